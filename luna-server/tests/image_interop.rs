//! Interop proof (LUNA_TEST_PRIVILEGED=1; needs `aria2c` and `transmission-cli`): in a server
//! network namespace run luna's tracker and seeder, in a client namespace (joined by a veth pair)
//! run aria2c and then transmission-cli on a packed image's `.torrent`. The torrent has no web
//! seed (packing leaves `url-list` out) and is private (no DHT, PEX or
//! LSD), so the bytes can only come from our seeder, found through our tracker. Both downloads
//! must match the revision's SHA-256.

mod image_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use image_support::{privileged, sha256_file, Env};
use luna_core::model::Kind;
use luna_server::image::seeder::Seeder;
use luna_server::image::{self, PackRequest};
use luna_server::tracker::swarm::{NoTopology, TrackerConfig};
use luna_server::tracker::{self, TrackerHandle};
use serde_json::json;

const SERVER_IP: &str = "10.99.0.1";
const CLIENT_IP: &str = "10.99.0.2";

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Two namespaces joined by a veth pair; deleted (with whatever runs inside) on drop.
struct Namespaces {
    server: String,
    client: String,
}

impl Namespaces {
    fn new() -> Namespaces {
        let pid = std::process::id();
        let ns = Namespaces { server: format!("luna-img-{pid}-s"), client: format!("luna-img-{pid}-c") };
        for n in [&ns.server, &ns.client] {
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "link", "add", "veth-ls", "netns", &ns.server, "type", "veth", "peer", "name", "veth-lc", "netns",
            &ns.client,
        ]);
        sh(&["ip", "-n", &ns.server, "addr", "add", &format!("{SERVER_IP}/24"), "dev", "veth-ls"]);
        sh(&["ip", "-n", &ns.client, "addr", "add", &format!("{CLIENT_IP}/24"), "dev", "veth-lc"]);
        sh(&["ip", "-n", &ns.server, "link", "set", "veth-ls", "up"]);
        sh(&["ip", "-n", &ns.client, "link", "set", "veth-lc", "up"]);
        ns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in [&self.server, &self.client] {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", n]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: plain kill of a process inside our own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// A child process killed on drop.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_file(path: &Path, size: u64, child: &mut Proc, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.0.try_wait() {
            if std::fs::metadata(path).is_ok_and(|m| m.len() == size) {
                return;
            }
            panic!("{what} exited with {st} before finishing {}", path.display());
        }
        if let Some(marker) = path.parent().map(|d| d.join("finished")) {
            if marker.exists() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what} did not finish {} in time", path.display());
}

#[test]
fn aria2c_and_transmission_download_from_our_tracker_and_seeder() {
    if !privileged() {
        return;
    }
    for tool in ["aria2c", "transmission-cli", "ip"] {
        assert!(have(tool), "{tool} is needed: apt-get install -y aria2 transmission-cli iproute2");
    }
    let ns = Namespaces::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = rt.block_on(async {
        let env = Env::new(|_, c| c.seed_listen = format!("{SERVER_IP}:6881").parse().unwrap()).await;
        env.service
            .update(Kind::Cluster, "cluster", json!({"frontend_address": SERVER_IP, "http_port": 7050}))
            .await
            .unwrap();
        env
    });
    let rev = rt.block_on(image::pack_now(&env.state, "compute", PackRequest::default())).unwrap();
    let torrent = env.rev_dir(rev.id).join(&rev.torrent);

    // the server: tracker on :7050 and the seeder, inside the server namespace
    let (ready_tx, ready_rx) = mpsc::channel::<Result<SocketAddr, String>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let state = env.state.clone();
    let ns_path = PathBuf::from("/run/netns").join(&ns.server);
    let server = std::thread::spawn(move || {
        let f = std::fs::File::open(&ns_path).unwrap();
        // SAFETY: setns on this thread only; the runtime's threads are started from it.
        let r = unsafe { libc::setns(std::os::unix::io::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        if r != 0 {
            let _ = ready_tx.send(Err(format!("setns: {}", std::io::Error::last_os_error())));
            return;
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let tracker =
                std::sync::Arc::new(TrackerHandle::new(TrackerConfig::default(), std::sync::Arc::new(NoTopology)));
            let app = tracker::router(tracker.clone());
            let listener = match tokio::net::TcpListener::bind((SERVER_IP, 7050)).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("bind tracker: {e}")));
                    return;
                }
            };
            tokio::spawn(async move {
                let _ = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await;
            });
            let seeder = match Seeder::start(state, Some(luna_server::wiring::registrar(tracker.clone()))).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(seeder.listen_addr()));
            let mut stop = stop_rx;
            loop {
                seeder.refresh().await;
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            seeder.stop().await;
        });
    });
    let addr = ready_rx.recv_timeout(Duration::from_secs(60)).expect("server thread").expect("server start");
    assert_eq!(addr.to_string(), format!("{SERVER_IP}:6881"));
    // the seeder registers with the tracker once its archive is verified
    let hash = rev.info_hash.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !env.state.seeding.read().unwrap().get(&hash).is_some_and(|s| s.healthy) {
        assert!(Instant::now() < deadline, "seeder never healthy: {:?}", env.state.seeding.read().unwrap().get(&hash));
        std::thread::sleep(Duration::from_millis(200));
    }

    let work = tempfile::tempdir().unwrap();
    // aria2c: exits once done (no seeding)
    let d1 = work.path().join("aria2");
    std::fs::create_dir_all(&d1).unwrap();
    let mut aria = Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns.client, "aria2c", "--seed-time=0", "--enable-dht=false", "--enable-dht6=false"])
            .args([
                "--bt-enable-lpd=false",
                "--enable-peer-exchange=false",
                "--listen-port=6891",
                "--summary-interval=0",
            ])
            .args(["--console-log-level=warn", "--check-certificate=false", "-d"])
            .arg(&d1)
            .arg(&torrent)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(st) = aria.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "aria2c did not finish");
        std::thread::sleep(Duration::from_millis(200));
    };
    let aria_file = d1.join(&rev.archive);
    assert!(aria_file.is_file(), "aria2c ({status}) wrote nothing");
    assert_eq!(sha256_file(&aria_file), rev.sha256, "aria2c download");

    // transmission-cli: keeps seeding after it finishes, so a finish script leaves a marker
    let d2 = work.path().join("transmission");
    let cfg = work.path().join("transmission-config");
    std::fs::create_dir_all(&d2).unwrap();
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("settings.json"),
        r#"{"dht-enabled": false, "lpd-enabled": false, "pex-enabled": false, "utp-enabled": false, "port-forwarding-enabled": false}"#,
    )
    .unwrap();
    let finish = work.path().join("finished.sh");
    std::fs::write(&finish, format!("#!/bin/sh\ntouch '{}'\n", d2.join("finished").display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&finish, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut tr = Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns.client, "transmission-cli", "-M", "-p", "51413", "-g"])
            .arg(&cfg)
            .arg("-w")
            .arg(&d2)
            .arg("-f")
            .arg(&finish)
            .arg(&torrent)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_file(&d2.join(&rev.archive), rev.archive_size, &mut tr, "transmission-cli");
    drop(tr);
    assert_eq!(sha256_file(&d2.join(&rev.archive)), rev.sha256, "transmission download");

    // the seeder uploaded at least both copies
    let up = env.state.seeding.read().unwrap().get(&hash).map(|s| s.uploaded_bytes).unwrap_or(0);
    let _ = stop_tx.send(());
    server.join().unwrap();
    assert!(up >= 2 * rev.archive_size, "seeder uploaded {up} bytes for two downloads of {}", rev.archive_size);
    drop(ns);
}
