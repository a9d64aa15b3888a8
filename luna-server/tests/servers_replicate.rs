//! Two `luna-server` processes (the real binary) on one MongoDB-wire store: both register and
//! heartbeat, a revision packed on A appears on B through the swarm (same revision and info
//! hash, archive and squashfs verified and seeded by B, kernel and initramfs checked against
//! the SHA-256 the revision records), a revision whose kernel A serves altered is refused by B
//! until A serves the right one, torrents name both trackers, and a third server whose DHCP
//! slice overlaps B's is refused at start.
//!
//! Runs against nx-27017 made a one-member replica set (`tests/assets/nx-replset.py`) when
//! `LUNA_TEST_MONGO=1`; everything listens on 127.0.0.1 (no namespaces needed).

mod https_support;
mod image_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use luna_server::store::conformance::{mongo_gate, unique_db_name, with_database, NxServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "servers-replicate-test-token";
/// `[server] replicate_interval_s` and `heartbeat_interval_s` of the servers.
const POLL_S: u64 = 2;

struct Server {
    child: Child,
    /// The boot port (plain HTTP: files, tracker).
    port: u16,
    /// The admin API (HTTPS).
    api: u16,
    log: PathBuf,
    data: PathBuf,
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

/// Every server but `init` uses the certificate `init` generated, as servers sharing a store
/// share a certificate.
fn write_config(dir: &Path, name: &str, store: &str, port: u16, api: u16, slice: &str) -> (PathBuf, PathBuf) {
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
    let dracut = image_support::fake_dracut(dir, "", true);
    let config = format!(
        "store = {store:?}\nlisten = \"127.0.0.1:{port}\"\ntoken_file = {token:?}\ndata_dir = {data:?}\n\
         cluster_name = \"servers\"\n[http]\napi_listen = \"127.0.0.1:{api}\"\n{tls}[tftp]\nenabled = false\n\
         [dhcp]\nslice = {slice:?}\n\
         [image]\ndracut = {dracut:?}\nseed_listen = \"127.0.0.1:0\"\n\
         [server]\nid = {name:?}\nadvertise = [\"127.0.0.1\"]\nheartbeat_interval_s = {POLL_S}\nreplicate_interval_s = {POLL_S}\n",
        token = dir.join("token").display().to_string(),
        data = data.display().to_string(),
        dracut = dracut.display().to_string(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).expect("config");
    (path, data)
}

fn luna_server(config: &Path, args: &[&str], log: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_luna-server"));
    cmd.arg("--config").arg(config).args(args).stdin(Stdio::null()).env("RUST_LOG", "info");
    let out = std::fs::File::create(log).expect("log");
    cmd.stdout(out.try_clone().expect("log")).stderr(out);
    cmd
}

async fn start(dir: &Path, name: &str, store: &str, slice: &str) -> Server {
    let port = free_port();
    let api = free_port();
    let (config, data) = write_config(dir, name, store, port, api, slice);
    let log = dir.join(format!("{name}.log"));
    let child = luna_server(&config, &[], &log).spawn().expect("start luna-server");
    let mut server = Server { child, port, api, log, data };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = call(api, "GET", "/api/v1/cluster", None).await {
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

/// One request to the admin API (HTTPS); the body as JSON.
async fn call(api: u16, method: &str, path: &str, body: Option<Value>) -> std::io::Result<(u16, Value)> {
    let (status, bytes) = https_support::request(api, TOKEN, method, path, body.map(|b| b.to_string())).await?;
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((status, json))
}

/// One plain HTTP/1.0 request to the boot port (no credentials: that port refuses them).
async fn call_raw(port: u16, method: &str, path: &str, body: Option<Value>) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").map_or(out.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&out[..head_end]);
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, out[head_end..].to_vec()))
}

async fn ok(port: u16, method: &str, path: &str, body: Value) -> Value {
    let (status, v) = call(port, method, path, Some(body)).await.expect("request");
    assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
    v
}

/// Packs osimage `compute` on the server with admin port `api` and waits for the job.
async fn pack(api: u16) {
    let job = ok(api, "POST", "/api/v1/osimage/compute/pack", json!({})).await;
    let job = job["job"].as_u64().expect("job id");
    wait_for(Duration::from_secs(120), "the pack finished", || async {
        let (_, j) = call(api, "GET", &format!("/api/v1/jobs/{job}"), None).await.ok()?;
        match j["state"].as_str() {
            Some("done") | Some("finished") | Some("succeeded") => Some(()),
            Some("failed") => panic!("pack failed: {j}"),
            _ => None,
        }
    })
    .await;
}

/// Resumes a stopped process when dropped (also when the test fails while it is stopped).
struct Resume(String);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

/// Polls `f` every 200 ms until it returns Some, or panics after `limit` naming `what`.
async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < limit, "{what} within {} s", limit.as_secs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_packed_on_one_server_reaches_the_other_through_the_swarm() {
    let Some(bin) = mongo_gate() else { return };
    let nx = NxServer::start(&bin).await.expect("nx-27017 starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = with_database(&nx.url("admin"), &unique_db_name("replicate"));
    std::fs::write(dir.path().join("token"), TOKEN).expect("token");
    let (init, _) = write_config(dir.path(), "init", &store, free_port(), free_port(), "10.141.200.0-10.141.200.9");
    let status = luna_server(&init, &["init"], &dir.path().join("init.log")).status().expect("init");
    assert!(status.success(), "init: {}", std::fs::read_to_string(dir.path().join("init.log")).unwrap_or_default());
    https_support::trust_ca(&dir.path().join("init/tls/ca.pem"));

    let a = start(dir.path(), "a", &store, "10.141.200.10-10.141.200.99").await;
    let b = start(dir.path(), "b", &store, "10.141.200.100-10.141.200.199").await;
    let chroot = dir.path().join("chroot");
    image_support::make_chroot(&chroot);
    ok(a.api, "PATCH", "/api/v1/cluster", json!({"frontend_address": "127.0.0.1", "http_port": a.port})).await;
    // Overlay root mode: the pack also builds the squashfs, which travels like the archive.
    ok(a.api, "POST", "/api/v1/osimage", json!({"name": "compute", "path": chroot, "root": "overlay"})).await;

    // Both servers are listed, with fresh heartbeats, by either one.
    let servers = wait_for(Duration::from_secs(10), "both servers listed", || async {
        let (_, v) = call(b.api, "GET", "/api/v1/cluster/servers", None).await.ok()?;
        let ids: Vec<&str> = v.as_array()?.iter().filter_map(|s| s["id"].as_str()).collect();
        (ids.contains(&"a") && ids.contains(&"b")).then_some(v)
    })
    .await;
    for s in servers.as_array().unwrap() {
        if ["a", "b"].contains(&s["id"].as_str().unwrap()) {
            assert_eq!(s["stale"], json!(false), "{s}");
            assert!(s["age_secs"].as_u64().unwrap() <= 3 * POLL_S, "{s}");
            assert!(s["seeder"].as_str().unwrap().starts_with("127.0.0.1:"), "{s}");
        }
    }

    // Pack on A.
    pack(a.api).await;
    let packed = Instant::now();
    let (_, revs) = call(a.api, "GET", "/api/v1/osimage/compute/revisions", None).await.unwrap();
    let rev = revs[0].clone();
    let (id, info_hash, sha) =
        (rev["id"].as_u64().unwrap(), rev["info_hash"].as_str().unwrap(), rev["sha256"].as_str().unwrap());

    // B holds it (downloaded, verified, published) and seeds it, within the poll interval (plus
    // a heartbeat for A to say it holds the revision and the download itself).
    let b_rev = wait_for(Duration::from_secs(60), "b seeds the revision", || async {
        let (_, v) = call(b.api, "GET", "/api/v1/osimage/compute/revisions", None).await.ok()?;
        let r = v.as_array()?.iter().find(|r| r["id"].as_u64() == Some(id))?.clone();
        (r["seeder"]["healthy"] == json!(true)).then_some(r)
    })
    .await;
    eprintln!("revision {id} seeded by b {:.1} s after the pack on a", packed.elapsed().as_secs_f64());
    assert_eq!(b_rev["info_hash"].as_str(), Some(info_hash));
    let archive = b.data.join("images/compute").join(id.to_string()).join(rev["archive"].as_str().unwrap());
    assert_eq!(image_support::sha256_file(&archive), sha, "b's archive is a's");
    for f in ["kernel", "initrd"] {
        let name = rev[f].as_str().unwrap();
        let (x, y) = (a.data.join("images/compute/1").join(name), b.data.join("images/compute/1").join(name));
        assert_eq!(std::fs::read(&x).unwrap(), std::fs::read(&y).unwrap(), "{f}");
        // The revision records the digest B checked its copy against.
        assert_eq!(rev[format!("{f}_sha256")].as_str(), Some(image_support::sha256_file(&x).as_str()), "{f}");
    }
    // The squashfs came through the swarm too, verified (its marker), and B seeds it.
    let sq = &rev["squashfs"];
    let b_dir = b.data.join("images/compute").join(id.to_string());
    let b_sq = b_dir.join(sq["file"].as_str().expect("the revision has a squashfs"));
    assert_eq!(image_support::sha256_file(&b_sq), sq["sha256"].as_str().unwrap(), "b's squashfs is a's");
    assert!(b_dir.join(".verified-squashfs").is_file(), "b verified the squashfs");
    assert!(b_dir.join(sq["torrent"].as_str().unwrap()).is_file());
    // Both list both servers as holding and seeding it.
    wait_for(Duration::from_secs(20), "a and b listed as holding and seeding", || async {
        let (_, v) = call(a.api, "GET", "/api/v1/osimage/compute/revisions", None).await.ok()?;
        let r = v.as_array()?.iter().find(|r| r["id"].as_u64() == Some(id))?.clone();
        (r["held_by"] == json!(["a", "b"]) && r["seeded_by"] == json!(["a", "b"])).then_some(())
    })
    .await;
    // B's torrent (as served) names both trackers, B's first, and has A's info hash.
    let torrent = format!("/images/compute/{id}/{}", rev["torrent"].as_str().unwrap());
    let (status, bytes) = call_raw(b.port, "GET", &torrent, None).await.unwrap();
    assert_eq!(status, 200);
    let t = luna_server::image::metainfo::parse(&bytes).unwrap();
    assert_eq!(hex::encode(t.info_hash), info_hash);
    let trackers = luna_server::image::metainfo::announce_list(&bytes).unwrap();
    let want: Vec<String> = [b.port, a.port].iter().map(|p| format!("http://127.0.0.1:{p}/announce")).collect();
    assert_eq!(trackers, want);
    // The store was not written by the replica: still the one revision a packed.
    let (_, img) = call(b.api, "GET", "/api/v1/osimage/compute", None).await.unwrap();
    assert_eq!(img["revisions"].as_array().unwrap().len(), 1, "{img}");

    // A kernel that is not the one the revision records is refused. B is paused while A packs
    // revision 2 and starts serving another kernel under its name; B, resumed, refuses the
    // revision (nothing published), and takes it once A serves the right file again.
    let pid = b.child.id().to_string();
    let signal = |sig: &str| assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    signal("-STOP");
    let resume = Resume(pid.clone());
    // A changed tree: revision 2 has archive and squashfs torrents of its own.
    std::fs::write(chroot.join("etc/revision-2"), "2\n").unwrap();
    pack(a.api).await;
    let (_, revs) = call(a.api, "GET", "/api/v1/osimage/compute/revisions", None).await.unwrap();
    let rev2 = revs.as_array().unwrap().iter().find(|r| r["id"] == json!(2)).expect("revision 2").clone();
    let kernel = a.data.join("images/compute/2").join(rev2["kernel"].as_str().unwrap());
    let kept = kernel.with_extension("kept");
    std::fs::rename(&kernel, &kept).unwrap();
    std::fs::write(&kernel, b"not the kernel the revision records").unwrap();
    drop(resume);
    let b_rev2 = b.data.join("images/compute/2");
    wait_for(Duration::from_secs(30), "b refuses the altered kernel", || async {
        let log = std::fs::read_to_string(&b.log).unwrap_or_default();
        (log.contains("revision 2") && log.contains("sha256 is")).then_some(())
    })
    .await;
    assert!(!b_rev2.exists(), "nothing of revision 2 was published on b");
    std::fs::rename(&kept, &kernel).unwrap();
    assert_ne!(rev2["info_hash"], rev["info_hash"]);
    wait_for(Duration::from_secs(60), "b takes revision 2 once the kernel is right", || async {
        let (_, v) = call(b.api, "GET", "/api/v1/osimage/compute/revisions", None).await.ok()?;
        let r = v.as_array()?.iter().find(|r| r["id"] == json!(2))?.clone();
        let held = b_rev2.join(".verified").is_file() && b_rev2.join(".verified-squashfs").is_file();
        (held && r["seeder"]["healthy"] == json!(true)).then_some(())
    })
    .await;

    // A third server whose DHCP slice overlaps B's is refused, naming both, and starts nothing.
    let (c_config, _) =
        write_config(dir.path(), "c", &store, free_port(), free_port(), "10.141.200.150-10.141.200.250");
    let c_log = dir.path().join("c.log");
    let mut c = luna_server(&c_config, &[], &c_log).spawn().expect("start c");
    let status = wait_for(Duration::from_secs(30), "c exits", || {
        let s = c.try_wait().expect("wait");
        async move { s }
    })
    .await;
    let log = std::fs::read_to_string(&c_log).unwrap_or_default();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("10.141.200.150-10.141.200.250")
            && log.contains("'b'")
            && log.contains("10.141.200.100-10.141.200.199"),
        "{log}"
    );
    let (_, v) = call(b.api, "GET", "/api/v1/cluster/servers", None).await.unwrap();
    assert!(!v.as_array().unwrap().iter().any(|s| s["id"] == json!("c")), "{v}");
    drop((a, b));
}
