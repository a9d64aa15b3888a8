//! `luna-agent bench-unpack ARCHIVE`: the agent's streaming unpack (read → SHA-256 → channel →
//! zstd → tar, as during an install) against `zstd -dc | tar -x`, on the same archive.

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::download::{CHANNEL, CHUNK};
use crate::os::Os;
use crate::unpack::{unpack_tar_zst, BlockPool, BlockReader, UnpackStats};

/// The agent's pipeline on a local file, as `download::fetch_once` runs it: a reader thread
/// hashes and hands chunks over a bounded channel to the unpacker, which returns them for reuse.
/// Returns the stats and the archive's SHA-256.
pub fn agent_unpack(archive: &Path, root: &Path, os: &dyn Os) -> anyhow::Result<(UnpackStats, String)> {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(CHANNEL);
    let (pool, recycle) = BlockPool::new();
    let path = archive.to_path_buf();
    let reader = std::thread::spawn(move || -> std::io::Result<String> {
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha256::new();
        loop {
            let mut chunk = pool.take(CHUNK);
            let n = f.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            h.update(&chunk);
            if tx.send(chunk).is_err() {
                break;
            }
        }
        Ok(hex::encode(h.finalize()))
    });
    let stats = unpack_tar_zst(BlockReader::new(move || rx.recv().ok(), recycle), root, os)?;
    let sha = reader.join().map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    Ok((stats, sha))
}

/// Resource usage of this process (`RUSAGE_SELF`) or of its waited-for children
/// (`RUSAGE_CHILDREN`: CPU times summed, `ru_maxrss` the largest of them).
fn rusage(who: libc::c_int) -> libc::rusage {
    // SAFETY: rusage is plain data; all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; `who` is RUSAGE_SELF or RUSAGE_CHILDREN.
    unsafe { libc::getrusage(who, &mut ru) };
    ru
}

/// User and system CPU time, see [`rusage`].
fn cpu(who: libc::c_int) -> (Duration, Duration) {
    let ru = rusage(who);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

fn cpu_since(who: libc::c_int, before: (Duration, Duration)) -> (Duration, Duration) {
    let now = cpu(who);
    (now.0.saturating_sub(before.0), now.1.saturating_sub(before.1))
}

fn fresh(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    Ok(())
}

fn time_agent(
    archive: &Path,
    dir: &Path,
    os: &dyn Os,
) -> anyhow::Result<(Duration, (Duration, Duration), UnpackStats, String)> {
    fresh(dir)?;
    let (t, before) = (Instant::now(), cpu(libc::RUSAGE_SELF));
    let (stats, sha) = agent_unpack(archive, dir, os)?;
    Ok((t.elapsed(), cpu_since(libc::RUSAGE_SELF, before), stats, sha))
}

fn time_shell(archive: &Path, dir: &Path) -> anyhow::Result<(Duration, (Duration, Duration))> {
    fresh(dir)?;
    let (t, before) = (Instant::now(), cpu(libc::RUSAGE_CHILDREN));
    let status = Command::new("sh")
        .arg("-c")
        .arg("zstd -dc \"$1\" | tar -x --xattrs --xattrs-include='*' --numeric-owner -p -C \"$2\"")
        .arg("bench")
        .arg(archive)
        .arg(dir)
        .status()?;
    let wall = t.elapsed();
    anyhow::ensure!(status.success(), "zstd -dc | tar -x failed: {status}");
    Ok((wall, cpu_since(libc::RUSAGE_CHILDREN, before)))
}

/// Runs both `rounds` times, alternating which goes first (the second of a pair unpacks onto a
/// file system the first has just filled), prints every round and the median ratio of wall
/// times (agent / shell; at most 1.11 is "at least 0.9x the speed"), returns that median.
pub fn bench_unpack(archive: &Path, scratch: &Path, rounds: u32, os: &dyn Os) -> anyhow::Result<f64> {
    anyhow::ensure!(rounds > 0, "bench-unpack needs at least one round");
    std::io::copy(&mut std::fs::File::open(archive)?, &mut std::io::sink())?;
    let a = scratch.join("agent");
    let b = scratch.join("shell");
    let size = std::fs::metadata(archive)?.len();
    let secs = |d: Duration| d.as_secs_f64();
    // On a busy machine wall time swings with the neighbours; CPU time shows the work done.
    let show = |(u, s): (Duration, Duration)| format!("{:.2}+{:.2}", secs(u), secs(s));
    println!("archive: {} ({size} bytes)", archive.display());
    println!("round  agent s  shell s  ratio  cpu user+sys s: agent  shell");
    let mut ratios = Vec::new();
    for r in 0..rounds {
        let agent_first = r % 2 == 0;
        let mut shell_run = None;
        if !agent_first {
            shell_run = Some(time_shell(archive, &b)?);
            fresh(&b)?;
        }
        let (agent, agent_cpu, stats, sha) = time_agent(archive, &a, os)?;
        fresh(&a)?;
        let (shell, shell_cpu) = match shell_run {
            Some(run) => run,
            None => {
                let run = time_shell(archive, &b)?;
                fresh(&b)?;
                run
            }
        };
        if r == 0 {
            println!("tree: {} files, {} dirs, {} bytes; sha256 {sha}", stats.files, stats.dirs, stats.bytes);
        }
        let ratio = secs(agent) / secs(shell).max(1e-9);
        ratios.push(ratio);
        println!(
            "{:>5}  {:>7.2}  {:>7.2}  {:>5.2}  {:>21}  {}",
            r + 1,
            secs(agent),
            secs(shell),
            ratio,
            show(agent_cpu),
            show(shell_cpu)
        );
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!("agent streaming unpack (incl. sha256) vs zstd -dc | tar -x: median ratio agent/shell {median:.2} over {rounds} rounds (target <= 1.11, i.e. >= 0.9x the speed)");
    Ok(median)
}

/// Kills and reaps a helper process when dropped, so a failed bench leaves no seeder behind.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What [`bench_fetch`] measured.
#[derive(Debug)]
pub struct FetchRun {
    pub wall: Duration,
    /// The fetching process's peak resident set (`ru_maxrss`), in bytes.
    pub peak_rss: u64,
    /// The fetch's own summary line.
    pub summary: String,
}

/// `luna-agent bench-fetch ARCHIVE [SCRATCH]`: seeds ARCHIVE from one `luna-agent seed` process
/// and fetches it through the swarm with another (`luna-agent fetch`, the install's download and
/// unpack into SCRATCH/fetch), then reports the fetching process's peak RSS: what a node's RAM must
/// hold besides its tree (target at most 64 MiB, whatever the image size).
pub fn bench_fetch(archive: &Path, scratch: &Path) -> anyhow::Result<FetchRun> {
    use std::io::BufRead;
    use std::process::Stdio;

    let exe = std::env::current_exe()?;
    let size = std::fs::metadata(archive).map_err(|e| anyhow::anyhow!("archive {}: {e}", archive.display()))?.len();
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(archive)?, &mut hasher)?;
    let sha = hex::encode(hasher.finalize());
    // Only a subdirectory of SCRATCH is emptied and removed, never SCRATCH itself.
    let work = scratch.join("fetch");
    fresh(&work)?;
    let torrent = work.join("image.torrent");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen = format!("127.0.0.1:{port}");

    let mut seeder = Reaped(
        Command::new(&exe)
            .arg("seed")
            .arg(archive)
            .arg("--torrent")
            .arg(&torrent)
            .args(["--listen", &listen])
            .env("LUNA_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let out = seeder.0.stdout.take().expect("piped stdout");
    let mut seeding = String::new();
    std::io::BufReader::new(out).read_line(&mut seeding)?;
    anyhow::ensure!(seeding.starts_with("seeding"), "the seeder exited before seeding ({})", seeder.0.wait()?);

    let t = Instant::now();
    let fetch = Command::new(&exe)
        .arg("fetch")
        // Nothing listens there: the whole image must come from the swarm.
        .args(["--url", "http://127.0.0.1:9/unused", "--sha256", &sha, "--size", &size.to_string()])
        .arg("--dir")
        .arg(work.join("tree"))
        .arg("--torrent")
        .arg(&torrent)
        .args(["--peer", &listen])
        .env("LUNA_LOG", "warn")
        .output()?;
    let wall = t.elapsed();
    // The fetch is the only child waited for so far (the seeder still runs): the children's
    // peak RSS is the fetch's.
    let peak_rss = rusage(libc::RUSAGE_CHILDREN).ru_maxrss as u64 * 1024;
    let summary = String::from_utf8_lossy(&fetch.stdout).trim().to_string();
    anyhow::ensure!(
        fetch.status.success(),
        "luna-agent fetch failed ({}): {}",
        fetch.status,
        String::from_utf8_lossy(&fetch.stderr).trim()
    );
    drop(seeder);
    std::fs::remove_dir_all(&work)?;
    Ok(FetchRun { wall, peak_rss, summary })
}
