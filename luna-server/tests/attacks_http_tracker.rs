//! Attacks on the HTTP port and the tracker (issue 12, items 8–11), each performed against the
//! real `luna-server` binary on 127.0.0.x (no root needed: every 127/8 address is local, so a
//! client binds its own source address to play a second machine).
//!
//! - slow clients: trickled request heads are cut after `[http] header_timeout_s`, connections
//!   beyond the per-address and total caps are closed at once, others are still served, and
//!   the open-file soft limit was raised to the hard limit; on the HTTPS API port, trickled TLS
//!   handshakes are cut after the same timeout while the API answers others;
//! - floods of unknown info hashes are capped and a full scrape stays small while the API
//!   answers;
//! - tracker poisoning: `ip=` is ignored by default and a peer id cannot be stopped from
//!   another address;
//! - request parsing: the smuggling, NUL and bare-LF requests that fooled the old fast path.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use luna_server::tracker::query::percent_encode;

mod https_support;

/// The server as a child process, killed (and reaped) on drop, even when the test fails.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// The HTTPS admin API.
    api: SocketAddr,
    token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// `luna-server init` and `luna-server` with a config made for attacking: short header timeout,
/// small connection caps, few torrents.
fn start(ip: Ipv4Addr) -> Server {
    let dir = tempfile::tempdir().unwrap();
    // Both ports picked while both are held, so they differ.
    let hold = std::net::TcpListener::bind((ip, 0)).unwrap();
    let api_port = free_port(ip);
    let port = hold.local_addr().unwrap().port();
    drop(hold);
    let addr = SocketAddr::from((ip, port));
    let d = dir.path();
    let config = format!(
        r#"store = "sqlite://{db}"
listen = "{addr}"
token_file = "{token}"
data_dir = "{data}"
[tftp]
enabled = false
[image]
seed = false
[http]
header_timeout_s = 2
max_connections = 12
max_connections_per_address = 8
api_listen = "{ip}:{api_port}"
[tracker]
max_torrents = 160
"#,
        db = d.join("luna.db").display(),
        token = d.join("token").display(),
        data = d.join("data").display(),
    );
    let cfg = d.join("luna.toml");
    std::fs::write(&cfg, config).unwrap();
    let bin = env!("CARGO_BIN_EXE_luna-server");
    let st = Command::new(bin).arg("--config").arg(&cfg).arg("init").stdout(Stdio::null()).status().unwrap();
    assert!(st.success(), "luna-server init failed");
    let log = std::fs::File::create(d.join("server.log")).unwrap();
    let child = Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let token = std::fs::read_to_string(d.join("token")).unwrap().trim().to_string();
    let api = SocketAddr::from((ip, api_port));
    let server = Server { child, addr, api, token, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "luna-server did not listen on {addr}: {}", log_of(server._dir.path()));
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
}

/// A connection from a chosen 127.x source address.
fn connect_from(src: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((src, 0)).into()).unwrap();
    sock.connect(&to.into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends raw bytes, reads until the server closes (or 10 s), returns what came back.
fn exchange(src: Ipv4Addr, to: SocketAddr, raw: &[u8]) -> String {
    let mut s = connect_from(src, to);
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn get(src: Ipv4Addr, to: SocketAddr, target: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    let raw = format!("GET {target} HTTP/1.1\r\nhost: luna\r\n{auth}connection: close\r\n\r\n");
    let mut s = connect_from(src, to);
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a whole response head");
    let status = std::str::from_utf8(&out[9..12]).unwrap().parse().unwrap();
    (status, out[head_end + 4..].to_vec())
}

/// Whether the server has closed the connection (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn announce_target(hash: &[u8; 20], peer: u8, port: u16, extra: &str) -> String {
    let mut peer_id = *b"-AT0001-000000000000";
    peer_id[19] = peer;
    format!(
        "/announce?info_hash={}&peer_id={}&port={port}&uploaded=0&downloaded=0&left=100&compact=0{extra}",
        percent_encode(hash),
        percent_encode(&peer_id)
    )
}

const A: Ipv4Addr = Ipv4Addr::new(127, 31, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(127, 31, 0, 2);
const C: Ipv4Addr = Ipv4Addr::new(127, 31, 0, 3);

#[test]
fn slow_heads_are_cut_and_connection_caps_hold() {
    let srv = start(Ipv4Addr::new(127, 31, 1, 1));
    // The open-file soft limit was raised to the hard limit.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", srv.child.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums[0], nums[1], "soft limit not raised: {line}");

    // A trickles heads on 8 connections (its cap): one byte every 300 ms, never finishing.
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..8).map(|_| connect_from(A, srv.addr)).collect();
    for s in &mut slow {
        s.write_all(b"GET /boot/ipxe?mac=").unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    // A 9th from A is closed at once, before anything is read.
    let mut ninth = connect_from(A, srv.addr);
    assert!(closed_within(&mut ninth, Duration::from_secs(1)), "a 9th connection from one address was kept");
    // B still gets answers, and takes 4 more places: 12, the total cap.
    let (status, _) = get(B, srv.addr, &announce_target(&[1; 20], 1, 7001, ""), None);
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(200));
    let mut held: Vec<TcpStream> = (0..4).map(|_| connect_from(B, srv.addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut over = connect_from(C, srv.addr);
    assert!(closed_within(&mut over, Duration::from_secs(1)), "a connection over the total cap was kept");
    // Trickling does not keep a connection: the whole head must arrive within 2 s.
    let mut cut = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(300));
        for s in &mut slow {
            if s.write_all(b"0").is_err() {
                continue;
            }
        }
        cut = slow.iter_mut().map(|s| closed_within(s, Duration::from_millis(1))).filter(|c| *c).count();
        if cut == slow.len() {
            break;
        }
    }
    let took = started.elapsed();
    assert_eq!(cut, 8, "slow heads still open after {took:?}");
    assert!(took < Duration::from_secs(5), "slow heads cut only after {took:?}");
    // Idle connections are cut too, and then the API answers everyone again.
    for s in &mut held {
        assert!(closed_within(s, Duration::from_secs(4)), "an idle connection was kept");
    }
    let (status, body) = get(C, srv.addr, "/scrape", None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn slow_tls_handshakes_are_cut_and_the_api_still_answers() {
    let srv = start(Ipv4Addr::new(127, 31, 4, 1));
    https_support::trust_ca(&srv._dir.path().join("data/tls/ca.pem"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let api = |path: &str| rt.block_on(https_support::request_at(srv.api, &srv.token, "GET", path, None));
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(srv.api).is_err() {
        assert!(Instant::now() < deadline, "the API did not listen on {}: {}", srv.api, log_of(srv._dir.path()));
        std::thread::sleep(Duration::from_millis(50));
    }

    // A opens 8 connections (its cap) that start a TLS handshake and never finish it: a
    // record header announcing a 512-byte ClientHello, then one byte every 300 ms.
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..8).map(|_| connect_from(A, srv.api)).collect();
    for s in &mut slow {
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut ninth = connect_from(A, srv.api);
    assert!(closed_within(&mut ninth, Duration::from_secs(1)), "a 9th handshake from one address was kept");
    // Meanwhile the API answers another address.
    let (status, body) = api("/api/v1/cluster").expect("the API over HTTPS");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let mut cut = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(300));
        for s in &mut slow {
            let _ = s.write_all(&[0]);
        }
        cut = slow.iter_mut().map(|s| closed_within(s, Duration::from_millis(1))).filter(|c| *c).count();
        if cut == slow.len() {
            break;
        }
    }
    let took = started.elapsed();
    assert_eq!(cut, 8, "slow handshakes still open after {took:?}");
    assert!(took < Duration::from_secs(5), "slow handshakes cut only after {took:?} (header_timeout_s = 2)");
    // (a record still 490 bytes short is not yet parsed: the timeout cut them, not an error)
    assert!(took > Duration::from_millis(1500), "slow handshakes cut after {took:?}, before the timeout");
    // A's places are free again: a new connection from A is kept (the cap would close it at once).
    let mut again = connect_from(A, srv.api);
    assert!(!closed_within(&mut again, Duration::from_millis(500)), "A's places were not given back");
}

#[test]
fn unknown_info_hashes_are_capped_and_a_full_scrape_stays_small() {
    let srv = start(Ipv4Addr::new(127, 31, 2, 1));
    let mut refused = 0;
    for n in 0..400u32 {
        let mut hash = [0u8; 20];
        hash[..4].copy_from_slice(&n.to_be_bytes());
        hash[19] = n as u8;
        let (status, body) = get(A, srv.addr, &announce_target(&hash, 1, 7001, ""), None);
        assert_eq!(status, 200);
        if body.starts_with(b"d14:failure reason") {
            assert!(String::from_utf8_lossy(&body).contains("maximum of 160 torrents"), "{body:?}");
            refused += 1;
        }
    }
    // 160 over 16 shards: each follows at most 10; the 400 hashes spread over them.
    assert_eq!(refused, 400 - 160, "unknown torrents refused");
    // A full scrape lists the server's torrents only (none here), however many were announced.
    let t0 = Instant::now();
    let (status, body) = get(B, srv.addr, "/scrape", None);
    assert_eq!((status, body.as_slice()), (200, &b"d5:filesdee"[..]));
    // The boot port answers at once (and, being plain HTTP, refuses the admin API).
    let (status, body) = get(B, srv.addr, "/api/v1/cluster", None);
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert!(t0.elapsed() < Duration::from_secs(2), "scrape and API took {:?}", t0.elapsed());
}

#[test]
fn the_tracker_cannot_be_poisoned() {
    let srv = start(Ipv4Addr::new(127, 31, 3, 1));
    let hash = [7u8; 20];
    // A claims to be 10.9.9.9: ignored, A's own address is listed.
    let (_, body) = get(A, srv.addr, &announce_target(&hash, 1, 7001, "&ip=10.9.9.9"), None);
    assert!(!body.starts_with(b"d14:failure"), "{}", String::from_utf8_lossy(&body));
    let (_, body) = get(B, srv.addr, &announce_target(&hash, 2, 7002, ""), None);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains(&format!("2:ip{}:{A}", A.to_string().len())), "{text}");
    assert!(!text.contains("10.9.9.9"), "{text}");
    // C stops A's peer id: refused, A stays listed.
    let (_, body) = get(C, srv.addr, &announce_target(&hash, 1, 7001, "&event=stopped"), None);
    let reason = "peer_id is registered from another address";
    assert_eq!(String::from_utf8_lossy(&body), format!("d14:failure reason{}:{reason}e", reason.len()));
    let (_, body) = get(B, srv.addr, &announce_target(&hash, 2, 7002, ""), None);
    assert!(String::from_utf8_lossy(&body).contains(&A.to_string()), "A was evicted");
    // A itself may stop.
    get(A, srv.addr, &announce_target(&hash, 1, 7001, "&event=stopped"), None);
    let (_, body) = get(B, srv.addr, &announce_target(&hash, 2, 7002, ""), None);
    assert!(!String::from_utf8_lossy(&body).contains(&A.to_string()), "A still listed after stopping");
}

#[test]
fn malformed_requests_get_no_second_answer_and_do_not_hang() {
    let srv = start(Ipv4Addr::new(127, 31, 4, 1));
    let hash = [9u8; 20];
    let announce = announce_target(&hash, 1, 7001, "");
    // A space before the colon: a request smuggled in the "body" must not be answered.
    let smuggle = format!(
        "GET {announce} HTTP/1.1\r\nhost: x\r\nContent-Length : 5\r\n\r\nGET /scrape HTTP/1.1\r\nhost: x\r\n\r\n"
    );
    let t0 = Instant::now();
    let got = exchange(A, srv.addr, smuggle.as_bytes());
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert_eq!(got.matches("HTTP/1.1").count(), 1, "a second answer: {got}");
    // NUL in the target.
    let got = exchange(A, srv.addr, b"GET /announce?info_hash=\0 HTTP/1.1\r\nhost: x\r\n\r\n");
    assert!(got.starts_with("HTTP/1.1 400"), "{got:?}");
    // Bare LF line ends: answered at once (not left to a timeout).
    let bare = format!("GET {announce} HTTP/1.1\nhost: x\nconnection: close\n\n");
    let got = exchange(A, srv.addr, bare.as_bytes());
    assert!(got.starts_with("HTTP/1.1 "), "{got}");
    assert!(t0.elapsed() < Duration::from_secs(2), "malformed requests took {:?}", t0.elapsed());
}

/// The admin API is HTTPS-only: on the plain boot port, `/api/v1` and anything carrying the
/// token are refused (and the refusal does not echo the token).
#[test]
fn the_boot_port_refuses_the_admin_api_and_the_token() {
    let srv = start(Ipv4Addr::new(127, 31, 4, 1));
    for (target, token) in [
        ("/api/v1/cluster", Some(srv.token.as_str())),
        ("/api/v1/node", None),
        ("/boot/ipxe?mac=52:54:00:00:00:01&preview=1", Some(srv.token.as_str())),
    ] {
        let (status, body) = get(A, srv.addr, target, token);
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 403, "{target}: {text}");
        assert!(text.contains("HTTPS") && !text.contains(&srv.token), "{target}: {text}");
    }
    // The boot path itself still answers in plain HTTP.
    let (status, _) = get(A, srv.addr, "/scrape", None);
    assert_eq!(status, 200);
}
