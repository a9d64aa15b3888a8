//! Benchmark (not a test): the boot storm. `--clients` simulated nodes (one process, one network
//! namespace) all power on at the same moment and do what a booting node does against the real
//! luna-server: DHCP DISCOVER/REQUEST, GET the iPXE script, HEAD the kernel and the initrd, GET
//! the install plan with the script's token, and three status reports at once.
//!
//!     cargo run --release -p luna-tests --bin bench-storm -- [--clients 512] [--loss-percent 10]
//!
//! Each client is a registered node with its own MAC and its own address (all on the generator's
//! interface), so the per-boot tokens, which are bound to node, MAC and address, work as on a
//! real cluster. Run twice: without loss, then with `--loss-percent` of the packets dropped both
//! ways in the generator's namespace (nf_tables `numgen random`; this kernel has no sch_netem),
//! where DHCP retransmits on iPXE's schedule (1 s doubling to 8 s, jittered) and HTTP steps retry
//! with the agent's backoff (full jitter, 0.5 s base): no step may fail. Printed per step: done,
//! failed, retries, p50/p99/max latency (from the step's start to its success, retries
//! included); and the server's peak RSS. Needs root and `nft` (nftables) for the loss run.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use dhcproto::v4::MessageType;
use luna_agent::backoff::Backoff;
use luna_server::dhcp::packet::client;
use luna_server::dhcp::Request;
use luna_tests::bench::{self, BenchNode, Link, CLIENT_DEV, SERVER_IP};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

/// Boot storm: N nodes booting at once against luna-server, without and with packet loss.
#[derive(Parser, Debug)]
struct Args {
    /// Simulated nodes booting at once.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u16).range(1..=4000))]
    clients: u16,
    /// Packets dropped (both ways) in the second run, in percent; 0 skips that run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=50))]
    loss_percent: u8,
}

const STEPS: [&str; 6] = ["dhcp", "ipxe", "head kernel", "head initrd", "plan", "3 status"];
/// Attempts per step before it counts as failed.
const ATTEMPTS: u32 = 8;
/// iPXE's DHCP retransmission: first timeout 1 s, doubling up to 8 s (`DHCP_DISC_START_TIMEOUT`,
/// `DHCP_DISC_MAX_TIMEOUT` in iPXE's net/udp/dhcp.c), here with ±25 % jitter.
const DHCP_FIRST: Duration = Duration::from_secs(1);
const DHCP_MAX: Duration = Duration::from_secs(8);
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Tally {
    /// Per step: latencies of the successes.
    lat: Vec<Vec<Duration>>,
    failed: Vec<u32>,
    retries: Vec<u32>,
    errors: Vec<String>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            lat: vec![Vec::new(); STEPS.len()],
            failed: vec![0; STEPS.len()],
            retries: vec![0; STEPS.len()],
            errors: Vec::new(),
        }
    }
}

/// Routes DHCP replies (by xid) to the client waiting for them.
type Waiters = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Request>>>>;

fn jitter(d: Duration, seed: &mut Backoff) -> Duration {
    // 0.75..1.25 of d, from the backoff's generator (a wait in [0, 0.5 s] scaled).
    let r = seed.next_delay().as_secs_f64() / 0.5;
    d.mul_f64(0.75 + 0.5 * r.clamp(0.0, 1.0))
}

/// DISCOVER → OFFER → REQUEST → ACK, retransmitting a packet that got no answer in time (the
/// timeout doubling); returns the retransmissions made.
async fn dhcp(sock: &UdpSocket, waiters: &Waiters, node: &BenchNode, xid: u32) -> Result<u32, String> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    waiters.lock().expect("waiters").insert(xid, tx);
    let server = SocketAddr::from((Ipv4Addr::BROADCAST, 67));
    let mut rng = Backoff::new(Duration::from_millis(500), Duration::from_millis(500), u64::from(xid));
    let discover = client::encode(&client::broadcast(client::discover(node.mac, xid)), None);
    let (mut pkt, mut requesting, mut timeout, mut retries) = (discover.clone(), false, DHCP_FIRST, 0u32);
    let result = 'tx: loop {
        if retries >= ATTEMPTS {
            break Err(format!("{}: no ack after {retries} retransmissions", node.name));
        }
        // A send the loss rule dropped fails with EPERM: for the client it is a lost packet.
        if let Err(e) = sock.send_to(&pkt, server).await {
            if e.kind() != std::io::ErrorKind::PermissionDenied {
                break Err(format!("{}: send: {e}", node.name));
            }
        }
        let deadline = tokio::time::Instant::now() + jitter(timeout, &mut rng);
        while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            match reply.msg_type() {
                Some(MessageType::Offer) if !requesting => {
                    let sid = reply.server_id().unwrap_or(SERVER_IP);
                    let m = client::request_selecting(node.mac, xid, reply.message.yiaddr(), sid);
                    pkt = client::encode(&client::broadcast(m), None);
                    requesting = true;
                    timeout = DHCP_FIRST;
                    continue 'tx;
                }
                Some(MessageType::Ack) if requesting => {
                    if reply.message.yiaddr() != node.ip {
                        break 'tx Err(format!(
                            "{}: ack for {} instead of {}",
                            node.name,
                            reply.message.yiaddr(),
                            node.ip
                        ));
                    }
                    break 'tx Ok(retries);
                }
                Some(MessageType::Nak) => {
                    (pkt, requesting, timeout) = (discover.clone(), false, DHCP_FIRST);
                    retries += 1;
                    continue 'tx;
                }
                _ => {}
            }
        }
        retries += 1;
        timeout = (timeout * 2).min(DHCP_MAX);
    };
    waiters.lock().expect("waiters").remove(&xid);
    result
}

/// Runs `f` until it succeeds, at most [`ATTEMPTS`] times, with the agent's backoff between.
async fn retried<T, F, Fut>(what: &str, f: F) -> Result<(T, u32), String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut backoff = Backoff::standard();
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        match f().await {
            Ok(v) => return Ok((v, attempt)),
            Err(e) => last = e,
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    Err(format!("{what}: {last}"))
}

async fn get_text(http: &reqwest::Client, url: &str) -> Result<String, String> {
    let resp = http.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| format!("GET {url}: body: {e}"))?;
    if !status.is_success() {
        return Err(format!("GET {url}: {status}: {body}"));
    }
    Ok(body)
}

async fn head(http: &reqwest::Client, url: &str) -> Result<(), String> {
    let resp = http.head(url).send().await.map_err(|e| format!("HEAD {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("HEAD {url}: {}", resp.status()));
    }
    Ok(())
}

async fn post_status(http: &reqwest::Client, url: &str, step: &str) -> Result<(), String> {
    let body = serde_json::json!({"step": step, "message": "bench-storm"});
    let resp = http.post(url).json(&body).send().await.map_err(|e| format!("POST {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("POST {url} ({step}): {}", resp.status()));
    }
    Ok(())
}

/// One node's boot; records each step in `tally`. Stops at the first failed step.
async fn boot(
    node: BenchNode,
    xid: u32,
    sock: Arc<UdpSocket>,
    waiters: Waiters,
    tally: Arc<Mutex<Tally>>,
    mut go: watch::Receiver<bool>,
) {
    let ok = |step: usize, t0: Instant, retries: u32| {
        let mut t = tally.lock().expect("tally");
        t.lat[step].push(t0.elapsed());
        t.retries[step] += retries;
    };
    let fail = |step: usize, e: String| {
        let mut t = tally.lock().expect("tally");
        t.failed[step] += 1;
        if t.errors.len() < 10 {
            t.errors.push(e);
        }
    };
    let http = match reqwest::Client::builder()
        .local_address(IpAddr::V4(node.ip))
        .timeout(HTTP_TIMEOUT)
        .pool_max_idle_per_host(4)
        .build()
    {
        Ok(c) => c,
        Err(e) => return fail(0, format!("{}: http client: {e}", node.name)),
    };
    let _ = go.wait_for(|g| *g).await;

    let t0 = Instant::now();
    match dhcp(&sock, &waiters, &node, xid).await {
        Ok(r) => ok(0, t0, r),
        Err(e) => return fail(0, e),
    }
    let base = format!("http://{SERVER_IP}:7050");
    let t0 = Instant::now();
    let url = format!("{base}/boot/ipxe?mac={}", node.mac);
    let script = match retried("ipxe", || async {
        let s = get_text(&http, &url).await?;
        if s.contains("luna.token=") {
            Ok(s)
        } else {
            Err(format!("{}: script without a token: {s}", node.name))
        }
    })
    .await
    {
        Ok((s, r)) => {
            ok(1, t0, r);
            s
        }
        Err(e) => return fail(1, e),
    };
    let token = script.split_whitespace().find_map(|w| w.strip_prefix("luna.token=")).unwrap_or_default().to_string();
    let kernel = script.lines().find_map(|l| l.trim().strip_prefix("kernel ")?.split(' ').next()).unwrap_or_default();
    let initrd = script
        .lines()
        .find_map(|l| l.trim().strip_prefix("initrd ")?.split(' ').find(|w| w.starts_with("http")))
        .unwrap_or_default();
    for (step, url) in [(2, kernel), (3, initrd)] {
        let t0 = Instant::now();
        match retried(STEPS[step], || head(&http, url)).await {
            Ok(((), r)) => ok(step, t0, r),
            Err(e) => return fail(step, e),
        }
    }
    let q = format!("node={}&token={token}", node.name);
    let t0 = Instant::now();
    let plan_url = format!("{base}/boot/plan?{q}");
    match retried("plan", || async {
        let p = get_text(&http, &plan_url).await?;
        if p.contains(&node.name) {
            Ok(())
        } else {
            Err(format!("{}: a plan that is not its own: {p}", node.name))
        }
    })
    .await
    {
        Ok(((), r)) => ok(4, t0, r),
        Err(e) => return fail(4, e),
    }
    let t0 = Instant::now();
    let status_url = format!("{base}/boot/status?{q}");
    let (a, b, c) = tokio::join!(
        retried("status", || post_status(&http, &status_url, "plan")),
        retried("status", || post_status(&http, &status_url, "partscript")),
        retried("status", || post_status(&http, &status_url, "download")),
    );
    match (a, b, c) {
        (Ok(((), ra)), Ok(((), rb)), Ok(((), rc))) => ok(5, t0, ra + rb + rc),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => fail(5, e),
    }
}

/// The whole storm, inside the generator's namespace.
async fn storm(nodes: &[BenchNode], round: u32) -> Result<(Tally, Duration)> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:68").context("bind udp port 68")?;
    sock.set_broadcast(true)?;
    sock.set_nonblocking(true)?;
    luna_server::dhcp::server::set_recv_buffer(&sock, 8 << 20);
    let sock = Arc::new(UdpSocket::from_std(sock)?);
    let waiters: Waiters = Arc::default();
    let receiver = {
        let (sock, waiters) = (sock.clone(), waiters.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, _)) = sock.recv_from(&mut buf).await {
                let Ok(reply) = Request::decode(&buf[..n]) else { continue };
                let xid = reply.message.xid();
                if let Some(tx) = waiters.lock().expect("waiters").get(&xid) {
                    let _ = tx.send(reply);
                }
            }
        })
    };
    let tally = Arc::new(Mutex::new(Tally::new()));
    let (go_tx, go_rx) = watch::channel(false);
    let tasks: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let xid = round << 24 | i as u32;
            tokio::spawn(boot(n.clone(), xid, sock.clone(), waiters.clone(), tally.clone(), go_rx.clone()))
        })
        .collect();
    // Every client is ready (its HTTP client built): power on all at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let _ = go_tx.send(true);
    for t in tasks {
        t.await.context("a client task panicked")?;
    }
    let took = t0.elapsed();
    receiver.abort();
    let t = std::mem::take(&mut *tally.lock().expect("tally"));
    Ok((t, took))
}

fn pct(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

fn report(label: &str, t: &mut Tally, took: Duration, n: usize) -> u32 {
    println!("\n{label}: {n} nodes, all done in {:.2} s", took.as_secs_f64());
    println!("| step | done | failed | retries | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|");
    let mut failed = 0;
    for (i, step) in STEPS.iter().enumerate() {
        t.lat[i].sort();
        failed += t.failed[i];
        println!(
            "| {step} | {} | {} | {} | {:.1} | {:.1} | {:.1} |",
            t.lat[i].len(),
            t.failed[i],
            t.retries[i],
            pct(&t.lat[i], 0.5),
            pct(&t.lat[i], 0.99),
            pct(&t.lat[i], 1.0)
        );
    }
    for e in &t.errors {
        println!("  error: {e}");
    }
    failed
}

/// Peak resident set of process `pid` (VmHWM), in bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("read the server's status")?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM in the server's status")?;
    Ok(kib * 1024)
}

/// Drops `percent` % of the packets both ways in `ns` (nf_tables: input and output hooks).
fn add_loss(ns: &luna_tests::Netns, percent: u8) -> Result<()> {
    let rules = format!(
        "table inet lunastorm {{\n chain in {{ type filter hook input priority 0; numgen random mod 100 < {percent} drop; }}\n \
         chain out {{ type filter hook output priority 0; numgen random mod 100 < {percent} drop; }}\n}}\n"
    );
    let path = std::env::temp_dir().join(format!("bench-storm-{}.nft", std::process::id()));
    std::fs::write(&path, rules)?;
    let r = ns.run("nft", &["-f", &path.display().to_string()]);
    let _ = std::fs::remove_file(&path);
    r.context("nft (apt-get install nftables)")?;
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let n = usize::from(a.clients);
    let nofile = bench::raise_nofile();
    if nofile < 4 * n as u64 + 256 {
        bail!("open-files limit {nofile} is too low for {n} clients");
    }
    // The server's namespace learns every client's address, the generator's the server's (the
    // kernel's one ARP table holds both, and whatever else runs).
    let _neigh = bench::NeighTable::raise(2 * n as u64 + 256)?;
    let dir = tempfile::Builder::new().prefix("bench-storm-").tempdir()?;
    let link = Link::new()?;
    let luna_dir = dir.path().join("luna");
    std::fs::create_dir_all(&luna_dir)?;
    let config = bench::luna_config(&luna_dir)?;
    let nodes = bench::populate_luna(&config, n)?;
    // The boot files the revision record names: HEAD needs them to exist.
    let files = luna_dir.join("data/images/img/1");
    std::fs::create_dir_all(&files)?;
    std::fs::write(files.join("vmlinuz"), vec![0u8; 8 << 20])?;
    std::fs::write(files.join("initrd.img"), vec![0u8; 32 << 20])?;
    // Every node's address on the generator's interface (the server answers each one there).
    // (The generator's own address may be a node's: it is there already.)
    let batch: String = nodes
        .iter()
        .filter(|n| n.ip != bench::CLIENT_IP)
        .map(|n| format!("addr add {}/20 dev {CLIENT_DEV}\n", n.ip))
        .collect();
    let batch_path = dir.path().join("addrs.batch");
    std::fs::write(&batch_path, batch)?;
    link.client.ip(&["-batch", &batch_path.display().to_string()]).context("add node addresses")?;
    let server = bench::start_luna(&link, &config)?;
    bench::wait_tcp(&link.client, &format!("{SERVER_IP}:7050"), Duration::from_secs(60))?;
    let rss0 = peak_rss(server.pid())?;

    let (mut t, took) = link.client.block_on(|| storm(&nodes, 1))??;
    let mut failed = report("no loss", &mut t, took, n);
    let rss1 = peak_rss(server.pid())?;
    if a.loss_percent > 0 {
        add_loss(&link.client, a.loss_percent)?;
        let (mut t, took) = link.client.block_on(|| storm(&nodes, 2))??;
        failed += report(&format!("{} % packet loss both ways", a.loss_percent), &mut t, took, n);
    }
    let rss2 = peak_rss(server.pid())?;
    println!(
        "\nluna-server peak RSS: {:.1} MiB idle, {:.1} MiB after the storm, {:.1} MiB after the lossy storm",
        rss0 as f64 / f64::from(1 << 20),
        rss1 as f64 / f64::from(1 << 20),
        rss2 as f64 / f64::from(1 << 20)
    );
    drop(server);
    if failed > 0 {
        bail!("{failed} steps failed");
    }
    Ok(())
}
