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
    let t = Instant::now();
    let (stats, sha) = agent_unpack(archive, &a, os)?;
    let agent = t.elapsed();
    fresh(&b)?;
    let t = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg("zstd -dc \"$1\" | tar -x --xattrs --xattrs-include='*' --numeric-owner -p -C \"$2\"")
        .arg("bench")
        .arg(archive)
        .arg(&b)
        .status()?;
    let shell = t.elapsed();
    anyhow::ensure!(status.success(), "zstd -dc | tar -x failed: {status}");
    let size = std::fs::metadata(archive)?.len();
    println!("archive: {} ({} bytes, sha256 {sha})", archive.display(), size);
    println!("tree: {} files, {} dirs, {} bytes", stats.files, stats.dirs, stats.bytes);
    println!("agent streaming unpack (incl. sha256): {:.2} s", agent.as_secs_f64());
    println!("zstd -dc | tar -x:                     {:.2} s", shell.as_secs_f64());
    println!("ratio agent/shell: {:.2}", agent.as_secs_f64() / shell.as_secs_f64().max(1e-9));
    fresh(&a)?;
    fresh(&b)?;
    Ok((agent, shell))
}
