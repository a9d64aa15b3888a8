//! `luna node watch [HOSTLIST]`: the live view in the terminal, from the same event stream as
//! the web page (`GET /api/v1/live`, Server-Sent Events).
//!
//! On a terminal the screen is redrawn (counts per step, then one row per node with a progress
//! bar while it downloads), at most a few times a second; otherwise (logs, pipes) one line per
//! change. It ends when every watched node is `installed` or `booted`, or on Ctrl-C.
//!
//! The event parser ([`SseParser`]) and the view ([`Watch`]) are sans-IO; [`run`] owns the
//! connection and the terminal.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use luna_core::api::{LiveEvent, LiveNode};
use luna_core::model::NodeStatus;

use crate::client::{Client, ClientError};

/// Steps after which a node needs nothing more from the server.
pub const DONE_STEPS: [&str; 2] = ["installed", "booted"];
/// Least time between two redraws of the terminal.
const REDRAW: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("no node named {0}")]
    UnknownNodes(String),
    #[error("invalid hostlist '{list}': {reason}")]
    Hostlist { list: String, reason: String },
    #[error("the live stream from luna-server ended")]
    Ended,
    #[error("reading the live stream: {0}")]
    Read(std::io::Error),
    #[error("invalid live event '{event}': {reason}")]
    Event { event: String, reason: String },
}

/// Server-Sent Events, one line at a time: returns `(event, data)` when a blank line ends an
/// event. Comments (`:` keep-alives) and unknown fields are skipped.
#[derive(Debug, Default)]
pub struct SseParser {
    event: String,
    data: String,
}

impl SseParser {
    pub fn line(&mut self, line: &str) -> Option<(String, String)> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            if self.data.is_empty() && self.event.is_empty() {
                return None;
            }
            let event = std::mem::take(&mut self.event);
            let data = std::mem::take(&mut self.data);
            return Some((if event.is_empty() { "message".into() } else { event }, data));
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
            }
            _ => {}
        }
        None
    }
}

/// What the terminal shows: the watched nodes and their status.
#[derive(Debug, Default)]
pub struct Watch {
    /// Only these nodes (a hostlist), or every node.
    wanted: Option<BTreeSet<String>>,
    nodes: BTreeMap<String, Option<NodeStatus>>,
    /// Whether a snapshot arrived (the first event); before it nothing is known.
    seen: bool,
}

impl Watch {
    pub fn new(wanted: Option<BTreeSet<String>>) -> Self {
        Watch { wanted, ..Default::default() }
    }

    /// Applies an event; returns one line per watched node whose status changed.
    pub fn apply(&mut self, event: &LiveEvent) -> Vec<String> {
        let mut lines = Vec::new();
        let wanted = &self.wanted;
        let watched = |name: &str| wanted.as_ref().is_none_or(|w| w.contains(name));
        match event {
            LiveEvent::Snapshot(nodes) => {
                let first = !self.seen;
                self.seen = true;
                let old = std::mem::take(&mut self.nodes);
                for n in nodes.iter().filter(|n| watched(&n.name)) {
                    let status = n.status.clone().flatten();
                    if first || old.get(&n.name) != Some(&status) {
                        lines.push(line(&n.name, status.as_ref()));
                    }
                    self.nodes.insert(n.name.clone(), status);
                }
            }
            LiveEvent::Nodes(nodes) => {
                for LiveNode { name, status, .. } in nodes.iter().filter(|n| watched(&n.name)) {
                    let known = self.nodes.contains_key(name);
                    let entry = self.nodes.entry(name.clone()).or_default();
                    if let Some(st) = status {
                        if entry != st || !known {
                            *entry = st.clone();
                            lines.push(line(name, st.as_ref()));
                        }
                    } else if !known {
                        lines.push(line(name, None));
                    }
                }
            }
            LiveEvent::Gone(names) => {
                for n in names.iter().filter(|n| watched(n)) {
                    if self.nodes.remove(n).is_some() {
                        lines.push(format!("{n} deleted"));
                    }
                }
            }
            LiveEvent::Stats(_) => {}
        }
        lines
    }

    /// Watched names the server does not know (after the first snapshot).
    pub fn unknown(&self) -> Vec<String> {
        match &self.wanted {
            Some(w) if self.seen => w.iter().filter(|n| !self.nodes.contains_key(*n)).cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Every watched node is installed or booted (and there is at least one).
    pub fn done(&self) -> bool {
        self.seen
            && !self.nodes.is_empty()
            && self.nodes.values().all(|s| s.as_ref().is_some_and(|s| DONE_STEPS.contains(&s.step.as_str())))
    }

    /// Nodes per step, `none` for nodes that never reported.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for s in self.nodes.values() {
            *c.entry(s.as_ref().map_or("none".to_string(), |s| s.step.clone())).or_insert(0) += 1;
        }
        c
    }

    /// The whole screen: counts, then one row per node (at most `rows` of them; the rest
    /// summed up), `now` in Unix seconds for the ages.
    pub fn render(&self, rows: usize, now: u64) -> String {
        let counts = self.counts().iter().map(|(s, n)| format!("{s} {n}")).collect::<Vec<_>>().join("  ");
        let mut out = format!("{} nodes: {counts}\n\n", self.nodes.len());
        let width = self.nodes.keys().map(String::len).max().unwrap_or(4).max(4);
        out.push_str(&format!("{:<width$}  {:<13} {:<26} {:>6}  {}\n", "NODE", "STEP", "PROGRESS", "AGE", "MESSAGE"));
        for (i, (name, st)) in self.nodes.iter().enumerate() {
            if i >= rows {
                out.push_str(&format!("… and {} more\n", self.nodes.len() - rows));
                break;
            }
            let (step, bar, age, msg) = match st {
                Some(s) => (
                    s.step.as_str(),
                    s.progress.map(bar).unwrap_or_default(),
                    format!("{}s", now.saturating_sub(s.time)),
                    s.message.as_deref().unwrap_or(""),
                ),
                None => ("-", String::new(), String::new(), ""),
            };
            let row = format!("{name:<width$}  {step:<13} {bar:<26} {age:>6}  {msg}");
            out.push_str(row.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `[#########...........] 45%`-style bar of 20 cells.
fn bar(pct: u8) -> String {
    let filled = usize::from(pct.min(100)) / 5;
    format!("[{}{}] {pct}%", "#".repeat(filled), ".".repeat(20 - filled))
}

fn line(name: &str, st: Option<&NodeStatus>) -> String {
    match st {
        None => format!("{name} -"),
        Some(s) => {
            let mut l = format!("{name} {}", s.step);
            if let Some(p) = s.progress {
                l.push_str(&format!(" {p}%"));
            }
            if let Some(m) = &s.message {
                l.push_str(&format!(": {m}"));
            }
            l
        }
    }
}

/// Watches until every node of `hostlist` (every node when `None`) is installed or booted.
/// `terminal`: redraw the screen on `out`; otherwise one line per change.
pub fn run(client: &Client, hostlist: Option<&str>, out: &mut dyn Write, terminal: bool) -> Result<(), WatchError> {
    let wanted = match hostlist {
        Some(list) => Some(
            luna_core::hostlist::expand(list)
                .map_err(|e| WatchError::Hostlist { list: list.to_string(), reason: e.to_string() })?
                .into_iter()
                .collect::<BTreeSet<_>>(),
        ),
        None => None,
    };
    let stream = client.stream("/live")?;
    let mut reader = BufReader::new(stream);
    let mut parser = SseParser::default();
    let mut watch = Watch::new(wanted);
    let mut last_draw: Option<Instant> = None;
    let mut dirty = false;
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = reader.read_line(&mut buf).map_err(WatchError::Read)?;
        if n == 0 {
            return Err(WatchError::Ended);
        }
        let Some((name, data)) = parser.line(&buf) else { continue };
        let event = LiveEvent::parse(&name, &data)
            .map_err(|e| WatchError::Event { event: name.clone(), reason: e.to_string() })?;
        let lines = watch.apply(&event);
        let unknown = watch.unknown();
        if !unknown.is_empty() {
            return Err(WatchError::UnknownNodes(luna_core::hostlist::compress(&unknown)));
        }
        let done = watch.done();
        if terminal {
            dirty |= !lines.is_empty() || matches!(event, LiveEvent::Stats(_));
            if dirty && (done || last_draw.is_none_or(|t| t.elapsed() >= REDRAW)) {
                let rows = terminal_rows().saturating_sub(5).max(5);
                let screen = watch.render(rows, unix_now());
                // Home, clear, draw.
                let _ = write!(out, "\x1b[H\x1b[2J{screen}");
                let _ = out.flush();
                last_draw = Some(Instant::now());
                dirty = false;
            }
        } else {
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
            let _ = out.flush();
        }
        if done {
            let _ = writeln!(out, "all {} watched nodes are installed or booted", watch.nodes.len());
            return Ok(());
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Rows of the terminal on stdout (24 when unknown).
fn terminal_rows() -> usize {
    // SAFETY: TIOCGWINSZ writes a `winsize` into the struct we pass and nothing else; stdout
    // is a valid descriptor for the life of the process.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: as above; on failure (not a terminal) the struct stays zeroed.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if rc == 0 && ws.ws_row > 0 {
        usize::from(ws.ws_row)
    } else {
        24
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(step: &str, progress: Option<u8>) -> Option<NodeStatus> {
        Some(NodeStatus { step: step.into(), progress, time: 100, message: None })
    }

    fn node(name: &str, status: Option<NodeStatus>) -> LiveNode {
        LiveNode { name: name.into(), group: Some("g".into()), switch: None, status: Some(status) }
    }

    #[test]
    fn sse_lines_make_events() {
        let mut p = SseParser::default();
        assert_eq!(p.line(": keep-alive\n"), None);
        assert_eq!(p.line("event: nodes\n"), None);
        assert_eq!(p.line("data: [1,\r\n"), None);
        assert_eq!(p.line("data:2]\n"), None);
        assert_eq!(p.line("\n"), Some(("nodes".into(), "[1,\n2]".into())));
        assert_eq!(p.line("\n"), None, "a blank line alone is no event");
        assert_eq!(p.line("data: x\n"), None);
        assert_eq!(p.line("\n"), Some(("message".into(), "x".into())));
    }

    #[test]
    fn watch_follows_changes_and_ends_when_all_are_done() {
        let mut w = Watch::new(Some(["n1".to_string(), "n2".to_string()].into()));
        let lines =
            w.apply(&LiveEvent::Snapshot(vec![node("n1", None), node("n2", st("dhcp", None)), node("n3", None)]));
        assert_eq!(lines, ["n1 -", "n2 dhcp"]);
        assert!(w.unknown().is_empty());
        assert!(!w.done());
        // Changes of unwatched nodes are not shown; an unchanged status is not repeated.
        let lines = w.apply(&LiveEvent::Nodes(vec![
            LiveNode { name: "n1".into(), status: Some(st("download", Some(40))), ..Default::default() },
            LiveNode { name: "n3".into(), status: Some(st("booted", None)), ..Default::default() },
            LiveNode { name: "n2".into(), status: Some(st("dhcp", None)), ..Default::default() },
        ]));
        assert_eq!(lines, ["n1 download 40%"]);
        let screen = w.render(10, 105);
        assert!(screen.starts_with("2 nodes: dhcp 1  download 1\n"), "{screen}");
        assert!(screen.contains("\nn1    download      [########............] 40%     5s\n"), "{screen}");
        w.apply(&LiveEvent::Nodes(vec![LiveNode {
            name: "n1".into(),
            status: Some(st("installed", None)),
            ..Default::default()
        }]));
        assert!(!w.done());
        w.apply(&LiveEvent::Nodes(vec![LiveNode {
            name: "n2".into(),
            status: Some(st("booted", None)),
            ..Default::default()
        }]));
        assert!(w.done());
    }

    #[test]
    fn unknown_watched_nodes_are_named() {
        let mut w = Watch::new(Some(["n1".to_string(), "n9".to_string()].into()));
        assert!(w.unknown().is_empty(), "nothing is known before the snapshot");
        w.apply(&LiveEvent::Snapshot(vec![node("n1", None)]));
        assert_eq!(w.unknown(), ["n9"]);
        // Watching everything with no nodes at all never ends by itself.
        let mut all = Watch::new(None);
        all.apply(&LiveEvent::Snapshot(vec![]));
        assert!(!all.done());
    }
}
