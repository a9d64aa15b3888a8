//! Announces per second: luna's tracker against opentracker, both driven by `wrk` with the same
//! fixed set of announce URLs (many peers over a few torrents), on 127.0.0.1.
//!
//! ```text
//! apt-get install -y wrk opentracker
//! cargo run --release -p luna-tests --bin bench_tracker -- [seconds] [connections] [rounds] [luna|axum|fast]
//! bench_tracker serve [luna|fast]   # the tracker alone, for scripts/tracker-instructions.sh
//! bench_tracker paths               # the announce paths, one per line
//! ```
//!
//! `luna` (the default) serves luna's tracker as luna-server does (`httpd::serve`: hyper with a
//! header timeout and connection caps); `axum` serves the same router with plain `axum::serve`;
//! `fast` puts the old announce fast path (`tracker::fast`, no longer used by luna-server) in
//! front of axum, for comparison.
//!
//! Prints requests/s of each (wrk's figure, per round and the median) and the ratio
//! luna/opentracker. Rounds alternate between the two to even out load from other processes.
//! Not a test: the numbers depend on the machine.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use luna_server::httpd::{self, HttpConfig};
use luna_server::tracker::{fast, query::percent_encode, router, NoTopology, TrackerConfig, TrackerHandle};
use luna_tests::{free_port, ChildGuard};

const TORRENTS: usize = 10;
const PEERS: usize = 1000;

fn info_hash(t: usize) -> [u8; 20] {
    // Binary on purpose: every byte value class (escaped, unreserved, high) appears.
    let mut h = [0u8; 20];
    for (i, b) in h.iter_mut().enumerate() {
        *b = (t as u8).wrapping_mul(37).wrapping_add((i as u8).wrapping_mul(53)) ^ 0xa5;
    }
    h
}

/// The announce paths wrk cycles through: peer `p` announces torrent `p % TORRENTS`, half of
/// the peers as seeders.
fn announce_paths() -> Vec<String> {
    (0..PEERS)
        .map(|p| {
            let mut peer_id = *b"-WK0001-000000000000";
            peer_id[8..20].copy_from_slice(format!("{p:012}").as_bytes());
            let left = if p % 2 == 0 { 0 } else { 1_000_000 };
            format!(
                "/announce?info_hash={}&peer_id={}&port={}&uploaded=0&downloaded=0&left={left}&compact=1&numwant=50",
                percent_encode(&info_hash(p % TORRENTS)),
                percent_encode(&peer_id),
                10000 + p
            )
        })
        .collect()
}

fn lua_script(paths: &[String]) -> String {
    let mut s = String::from("local paths = {\n");
    for p in paths {
        s.push_str(&format!("  \"{p}\",\n"));
    }
    s.push_str(
        r#"}
local n = #paths
local counter = 0
function setup(thread)
  thread:set("offset", counter * 97)
  counter = counter + 1
end
function init(args)
  i = offset or 0
end
function request()
  i = i % n + 1
  return wrk.format("GET", paths[i])
end
"#,
    );
    s
}

/// One plain HTTP/1.0 GET; the body of the answer.
fn http_get(addr: SocketAddr, path: &str) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let at = resp.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers in the answer")?;
    Ok(resp[at + 4..].to_vec())
}

fn check_tracker(name: &str, addr: SocketAddr, paths: &[String]) -> Result<()> {
    for p in &paths[..3] {
        let body = http_get(addr, p)?;
        if !body.starts_with(b"d8:complete") {
            bail!("{name} answered {:?} to {p}", String::from_utf8_lossy(&body));
        }
    }
    Ok(())
}

struct WrkResult {
    requests_per_sec: f64,
    /// CPU time (user + system) the server process spent per answered request.
    cpu_us_per_request: f64,
    summary: String,
}

/// User + system CPU seconds a process has used so far (`/proc/<pid>/stat`, all threads).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("no ')' in /proc/pid/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks =
        |i: usize| -> Result<f64> { Ok(fields.get(i - 3).context("short /proc/pid/stat")?.parse::<u64>()? as f64) };
    // USER_HZ is part of the kernel ABI: 100 on Linux.
    Ok((ticks(14)? + ticks(15)?) / 100.0)
}

/// How wrk talks to the trackers.
#[derive(Clone, Copy)]
enum Mode {
    /// Many announces per connection (HTTP keep-alive, where the server offers it).
    KeepAlive,
    /// `Connection: close`: one announce per TCP connection, as BitTorrent clients announce.
    Close,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::Close => "one connection per announce",
        }
    }
}

fn wrk(url: &str, script: &Path, seconds: u32, connections: u32, mode: Mode, server: u32) -> Result<WrkResult> {
    let cpu_before = cpu_seconds(server)?;
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", &format!("-c{connections}"), &format!("-d{seconds}s"), "-s"]).arg(script);
    if let Mode::Close = mode {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(url).output().context("run wrk (apt-get install -y wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {text}"))?;
    let summary = text
        .lines()
        .filter(|l| {
            l.contains("requests in") || l.contains("Socket errors") || l.contains("Non-2xx") || l.contains("Latency")
        })
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    let cpu = cpu_seconds(server)? - cpu_before;
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse::<f64>().ok())
        .with_context(|| format!("no request count in wrk's output: {text}"))?;
    Ok(WrkResult { requests_per_sec: rps, cpu_us_per_request: cpu * 1e6 / requests.max(1.0), summary })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `bench_tracker serve [luna|fast]`: only luna's tracker, served as luna-server serves it (or
/// through the old fast path), on 127.0.0.1; prints `listening <addr>` and serves until stdin
/// closes. For counting instructions per announce under `valgrind --tool=callgrind`
/// (`scripts/tracker-instructions.sh`), where wall-clock rates mean nothing.
fn serve_only(served_by: &str) -> Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    listener.set_nonblocking(true)?;
    println!("listening {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let handle = Arc::new(TrackerHandle::new(TrackerConfig::default(), Arc::new(NoTopology)));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let fast_path = served_by == "fast";
    runtime.spawn(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => return eprintln!("luna tracker listener: {e}"),
        };
        let router = router(handle.clone());
        let served = if fast_path {
            let app = router.into_make_service_with_connect_info::<SocketAddr>();
            match fast::listener(listener, handle) {
                Ok(l) => axum::serve(l, app).await,
                Err(e) => Err(e),
            }
        } else {
            let config = HttpConfig { max_connections_per_address: 1 << 20, ..HttpConfig::default() };
            let limits = httpd::ConnLimits::new(config.max_connections, config.max_connections_per_address);
            httpd::serve(listener, router, &config, None, limits, tokio_util::sync::CancellationToken::new()).await
        };
        if let Err(e) = served {
            eprintln!("luna tracker: {e}");
        }
    });
    // Until stdin closes.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => return serve_only(args.get(1).map_or("luna", String::as_str)),
        // The announce paths of every run, one per line (for outside drivers).
        Some("paths") => {
            for p in announce_paths() {
                println!("{p}");
            }
            return Ok(());
        }
        _ => {}
    }
    let arg = |i: usize, default: u32| -> Result<u32> {
        args.get(i).map_or(Ok(default), |s| s.parse().with_context(|| format!("argument {}: {s:?}", i + 1)))
    };
    let seconds = arg(0, 10)?;
    let connections = arg(1, 300)?;
    let rounds = arg(2, 2)?.max(1);
    // How luna's side is served: "luna" as luna-server does (`httpd::serve`: hyper with a
    // header timeout and connection caps), "axum" with plain axum::serve, "fast" with the
    // announce fast path in front of axum.
    let served_by = match args.get(3).map(String::as_str) {
        None | Some("luna") => "luna",
        Some("axum") => "axum",
        Some("fast") => "fast",
        Some(other) => bail!("argument 4: 'luna', 'axum' or 'fast', not {other:?}"),
    };
    for tool in ["wrk", "opentracker"] {
        if Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?.stdout.is_empty() {
            bail!("{tool} not found: apt-get install -y wrk opentracker");
        }
    }

    let dir = tempfile::tempdir()?;
    let paths = announce_paths();
    let script = dir.path().join("announce.lua");
    std::fs::write(&script, lua_script(&paths))?;

    // Ours: the tracker as luna-server serves it (fast path in front of the router).
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    listener.set_nonblocking(true)?;
    let ours: SocketAddr = listener.local_addr()?;
    let handle = Arc::new(TrackerHandle::new(TrackerConfig::default(), Arc::new(NoTopology)));
    // The server runs on its own threads; wrk and opentracker are separate processes.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.spawn(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => return eprintln!("luna tracker listener: {e}"),
        };
        let router = router(handle.clone());
        let app = router.clone().into_make_service_with_connect_info::<SocketAddr>();
        let served = match served_by {
            "axum" => axum::serve(listener, app).await,
            "fast" => match fast::listener(listener, handle) {
                Ok(l) => axum::serve(l, app).await,
                Err(e) => Err(e),
            },
            _ => {
                // Every connection comes from 127.0.0.1: lift the per-address cap.
                let config = HttpConfig { max_connections_per_address: 1 << 20, ..HttpConfig::default() };
                let limits = httpd::ConnLimits::new(config.max_connections, config.max_connections_per_address);
                httpd::serve(listener, router, &config, None, limits, tokio_util::sync::CancellationToken::new()).await
            }
        };
        if let Err(e) = served {
            eprintln!("luna tracker: {e}");
        }
    });

    // opentracker: whitelist mode in Debian's build, so list the torrents. It chroots into
    // the directory, hence the whitelist path relative to it. (It does not keep connections
    // alive: every request is a new TCP connection, which is part of what is measured.)
    let whitelist: String = (0..TORRENTS).map(|t| format!("{}\n", hex(&info_hash(t)))).collect();
    std::fs::write(dir.path().join("whitelist"), whitelist)?;
    // It drops root for "nobody", who must still reach the directory.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let ot_port = free_port()?;
    let ot_udp = luna_tests::free_udp_port()?;
    let theirs = SocketAddr::from((Ipv4Addr::LOCALHOST, ot_port));
    let mut cmd = Command::new("opentracker");
    cmd.args(["-i", "127.0.0.1", "-p", &ot_port.to_string(), "-P", &ot_udp.to_string(), "-d"]);
    cmd.arg(dir.path()).args(["-w", "/whitelist"]);
    let opentracker = ChildGuard::spawn(&mut cmd, "opentracker")?;

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match (check_tracker("luna", ours, &paths), check_tracker("opentracker", theirs, &paths)) {
            (Ok(()), Ok(())) => break,
            (a, b) if std::time::Instant::now() > deadline => {
                a.context("luna tracker not answering")?;
                b.context("opentracker not answering")?;
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }

    let url = |a: SocketAddr| format!("http://{a}");
    println!(
        "{PEERS} peers over {TORRENTS} torrents, wrk -t2 -c{connections} -d{seconds}s, {rounds} round(s), luna via {}",
        match served_by {
            "axum" => "plain axum::serve",
            "fast" => "the fast path",
            _ => "luna-server's httpd::serve",
        }
    );
    // Warm-up: fills both swarms so every measured announce hands out a full peer list.
    let (our_pid, their_pid) = (std::process::id(), opentracker.pid());
    wrk(&url(ours), &script, 2, connections, Mode::KeepAlive, our_pid)?;
    wrk(&url(theirs), &script, 2, connections, Mode::KeepAlive, their_pid)?;

    let mut ratios = Vec::new();
    for mode in [Mode::KeepAlive, Mode::Close] {
        println!("-- {}", mode.name());
        let (mut luna, mut ot) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let a = wrk(&url(ours), &script, seconds, connections, mode, our_pid)?;
            println!(
                "round {round} luna:        {:>8.0} req/s {:>6.1} µs cpu/req  ({})",
                a.requests_per_sec, a.cpu_us_per_request, a.summary
            );
            let b = wrk(&url(theirs), &script, seconds, connections, mode, their_pid)?;
            println!(
                "round {round} opentracker: {:>8.0} req/s {:>6.1} µs cpu/req  ({})",
                b.requests_per_sec, b.cpu_us_per_request, b.summary
            );
            luna.push(a.requests_per_sec);
            ot.push(b.requests_per_sec);
        }
        let (l, o) = (median(&mut luna), median(&mut ot));
        println!("median luna:        {l:>10.0} req/s");
        println!("median opentracker: {o:>10.0} req/s");
        ratios.push((mode, l / o));
    }
    for (mode, r) in ratios {
        println!("ratio luna/opentracker, {}: {r:.2} (target >= 1.0)", mode.name());
    }
    // Both must still answer correctly after the load.
    check_tracker("luna", ours, &paths)?;
    check_tracker("opentracker", theirs, &paths)?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
