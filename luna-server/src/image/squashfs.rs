//! The squashfs of a revision, for nodes in `overlay` root mode: the same tree as the archive
//! (same `grab_exclude`, same file system only), built by Debian's `mksquashfs` (squashfs-tools),
//! zstd-compressed and reproducible: entries sorted, every time stamp and the file system's own
//! time set to 0 (`-reproducible -mkfs-time 0 -all-time 0`), so the same tree gives the same
//! bytes and therefore the same torrent. Then read once for its SHA-256 and piece hashes.
//!
//! Why mksquashfs rather than a Rust writer: the kernel reads the result, and squashfs-tools is
//! the writer every distribution's live images and the kernel's own tests use; the Rust crates
//! (`backhand`) do not write xattrs (ACLs, capabilities) of every kind a chroot has.
//!
//! Exclusions: mksquashfs's own wildcards do not follow the archive's glob rules, and it has no
//! `-one-file-system` before squashfs-tools 4.6 (bookworm has 4.5.1), so the tree is walked here
//! with the archive's [`Excludes`] and every path to leave out is handed over in an exact
//! exclude file (`-ef`, no wildcards).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::archive::Excludes;
use super::piece::{self, PieceHasher, Pieces};

#[derive(Debug, thiserror::Error)]
pub enum SquashfsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} cannot go into the squashfs: its name contains a line break")]
    Name { path: PathBuf },
    #[error("cannot run {program} (install squashfs-tools): {source}")]
    Spawn { program: String, source: io::Error },
    #[error("{program} failed with {status}: {stderr}")]
    Failed { program: String, status: String, stderr: String },
}

type Result<T, E = SquashfsError> = std::result::Result<T, E>;

/// How to build it.
#[derive(Debug, Clone)]
pub struct SquashfsOptions {
    /// The mksquashfs command.
    pub program: String,
    /// zstd level (1 to 22).
    pub zstd_level: i32,
    /// Threads; 0 = one per core.
    pub threads: u32,
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    pub size: u64,
    pub sha256: String,
    pub pieces: Pieces,
}

/// The paths (relative to `root`) mksquashfs must leave out: every excluded entry (not what is
/// below it) and everything below a directory on another file system (the directory stays, as
/// in the archive). Sorted.
pub fn excluded_paths(root: &Path, ex: &Excludes) -> Result<Vec<PathBuf>> {
    let meta = std::fs::symlink_metadata(root).map_err(|source| SquashfsError::Read { path: root.into(), source })?;
    let dev = meta.dev();
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = std::fs::read_dir(&dir).map_err(|source| SquashfsError::Read { path: dir.clone(), source })?;
        for e in rd {
            let e = e.map_err(|source| SquashfsError::Read { path: dir.clone(), source })?;
            let child = rel.join(e.file_name());
            if ex.is_excluded(&child) {
                out.push(child);
                continue;
            }
            let m = e.metadata().map_err(|source| SquashfsError::Read { path: e.path(), source })?;
            if !m.is_dir() {
                continue;
            }
            if m.dev() != dev {
                // A mount point: kept, empty.
                let inner =
                    std::fs::read_dir(e.path()).map_err(|source| SquashfsError::Read { path: e.path(), source })?;
                for i in inner {
                    let i = i.map_err(|source| SquashfsError::Read { path: e.path(), source })?;
                    out.push(child.join(i.file_name()));
                }
                continue;
            }
            stack.push(child);
        }
    }
    out.sort();
    Ok(out)
}

/// Writes the exclude file mksquashfs reads with `-ef`: one path per line, relative to the tree.
fn write_exclude_file(path: &Path, paths: &[PathBuf]) -> Result<()> {
    let werr = |source| SquashfsError::Write { path: path.into(), source };
    let mut f = io::BufWriter::new(File::create(path).map_err(werr)?);
    for p in paths {
        let bytes = p.as_os_str().as_bytes();
        if bytes.contains(&b'\n') || bytes.contains(&b'\r') {
            return Err(SquashfsError::Name { path: p.clone() });
        }
        // mksquashfs reads the file with its own quoting: a backslash escapes the next character.
        let mut line = Vec::with_capacity(bytes.len() + 1);
        for &b in bytes {
            if b == b'\\' || b == b' ' || b == b'\t' {
                line.push(b'\\');
            }
            line.push(b);
        }
        line.push(b'\n');
        f.write_all(&line).map_err(werr)?;
    }
    f.flush().map_err(werr)
}

/// The mksquashfs arguments (after the program) for `root` into `out`.
pub fn arguments(root: &Path, out: &Path, exclude_file: &Path, opts: &SquashfsOptions) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec![root.into(), out.into()];
    let level = opts.zstd_level.clamp(1, 22).to_string();
    for s in [
        "-noappend",
        "-no-progress",
        "-quiet",
        "-comp",
        "zstd",
        "-Xcompression-level",
        &level,
        "-reproducible",
        "-mkfs-time",
        "0",
        "-all-time",
        "0",
        "-ef",
    ] {
        a.push(s.into());
    }
    a.push(exclude_file.into());
    if opts.threads > 0 {
        a.push("-processors".into());
        a.push(opts.threads.to_string().into());
    }
    a
}

/// Builds the squashfs of `root` into `out` and hashes it (SHA-256, pieces for a torrent).
/// `scratch` is a directory for the exclude file.
pub fn build(root: &Path, ex: &Excludes, out: &Path, scratch: &Path, opts: &SquashfsOptions) -> Result<Built> {
    let paths = excluded_paths(root, ex)?;
    let exclude_file = scratch.join(".squashfs-exclude");
    write_exclude_file(&exclude_file, &paths)?;
    let run = Command::new(&opts.program).args(arguments(root, out, &exclude_file, opts)).output();
    let _ = std::fs::remove_file(&exclude_file);
    let run = run.map_err(|source| SquashfsError::Spawn { program: opts.program.clone(), source })?;
    if !run.status.success() {
        let stderr = String::from_utf8_lossy(&run.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(SquashfsError::Failed {
            program: opts.program.clone(),
            status: run.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("; "),
        });
    }
    let f = File::open(out).map_err(|source| SquashfsError::Read { path: out.into(), source })?;
    f.sync_all().map_err(|source| SquashfsError::Write { path: out.into(), source })?;
    hash(out)
}

/// SHA-256 and SHA-1 pieces of a finished file (the piece size suits its length).
pub fn hash(path: &Path) -> Result<Built> {
    let rerr = |source| SquashfsError::Read { path: path.into(), source };
    let mut f = File::open(path).map_err(rerr)?;
    let len = f.metadata().map_err(rerr)?.len();
    let mut pieces = PieceHasher::new(&[piece::piece_length_for(len)]);
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(rerr)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        pieces.update(&buf[..n]);
    }
    Ok(Built { size: len, sha256: hex::encode(sha.finalize()), pieces: pieces.finish() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mksquashfs_present() -> bool {
        Command::new("mksquashfs").arg("-version").output().is_ok_and(|o| o.status.success())
    }

    fn tree(dir: &Path) {
        std::fs::create_dir_all(dir.join("etc/ssh")).unwrap();
        std::fs::create_dir_all(dir.join("proc/1")).unwrap();
        std::fs::create_dir_all(dir.join("usr/lib")).unwrap();
        std::fs::write(dir.join("etc/hostname"), "image\n").unwrap();
        std::fs::write(dir.join("etc/ssh/ssh_host_ed25519_key"), "secret").unwrap();
        std::fs::write(dir.join("etc/ssh/sshd_config"), "Port 22\n").unwrap();
        std::fs::write(dir.join("proc/1/status"), "x").unwrap();
        std::fs::write(dir.join("usr/lib/with space"), "y").unwrap();
        std::fs::write(dir.join("usr/lib/a.pyc"), "z").unwrap();
        std::fs::write(dir.join("usr/lib/data"), vec![7u8; 300_000]).unwrap();
        std::os::unix::fs::symlink("data", dir.join("usr/lib/link")).unwrap();
    }

    #[test]
    fn exclusions_follow_the_archive_rules() {
        let d = tempfile::tempdir().unwrap();
        tree(d.path());
        let ex = Excludes::new(&["proc/*", "etc/ssh/ssh_host_*", "etc/hostname", "*.pyc"]).unwrap();
        let got = excluded_paths(d.path(), &ex).unwrap();
        let want: Vec<PathBuf> = ["etc/hostname", "etc/ssh/ssh_host_ed25519_key", "proc/1", "usr/lib/a.pyc"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn exclude_file_escapes_and_refuses_line_breaks() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ex");
        write_exclude_file(&f, &[PathBuf::from("usr/lib/with space"), PathBuf::from("a\\b")]).unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "usr/lib/with\\ space\na\\\\b\n");
        let e = write_exclude_file(&f, &[PathBuf::from("bad\nname")]).unwrap_err().to_string();
        assert!(e.contains("bad\nname") && e.contains("line break"), "{e}");
    }

    #[test]
    fn arguments_make_it_reproducible() {
        let o = SquashfsOptions { program: "mksquashfs".into(), zstd_level: 30, threads: 2 };
        let a: Vec<String> = arguments(Path::new("/t"), Path::new("/o.sqfs"), Path::new("/ex"), &o)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let joined = a.join(" ");
        assert!(joined.starts_with("/t /o.sqfs -noappend"), "{joined}");
        for want in [
            "-comp zstd",
            "-Xcompression-level 22",
            "-reproducible",
            "-mkfs-time 0",
            "-all-time 0",
            "-ef /ex",
            "-processors 2",
        ] {
            assert!(joined.contains(want), "{want} missing: {joined}");
        }
    }

    /// The same tree packed twice (different mtimes, different directory) gives the same bytes,
    /// and excluded files are not in it. Needs squashfs-tools (`scripts/install-deps.sh`).
    #[test]
    fn same_tree_same_bytes() {
        if !mksquashfs_present() {
            // A skip that scripts/test.sh reports and fails on (install-deps.sh installs it).
            luna_core::test_support::skip("mksquashfs not found: run scripts/install-deps.sh (squashfs-tools)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        tree(&a);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        tree(&b);
        let ex = Excludes::new(&["proc/*", "etc/ssh/ssh_host_*", "*.pyc"]).unwrap();
        let o = SquashfsOptions { program: "mksquashfs".into(), zstd_level: 3, threads: 0 };
        let one = build(&a, &ex, &d.path().join("one.sqfs"), d.path(), &o).unwrap();
        let two = build(&b, &ex, &d.path().join("two.sqfs"), d.path(), &o).unwrap();
        assert_eq!(one, two, "same tree, same squashfs");
        assert_eq!(
            std::fs::read(d.path().join("one.sqfs")).unwrap(),
            std::fs::read(d.path().join("two.sqfs")).unwrap()
        );
        assert_eq!(one.size, std::fs::metadata(d.path().join("one.sqfs")).unwrap().len());
        assert!(!d.path().join(".squashfs-exclude").exists(), "exclude file removed");
        // What is in it, listed by unsquashfs.
        let ls = Command::new("unsquashfs").arg("-lc").arg(d.path().join("one.sqfs")).output().unwrap();
        let ls = String::from_utf8_lossy(&ls.stdout);
        assert!(ls.contains("etc/ssh/sshd_config") && ls.contains("usr/lib/with space"), "{ls}");
        assert!(!ls.contains("ssh_host_") && !ls.contains("a.pyc") && !ls.contains("proc/1"), "{ls}");
        // A changed tree gives other bytes.
        std::fs::write(b.join("etc/hostname"), "changed\n").unwrap();
        let three = build(&b, &ex, &d.path().join("three.sqfs"), d.path(), &o).unwrap();
        assert_ne!(one.sha256, three.sha256);
    }
}
