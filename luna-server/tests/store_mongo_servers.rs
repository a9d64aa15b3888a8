//! Two `luna-server` processes (the real binary) on one MongoDB database, committing conflicting
//! batches at the same time, and one of them killed with SIGKILL in the middle of a batch.
//!
//! Each server adds racks of nodes to the same group and network (every rack is one batch:
//! the nodes, their address claims and the group's referrer record, so the two servers' batches
//! contend for the same lowest free addresses and records). Afterwards: every rack is either
//! complete or absent (no half batch), every acknowledged rack is there (no lost update),
//! claims and nodes agree and no address is held twice, the survivor answered every request
//! within a bound, and nx-27017 reports that it aborted the killed server's open transaction
//! (the kill did land mid-batch).
//!
//! Runs against nx-27017 made a one-member replica set (`tests/assets/nx-replset.py`) when
//! `LUNA_TEST_MONGO=1`.

mod https_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use luna_server::store::conformance::{mongo_gate, unique_db_name, with_database, NxServer};
use serde_json::{json, Value};

const TOKEN: &str = "store-servers-test-token";
/// Nodes per rack (one batch).
const RACK: usize = 24;
/// The longest the survivor may take for one rack while the other server is killed.
const SURVIVOR_BOUND: Duration = Duration::from_secs(20);

/// A luna-server process, killed on drop.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// `port` is the admin API's (HTTPS); the boot port is any free one. Every server but `init`
/// uses the certificate `init` generated, as servers sharing a store share a certificate.
fn write_config(dir: &Path, name: &str, store: &str, port: u16) -> PathBuf {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).expect("data dir");
    let tls = match name {
        "init" => String::new(),
        _ => format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            dir.join("init/tls/server.pem").display().to_string(),
            dir.join("init/tls/server.key").display().to_string()
        ),
    };
    let config = format!(
        "store = {store:?}\nlisten = \"127.0.0.1:{boot}\"\ntoken_file = {token:?}\ndata_dir = {data:?}\n\
         cluster_name = \"servers\"\n[http]\napi_listen = \"127.0.0.1:{port}\"\n{tls}\
         [tftp]\nenabled = false\n[image]\nseed = false\n",
        boot = free_port(),
        token = dir.join("token").display().to_string(),
        data = data.display().to_string(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).expect("config");
    path
}

fn luna_server(config: &Path, args: &[&str], log: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_luna-server"));
    cmd.arg("--config").arg(config).args(args).stdin(Stdio::null());
    let out = std::fs::File::create(log).expect("log");
    cmd.stdout(out.try_clone().expect("log")).stderr(out);
    cmd
}

async fn start(dir: &Path, name: &str, store: &str) -> Server {
    let port = free_port();
    let config = write_config(dir, name, store, port);
    let log = dir.join(format!("{name}.log"));
    let child = luna_server(&config, &[], &log).spawn().expect("start luna-server");
    let mut server = Server { child, port, log };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = call(port, "GET", "/cluster", None).await {
            return server;
        }
        if let Some(status) = server.child.try_wait().expect("wait") {
            panic!(
                "luna-server {name} exited ({status}): {}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "luna-server {name} did not answer within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One REST call over HTTPS (`/api/v1` + `path`); the body as JSON.
async fn call(port: u16, method: &str, path: &str, body: Option<Value>) -> std::io::Result<(u16, Value)> {
    let (status, bytes) =
        https_support::request(port, TOKEN, method, &format!("/api/v1{path}"), body.map(|b| b.to_string())).await?;
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

async fn ok(port: u16, method: &str, path: &str, body: Value) {
    let (status, v) = call(port, method, path, Some(body)).await.expect("request");
    assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
}

/// Adds racks `<prefix>000, <prefix>001, …` one batch each until told to stop; returns the
/// racks acknowledged and the longest a request took.
/// Lets the test hold the survivor's client between two requests.
#[derive(Default)]
struct Pause {
    paused: AtomicBool,
    idle: AtomicBool,
}

async fn add_racks(
    port: u16,
    prefix: char,
    stop: tokio::sync::watch::Receiver<bool>,
    pause: Arc<Pause>,
) -> (Vec<usize>, Duration) {
    let mut acked = Vec::new();
    let mut slowest = Duration::ZERO;
    for rack in 0.. {
        while pause.paused.load(Ordering::SeqCst) {
            pause.idle.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        pause.idle.store(false, Ordering::SeqCst);
        if *stop.borrow() {
            break;
        }
        let name = format!("{prefix}{rack:03}n[01-{RACK:02}]");
        let started = Instant::now();
        match call(port, "POST", "/node", Some(json!({"name": name, "group": "compute"}))).await {
            Ok((201, _)) | Ok((200, _)) => acked.push(rack),
            // The server was killed: what it acknowledged so far is what we check.
            Ok((0, _)) | Err(_) => break,
            Ok((status, v)) => panic!("server {prefix}: rack {rack} failed: {status} {v}"),
        }
        slowest = slowest.max(started.elapsed());
    }
    (acked, slowest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_one_killed_mid_batch() {
    let Some(bin) = mongo_gate() else { return };
    let nx = NxServer::start(&bin).await.expect("nx-27017 starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = with_database(&nx.url("admin"), &unique_db_name("servers"));
    std::fs::write(dir.path().join("token"), TOKEN).expect("token");

    let init_config = write_config(dir.path(), "init", &store, free_port());
    let status = luna_server(&init_config, &["init"], &dir.path().join("init.log")).status().expect("init");
    let init_log = std::fs::read_to_string(dir.path().join("init.log")).unwrap_or_default();
    assert!(status.success(), "luna-server init: {init_log}");
    https_support::trust_ca(&dir.path().join("init/tls/ca.pem"));
    let b = start(dir.path(), "b", &store).await;
    ok(b.port, "POST", "/network", json!({"name": "cluster", "cidr": "10.141.0.0/20"})).await;
    ok(b.port, "POST", "/osimage", json!({"name": "compute", "path": "/images/compute"})).await;
    let group =
        json!({"name": "compute", "osimage": "compute", "interfaces": [{"name": "BOOTIF", "network": "cluster"}]});
    ok(b.port, "POST", "/group", group).await;

    // b adds racks the whole time; a is started, adds racks, and is killed, until one kill
    // lands inside one of its transactions (nx-27017 logs the abort of its open transaction).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let pause_b = Arc::new(Pause::default());
    let racks_b = tokio::spawn(add_racks(b.port, 'b', stop_rx, pause_b.clone()));
    let mut acked_a: Vec<String> = Vec::new();
    let mut kills = 0;
    for attempt in 0..8 {
        let prefix = char::from(b'c' + attempt);
        let mut a = start(dir.path(), &format!("{prefix}"), &store).await;
        let (stop_a_tx, stop_a_rx) = tokio::sync::watch::channel(false);
        let racks_a = tokio::spawn(add_racks(a.port, prefix, stop_a_rx, Arc::default()));
        let before = nx.log().matches("its client connection closed").count();
        tokio::time::sleep(Duration::from_millis(1000 + rand::random::<u64>() % 1000)).await;
        // Hold b between two requests for a moment, so that the next transaction to open is
        // a's, and kill a while it is open.
        pause_b.paused.store(true, Ordering::SeqCst);
        while !pause_b.idle.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let waiting = Instant::now();
        while !nx.transaction_open() && waiting.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        a.child.kill().expect("SIGKILL server a");
        pause_b.paused.store(false, Ordering::SeqCst);
        let _ = a.child.wait();
        let _ = stop_a_tx.send(true);
        let (acked, _) = racks_a.await.expect("server a's client");
        println!("server {prefix}: {} racks acknowledged, then killed", acked.len());
        acked_a.extend(acked.iter().map(|r| format!("{prefix}{r:03}")));
        kills += 1;
        // The abort is logged when nx-27017 sees the connection close.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if nx.log().matches("its client connection closed").count() > before {
            break;
        }
    }
    let nx_log = nx.log();
    assert!(
        nx_log.contains("its client connection closed"),
        "none of {kills} kills landed inside a transaction (nx-27017 log):\n{nx_log}"
    );
    // The survivor keeps going for a while after the last kill.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let (acked_b, slowest_b) = racks_b.await.expect("server b's client");
    println!(
        "{kills} kills; killed servers: {} racks acknowledged; survivor: {} racks, slowest {slowest_b:?}",
        acked_a.len(),
        acked_b.len()
    );
    assert!(!acked_b.is_empty(), "the survivor committed nothing");
    assert!(slowest_b < SURVIVOR_BOUND, "the survivor stalled: one rack took {slowest_b:?}");

    // What the store holds, read through the survivor.
    let (status, nodes) = call(b.port, "GET", "/node", None).await.expect("list nodes");
    assert_eq!(status, 200, "{nodes}");
    let nodes = nodes.as_array().expect("node list").clone();
    let mut racks: BTreeMap<String, usize> = BTreeMap::new();
    let mut ips = BTreeSet::new();
    for n in &nodes {
        let name = n["name"].as_str().expect("name");
        *racks.entry(name[..4].to_string()).or_default() += 1;
        let ip = n["interfaces"][0]["ip"].as_str().expect("ip").to_string();
        assert!(ips.insert(ip.clone()), "address {ip} is held twice");
    }
    for (rack, count) in &racks {
        assert_eq!(*count, RACK, "rack {rack} is half there: {count} of {RACK} nodes");
    }
    let acked = acked_a.into_iter().chain(acked_b.iter().map(|r| format!("b{r:03}")));
    for rack in acked {
        assert!(racks.contains_key(&rack), "acknowledged rack {rack} was lost");
    }
    // Address claims and nodes agree (no claim left by a dead batch, none missing).
    let (status, _) = call(b.port, "GET", "/network/cluster", None).await.expect("network");
    assert_eq!(status, 200);
    let started = Instant::now();
    ok(b.port, "POST", "/node", json!({"name": "after", "group": "compute"})).await;
    assert!(started.elapsed() < Duration::from_secs(5), "a write after the kills took {:?}", started.elapsed());
}
