//! Benchmark (not a test): DHCP transactions (DISCOVER → OFFER → REQUEST → ACK) per second
//! against luna-server, dnsmasq and Kea, each with the same `n` reservations (MAC → address).
//!
//!     cargo run --release -p luna-tests --bin bench-dhcp -- [--nodes 1024] [--in-flight 256]
//!         [--seconds 10]
//!
//! The load generator runs in one network namespace, the server in another, joined by a veth
//! pair. The generator cycles through the `n` MACs with `--in-flight` transactions open at a
//! time (never two for one MAC), broadcast flag set, and checks every ACK carries the MAC's
//! reserved address. Every server persists what it hands out: luna records each node's DHCP
//! status in its store (sqlite), dnsmasq writes its lease file, Kea appends to its memfile
//! lease file (`persist: true`). Needs root, `dnsmasq` (dnsmasq-base) and `kea-dhcp4`
//! (kea-dhcp4-server); a missing one is skipped.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use dhcproto::v4::MessageType;
use luna_server::dhcp::packet::client;
use luna_server::dhcp::Request;
use luna_tests::bench::{self, BenchNode, CommonArgs, Link, CLIENT_DEV, SERVER_DEV, SERVER_IP};
use luna_tests::ChildGuard;

/// DHCP transactions per second: luna-server against dnsmasq and Kea.
#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Transactions open at a time (at most --nodes).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    in_flight: u16,
}

fn parse_args() -> Result<Args> {
    let a = Args::parse();
    if a.in_flight > a.common.nodes {
        bail!("--in-flight {} is more than --nodes {}", a.in_flight, a.common.nodes);
    }
    Ok(a)
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    done: u64,
    retried: u64,
    naks: u64,
    wrong: u64,
}

struct Tx {
    node: usize,
    xid: u32,
    requesting: bool,
    sent: Instant,
}

/// A reply is late after this; the transaction starts over (as a client would).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Runs the generator for `warmup + seconds` inside the client namespace's thread; counts only
/// what completes after the warm-up.
fn generate(nodes: &[BenchNode], in_flight: usize, warmup: Duration, run: Duration) -> Result<(Tally, Duration)> {
    let sock = UdpSocket::bind("0.0.0.0:68").context("bind udp port 68")?;
    sock.set_broadcast(true)?;
    sock.set_read_timeout(Some(Duration::from_millis(5)))?;
    // Room for every reply in flight: with the default buffer (~90 datagrams) replies to 256
    // open transactions were dropped here, and every drop stalled a slot for RETRY_AFTER
    // whichever server was measured. The same call luna-server makes for its own sockets.
    luna_server::dhcp::server::set_recv_buffer(&sock, 4 << 20);
    let server = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let mut busy = vec![false; nodes.len()];
    let mut open: HashMap<u32, Tx> = HashMap::with_capacity(in_flight * 2);
    let mut cursor = 0usize;
    let mut xid: u32 = 0x1000_0000;
    let mut tally = Tally::default();
    let mut buf = vec![0u8; 4096];
    let started = Instant::now();
    let mut measuring: Option<(Instant, Tally)> = None;
    let mut last_scan = Instant::now();
    let send_discover = |sock: &UdpSocket, node: &BenchNode, xid: u32| -> Result<()> {
        let m = client::broadcast(client::discover(node.mac, xid));
        sock.send_to(&client::encode(&m, None), server)?;
        Ok(())
    };
    loop {
        let now = Instant::now();
        if measuring.is_none() && now - started >= warmup {
            measuring = Some((now, tally));
        }
        if let Some((from, _)) = measuring {
            if now - from >= run {
                break;
            }
        }
        while open.len() < in_flight {
            while busy[cursor] {
                cursor = (cursor + 1) % nodes.len();
            }
            let node = cursor;
            cursor = (cursor + 1) % nodes.len();
            busy[node] = true;
            xid = xid.wrapping_add(1);
            send_discover(&sock, &nodes[node], xid)?;
            open.insert(xid, Tx { node, xid, requesting: false, sent: Instant::now() });
        }
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                let Ok(reply) = Request::decode(&buf[..n]) else { continue };
                let m = &reply.message;
                let Some(tx) = open.get_mut(&m.xid()) else { continue };
                let node = &nodes[tx.node];
                match (tx.requesting, reply.msg_type()) {
                    (false, Some(MessageType::Offer)) => {
                        let sid = reply.server_id().unwrap_or(SERVER_IP);
                        let req = client::broadcast(client::request_selecting(node.mac, tx.xid, m.yiaddr(), sid));
                        sock.send_to(&client::encode(&req, None), server)?;
                        tx.requesting = true;
                        tx.sent = Instant::now();
                    }
                    (true, Some(MessageType::Ack)) => {
                        if m.yiaddr() == node.ip {
                            tally.done += 1;
                        } else {
                            tally.wrong += 1;
                        }
                        busy[tx.node] = false;
                        open.remove(&m.xid());
                    }
                    (true, Some(MessageType::Nak)) => {
                        tally.naks += 1;
                        busy[tx.node] = false;
                        open.remove(&m.xid());
                    }
                    _ => {}
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
        if last_scan.elapsed() > Duration::from_millis(100) {
            last_scan = Instant::now();
            let late: Vec<u32> = open.values().filter(|t| t.sent.elapsed() > RETRY_AFTER).map(|t| t.xid).collect();
            for old in late {
                if let Some(tx) = open.remove(&old) {
                    tally.retried += 1;
                    xid = xid.wrapping_add(1);
                    send_discover(&sock, &nodes[tx.node], xid)?;
                    open.insert(xid, Tx { node: tx.node, xid, requesting: false, sent: Instant::now() });
                }
            }
        }
    }
    let (from, before) = measuring.ok_or_else(|| anyhow!("the run ended before the warm-up did"))?;
    let d = Tally {
        done: tally.done - before.done,
        retried: tally.retried - before.retried,
        naks: tally.naks - before.naks,
        wrong: tally.wrong - before.wrong,
    };
    Ok((d, from.elapsed()))
}

/// Waits until one DORA for the first node completes (the server is up and answering).
fn wait_answering(link: &Link, nodes: &[BenchNode]) -> Result<()> {
    let first = vec![nodes[0].clone()];
    for _ in 0..30 {
        let r = link.client.enter(|| generate(&first, 1, Duration::ZERO, Duration::from_millis(500)))??;
        if r.0.done > 0 {
            return Ok(());
        }
    }
    bail!("the server did not answer a DHCP transaction within 15 s")
}

fn measure(name: &str, link: &Link, nodes: &[BenchNode], a: &Args) -> Result<f64> {
    wait_answering(link, nodes)?;
    let (t, took) = link.client.enter(|| {
        generate(nodes, a.in_flight.into(), Duration::from_secs(2), Duration::from_secs(a.common.seconds))
    })??;
    let rate = t.done as f64 / took.as_secs_f64();
    println!(
        "{name:<8} {rate:10.1} DORA/s  ({} done in {took:.1?}, {} retried after {RETRY_AFTER:?}, {} nak, {} wrong address)",
        t.done, t.retried, t.naks, t.wrong
    );
    if t.wrong > 0 || t.naks > 0 {
        bail!("{name} gave {} wrong addresses and {} naks", t.wrong, t.naks);
    }
    Ok(rate)
}

fn start_dnsmasq(link: &Link, dir: &Path, nodes: &[BenchNode]) -> Result<ChildGuard> {
    let mut hosts = String::new();
    for n in nodes {
        writeln!(hosts, "{},{}", n.mac, n.ip)?;
    }
    std::fs::write(dir.join("hosts"), hosts)?;
    let args = [
        "--keep-in-foreground".to_string(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--port=0".into(),
        format!("--interface={SERVER_DEV}"),
        "--bind-interfaces".into(),
        format!("--dhcp-range={},static,255.255.240.0,1h", SERVER_IP),
        format!("--dhcp-hostsfile={}", dir.join("hosts").display()),
        format!("--dhcp-leasefile={}", dir.join("leases").display()),
        format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
        "--dhcp-authoritative".into(),
        format!("--dhcp-lease-max={}", nodes.len() * 2),
        "--user=root".into(),
        "--log-facility=-".into(),
    ];
    Ok(link.server.spawn("bench-dnsmasq", "dnsmasq", &args)?)
}

fn start_kea(link: &Link, dir: &Path, nodes: &[BenchNode], threads: u32) -> Result<ChildGuard> {
    let reservations: Vec<_> = nodes
        .iter()
        .map(|n| serde_json::json!({"hw-address": n.mac.to_string(), "ip-address": n.ip.to_string()}))
        .collect();
    let config = serde_json::json!({"Dhcp4": {
        "interfaces-config": {"interfaces": [SERVER_DEV], "dhcp-socket-type": "raw"},
        // Leases persisted to a CSV file like a production Kea (memfile, persist).
        "lease-database": {"type": "memfile", "persist": true,
            "name": dir.join("kea-leases4.csv").display().to_string(), "lfc-interval": 3600},
        "valid-lifetime": 3600,
        "multi-threading": {"enable-multi-threading": threads > 1, "thread-pool-size": threads,
            "packet-queue-size": 1024},
        // Reservations only: no pool, so the lookup is by host reservation as in luna.
        "host-reservation-identifiers": ["hw-address"],
        "subnet4": [{"id": 1, "subnet": bench::CIDR, "reservations": reservations}],
        "loggers": [{"name": "kea-dhcp4", "output_options": [{"output": "stdout"}], "severity": "WARN"}]
    }});
    let path = dir.join("kea-dhcp4.conf");
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    let mut cmd = link.server.command("kea-dhcp4");
    cmd.arg("-c").arg(&path).env("KEA_PIDFILE_DIR", dir).env("KEA_LOCKFILE_DIR", dir);
    Ok(ChildGuard::spawn(&mut cmd, "bench-kea")?)
}

fn main() -> Result<()> {
    let a = parse_args()?;
    bench::raise_nofile();
    let dir = tempfile::Builder::new().prefix("bench-dhcp-").tempdir()?;
    let link = Link::new()?;
    println!(
        "{} reservations, {} transactions in flight, {} s per server, generator and server in two netns over veth ({CLIENT_DEV} → {SERVER_DEV})",
        a.common.nodes, a.in_flight, a.common.seconds
    );

    let luna_dir = dir.path().join("luna");
    std::fs::create_dir_all(&luna_dir)?;
    let config = bench::luna_config(&luna_dir)?;
    let nodes = bench::populate_luna(&config, a.common.nodes.into())?;
    let luna = {
        let _server = bench::start_luna(&link, &config)?;
        measure("luna", &link, &nodes, &a)?
    };

    let dnsmasq = if bench::have("dnsmasq") {
        let d = dir.path().join("dnsmasq");
        std::fs::create_dir_all(&d)?;
        let _server = start_dnsmasq(&link, &d, &nodes)?;
        Some(measure("dnsmasq", &link, &nodes, &a)?)
    } else {
        println!("dnsmasq  skipped: not installed (apt-get install -y dnsmasq-base)");
        None
    };

    let mut kea = None;
    if bench::have("kea-dhcp4") {
        // Kea 2.2 runs single-threaded by default; its multi-threaded mode is measured too and
        // the better of the two is the baseline.
        for threads in [1u32, 2] {
            let d = dir.path().join(format!("kea-{threads}"));
            std::fs::create_dir_all(&d)?;
            let _server = start_kea(&link, &d, &nodes, threads)?;
            let rate = measure(&format!("kea/{threads}t"), &link, &nodes, &a)?;
            let leases = std::fs::read_to_string(d.join("kea-leases4.csv")).unwrap_or_default();
            if leases.lines().count() < 2 {
                bail!("kea wrote no leases to its memfile");
            }
            kea = Some(kea.map_or(rate, |k: f64| k.max(rate)));
        }
    } else {
        println!("kea      skipped: not installed (apt-get install -y kea-dhcp4-server)");
    }

    if let Some(d) = dnsmasq {
        println!("ratio luna/dnsmasq: {:.2}", luna / d);
    }
    if let Some(k) = kea {
        println!("ratio luna/kea:     {:.2} (target >= 1.0)", luna / k);
    }
    Ok(())
}
