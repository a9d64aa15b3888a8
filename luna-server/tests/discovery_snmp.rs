//! Switch-port autodiscovery against a real SNMP agent: snmpsim (installed by
//! scripts/install-deps.sh into /opt/luna-venv) plays the switches, serving data files this test
//! writes. One snmpsim process, two endpoints (127.0.77.1 and .2, UDP 16161); it picks the data
//! file by community, so a community is a switch's state:
//! - `qbridge`: Q-BRIDGE dot1qTpFdbPort, ifName; ports 1-6 and 7 one MAC each, port 47 (listed
//!   as uplink) two MACs, port 48 six MACs (over the threshold of 4);
//! - `qbridge-later`: the same switch after the MAC of port 3 left;
//! - `bridge`: BRIDGE-MIB dot1dTpFdbPort, ifDescr only (`swpN`).
//!
//! Gated by `image_support::privileged()` (it needs the test dependencies installed).

mod image_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::Router;
use luna_core::api::SwitchMacs;
use luna_server::api::router;
use luna_server::boot::{self, BootContext, BootTokens};
use luna_server::discovery::{self, Discovery, DiscoveryConfig};
use luna_server::http::AppState;
use luna_server::service::Service;
use serde_json::{json, Value};
use tower::ServiceExt;

const TOKEN: &str = "admin-token";
const PORT: u16 = 16161;

struct Sim(Child);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn snmpsim() -> PathBuf {
    let venv = std::env::var("LUNA_VENV").unwrap_or_else(|_| "/opt/luna-venv".into());
    let p = Path::new(&venv).join("bin/snmpsim-command-responder");
    assert!(p.is_file(), "{} missing: run scripts/install-deps.sh", p.display());
    p
}

fn mac_arcs(last: u8, site: u8) -> String {
    format!("82.84.0.{site}.0.{last}")
}

/// `OID|type|value` lines, sorted by OID as snmpsim wants them.
fn write_snmprec(path: &Path, mut rows: Vec<(String, &str, String)>) {
    let key = |o: &str| o.split('.').map(|a| a.parse::<u64>().unwrap()).collect::<Vec<_>>();
    rows.sort_by_key(|(o, _, _)| key(o));
    let text: String = rows.iter().map(|(o, t, v)| format!("{o}|{t}|{v}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn qbridge(without_port3: bool) -> Vec<(String, &'static str, String)> {
    let mut rows = Vec::new();
    let mut fdb = |last: u8, port: u32| {
        rows.push((format!("1.3.6.1.2.1.17.7.1.2.2.1.2.1.{}", mac_arcs(last, 0xaa)), "2", port.to_string()));
    };
    for p in 1..=7u8 {
        if !(without_port3 && p == 3) {
            fdb(p, u32::from(p));
        }
    }
    fdb(100, 47);
    fdb(101, 47);
    for m in 110..116 {
        fdb(m, 48);
    }
    for p in (1..=7).chain([47, 48]) {
        rows.push((format!("1.3.6.1.2.1.17.1.4.1.2.{p}"), "2", (1000 + p).to_string()));
        rows.push((format!("1.3.6.1.2.1.31.1.1.1.1.{}", 1000 + p), "4", format!("Gi1/0/{p}")));
        rows.push((format!("1.3.6.1.2.1.2.2.1.2.{}", 1000 + p), "4", format!("GigabitEthernet1/0/{p}")));
    }
    rows
}

fn bridge() -> Vec<(String, &'static str, String)> {
    let mut rows = Vec::new();
    for p in 1..=4u32 {
        rows.push((format!("1.3.6.1.2.1.17.4.3.1.2.{}", mac_arcs(p as u8, 0xbb)), "2", p.to_string()));
        rows.push((format!("1.3.6.1.2.1.17.1.4.1.2.{p}"), "2", p.to_string()));
        rows.push((format!("1.3.6.1.2.1.2.2.1.2.{p}"), "4", format!("swp{p}")));
    }
    rows
}

fn start_sim(dir: &Path) -> Sim {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_snmprec(&data.join("qbridge.snmprec"), qbridge(false));
    write_snmprec(&data.join("qbridge-later.snmprec"), qbridge(true));
    write_snmprec(&data.join("bridge.snmprec"), bridge());
    let mut cmd = Command::new(snmpsim());
    cmd.arg(format!("--data-dir={}", data.display()))
        .arg(format!("--cache-dir={}", dir.join("cache").display()))
        .arg(format!("--agent-udpv4-endpoint=127.0.77.1:{PORT}"))
        .arg(format!("--agent-udpv4-endpoint=127.0.77.2:{PORT}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("snmpsim.log")).unwrap());
    if image_support::is_root() {
        cmd.args(["--process-user=root", "--process-group=root"]);
    }
    Sim(cmd.spawn().expect("start snmpsim"))
}

struct Env {
    app: Router,
    service: Service,
    discovery: Arc<Discovery>,
    _dir: tempfile::TempDir,
}

async fn env(config: DiscoveryConfig) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = luna_server::store::open("sqlite://:memory:").await.unwrap();
    let service = Service::new(store);
    service.ensure_cluster("test").await.unwrap();
    let discovery = Discovery::new(service.clone(), config, Arc::new(discovery::transport::Udp));
    let boot =
        BootContext::new(BootTokens::new(TOKEN.as_bytes()), dir.path().to_path_buf()).with_discovery(discovery.clone());
    let state = Arc::new(AppState::new(service.clone(), TOKEN.into()));
    let app = router(state.clone())
        .merge(luna_server::discovery::http::router(discovery.clone(), state.clone()))
        .merge(boot::router(state, boot));
    let e = Env { app, service, discovery, _dir: dir };
    for (path, body) in [
        ("/network", json!({"name": "cluster", "cidr": "10.141.0.0/16"})),
        ("/network", json!({"name": "mgmt", "cidr": "127.0.77.0/24"})),
        ("/osimage", json!({"name": "compute", "path": "/images/compute"})),
        (
            "/group",
            json!({"name": "compute", "osimage": "compute", "interfaces": [{"name": "BOOTIF", "network": "cluster"}]}),
        ),
        (
            "/switch",
            json!({"name": "sw1", "network": "mgmt", "ip": "127.0.77.1", "community": "qbridge", "uplinks": [47]}),
        ),
        (
            "/switch",
            json!({"name": "sw2", "network": "mgmt", "ip": "127.0.77.2", "community": "bridge",
                   "oid": "1.3.6.1.2.1.17.4.3.1.2"}),
        ),
    ] {
        let (s, v) = e.call("POST", &format!("/api/v1{path}"), Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{path}: {v}");
    }
    e
}

impl Env {
    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (s, text) = self.call_text(method, uri, body).await;
        (s, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn call_text(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, String) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(body.map(|b| Body::from(b.to_string())).unwrap_or_default())
            .unwrap();
        let remote: SocketAddr = "10.141.200.1:68".parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(remote));
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn macs(&self) -> Vec<SwitchMacs> {
        let (s, v) = self.call("GET", "/api/v1/discovery/macs", None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    /// Polls until both switches have a table (snmpsim indexes its files first).
    async fn until_learned(&self) -> Vec<SwitchMacs> {
        let start = Instant::now();
        loop {
            self.discovery.poll_all().await.unwrap();
            let m = self.macs().await;
            if m.iter().all(|s| s.polled_at.is_some()) {
                return m;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "snmpsim never answered: {m:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn add_node(&self, name: &str, switch: &str, port: Value) {
        let body = json!({"name": name, "group": "compute", "switch": switch, "port": port});
        let (s, v) = self.call("POST", "/api/v1/node", Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
}

/// The tests share the simulated switches' addresses (127.0.77.1-2): one at a time, or one
/// test's simulator going away answers another test's queries with "port unreachable".
static SWITCHES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config() -> DiscoveryConfig {
    DiscoveryConfig { snmp_port: PORT, timeout_ms: 300, tries: 2, max_repetitions: 5, ..Default::default() }
}

fn row<'a>(m: &'a [SwitchMacs], switch: &str, mac: &str) -> Option<&'a luna_core::api::LearnedMac> {
    let mac: luna_core::MacAddr = mac.parse().unwrap();
    m.iter().find(|s| s.switch == switch)?.macs.iter().find(|r| r.mac == mac)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learns_both_mibs_marks_uplinks_and_expires_macs() {
    if !image_support::privileged() {
        return;
    }
    let _switches = SWITCHES.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _sim = start_sim(dir.path());
    let e = env(config()).await;
    e.add_node("node007", "sw1", json!(7)).await;
    e.add_node("node003", "sw1", json!("Gi1/0/3")).await;
    let m = e.until_learned().await;
    for s in &m {
        assert_eq!(s.error, None, "{s:?}");
    }
    // Q-BRIDGE with ifName (max_repetitions 5: the walks take several GETBULKs each).
    let sw1 = &m.iter().find(|s| s.switch == "sw1").unwrap().macs;
    assert_eq!(sw1.len(), 7 + 2 + 6, "{sw1:?}");
    let r7 = row(&m, "sw1", "52:54:00:aa:00:07").unwrap();
    assert_eq!((r7.port, r7.port_name.as_deref(), r7.if_index), (7, Some("Gi1/0/7"), Some(1007)));
    assert_eq!((r7.node.as_deref(), r7.uplink.as_deref()), (Some("node007"), None));
    assert_eq!(row(&m, "sw1", "52:54:00:aa:00:03").unwrap().node.as_deref(), Some("node003"));
    // Uplinks: listed (47, two MACs) and by threshold (48, six MACs > 4); never a node there.
    let r47 = row(&m, "sw1", "52:54:00:aa:00:64").unwrap();
    assert_eq!((r47.port, r47.uplink.as_deref()), (47, Some("listed")));
    let r48 = row(&m, "sw1", "52:54:00:aa:00:6e").unwrap();
    assert_eq!((r48.port, r48.uplink.as_deref()), (48, Some("threshold")));
    assert_eq!(e.discovery.locate("52:54:00:aa:00:6e".parse().unwrap()), vec![]);
    // BRIDGE-MIB with ifDescr only.
    let b2 = row(&m, "sw2", "52:54:00:bb:00:02").unwrap();
    assert_eq!((b2.port, b2.port_name.as_deref(), b2.uplink.as_deref()), (2, Some("swp2"), None));
    assert_eq!(m.iter().find(|s| s.switch == "sw2").unwrap().macs.len(), 4);
    // One switch only.
    let (s, v) = e.call("GET", "/api/v1/discovery/macs?switch=sw2", None).await;
    assert_eq!((s, v.as_array().map(Vec::len)), (StatusCode::OK, Some(1)), "{v}");
    let (s, v) = e.call("GET", "/api/v1/discovery/macs?switch=nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");

    // The MAC of port 3 leaves: gone at the next poll, the others stay.
    let (s, v) = e.call("PATCH", "/api/v1/switch/sw1", Some(json!({"community": "qbridge-later"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    e.discovery.poll_all().await.unwrap();
    let m = e.macs().await;
    assert!(row(&m, "sw1", "52:54:00:aa:00:03").is_none(), "{m:?}");
    assert!(row(&m, "sw1", "52:54:00:aa:00:07").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_switches_keep_their_last_table_and_block_nothing() {
    if !image_support::privileged() {
        return;
    }
    let _switches = SWITCHES.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _sim = start_sim(dir.path());
    let e = env(DiscoveryConfig { timeout_ms: 1500, tries: 2, ..config() }).await;
    e.add_node("node007", "sw1", json!("Gi1/0/7")).await;
    e.until_learned().await;

    // sw2's community is now wrong (the agent stays silent) and a third switch is dead.
    let (s, v) = e.call("PATCH", "/api/v1/switch/sw2", Some(json!({"community": "wrong-one"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) =
        e.call("POST", "/api/v1/switch", Some(json!({"name": "sw3", "network": "mgmt", "ip": "127.0.77.3"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let round = {
        let d = e.discovery.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            d.poll_all().await.unwrap();
            t.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // While the round waits for the silent switch, the boot path answers at once: a machine
    // on sw1 port 7 is bound to node007 from the table already learned.
    let t = Instant::now();
    let (s, script) = e.call_text("GET", "/boot/ipxe?mac=52:54:00:aa:00:07", None).await;
    let took = t.elapsed();
    assert_eq!(s, StatusCode::OK);
    // bound, but the machine still has its discovery address: DHCP again, then the node's script
    assert!(script.contains("mac bound, asking DHCP for the node's address"), "{script}");
    assert!(took < Duration::from_millis(1000), "boot path waited {took:?} for a poll");
    let node = e.service.node("node007").await.unwrap();
    assert_eq!(node.mac, Some("52:54:00:aa:00:07".parse().unwrap()));
    assert_eq!(node.status.as_ref().map(|s| s.step.as_str()), Some("discovered"));
    assert!(node.status.unwrap().message.unwrap().contains("switch sw1 port 7 (Gi1/0/7)"));

    let took = round.await.unwrap();
    assert!(took >= Duration::from_millis(2900), "a silent switch gets two tries of 1.5 s: {took:?}");
    let m = e.macs().await;
    let sw2 = m.iter().find(|s| s.switch == "sw2").unwrap();
    let err = sw2.error.as_deref().unwrap_or("");
    assert!(err.contains("no answer from 127.0.77.2:16161") && err.contains("community wrong"), "{err}");
    assert!(!err.contains("wrong-one"), "the community leaked into the error: {err}");
    assert_eq!(sw2.macs.len(), 4, "the last good table is kept");
    assert!(sw2.age_secs.is_some());
    let sw3 = m.iter().find(|s| s.switch == "sw3").unwrap();
    assert!(sw3.error.is_some() && sw3.polled_at.is_none(), "{sw3:?}");
    let sw1 = m.iter().find(|s| s.switch == "sw1").unwrap();
    assert_eq!((sw1.error.as_deref(), sw1.macs.len()), (None, 15), "the good switch is still learned");

    // Never re-bound: a MAC on the port of a node that has another MAC is reported, not bound.
    let (s, v) = e.call("PATCH", "/api/v1/switch/sw2", Some(json!({"community": "bridge"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    e.discovery.poll_all().await.unwrap();
    let body = json!({"name": "node201", "group": "compute", "switch": "sw2", "port": 1, "mac": "52:54:00:dd:00:01"});
    let (s, v) = e.call("POST", "/api/v1/node", Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, script) = e.call_text("GET", "/boot/ipxe?mac=52:54:00:bb:00:01", None).await;
    assert!(
        script.contains("not bound: switch sw2 port 1 (swp1) belongs to node node201 which has mac 52:54:00:dd:00:01"),
        "{script}"
    );
    assert_eq!(e.service.node("node201").await.unwrap().mac, Some("52:54:00:dd:00:01".parse().unwrap()));
    let m = e.macs().await;
    let note = row(&m, "sw2", "52:54:00:bb:00:01").and_then(|r| r.note.clone()).unwrap_or_default();
    assert!(note.contains("not bound: node node201 has mac 52:54:00:dd:00:01"), "{m:?}");
    // Two nodes for one port are refused when the second is configured.
    let body = json!({"name": "dup1", "group": "compute", "switch": "sw2", "port": 1});
    let (s, v) = e.call("POST", "/api/v1/node", Some(body)).await;
    assert_eq!(s, StatusCode::CONFLICT, "two nodes on one port: {v}");
    assert!(v.to_string().contains("port 1 of switch sw2"), "{v}");
    // The same port by number and by name: the binder refuses to guess.
    e.add_node("byname", "sw2", json!("swp2")).await;
    e.add_node("bynumber", "sw2", json!(2)).await;
    let (_, script) = e.call_text("GET", "/boot/ipxe?mac=52:54:00:bb:00:02", None).await;
    assert!(script.contains("nodes bynumber and byname are both configured for switch sw2 port 2 (swp2)"), "{script}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discover_entry_polls_now_then_offers_the_manual_choices() {
    if !image_support::privileged() {
        return;
    }
    let _switches = SWITCHES.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _sim = start_sim(dir.path());
    // No interval polling in this test: only what the boot path asks for.
    let e = env(config()).await;
    e.add_node("node004", "sw2", json!("swp4")).await;
    e.add_node("spare", "sw2", json!(9)).await;
    // Nothing polled yet: the menu's default entry is discovery, chosen after 3 s.
    let (_, menu) = e.call_text("GET", "/boot/ipxe?mac=52:54:00:bb:00:04", None).await;
    assert!(menu.contains("choose --default discover --timeout 3000"), "{menu}");
    // The discover entry polls now and binds.
    let start = Instant::now();
    let script = loop {
        let (_, s) = e.call_text("GET", "/boot/ipxe/discover?mac=52:54:00:bb:00:04&try=1", None).await;
        if !s.contains("not learned") && !s.contains("no switch has learned")
            || start.elapsed() > Duration::from_secs(60)
        {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(script.contains("mac bound, asking DHCP for the node's address"), "{script}");
    assert_eq!(e.service.node("node004").await.unwrap().mac, Some("52:54:00:bb:00:04".parse().unwrap()));
    // A MAC no switch knows: wait-and-retry scripts, then the menu with the manual choices.
    let (_, s) = e.call_text("GET", "/boot/ipxe/discover?mac=52:54:00:cc:00:01&try=1", None).await;
    assert!(s.contains("(try 1 of 5)") && s.contains("/boot/ipxe/discover?mac=${netX/mac}&try=2"), "{s}");
    let (_, s) = e.call_text("GET", "/boot/ipxe/discover?mac=52:54:00:cc:00:01&try=5", None).await;
    assert!(s.contains("\nitem node0 spare\n"), "unbound nodes offered: {s}");
    assert!(s.contains("item name Type a node name"), "{s}");
    assert!(s.contains("choose --default again"), "{s}");
    // Learned on a port no node is configured for: said so above the menu.
    let (_, s) = e.call_text("GET", "/boot/ipxe?mac=52:54:00:bb:00:01", None).await;
    assert!(
        s.contains("echo luna: this machine is on switch sw2 port 1 (swp1); no node is configured for that port"),
        "{s}"
    );
    // Bad input.
    let (_, s) = e.call_text("GET", "/boot/ipxe/discover?mac=zz&try=1", None).await;
    assert!(s.contains("invalid mac address 'zz'"), "{s}");
}
