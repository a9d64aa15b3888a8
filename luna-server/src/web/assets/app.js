// luna live view: plain JavaScript, no framework, no build step (embedded in luna-server).
// Data comes only from GET /api/v1/live (Server-Sent Events, see luna_core::api::LiveEvent).
'use strict';

// Step (as reported) → colour category. Anything unknown is "other".
const CATEGORY = {
  none: 'off', '': 'off', discovered: 'dhcp', dhcp: 'dhcp', ipxe: 'ipxe', kernel: 'kernel', initrd: 'kernel',
  plan: 'plan', prescript: 'plan', partscript: 'plan', bmc: 'plan',
  download: 'download', 'http-fallback': 'download', verify: 'download',
  unpack: 'unpack', personality: 'unpack', postscript: 'post',
  installed: 'installed', booted: 'booted', service: 'service', error: 'failed', failed: 'failed',
};
const ORDER = ['off', 'dhcp', 'ipxe', 'kernel', 'plan', 'download', 'unpack', 'post', 'installed', 'booted',
  'service', 'failed', 'other'];
const HISTORY_POINTS = 300;

const $ = (id) => document.getElementById(id);
// What the page knows, and what tests and measurements read (window.luna).
const luna = window.luna = {
  nodes: new Map(),      // name → {name, group, switch, status, el}
  counts: {},            // category → number of nodes
  applied: 0,            // node updates applied (snapshot entries not counted)
  snapshots: 0,
  firstRenderMs: null,   // performance.now() when the first snapshot was on screen
  lastApplyMs: null,     // performance.now() after the last batch of updates was applied
  applyMs: 0,            // time spent applying updates (script time)
  stats: null,
  points: [],            // [{t, got, sent}]
};

function category(step) {
  if (step == null) return 'off';
  return CATEGORY[step] || 'other';
}

function nodeCategory(n) {
  return n.status ? category(n.status.step) : 'off';
}

function token() {
  return sessionStorage.getItem('luna-token');
}

function takeTokenFromUrl() {
  const url = new URL(location.href);
  const t = url.searchParams.get('token');
  if (t) {
    sessionStorage.setItem('luna-token', t);
    url.searchParams.delete('token');
    // The token does not stay in the address bar or the history.
    history.replaceState(null, '', url.pathname + url.search + url.hash);
  }
}

function human(bytes) {
  if (bytes == null) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes, u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return (u === 0 ? v.toFixed(0) : v.toFixed(1)) + ' ' + units[u];
}

function age(time) {
  const s = Math.max(0, Math.round(Date.now() / 1000 - time));
  if (s < 120) return s + ' s';
  if (s < 7200) return Math.round(s / 60) + ' min';
  return Math.round(s / 3600) + ' h';
}

function naturalCompare(a, b) {
  return a.localeCompare(b, undefined, { numeric: true });
}

// ---- the grid ----

function sectionKey(n) {
  const by = $('by').value;
  return (by === 'switch' ? n.switch : n.group) || (by === 'switch' ? '(no switch)' : '(no group)');
}

function makeTile(n) {
  const el = document.createElement('div');
  el.className = 't';
  el.dataset.n = n.name;
  el.appendChild(document.createElement('i'));
  n.el = el;
  paint(n);
  return el;
}

function paint(n) {
  const cat = nodeCategory(n);
  const cls = 't s-' + cat;
  if (n.el.className !== cls) n.el.className = cls;
  if (cat === 'download') {
    const p = n.status && n.status.progress != null ? n.status.progress : 0;
    n.el.firstChild.style.width = (100 - p) + '%';
    n.el.firstChild.style.left = p + '%';
  }
}

function sectionFor(key, create) {
  let sec = document.querySelector('section.grp[data-key="' + CSS.escape(key) + '"]');
  if (!sec && create) {
    sec = document.createElement('section');
    sec.className = 'grp';
    sec.dataset.key = key;
    const h = document.createElement('h3');
    const tiles = document.createElement('div');
    tiles.className = 'tiles';
    sec.append(h, tiles);
    // Sections stay sorted by name.
    const after = [...$('grid').children].find((s) => naturalCompare(s.dataset.key, key) > 0);
    $('grid').insertBefore(sec, after || null);
  }
  return sec;
}

function renderAll() {
  const grid = $('grid');
  const sections = new Map();
  const names = [...luna.nodes.keys()].sort(naturalCompare);
  for (const name of names) {
    const n = luna.nodes.get(name);
    const key = sectionKey(n);
    if (!sections.has(key)) sections.set(key, []);
    sections.get(key).push(n);
  }
  const frag = document.createDocumentFragment();
  for (const key of [...sections.keys()].sort(naturalCompare)) {
    const sec = document.createElement('section');
    sec.className = 'grp';
    sec.dataset.key = key;
    const h = document.createElement('h3');
    const tiles = document.createElement('div');
    tiles.className = 'tiles';
    for (const n of sections.get(key)) tiles.appendChild(makeTile(n));
    sec.append(h, tiles);
    frag.appendChild(sec);
  }
  grid.replaceChildren(frag);
  renderHeadings();
}

function renderHeadings() {
  for (const sec of $('grid').children) {
    const count = sec.lastChild.childElementCount;
    sec.firstChild.textContent = sec.dataset.key + ' · ' + count;
  }
}

function place(n) {
  const sec = sectionFor(sectionKey(n), true);
  if (n.el.parentNode !== sec.lastChild) {
    const old = n.el.parentNode;
    sec.lastChild.appendChild(n.el);
    if (old && old.childElementCount === 0) old.parentNode.remove();
    headingsDirty = true;
  }
}

// ---- counts ----

function recount() {
  const counts = {};
  for (const n of luna.nodes.values()) {
    const c = nodeCategory(n);
    counts[c] = (counts[c] || 0) + 1;
  }
  luna.counts = counts;
  countsDirty = true;
}

function bump(cat, d) {
  luna.counts[cat] = (luna.counts[cat] || 0) + d;
  countsDirty = true;
}

function renderCounts() {
  const box = $('counts');
  if (!box.childElementCount) {
    for (const cat of ORDER) {
      const s = document.createElement('span');
      s.dataset.step = cat;
      s.title = cat === 'off' ? 'off or unknown' : cat;
      const i = document.createElement('i');
      i.className = 's-' + cat;
      const b = document.createElement('b');
      s.append(i, document.createTextNode(cat + ' '), b);
      box.appendChild(s);
    }
  }
  for (const s of box.children) {
    const v = luna.counts[s.dataset.step] || 0;
    s.lastChild.textContent = v;
    s.classList.toggle('zero', v === 0);
  }
  $('total').textContent = luna.nodes.size + ' nodes';
}

// ---- applying events (batched to one DOM pass per frame) ----

let countsDirty = false;
let headingsDirty = false;
let scheduled = false;
const queue = [];

function schedule() {
  if (scheduled) return;
  scheduled = true;
  // A frame when the tab shows; a timer as well, so a hidden or headless tab is not left behind.
  const run = () => { if (scheduled) { scheduled = false; flush(); } };
  requestAnimationFrame(run);
  setTimeout(run, 100);
}

function flush() {
  const t0 = performance.now();
  const batch = queue.splice(0);
  for (const [kind, data] of batch) {
    if (kind === 'snapshot') applySnapshot(data);
    else if (kind === 'nodes') applyNodes(data);
    else if (kind === 'gone') applyGone(data);
  }
  if (countsDirty) { renderCounts(); countsDirty = false; }
  if (headingsDirty) { renderHeadings(); headingsDirty = false; }
  const t1 = performance.now();
  if (batch.some(([k]) => k !== 'snapshot')) {
    luna.applyMs += t1 - t0;
    luna.lastApplyMs = t1;
  }
}

function applySnapshot(list) {
  luna.nodes.clear();
  for (const n of list) luna.nodes.set(n.name, { name: n.name, group: n.group, switch: n.switch, status: n.status });
  recount();
  renderAll();
  luna.snapshots++;
  if (luna.firstRenderMs == null) {
    // Forces layout, so the figure includes it.
    void document.body.offsetHeight;
    luna.firstRenderMs = performance.now();
  }
}

function applyNodes(list) {
  for (const u of list) {
    let n = luna.nodes.get(u.name);
    if (!n) {
      n = { name: u.name, group: u.group, switch: u.switch, status: null };
      luna.nodes.set(u.name, n);
      bump('off', 1);
      makeTile(n);
      place(n);
    }
    const before = nodeCategory(n);
    if (u.group !== undefined) {
      n.group = u.group;
      n.switch = u.switch;
      place(n);
    }
    if (u.status !== undefined) n.status = u.status;
    const after = nodeCategory(n);
    if (before !== after) { bump(before, -1); bump(after, 1); }
    paint(n);
    luna.applied++;
  }
}

function applyGone(names) {
  for (const name of names) {
    const n = luna.nodes.get(name);
    if (!n) continue;
    bump(nodeCategory(n), -1);
    const tiles = n.el.parentNode;
    n.el.remove();
    if (tiles && tiles.childElementCount === 0) tiles.parentNode.remove();
    luna.nodes.delete(name);
    headingsDirty = true;
  }
}

// ---- swarm and bytes ----

function applyStats(s) {
  luna.stats = s;
  const body = $('images').tBodies[0];
  const rows = s.images.map((i) => {
    const tr = document.createElement('tr');
    if (i.current) tr.className = 'current';
    for (const v of [i.osimage, i.revision, i.seeders, i.leechers, i.completed, human(i.seeder_uploaded_bytes)]) {
      const td = document.createElement('td');
      td.textContent = v;
      tr.appendChild(td);
    }
    return tr;
  });
  body.replaceChildren(...rows);
  const sent = s.seeder_bytes + s.http_bytes;
  const got = s.node_bytes_from_peers + s.node_bytes_over_http;
  $('rate').textContent = human(s.upload_rate) + '/s';
  $('sent').textContent = human(sent) + ' (seeder ' + human(s.seeder_bytes) + ', http ' + human(s.http_bytes) + ')';
  $('peers').textContent = human(s.node_bytes_from_peers);
  $('nodehttp').textContent = human(s.node_bytes_over_http);
  // What the nodes got beyond what the server sent came from each other.
  const saved = Math.max(0, got - sent);
  $('saving').textContent = got > 0 ? human(saved) + ' (' + Math.round(100 * saved / got) + ' %)' : '–';
  luna.points.push({ t: s.time, got, sent });
  if (luna.points.length > HISTORY_POINTS) luna.points.shift();
  drawChart();
}

function drawChart() {
  const c = $('chart');
  const g = c.getContext('2d');
  const w = c.width, h = c.height;
  g.clearRect(0, 0, w, h);
  const pts = luna.points;
  if (pts.length < 2) return;
  const max = Math.max(1, ...pts.map((p) => Math.max(p.got, p.sent)));
  const t0 = pts[0].t, t1 = Math.max(pts[pts.length - 1].t, t0 + 1);
  const x = (t) => 4 + (w - 8) * (t - t0) / (t1 - t0);
  const y = (v) => h - 14 - (h - 20) * v / max;
  const line = (key, colour) => {
    g.strokeStyle = colour;
    g.lineWidth = 2;
    g.beginPath();
    pts.forEach((p, i) => (i ? g.lineTo(x(p.t), y(p[key])) : g.moveTo(x(p.t), y(p[key]))));
    g.stroke();
  };
  const css = getComputedStyle(document.documentElement);
  line('got', css.getPropertyValue('--installed'));
  line('sent', css.getPropertyValue('--kernel'));
  g.fillStyle = css.getPropertyValue('--muted');
  g.font = '10px system-ui, sans-serif';
  g.fillText(human(max), 4, 10);
  g.fillText(Math.round(t1 - t0) + ' s', w - 40, h - 2);
}

// ---- a node's last messages ----

async function showDetail(name) {
  const r = await fetch('/api/v1/live/node/' + encodeURIComponent(name), {
    headers: { Authorization: 'Bearer ' + token() },
  });
  $('detail').hidden = false;
  $('detail-name').textContent = name;
  const list = $('detail-history');
  list.replaceChildren();
  if (!r.ok) {
    $('detail-status').textContent = 'cannot read the node: ' + r.status;
    return;
  }
  const d = await r.json();
  const st = d.status;
  $('detail-status').textContent = st
    ? st.step + (st.progress != null ? ' ' + st.progress + ' %' : '') + ' · ' + age(st.time) + ' ago' +
      (st.message ? ' · ' + st.message : '')
    : 'no status reported';
  for (const h of d.history.slice().reverse()) {
    const li = document.createElement('li');
    li.className = 's-' + category(h.step);
    li.textContent = new Date(h.time * 1000).toLocaleTimeString() + ' ' + h.step +
      (h.progress != null ? ' ' + h.progress + ' %' : '') + (h.message ? ': ' + h.message : '');
    list.appendChild(li);
  }
}

// ---- connection ----

let source = null;

function connect() {
  const t = token();
  if (!t) { showLogin(''); return; }
  $('login').hidden = true;
  if (source) source.close();
  source = new EventSource('/api/v1/live?token=' + encodeURIComponent(t));
  const on = (kind) => source.addEventListener(kind, (e) => { queue.push([kind, JSON.parse(e.data)]); schedule(); });
  on('snapshot'); on('nodes'); on('gone');
  source.addEventListener('stats', (e) => applyStats(JSON.parse(e.data)));
  source.onopen = () => { $('conn').textContent = 'live'; $('conn').className = 'conn on'; };
  source.onerror = async () => {
    $('conn').textContent = 'reconnecting…';
    $('conn').className = 'conn off';
    if (source.readyState === EventSource.CLOSED) {
      // Closed for good: a wrong token, or the server is gone. Ask which.
      const r = await fetch('/api/v1/live/node/-', { headers: { Authorization: 'Bearer ' + t } }).catch(() => null);
      if (r && r.status === 401) {
        sessionStorage.removeItem('luna-token');
        showLogin('the server refused this token');
      } else {
        setTimeout(connect, 2000);
      }
    }
  };
}

function showLogin(msg) {
  $('login').hidden = false;
  $('login-error').textContent = msg;
  $('conn').textContent = 'not connected';
  $('conn').className = 'conn off';
}

$('login').addEventListener('submit', (e) => {
  e.preventDefault();
  sessionStorage.setItem('luna-token', $('token').value.trim());
  $('token').value = '';
  connect();
});
$('by').addEventListener('change', () => renderAll());
$('grid').addEventListener('click', (e) => {
  const name = e.target.closest('.t')?.dataset.n;
  if (name) showDetail(name);
});
// The step and its age on hover, computed when asked (ages move on).
$('grid').addEventListener('mouseover', (e) => {
  const el = e.target.closest('.t');
  const n = el && luna.nodes.get(el.dataset.n);
  if (!n) return;
  const st = n.status;
  el.title = n.name + ' · ' + (st
    ? st.step + (st.progress != null ? ' ' + st.progress + ' %' : '') + ' · ' + age(st.time) + ' ago' +
      (st.message ? '\n' + st.message : '')
    : 'no status');
});
$('detail-close').addEventListener('click', () => { $('detail').hidden = true; });

takeTokenFromUrl();
renderCounts();
connect();
