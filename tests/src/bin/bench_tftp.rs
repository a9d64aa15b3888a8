//! Benchmark (not a test): many concurrent TFTP fetches of `undionly.kpxe` from luna's TFTP
//! server and from tftpd-hpa's `in.tftpd`, same file, same client, same block size.
//!
//!     cargo run --release -p luna-tests --bin bench-tftp -- [--concurrency 100] [--total 1000]
//!         [--blksize 1468|512|0] [--file /usr/lib/ipxe/undionly.kpxe]
//!
//! `--blksize 0` sends no option at all (plain RFC 1350, 512-byte blocks). Needs the `ipxe`
//! and `tftpd-hpa` packages. luna's server runs in a child process (this binary with
//! `--serve-luna`) so both servers are separate processes, as in production.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use luna_server::tftp::packet::{self, Mode, Packet};
use luna_server::tftp::{TftpConfig, TftpServer};
use tokio::net::UdpSocket;

struct Args {
    concurrency: usize,
    total: usize,
    blksize: u16,
    file: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut a =
        Args { concurrency: 100, total: 1000, blksize: 1468, file: PathBuf::from("/usr/lib/ipxe/undionly.kpxe") };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--concurrency" => a.concurrency = value()?.parse().context("--concurrency")?,
            "--total" => a.total = value()?.parse().context("--total")?,
            "--blksize" => a.blksize = value()?.parse().context("--blksize")?,
            "--file" => a.file = value()?.into(),
            other => bail!("unknown argument '{other}'"),
        }
    }
    if a.concurrency == 0 || a.total == 0 {
        bail!("--concurrency and --total must be positive");
    }
    Ok(a)
}

/// One download with a minimal RFC 1350/2347/2348 client; returns the file.
async fn fetch(server: SocketAddr, name: &str, blksize: u16) -> Result<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    let options: Vec<(String, String)> =
        if blksize == 0 { vec![] } else { vec![("blksize".into(), blksize.to_string())] };
    let mut last = Vec::new();
    packet::encode_rrq(&mut last, name.as_bytes(), Mode::Octet, &options);
    sock.send_to(&last, server).await?;
    let mut tid: Option<SocketAddr> = None;
    let mut block_len = 512usize;
    let mut expected: u16 = 1;
    let mut data = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut retries = 0;
    loop {
        let (n, from) = match tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => {
                retries += 1;
                if retries > 5 {
                    bail!("{name}: timed out");
                }
                sock.send_to(&last, tid.unwrap_or(server)).await?;
                continue;
            }
        };
        // The first answer fixes the server's transfer ID; others are strays.
        match tid {
            Some(t) if t != from => continue,
            Some(_) => {}
            None => tid = Some(from),
        }
        retries = 0;
        match packet::parse(&buf[..n]).map_err(|e| anyhow!("{name}: {e}"))? {
            Packet::Oack(opts) if expected == 1 => {
                if let Some((_, v)) = opts.iter().find(|(k, _)| k == "blksize") {
                    block_len = v.parse().context("oack blksize")?;
                }
                packet::encode_ack(&mut last, 0);
                sock.send_to(&last, from).await?;
            }
            Packet::Data { block, data: d } if block == expected => {
                data.extend_from_slice(d);
                packet::encode_ack(&mut last, block);
                sock.send_to(&last, from).await?;
                if d.len() < block_len {
                    return Ok(data);
                }
                expected = expected.wrapping_add(1);
            }
            // A duplicate: our ACK was lost or late; the resend of `last` covers it.
            Packet::Data { .. } | Packet::Oack(_) => sock.send_to(&last, from).await.map(drop)?,
            Packet::Error { code, message } => bail!("{name}: server error {}: {message}", code.to_u16()),
            other => bail!("{name}: unexpected {other:?}"),
        }
    }
}

/// Runs `total` fetches, `concurrency` at a time; returns transfers per second.
async fn load(server: SocketAddr, name: &str, expected: Arc<Vec<u8>>, a: &Args) -> Result<f64> {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..a.concurrency {
        let (next, expected, name, total, blksize) =
            (next.clone(), expected.clone(), name.to_string(), a.total, a.blksize);
        workers.spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let got = fetch(server, &name, blksize).await?;
                if got != *expected {
                    bail!("{name}: got {} bytes, expected {} identical bytes", got.len(), expected.len());
                }
            }
            Ok(())
        });
    }
    while let Some(r) = workers.join_next().await {
        r??;
    }
    Ok(a.total as f64 / started.elapsed().as_secs_f64())
}

/// Waits until something answers TFTP at `addr` (an error for a missing file is an answer).
async fn wait_ready(addr: SocketAddr) -> Result<()> {
    for _ in 0..100 {
        if let Err(e) = fetch(addr, "probe-does-not-exist", 0).await {
            if e.to_string().contains("server error") {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("no tftp server answered at {addr}")
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Stops a server child: SIGTERM first (in.tftpd then reaps its own transfer children),
/// SIGKILL if it lingers.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..50 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Child mode: luna's server on 127.0.0.1:<any>, `undionly.kpxe` from `file` through the
/// `ipxe_files` map; prints the port, stops when stdin closes.
fn serve_luna(root: &Path, file: &Path) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let cfg = TftpConfig {
            root: root.to_path_buf(),
            bind: "127.0.0.1:0".parse()?,
            ipxe_files: [("undionly.kpxe".to_string(), file.to_path_buf())].into_iter().collect(),
            max_transfers: 4096,
            // Every simulated client talks from 127.0.0.1: one address, all the concurrency.
            max_transfers_per_client: 4096,
            ..TftpConfig::default()
        };
        let server = TftpServer::bind(cfg).await?;
        println!("PORT {}", server.local_addr()?.port());
        std::io::stdout().flush()?;
        let (stop, rx) = tokio::sync::watch::channel(false);
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            let _ = stop.send(true);
        });
        server.run(rx).await?;
        Ok(())
    })
}

fn start_luna(root: &Path, file: &Path) -> Result<(Reaper, SocketAddr)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--serve-luna")
        .arg(root)
        .arg(file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting luna tftp child")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("child has no stdout"))?;
    let reaper = Reaper(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let port: u16 = line.trim().strip_prefix("PORT ").ok_or_else(|| anyhow!("child said '{line}'"))?.parse()?;
    Ok((reaper, SocketAddr::from(([127, 0, 0, 1], port))))
}

fn start_tftpd_hpa(root: &Path) -> Result<(Reaper, SocketAddr)> {
    let port = free_udp_port()?;
    let child = Command::new("in.tftpd")
        .args(["--foreground", "--address", &format!("127.0.0.1:{port}"), "--secure"])
        .arg(root)
        .stdin(Stdio::null())
        .spawn()
        .context("starting in.tftpd (apt-get install -y tftpd-hpa)")?;
    Ok((Reaper(child), SocketAddr::from(([127, 0, 0, 1], port))))
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--serve-luna") {
        let (root, file) = (argv.get(2).context("root")?, argv.get(3).context("file")?);
        return serve_luna(Path::new(root), Path::new(file));
    }
    let a = parse_args()?;
    let content = Arc::new(
        std::fs::read(&a.file).with_context(|| format!("reading {} (apt-get install -y ipxe)", a.file.display()))?,
    );
    let dir = tempfile::tempdir()?;
    // in.tftpd --secure chroots and drops to the `tftp` user: the tree must be world-readable.
    let hpa_root = dir.path().join("tftpd-hpa");
    let luna_root = dir.path().join("luna");
    for d in [dir.path(), &hpa_root, &luna_root] {
        std::fs::create_dir_all(d)?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::write(hpa_root.join("undionly.kpxe"), &*content)?;
    std::fs::set_permissions(hpa_root.join("undionly.kpxe"), std::fs::Permissions::from_mode(0o644))?;

    let rt = tokio::runtime::Runtime::new()?;
    println!(
        "{} fetches of {} ({} bytes), {} at a time, blksize {}",
        a.total,
        a.file.display(),
        content.len(),
        a.concurrency,
        if a.blksize == 0 { "512 (no option)".to_string() } else { a.blksize.to_string() }
    );

    let (_luna, luna_addr) = start_luna(&luna_root, &a.file)?;
    let (_hpa, hpa_addr) = start_tftpd_hpa(&hpa_root)?;
    let (ours, theirs) = rt.block_on(async {
        wait_ready(luna_addr).await?;
        wait_ready(hpa_addr).await?;
        // Warm-up: page cache, luna's file cache, first fork of in.tftpd.
        fetch(luna_addr, "undionly.kpxe", a.blksize).await?;
        fetch(hpa_addr, "undionly.kpxe", a.blksize).await?;
        let ours = load(luna_addr, "undionly.kpxe", content.clone(), &a).await?;
        println!("luna       {ours:10.1} transfers/s");
        let theirs = load(hpa_addr, "undionly.kpxe", content.clone(), &a).await?;
        println!("tftpd-hpa  {theirs:10.1} transfers/s");
        anyhow::Ok((ours, theirs))
    })?;
    // Let in.tftpd's last transfer children exit while their parent can still reap them.
    std::thread::sleep(Duration::from_millis(300));
    println!("ratio luna/tftpd-hpa: {:.2}", ours / theirs);
    Ok(())
}
