//! `luna-agent bench-unpack ARCHIVE`: the agent's streaming unpack (read → SHA-256 → channel →
//! zstd → tar, as during an install) against `zstd -dc | tar -x`, on the same archive.

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::os::Os;
use crate::unpack::{unpack_tar_zst, BlockReader, UnpackStats};

/// The agent's pipeline on a local file: a reader thread hashes and hands 64 KiB chunks over a
/// bounded channel to the unpacker. Returns the stats and the archive's SHA-256.
pub fn agent_unpack(archive: &Path, root: &Path, os: &dyn Os) -> anyhow::Result<(UnpackStats, String)> {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(32);
    let path = archive.to_path_buf();
    let reader = std::thread::spawn(move || -> std::io::Result<String> {
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha256::new();
        loop {
            // The swarm path's chunk size (download.rs).
            let mut buf = vec![0u8; 64 * 1024];
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            h.update(&buf);
            if tx.send(buf).is_err() {
                break;
            }
        }
        Ok(hex::encode(h.finalize()))
    });
    let stats = unpack_tar_zst(BlockReader::new(rx), root, os)?;
    let sha = reader.join().map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    Ok((stats, sha))
}

/// User and system CPU time of this process (`RUSAGE_SELF`) or of its waited-for children
/// (`RUSAGE_CHILDREN`).
fn cpu(who: libc::c_int) -> (Duration, Duration) {
    // SAFETY: getrusage only writes the struct we pass, which is zero-initialised and ours.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; `who` is RUSAGE_SELF or RUSAGE_CHILDREN.
    unsafe { libc::getrusage(who, &mut ru) };
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

/// Runs both, prints the times and the ratio (agent / shell), returns them.
pub fn bench_unpack(archive: &Path, scratch: &Path, os: &dyn Os) -> anyhow::Result<(Duration, Duration)> {
    std::io::copy(&mut std::fs::File::open(archive)?, &mut std::io::sink())?;
    let a = scratch.join("agent");
    let b = scratch.join("shell");
    fresh(&a)?;
    let (t, before) = (Instant::now(), cpu(libc::RUSAGE_SELF));
    let (stats, sha) = agent_unpack(archive, &a, os)?;
    let agent = t.elapsed();
    let agent_cpu = cpu_since(libc::RUSAGE_SELF, before);
    fresh(&b)?;
    let (t, before) = (Instant::now(), cpu(libc::RUSAGE_CHILDREN));
    let status = Command::new("sh")
        .arg("-c")
        .arg("zstd -dc \"$1\" | tar -x --xattrs --xattrs-include='*' --numeric-owner -p -C \"$2\"")
        .arg("bench")
        .arg(archive)
        .arg(&b)
        .status()?;
    let shell = t.elapsed();
    let shell_cpu = cpu_since(libc::RUSAGE_CHILDREN, before);
    anyhow::ensure!(status.success(), "zstd -dc | tar -x failed: {status}");
    let size = std::fs::metadata(archive)?.len();
    println!("archive: {} ({} bytes, sha256 {sha})", archive.display(), size);
    println!("tree: {} files, {} dirs, {} bytes", stats.files, stats.dirs, stats.bytes);
    println!("agent streaming unpack (incl. sha256): {:.2} s", agent.as_secs_f64());
    println!("zstd -dc | tar -x:                     {:.2} s", shell.as_secs_f64());
    println!("ratio agent/shell: {:.2}", agent.as_secs_f64() / shell.as_secs_f64().max(1e-9));
    // On a busy machine wall time swings with the neighbours; CPU time shows the work done.
    let show = |(u, s): (Duration, Duration)| format!("{:.2} s user + {:.2} s sys", u.as_secs_f64(), s.as_secs_f64());
    println!("cpu agent: {}; shell: {}", show(agent_cpu), show(shell_cpu));
    fresh(&a)?;
    fresh(&b)?;
    Ok((agent, shell))
}
