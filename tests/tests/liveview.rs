//! The live view (issue 18) against the real luna-server binary on 127.0.0.1: a headless
//! Chromium (Debian's `chromium`, driven over the DevTools protocol) opens `GET /`, the test
//! posts status changes through the REST API, and the page must show them without a reload
//! (Server-Sent Events); `/metrics` is read with a Prometheus text parser; `luna node watch`
//! follows the same stream. A second test measures the page with 4096 nodes.
//!
//! Gated by `LUNA_TEST_PRIVILEGED=1` (`privileged()`): it needs chromium (scripts/install-deps.sh).
//! The screenshots go to `tests/work/liveview/`.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use luna_tests::{cargo_bin, free_port, privileged, work_dir, Browser, ChildGuard};
use serde_json::{json, Value};

/// luna-server on 127.0.0.1 with no DHCP, TFTP or seeder (nothing here needs them).
struct Server {
    /// `https://127.0.0.1:PORT`: the admin API, the page, `/metrics`.
    url: String,
    /// `http://127.0.0.1:PORT`: the boot port (scripts, tracker).
    boot_url: String,
    ca: PathBuf,
    /// Trusts the server's CA (and nothing else).
    agent: ureq::Agent,
    token: String,
    child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        std::fs::create_dir_all(work_dir()).unwrap();
        let dir = tempfile::Builder::new().prefix("liveview-").tempdir_in(work_dir()).unwrap();
        let port = free_port().unwrap();
        let api_port = free_port().unwrap();
        let d = dir.path();
        let config = d.join("luna.toml");
        std::fs::write(
            &config,
            format!(
                "store = \"sqlite://{db}\"\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{token}\"\n\
                 data_dir = \"{data}\"\n[tftp]\nenabled = false\n[image]\nseed = false\n\
                 [http]\napi_listen = \"127.0.0.1:{api_port}\"\n",
                db = d.join("luna.db").display(),
                token = d.join("token").display(),
                data = d.join("data").display(),
            ),
        )
        .unwrap();
        let bin = cargo_bin("luna-server").unwrap();
        let init = Command::new(&bin).arg("--config").arg(&config).arg("init").output().unwrap();
        assert!(init.status.success(), "luna-server init: {}", String::from_utf8_lossy(&init.stderr));
        let child = ChildGuard::spawn(Command::new(&bin).arg("--config").arg(&config), "luna-server-liveview").unwrap();
        child.wait_for("http listening", Duration::from_secs(60)).unwrap();
        let token = std::fs::read_to_string(d.join("token")).unwrap().trim().to_string();
        let ca = d.join("data/tls/ca.pem");
        let tls = luna_cli::client::tls_config(&ca).unwrap();
        let agent = ureq::AgentBuilder::new().tls_config(tls).build();
        Server {
            url: format!("https://127.0.0.1:{api_port}"),
            boot_url: format!("http://127.0.0.1:{port}"),
            ca,
            agent,
            token,
            child,
            _dir: dir,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let req = self
            .agent
            .request(method, &format!("{}/api/v1{path}", self.url))
            .set("Authorization", &format!("Bearer {}", self.token));
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(r) => r.into_json().unwrap_or(Value::Null),
            Err(ureq::Error::Status(code, r)) => panic!("{method} {path}: {code} {}", r.into_string().unwrap()),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    /// Sets a node's status the way an admin can (PATCH), which is a status write like any.
    fn status(&self, node: &str, step: &str, progress: Option<u8>, message: Option<&str>) {
        let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let status = json!({ "step": step, "progress": progress, "time": time, "message": message });
        self.call("PATCH", &format!("/node/{node}"), Some(json!({ "status": status })));
    }

    /// Osimage `img`, groups, and nodes (`(hostlist, group)`).
    fn objects(&self, nodes: &[(&str, &str)]) {
        self.call("POST", "/osimage", Some(json!({ "name": "img", "path": "/nonexistent/img" })));
        let mut groups: Vec<&str> = nodes.iter().map(|(_, g)| *g).collect();
        groups.dedup();
        for g in groups {
            self.call("POST", "/group", Some(json!({ "name": g, "osimage": "img" })));
        }
        for (list, group) in nodes {
            self.call("POST", "/node", Some(json!({ "name": list, "group": group })));
        }
    }

    fn metrics(&self) -> prometheus_parse::Scrape {
        let text = self
            .agent
            .get(&format!("{}/metrics", self.url))
            .set("Authorization", &format!("Bearer {}", self.token))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("/metrics parses")
    }
}

fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or(0.0)
}

fn out_dir() -> PathBuf {
    let d = work_dir().join("liveview");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn page(server: &Server, width: u32, height: u32) -> Browser {
    let mut b = Browser::launch(width, height).unwrap();
    b.navigate(&format!("{}/?token={}", server.url, server.token)).unwrap();
    b
}

/// The class of node `n`'s tile.
fn tile(b: &mut Browser, n: &str) -> String {
    b.eval(&format!("document.querySelector('[data-n=\"{n}\"]')?.className ?? ''"))
        .unwrap()
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// The header counts, category → number.
fn counts(b: &mut Browser) -> HashMap<String, u64> {
    let v = b
        .eval("Object.fromEntries([...document.querySelectorAll('#counts span')].map(s => [s.dataset.step, +s.lastChild.textContent]))")
        .unwrap();
    serde_json::from_value(v).unwrap()
}

#[test]
fn page_follows_status_reports_live() {
    if !privileged() {
        return;
    }
    let server = Server::start();
    server.objects(&[("compute[01-12]", "compute"), ("gpu[01-04]", "gpu")]);
    let before = server.metrics();

    let mut b = page(&server, 1280, 720);
    b.wait_for("window.luna && luna.snapshots === 1 && luna.nodes.size === 16", Duration::from_secs(30)).unwrap();
    // The token left the address bar; the tab keeps it.
    assert_eq!(b.eval("location.search").unwrap(), json!(""));
    assert_eq!(b.eval("sessionStorage.getItem('luna-token')").unwrap(), json!(server.token));
    assert_eq!(b.eval("document.querySelectorAll('#grid .t').length").unwrap(), json!(16));
    assert_eq!(
        b.eval("[...document.querySelectorAll('section.grp h3')].map(h => h.textContent)").unwrap(),
        json!(["compute · 12", "gpu · 4"])
    );
    assert_eq!(counts(&mut b)["off"], 16);
    // Anything that survives until the end proves there was no reload.
    b.eval("window.noReload = 42").unwrap();

    // One report, timed from the request to the tile's new class.
    let t0 = Instant::now();
    server.status("compute01", "dhcp", None, Some("dhcp acked 10.0.0.2"));
    b.wait_for("document.querySelector('[data-n=compute01]').className === 't s-dhcp'", Duration::from_secs(10))
        .unwrap();
    println!("liveview: one status report reached the tile in {:?}", t0.elapsed());

    let steps: &[(&str, &str, Option<u8>, Option<&str>)] = &[
        ("compute02", "ipxe", None, Some("boot script served")),
        ("compute03", "kernel", None, Some("kernel fetched")),
        ("compute04", "plan", None, Some("install plan fetched")),
        ("compute05", "download", Some(40), None),
        ("compute06", "unpack", None, None),
        ("compute07", "postscript", None, None),
        ("compute08", "installed", None, Some("img revision 1 installed, switching root")),
        ("compute09", "booted", None, None),
        ("compute10", "service", None, None),
        ("gpu01", "error", None, Some("download: sha256 mismatch")),
        ("gpu02", "booted", None, None),
    ];
    for (n, step, progress, msg) in steps {
        server.status(n, step, *progress, *msg);
    }
    b.wait_for("document.querySelector('[data-n=gpu02]').className === 't s-booted'", Duration::from_secs(10)).unwrap();
    let want = [
        ("compute01", "t s-dhcp"),
        ("compute02", "t s-ipxe"),
        ("compute03", "t s-kernel"),
        ("compute04", "t s-plan"),
        ("compute05", "t s-download"),
        ("compute06", "t s-unpack"),
        ("compute07", "t s-post"),
        ("compute08", "t s-installed"),
        ("compute09", "t s-booted"),
        ("compute10", "t s-service"),
        ("compute11", "t s-off"),
        ("gpu01", "t s-failed"),
        ("gpu02", "t s-booted"),
        ("gpu03", "t s-off"),
    ];
    for (n, class) in want {
        assert_eq!(tile(&mut b, n), class, "tile of {n}");
    }
    // The download's bar covers what is still to come: 60 % of the tile from 40 %.
    assert_eq!(b.eval("document.querySelector('[data-n=compute05] i').style.left").unwrap(), json!("40%"));
    let c = counts(&mut b);
    let expect: HashMap<&str, u64> = [
        ("off", 4),
        ("dhcp", 1),
        ("ipxe", 1),
        ("kernel", 1),
        ("plan", 1),
        ("download", 1),
        ("unpack", 1),
        ("post", 1),
        ("installed", 1),
        ("booted", 2),
        ("service", 1),
        ("failed", 1),
        ("other", 0),
    ]
    .into();
    for (k, v) in expect {
        assert_eq!(c[k], v, "count of {k}: {c:?}");
    }

    // The failed tile leads to its last messages.
    server.status("gpu01", "error", None, Some("download: sha256 mismatch, retry 2"));
    b.eval("document.querySelector('[data-n=gpu01]').click()").unwrap();
    b.wait_for("document.getElementById('detail-history').children.length === 2", Duration::from_secs(10)).unwrap();
    let status = b.eval("document.getElementById('detail-status').textContent").unwrap();
    assert!(status.as_str().unwrap().contains("sha256 mismatch, retry 2"), "{status}");
    let history = b.eval("document.getElementById('detail-history').textContent").unwrap();
    assert!(history.as_str().unwrap().contains("error: download: sha256 mismatch"), "{history}");

    // A node added and one deleted while the page is open.
    server.call("POST", "/node", Some(json!({ "name": "gpu05", "group": "gpu" })));
    server.call("DELETE", "/node/compute12", None);
    b.wait_for("luna.nodes.size === 16 && !!document.querySelector('[data-n=gpu05]') && !document.querySelector('[data-n=compute12]')", Duration::from_secs(10)).unwrap();
    assert_eq!(
        b.eval("[...document.querySelectorAll('section.grp h3')].map(h => h.textContent)").unwrap(),
        json!(["compute · 11", "gpu · 5"])
    );
    assert_eq!(b.eval("window.noReload === 42 && luna.snapshots === 1").unwrap(), json!(true), "the page reloaded");
    // Stats arrive every second (no images here: empty table, zero bytes).
    b.wait_for("luna.stats && luna.points.length >= 2", Duration::from_secs(10)).unwrap();
    b.eval("document.querySelector('[data-n=gpu01]').click()").unwrap();
    b.wait_for("!document.getElementById('detail').hidden", Duration::from_secs(5)).unwrap();
    let shot = out_dir().join("page.png");
    b.screenshot(&shot).unwrap();
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "screenshot {} is too small", shot.display());
    println!("liveview: screenshot {}", shot.display());

    // Metrics: read with a real parser. The boot path and the tracker count what they serve.
    let boot = ureq::get(&format!("{}/boot/ipxe?mac=52:54:00:aa:bb:01", server.boot_url)).call().unwrap();
    assert!(boot.into_string().unwrap().starts_with("#!ipxe"));
    let hash = "%124Vx%9a%bc%de%f0%124Vx%9a%bc%de%f0%124Vx";
    let announce = format!(
        "{}/announce?info_hash={hash}&peer_id=-XX0001-000000000001&port=6999&uploaded=0&downloaded=0&left=5&event=started",
        server.boot_url
    );
    ureq::get(&announce).call().unwrap();
    ureq::get(&format!("{}/announce?info_hash=short", server.boot_url)).call().unwrap();
    // the node gauges are sampled once a second: wait for the sample that has the last changes
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = server.metrics();
    while sample(&after, "luna_nodes", &[("step", "booted")]) != 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after = server.metrics();
    }
    let moved = |name: &str, labels: &[(&str, &str)]| sample(&after, name, labels) - sample(&before, name, labels);
    assert_eq!(moved("luna_boot_scripts_total", &[("outcome", "served")]), 1.0);
    assert_eq!(moved("luna_tracker_announces_total", &[("event", "started")]), 1.0);
    assert_eq!(moved("luna_tracker_announces_total", &[("event", "refused")]), 1.0);
    // Admin patches are status writes, not reports from nodes: not counted as reports.
    assert_eq!(moved("luna_status_reports_total", &[("step", "booted")]), 0.0);
    assert_eq!(sample(&after, "luna_nodes", &[("step", "booted")]), 2.0);
    assert_eq!(sample(&after, "luna_nodes", &[("step", "none")]), 4.0);
    assert!(sample(&after, "luna_live_clients", &[]) >= 1.0);
    let commits = after.samples.iter().find(|s| s.metric == "luna_store_commit_seconds").expect("commit histogram");
    let prometheus_parse::Value::Histogram(buckets) = &commits.value else { panic!("{commits:?}") };
    assert!(buckets.last().unwrap().count >= 20.0, "every status write is a commit: {buckets:?}");
    // Without the token (and not on the allow list): refused.
    let anon = server.agent.get(&format!("{}/metrics", server.url)).call();
    assert!(matches!(anon, Err(ureq::Error::Status(401, _))), "{anon:?}");
    let anon = server.agent.get(&format!("{}/api/v1/live", server.url)).call();
    assert!(matches!(anon, Err(ureq::Error::Status(401, _))), "{anon:?}");

    // `luna node watch` on the same stream: one line per change off a terminal, and it ends
    // when every watched node is installed or booted.
    let mut watch = Command::new(cargo_bin("luna").unwrap())
        .args(["node", "watch", "compute[08-09],gpu02"])
        .env("LUNA_SERVER", &server.url)
        .env("LUNA_CA", &server.ca)
        .env("LUNA_TOKEN", &server.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = watch.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = watch.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "luna node watch did not end");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap();
    assert!(status.success(), "luna node watch: {status}: {out}");
    assert!(out.contains("compute08 installed: img revision 1 installed"), "{out}");
    assert!(out.contains("gpu02 booted"), "{out}");
    assert!(out.ends_with("all 3 watched nodes are installed or booted\n"), "{out}");
    // A node it cannot know is an error naming it, and nothing waits.
    let bad = Command::new(cargo_bin("luna").unwrap())
        .args(["node", "watch", "compute01,nosuch[1-2]"])
        .env("LUNA_SERVER", &server.url)
        .env("LUNA_CA", &server.ca)
        .env("LUNA_TOKEN", &server.token)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("no node named nosuch[1-2]"), "{err}");
    // Still alive (not a crash that happened to end the stream).
    let mut server = server;
    assert!(server.child.is_running());
}

/// Time to first render and to apply 1000 updates with 4096 nodes, printed (figures for the
/// README; nothing is asserted about speed, only that everything arrived).
#[test]
fn page_with_4096_nodes() {
    if !privileged() {
        return;
    }
    let server = Server::start();
    let groups: Vec<(String, String)> = (0..4).map(|r| (format!("rack{r}n[0001-1024]"), format!("rack{r}"))).collect();
    let refs: Vec<(&str, &str)> = groups.iter().map(|(l, g)| (l.as_str(), g.as_str())).collect();
    server.objects(&refs);

    let mut b = page(&server, 1600, 1000);
    b.wait_for("window.luna && luna.firstRenderMs !== null && luna.nodes.size === 4096", Duration::from_secs(60))
        .unwrap();
    let first = b.eval("luna.firstRenderMs").unwrap().as_f64().unwrap();
    assert_eq!(b.eval("document.querySelectorAll('#grid .t').length").unwrap(), json!(4096));

    // 1000 updates from 8 concurrent writers, as separate reports.
    let names: Vec<String> = (0..1000).map(|i| format!("rack{}n{:04}", i % 4, i / 4 + 1)).collect();
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let t_start = b.eval("performance.now()").unwrap().as_f64().unwrap();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(n) = names.get(i) else { return };
                server.status(n, "download", Some((i % 100) as u8), None);
            });
        }
    });
    let posted = start.elapsed();
    b.wait_for("document.querySelectorAll('#grid .t.s-download').length === 1000", Duration::from_secs(60)).unwrap();
    let shown = start.elapsed();
    let apply_ms = b.eval("luna.applyMs").unwrap().as_f64().unwrap();
    let last = b.eval("luna.lastApplyMs").unwrap().as_f64().unwrap();
    assert_eq!(counts(&mut b)["download"], 1000);
    assert_eq!(counts(&mut b)["off"], 3096);
    let shot = out_dir().join("page-4096.png");
    b.screenshot(&shot).unwrap();
    println!(
        "liveview 4096 nodes: first render {first:.0} ms after navigation; 1000 updates: posted in {posted:?}, \
         all on the page {shown:?} after the first post (page {:.0} ms after it), script time applying them \
         {apply_ms:.0} ms; screenshot {}",
        last - t_start,
        shot.display()
    );
}
