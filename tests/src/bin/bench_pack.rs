//! Pack throughput: luna's one-pass packer (tar + zstd + SHA-256 + torrent piece hashes) against
//! `tar -C tree -cf - . | zstd -T0 -<level>` on the same generated tree, same zstd level.
//!
//! Usage: bench_pack [--size-mib N] [--level L] [--dir DIR [--reuse]] [--rounds R] [--threads N]
//! The tree (mixed sizes; compressible text, random bytes and small files) is generated once in
//! DIR (default: a temporary directory) and kept in the page cache by generating it right before.
//! Prints both rates and the ratio luna/tar (target: at least 0.9).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use luna_server::image::archive::{self, ArchiveOptions, Excludes};
use luna_server::image::piece;

struct Args {
    size_mib: u64,
    level: i32,
    dir: Option<PathBuf>,
    rounds: u32,
    /// Keep an existing tree in DIR instead of generating a new one.
    reuse: bool,
    /// zstd workers for luna (0 = one per core, as `zstd -T0`).
    threads: u32,
}

fn args() -> Result<Args> {
    let mut a = Args { size_mib: 1024, level: 3, dir: None, rounds: 2, reuse: false, threads: 0 };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--size-mib" => a.size_mib = v()?.parse().context("--size-mib")?,
            "--level" => a.level = v()?.parse().context("--level")?,
            "--dir" => a.dir = Some(v()?.into()),
            "--rounds" => a.rounds = v()?.parse().context("--rounds")?,
            "--reuse" => a.reuse = true,
            "--threads" => a.threads = v()?.parse().context("--threads")?,
            "-h" | "--help" => {
                println!("bench_pack [--size-mib N] [--level L] [--dir DIR [--reuse]] [--rounds R] [--threads N]");
                std::process::exit(0);
            }
            other => bail!("unknown argument '{other}'"),
        }
    }
    Ok(a)
}

/// xorshift64*: fast, deterministic filler for incompressible data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "kernel", "module", "node", "cluster", "the", "of", "and", "config", "library", "error", "value", "return",
    "static", "int", "char", "void", "struct", "include", "define", "if", "else", "for", "while", "0x1f", "42",
];

fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let w = WORDS[(rng.next() % WORDS.len() as u64) as usize];
        out.extend_from_slice(w.as_bytes());
        out.push(if rng.next().is_multiple_of(9) { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// About half compressible text, half random bytes, in files from 1 KiB to 8 MiB, the small
/// ones in bunches.
fn generate(root: &Path, total: u64) -> Result<(u64, u64)> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut bytes, mut files) = (0u64, 0u64);
    let mut buf = vec![0u8; 9 << 20];
    let mut n = 0u64;
    while bytes < total {
        let dir = root.join(format!("d{:03}", n % 97));
        std::fs::create_dir_all(&dir)?;
        let kind = n % 10;
        let len = match kind {
            0..=7 => 64 * 1024 + rng.next() % (8 << 20),
            _ => 1024 + rng.next() % (16 * 1024),
        }
        .min(total - bytes + 1) as usize;
        let path = dir.join(format!("f{n}"));
        let mut f = std::fs::File::create(&path)?;
        if (4..=7).contains(&kind) {
            let b = &mut buf[..len];
            rng.fill(b);
            f.write_all(b)?;
        } else {
            f.write_all(&text(&mut rng, len))?;
        }
        if kind >= 8 {
            // small files come in bunches, like /usr/share
            for k in 0..20 {
                let l = 512 + (rng.next() % 8192) as usize;
                std::fs::write(dir.join(format!("s{n}_{k}")), text(&mut rng, l))?;
                bytes += l as u64;
                files += 1;
            }
        }
        bytes += len as u64;
        files += 1;
        n += 1;
    }
    Ok((bytes, files))
}

/// Reads every file of the tree so both contenders start from a warm page cache (otherwise the
/// first one pays for the disk and the second reads what the first cached).
fn warm(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            warm(&e.path())?;
        } else if ft.is_file() {
            std::io::copy(&mut std::fs::File::open(e.path())?, &mut std::io::sink())?;
        }
    }
    Ok(())
}

/// User + system CPU seconds of this process (`self_`) or of its waited-for children.
fn cpu_seconds(self_: bool) -> f64 {
    let who = if self_ { libc::RUSAGE_SELF } else { libc::RUSAGE_CHILDREN };
    // SAFETY: getrusage fills the zeroed struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut u) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn luna(tree: &Path, out: &Path, level: i32, threads: u32) -> Result<(f64, u64)> {
    let ex = Excludes::new::<String>(&[])?;
    let t0 = Instant::now();
    let stats = archive::scan(tree, &ex)?;
    let f = std::fs::File::create(out)?;
    let (lo, hi) = (stats.data_bytes / 4, stats.data_bytes + stats.data_bytes / 50 + (1 << 20));
    let opts = ArchiveOptions { zstd_level: level, zstd_threads: threads, piece_candidates: piece::candidates(lo, hi) };
    let (f, sum) = archive::write_archive(tree, &ex, f, &opts, stats.data_bytes, &mut |_| true)?;
    f.sync_all()?;
    Ok((t0.elapsed().as_secs_f64(), sum.size))
}

fn tar_zstd(tree: &Path, out: &Path, level: i32) -> Result<(f64, u64)> {
    let t0 = Instant::now();
    let script = format!(
        "set -o pipefail; tar -C '{}' -cf - . | zstd -q -f -T0 -{level} -o '{}' && sync '{}'",
        tree.display(),
        out.display(),
        out.display()
    );
    let st = Command::new("bash").arg("-c").arg(&script).status().context("run tar | zstd")?;
    if !st.success() {
        bail!("`{script}` failed: {st}");
    }
    Ok((t0.elapsed().as_secs_f64(), std::fs::metadata(out)?.len()))
}

fn main() -> Result<()> {
    let a = args()?;
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir_in(std::env::temp_dir())?;
            tmp.path().to_path_buf()
        }
    };
    let tree = dir.join("tree");
    let (bytes, files) = if a.reuse && tree.exists() {
        let st = archive::scan(&tree, &Excludes::new::<String>(&[])?)?;
        (st.data_bytes, st.entries)
    } else {
        if tree.exists() {
            std::fs::remove_dir_all(&tree)?;
        }
        std::fs::create_dir_all(&tree)?;
        let t0 = Instant::now();
        let r = generate(&tree, a.size_mib << 20)?;
        println!("generated in {:.1}s", t0.elapsed().as_secs_f64());
        r
    };
    println!("tree: {} MiB in {files} files", bytes >> 20);
    let mib = bytes as f64 / (1 << 20) as f64;
    let (mut best_luna, mut best_tar) = (f64::MAX, f64::MAX);
    let (mut size_luna, mut size_tar) = (0, 0);
    // CPU seconds summed over rounds: unlike wall time, not skewed by other load on the machine.
    let mut cpu = (0.0f64, 0.0f64);
    for round in 1..=a.rounds {
        warm(&tree)?;
        let c0 = cpu_seconds(true);
        let (t, s) = luna(&tree, &dir.join("luna.tar.zst"), a.level, a.threads)?;
        let cpu_luna = cpu_seconds(true) - c0;
        // disk space: one archive at a time
        std::fs::remove_file(dir.join("luna.tar.zst"))?;
        println!("round {round}: luna      {:7.1} MiB/s  ({t:.2}s, {cpu_luna:.2}s cpu, {} MiB out)", mib / t, s >> 20);
        cpu.0 += cpu_luna;
        best_luna = best_luna.min(t);
        size_luna = s;
        warm(&tree)?;
        let c0 = cpu_seconds(false);
        let (t, s) = tar_zstd(&tree, &dir.join("tar.tar.zst"), a.level)?;
        let cpu_tar = cpu_seconds(false) - c0;
        std::fs::remove_file(dir.join("tar.tar.zst"))?;
        println!("round {round}: tar|zstd  {:7.1} MiB/s  ({t:.2}s, {cpu_tar:.2}s cpu, {} MiB out)", mib / t, s >> 20);
        cpu.1 += cpu_tar;
        best_tar = best_tar.min(t);
        size_tar = s;
    }
    let (rl, rt) = (mib / best_luna, mib / best_tar);
    println!("luna (tar+zstd+sha256+pieces): {rl:.1} MiB/s, {} MiB", size_luna >> 20);
    println!("tar | zstd -T0 -{}:            {rt:.1} MiB/s, {} MiB", a.level, size_tar >> 20);
    println!("ratio luna/tar: {:.2} (target >= 0.90)", rl / rt);
    println!("cpu per MiB luna/tar: {:.2} (what luna's hashing costs on a CPU-bound machine)", cpu.0 / cpu.1);
    Ok(())
}
