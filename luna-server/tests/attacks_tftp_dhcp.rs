//! Issue 12's cheap denial-of-service attacks on TFTP and DHCP, performed against the real
//! `luna-server` binary (the build of this test's profile), each asserting the fixed behaviour.
//!
//! - TFTP (on 127.0.77.x, no privileges needed): the slot attack (item 5), netascii memory
//!   (item 6, the server's VmRSS), the option flood (item 7, the server's CPU time).
//! - DHCP (two network namespaces `lt-dos-*` joined by a veth pair; needs
//!   `LUNA_TEST_PRIVILEGED=1`): a flood of random MACs in discovery mode keeps the lease records
//!   bounded (item 12), and requests carrying options dhcproto used to `debug_assert!` on are
//!   still answered by the debug build (item 13).

mod image_support;
mod netns_support;
use netns_support::Netns;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use luna_server::dhcp::packet::client;
use luna_server::tftp::packet::{self, Mode, Packet};

const SERVER_IP: &str = "127.0.77.1";

/// Raises this process's open-file soft limit to the hard limit: the attacks hold hundreds
/// of client sockets open at once.
fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn free_udp_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// A running `luna-server`; SIGTERM (then SIGKILL) and reaped on drop.
struct LunaServer {
    child: Child,
    dir: tempfile::TempDir,
    tftp: SocketAddr,
}

impl LunaServer {
    /// `init`s a store in a temporary directory, lets `prepare` change it, then serves with
    /// `extra` appended to the config file; `netns` runs it inside that namespace.
    fn start(tftp_extra: &str, dhcp: &str, netns: Option<&str>, prepare: impl FnOnce(&Path)) -> LunaServer {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("tftpboot")).unwrap();
        let port = if netns.is_some() { 69 } else { free_udp_port(SERVER_IP) };
        let listen = if netns.is_some() { "127.0.0.1:0".to_string() } else { format!("{SERVER_IP}:0") };
        let tftp_ip = if netns.is_some() { "127.0.0.1" } else { SERVER_IP };
        let config = format!(
            "store = \"sqlite://{db}\"\nlisten = \"{listen}\"\ntoken_file = \"{token}\"\ndata_dir = \"{data}\"\n\
             [http]\napi_listen = \"{listen}\"\n[image]\nseed = false\n[dhcp]\n{dhcp}\n[tftp]\nroot = \"{root}\"\nbind = \"{tftp_ip}:{port}\"\n{tftp_extra}\n\
             [tftp.ipxe_files]\n",
            db = d.join("luna.db").display(),
            token = d.join("token").display(),
            data = d.join("data").display(),
            root = d.join("tftpboot").display(),
        );
        std::fs::write(d.join("luna.toml"), config).unwrap();
        let bin = env!("CARGO_BIN_EXE_luna-server");
        let out = Command::new(bin).arg("--config").arg(d.join("luna.toml")).arg("init").output().unwrap();
        assert!(out.status.success(), "luna-server init: {}", String::from_utf8_lossy(&out.stderr));
        prepare(d);
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin]);
                c
            }
            None => Command::new(bin),
        };
        let log = File::create(d.join("server.log")).unwrap();
        let child = cmd
            .arg("--config")
            .arg(d.join("luna.toml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let server = LunaServer { child, tftp: format!("{tftp_ip}:{port}").parse().unwrap(), dir };
        server.wait_ready(netns.is_some());
        server
    }

    fn wait_ready(&self, in_netns: bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = if in_netns {
                // `ip netns exec` execs luna-server: DHCP is up once port 67 is bound there.
                udp_port_bound_in(self.child.id(), 67)
            } else {
                let c = UdpSocket::bind((SERVER_IP, 0)).unwrap();
                c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                let mut b = Vec::new();
                packet::encode_rrq(&mut b, b"no-such-file", Mode::Octet, &[]);
                c.send_to(&b, self.tftp).unwrap();
                let mut buf = [0u8; 512];
                c.recv_from(&mut buf).is_ok()
            };
            if up {
                return;
            }
            assert!(Instant::now() < deadline, "luna-server did not come up: {}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("tftpboot")
    }

    fn stop(&mut self) {
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LunaServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a process (`ip netns exec` hands over to luna-server with exec) has a UDP socket on
/// `port`, from its namespace's /proc/<pid>/net/udp.
fn udp_port_bound_in(pid: u32, port: u16) -> bool {
    let Ok(f) = File::open(format!("/proc/{pid}/net/udp")) else { return false };
    let needle = format!(":{port:04X} ");
    BufReader::new(f)
        .lines()
        .skip(1)
        .map_while(Result::ok)
        .any(|l| l.split_whitespace().nth(1).is_some_and(|local| format!("{local} ").ends_with(&needle)))
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// User + system CPU time of `pid`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn client(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

fn send_rrq(sock: &UdpSocket, to: SocketAddr, name: &str, mode: Mode, opts: &[(&str, &str)]) {
    let opts: Vec<(String, String)> = opts.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    let mut b = Vec::new();
    packet::encode_rrq(&mut b, name.as_bytes(), mode, &opts);
    sock.send_to(&b, to).unwrap();
}

/// What came back first to an RRQ.
#[derive(Debug)]
enum First {
    Oack(Vec<(String, String)>, SocketAddr),
    Data(Vec<u8>),
    Error(String),
    Nothing,
}

fn first_reply(sock: &UdpSocket) -> First {
    let mut buf = vec![0u8; 65536];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => match packet::parse(&buf[..n]) {
            Ok(Packet::Oack(o)) => First::Oack(o, from),
            Ok(Packet::Data { data, .. }) => First::Data(data.to_vec()),
            Ok(Packet::Error { message, .. }) => First::Error(message),
            other => panic!("unexpected reply {other:?}"),
        },
        Err(_) => First::Nothing,
    }
}

/// A well-behaved client: fetches `name` in octet mode from `local`, lockstep.
fn fetch(local: &str, server: SocketAddr, name: &str) -> Result<Vec<u8>, String> {
    let sock = client(local);
    send_rrq(&sock, server, name, Mode::Octet, &[("blksize", "1428")]);
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::new();
    let mut expect: u16 = 0;
    let mut ack = Vec::new();
    loop {
        let (n, from) = sock.recv_from(&mut buf).map_err(|e| format!("no reply: {e}"))?;
        match packet::parse(&buf[..n]).map_err(|e| e.to_string())? {
            Packet::Oack(_) if expect == 0 => {
                packet::encode_ack(&mut ack, 0);
                sock.send_to(&ack, from).unwrap();
                expect = 1;
            }
            Packet::Data { block, data } if block == expect.max(1) => {
                out.extend_from_slice(data);
                packet::encode_ack(&mut ack, block);
                sock.send_to(&ack, from).unwrap();
                if data.len() < 1428 {
                    return Ok(out);
                }
                expect = block + 1;
            }
            Packet::Error { message, .. } => return Err(message),
            _ => {}
        }
    }
}

/// Item 5: 520 never-acknowledged requests with timeout=255 from one address fill at most that
/// address's share of the slots (the timeout is declined), everyone else is served meanwhile,
/// and slots filled from many addresses are given back after `abandon_after_secs`.
#[test]
fn tftp_slot_attack_does_not_lock_out_other_clients() {
    raise_nofile();
    let extra = "max_transfers = 64\nmax_transfers_per_client = 4\nmax_timeout_secs = 5\nabandon_after_secs = 3\ntimeout_ms = 1000\nmax_retries = 5";
    let server = LunaServer::start(extra, "", None, |_| {});
    let file = image_support::pattern(100_000, 0x9e37_79b9);
    std::fs::write(server.root().join("boot.bin"), &file).unwrap();

    // The attack, as reported: 520 requests, each from its own port, never acknowledged.
    // (One after the other: a burst of 520 overflows the listener's receive buffer, and a
    // dropped request would prove nothing.)
    let attackers: Vec<UdpSocket> = (0..520).map(|_| client("127.0.77.2")).collect();
    let (mut started, mut refused) = (0, 0);
    for s in &attackers {
        send_rrq(s, server.tftp, "boot.bin", Mode::Octet, &[("timeout", "255"), ("tsize", "0")]);
        match first_reply(s) {
            First::Oack(o, _) => {
                assert!(o.iter().all(|(n, _)| n != "timeout"), "a 255 s timeout was accepted: {o:?}");
                started += 1;
            }
            First::Error(m) if m.contains("too many transfers from your address") => refused += 1,
            other => panic!("attacker got {other:?}"),
        }
    }
    assert_eq!((started, refused), (4, 516));

    // A node boots meanwhile.
    let t = Instant::now();
    assert_eq!(fetch("127.0.77.3", server.tftp, "boot.bin").expect("legitimate client served"), file);
    assert!(t.elapsed() < Duration::from_secs(3), "legitimate fetch took {:?}", t.elapsed());

    // Now from 16 addresses, once the first attack's transfers are gone: every slot taken, a
    // newcomer hears "busy"…
    std::thread::sleep(Duration::from_secs(4));
    let many: Vec<UdpSocket> = (0..64).map(|i| client(&format!("127.0.78.{}", 10 + i / 4))).collect();
    let filled = Instant::now();
    for s in &many {
        send_rrq(s, server.tftp, "boot.bin", Mode::Octet, &[("timeout", "255")]);
        let first = first_reply(s);
        assert!(matches!(first, First::Data(..)), "{first:?}");
    }
    match fetch("127.0.77.4", server.tftp, "boot.bin") {
        Err(m) => assert!(m.contains("busy"), "{m}"),
        Ok(_) => panic!("served although every slot should be taken"),
    }
    // …until the abandoned transfers give their slots back (3 s, not 255 s × 6).
    let served = loop {
        match fetch("127.0.77.4", server.tftp, "boot.bin") {
            Ok(got) => break got,
            Err(m) => assert!(m.contains("busy"), "{m}"),
        }
        assert!(filled.elapsed() < Duration::from_secs(15), "slots still taken after {:?}", filled.elapsed());
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(served, file);
    let waited = filled.elapsed();
    assert!(waited >= Duration::from_secs(2), "served after {waited:?}: were the slots ever full?");
    eprintln!("slots given back {waited:?} after the attack filled them");
    drop(attackers);
}

/// Item 6: 500 concurrent netascii requests of a 1 MiB file grow the server's RSS by a few
/// MiB, not by a converted copy each (500 MiB before), and what is sent is still netascii with
/// the converted size as tsize.
#[test]
fn tftp_netascii_requests_keep_memory_bounded() {
    raise_nofile();
    let extra = "max_transfers = 1000\nmax_transfers_per_client = 1000\nabandon_after_secs = 20";
    let server = LunaServer::start(extra, "", None, |_| {});
    // 1 MiB like ipxe.efi, with line ends to convert.
    let mut raw = image_support::pattern(1 << 20, 0x9e37_79b9);
    for (i, b) in raw.iter_mut().enumerate() {
        if i.is_multiple_of(61) {
            *b = b'\n';
        }
    }
    std::fs::write(server.root().join("ipxe.efi"), &raw).unwrap();
    let converted_len = raw.len() + raw.iter().filter(|&&c| c == b'\n' || c == b'\r').count();

    // One full netascii fetch first (it also loads the file cache, shared by everyone).
    let s = client("127.0.77.5");
    send_rrq(&s, server.tftp, "ipxe.efi", Mode::Netascii, &[("tsize", "0"), ("blksize", "1428")]);
    let First::Oack(o, from) = first_reply(&s) else { panic!("no oack") };
    assert_eq!(o, vec![("tsize".to_string(), converted_len.to_string()), ("blksize".into(), "1428".into())]);
    let mut got = Vec::new();
    let mut ack = Vec::new();
    let mut buf = vec![0u8; 2048];
    packet::encode_ack(&mut ack, 0);
    s.send_to(&ack, from).unwrap();
    loop {
        let n = s.recv(&mut buf).unwrap();
        let Ok(Packet::Data { block, data }) = packet::parse(&buf[..n]) else { panic!("not data") };
        got.extend_from_slice(data);
        packet::encode_ack(&mut ack, block);
        s.send_to(&ack, from).unwrap();
        if data.len() < 1428 {
            break;
        }
    }
    assert_eq!(got.len(), converted_len);
    assert_eq!(got, luna_server::tftp::files::to_netascii(&raw));

    let before = rss_kib(server.pid());
    let clients: Vec<UdpSocket> = (0..500).map(|_| client("127.0.77.6")).collect();
    for c in &clients {
        send_rrq(c, server.tftp, "ipxe.efi", Mode::Netascii, &[]);
        let First::Data(d) = first_reply(c) else { panic!("no data block") };
        assert_eq!(d.len(), 512);
    }
    // Every transfer is running (its first block sent, waiting for an ACK).
    let after = rss_kib(server.pid());
    let grown = after.saturating_sub(before);
    eprintln!("VmRSS {before} KiB -> {after} KiB with 500 netascii transfers of 1 MiB (+{grown} KiB)");
    assert!(grown < 48 * 1024, "RSS grew by {grown} KiB for 500 netascii transfers");
}

/// Item 7: 65 KB requests with ~10 800 distinct options are refused after the 17th option, and
/// ten of them cost the server well under a second of CPU (1.45 s each before).
#[test]
fn tftp_option_flood_costs_little_cpu() {
    let server = LunaServer::start("", "", None, |_| {});
    let mut raw = Vec::new();
    packet::encode_rrq(&mut raw, b"boot.bin", Mode::Octet, &[]);
    let mut count = 0;
    while raw.len() < 65_000 {
        raw.extend_from_slice(format!("{count:x}\0\0").as_bytes());
        count += 1;
    }
    assert!(count > 10_000);
    let s = client("127.0.77.7");
    let before = cpu_time(server.pid());
    for _ in 0..10 {
        s.send_to(&raw, server.tftp).unwrap();
        match first_reply(&s) {
            First::Error(m) => assert!(m.contains("more than 16 options"), "{m}"),
            other => panic!("got {other:?}"),
        }
    }
    let after = cpu_time(server.pid());
    assert!(after > Duration::ZERO, "cpu time not readable");
    let spent = after.saturating_sub(before);
    eprintln!("10 requests with {count} options each: {spent:?} of server CPU");
    assert!(spent < Duration::from_millis(300), "server spent {spent:?}");
}

// ---------------------------------------------------------------------------------------------
// DHCP, in namespaces

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn discover(mac: [u8; 6], xid: u32, bad: &[&[u8]]) -> Vec<u8> {
    let m = client::broadcast(client::discover(luna_core::MacAddr(mac), xid));
    let mut bytes = client::encode(&m, None);
    for opt in bad {
        bytes.splice(240..240, opt.iter().copied());
    }
    bytes
}

/// Items 12 and 13: discovery on, a range of 8 addresses, offers held 1 s. For 4 s a stranger
/// floods DISCOVERs from random MACs (every other one with a malformed option); afterwards the
/// store holds at most one `ip/` and one `mac/` record per address of the range, though far
/// more machines were offered one. A DISCOVER carrying all the malformed options still gets
/// its OFFER from the debug build.
#[test]
fn dhcp_random_mac_flood_keeps_leases_bounded() {
    if !image_support::privileged() {
        return;
    }
    let srv = Netns::new("lt-dos-srv");
    let cli = Netns::new("lt-dos-cli");
    sh(
        "ip",
        &["link", "add", "lt-dos-s", "netns", &srv.0, "type", "veth", "peer", "name", "lt-dos-c", "netns", &cli.0],
    );
    sh("ip", &["-n", &srv.0, "addr", "add", "10.77.0.1/24", "dev", "lt-dos-s"]);
    sh("ip", &["-n", &srv.0, "link", "set", "lt-dos-s", "up"]);
    sh("ip", &["-n", &cli.0, "addr", "add", "10.77.0.2/24", "dev", "lt-dos-c"]);
    sh("ip", &["-n", &cli.0, "link", "set", "lt-dos-c", "up"]);

    let dhcp = "interfaces = [\"lt-dos-s\"]\noffer_time = 1";
    let mut server = LunaServer::start("enabled = false", dhcp, Some(&srv.0), |dir| {
        let db = format!("sqlite://{}", dir.join("luna.db").display());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = luna_server::store::open(&db).await.unwrap();
            let service = luna_server::service::Service::new(store);
            let net = serde_json::json!({"name": "prov", "cidr": "10.77.0.0/24"});
            service.create(luna_core::model::Kind::Network, net).await.unwrap();
            let patch = serde_json::json!({"dhcp_range": "10.77.0.100-10.77.0.107"});
            service.update(luna_core::model::Kind::Cluster, "luna", patch).await.unwrap();
        });
    });
    let (sent, offers, late_offer) = cli.run(|| {
        let sock = UdpSocket::bind("0.0.0.0:68").unwrap();
        sock.set_nonblocking(true).unwrap();
        let to: SocketAddr = (Ipv4Addr::new(10, 77, 0, 1), 67).into();
        let mut buf = vec![0u8; 1500];
        let mut offers = std::collections::HashSet::new();
        let mut drain = |offers: &mut std::collections::HashSet<(u32, Ipv4Addr)>| {
            while let Ok(n) = sock.recv(&mut buf) {
                if let Ok(r) = luna_server::dhcp::Request::decode(&buf[..n]) {
                    offers.insert((r.message.xid(), r.message.yiaddr()));
                }
            }
        };
        let start = Instant::now();
        let mut sent = 0u32;
        while start.elapsed() < Duration::from_secs(4) {
            let mut mac = rand::random::<[u8; 6]>();
            mac[0] = (mac[0] & 0xfe) | 0x02;
            let bad: &[&[u8]] =
                if sent.is_multiple_of(2) { &[] } else { &client::BAD_OPTIONS[sent as usize % 8..][..1] };
            sock.send_to(&discover(mac, sent, bad), to).unwrap();
            sent += 1;
            drain(&mut offers);
            std::thread::sleep(Duration::from_millis(2));
        }
        // A last machine whose DISCOVER carries every malformed option (offers expire in 1 s).
        std::thread::sleep(Duration::from_millis(1100));
        sock.send_to(&discover([2, 0x77, 0, 0, 0, 1], 0xdead, &client::BAD_OPTIONS), to).unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut late = false;
        while Instant::now() < deadline && !late {
            drain(&mut offers);
            late = offers.iter().any(|(xid, _)| *xid == 0xdead);
            std::thread::sleep(Duration::from_millis(20));
        }
        (sent, offers.len(), late)
    });
    server.stop();
    eprintln!("{sent} DISCOVERs from random MACs, {offers} offers");
    assert!(late_offer, "the DISCOVER with malformed options got no offer: {}", server.log());
    assert!(offers > 16, "only {offers} offers: the flood never took expired addresses over");
    assert!(!server.log().contains("panicked"), "{}", server.log());

    let db = format!("sqlite://{}", server.dir.path().join("luna.db").display());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let leases = rt.block_on(async {
        let store = luna_server::store::open(&db).await.unwrap();
        store.list(luna_server::store::Collection::Lease, "").await.unwrap()
    });
    let ips = leases.iter().filter(|r| r.key.starts_with("ip/")).count();
    let macs = leases.iter().filter(|r| r.key.starts_with("mac/")).count();
    eprintln!("lease records after the flood: {ips} ip/, {macs} mac/");
    assert!(ips <= 8 && macs <= 8, "{ips} ip/ and {macs} mac/ records for a range of 8 addresses");
}
