//! Packing one revision of an osimage into a directory: archive + torrent, kernel + initramfs.
//! Blocking (file system and child processes); publishing around it is in `publish`.
//!
//! Verification: the archive's SHA-256 and piece hashes are computed over exactly the bytes
//! handed to `write(2)`, and the file is `fsync`ed before it is published, so a write error is
//! reported rather than hidden. Re-reading it right away would be served from the page cache and
//! prove nothing more about the disk; later damage is caught by the seeder (librqbit checks
//! pieces when a revision is added, see `seeder`) and by nodes, which verify every piece.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use luna_core::model::{ImageRevision, Osimage, SquashfsImage};
use serde::{Deserialize, Serialize};

use super::archive::{self, ArchiveError, ArchiveOptions, Excludes};
use super::kernel::{self, KernelError};
use super::metainfo::{self, Metainfo, MetainfoError};
use super::piece;
use super::squashfs::{self, SquashfsError, SquashfsOptions};

/// What a pack rebuilds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackMode {
    /// Archive, torrent, kernel and initramfs.
    #[default]
    Full,
    /// Kernel and initramfs only; the archive and its torrent are reused.
    BootOnly,
    /// Archive and torrent only; kernel and initramfs are reused.
    ImageOnly,
}

/// The steps a pack goes through, as jobs report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackStep {
    Queued,
    Scanning,
    Archiving,
    /// The squashfs for `overlay` nodes.
    Squashfs,
    Kernel,
    Initramfs,
    Torrent,
    Publishing,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PackProgress {
    pub step: PackStep,
    pub bytes: u64,
    pub total: u64,
    pub rate: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("squashfs: {0}")]
    Squashfs(#[from] SquashfsError),
    #[error("previous revision's torrent: {0}")]
    Torrent(#[from] MetainfoError),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("osimage '{image}' has no revision to reuse for a {mode} pack; pack it fully first")]
    NothingToReuse { image: String, mode: &'static str },
}

type Result<T, E = PackError> = std::result::Result<T, E>;

pub(crate) fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PackError + 'a {
    move |source| PackError::Io { what, path: path.to_path_buf(), source }
}

/// The previous revision a partial pack reuses files from.
#[derive(Debug, Clone)]
pub struct Previous {
    pub dir: PathBuf,
    pub revision: ImageRevision,
}

#[derive(Debug, Clone)]
pub struct PackOptions {
    pub mode: PackMode,
    /// Where the files go (an empty directory).
    pub out_dir: PathBuf,
    pub revision: u32,
    pub previous: Option<Previous>,
    /// Tracker URL.
    pub announce: String,
    /// HTTP URL of this revision's archive (BEP 19 web seed); `None` leaves it out.
    pub web_seed: Option<String>,
    /// dracut command.
    pub dracut: String,
    pub archive: ArchiveOptions,
    /// Also build the squashfs (some node boots this image in `overlay` root mode).
    pub squashfs: Option<SquashfsOptions>,
    /// Unix seconds, recorded as the revision's creation time.
    pub now: u64,
}

/// The file name of an osimage's archive inside a revision directory (and the torrent's name).
pub fn archive_name(image: &str) -> String {
    format!("{image}.tar.zst")
}

pub fn torrent_name(image: &str) -> String {
    format!("{image}.torrent")
}

/// The squashfs of an osimage inside a revision directory (and its torrent's name).
pub fn squashfs_name(image: &str) -> String {
    format!("{image}.squashfs")
}

pub fn squashfs_torrent_name(image: &str) -> String {
    format!("{image}.squashfs.torrent")
}

/// The marker of the squashfs (the archive's is [`VERIFIED_MARKER`]).
pub const SQUASHFS_VERIFIED_MARKER: &str = ".verified-squashfs";

/// Written next to the archive: what was verified when it was written, so a restart can tell
/// whether the file is still the one that was hashed without reading it.
pub const VERIFIED_MARKER: &str = ".verified";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    pub size: u64,
    pub mtime_ns: i128,
    pub inode: u64,
    pub sha256: String,
    pub info_hash: String,
}

impl Verified {
    pub fn of(path: &Path, sha256: &str, info_hash: &str) -> io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(Verified {
            size: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            inode: m.ino(),
            sha256: sha256.into(),
            info_hash: info_hash.into(),
        })
    }

    /// Whether the file at `path` still looks like the one verified (size, mtime and inode).
    pub fn matches(&self, path: &Path) -> bool {
        match Verified::of(path, &self.sha256, &self.info_hash) {
            Ok(now) => now == *self,
            Err(_) => false,
        }
    }

    pub fn read(dir: &Path) -> Option<Self> {
        Self::read_named(dir, VERIFIED_MARKER)
    }

    pub fn write(&self, dir: &Path) -> io::Result<()> {
        self.write_named(dir, VERIFIED_MARKER)
    }

    /// The marker `name` in `dir` ([`VERIFIED_MARKER`], [`SQUASHFS_VERIFIED_MARKER`]).
    pub fn read_named(dir: &Path, name: &str) -> Option<Self> {
        let text = std::fs::read(dir.join(name)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn write_named(&self, dir: &Path, name: &str) -> io::Result<()> {
        let path = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        let f = File::create(&tmp)?;
        serde_json::to_writer(&f, self).map_err(io::Error::other)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }
}

/// Lower-case hex SHA-256 of the file at `path`.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    use sha2::Digest;
    let mut f = File::open(path)?;
    let mut h = sha2::Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Hard-links `src` to `dst`, copying when they are on different file systems.
fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    match std::fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(src, dst).map(drop).map_err(io_err("cannot copy", src))
        }
        Err(e) => Err(PackError::Io { what: "cannot link", path: src.into(), source: e }),
    }
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io_err("cannot sync", path))
}

/// Estimated archive size range for a tree with `data_bytes` of file data: from the previous
/// revision's compression ratio when known, else zstd's usual 1:1 to 4:1 on OS trees.
pub fn size_estimate(data_bytes: u64, previous: Option<&ImageRevision>) -> (u64, u64) {
    match previous {
        Some(p) if p.tree_bytes > 0 && p.archive_size > 0 => {
            let est = (data_bytes as f64 * p.archive_size as f64 / p.tree_bytes as f64) as u64;
            (est / 3 * 2, est / 2 * 3)
        }
        _ => (data_bytes / 4, data_bytes + data_bytes / 50 + (1 << 20)),
    }
}

/// Packs `image` into `opts.out_dir` and describes the revision. `progress` returning `false`
/// cancels.
pub fn pack(
    image: &Osimage,
    opts: &PackOptions,
    progress: &mut dyn FnMut(&PackProgress) -> bool,
) -> Result<ImageRevision> {
    let dir = &opts.out_dir;
    let previous = match (opts.mode, &opts.previous) {
        (PackMode::Full, _) => None,
        (_, Some(p)) => Some(p),
        (mode, None) => {
            return Err(PackError::NothingToReuse {
                image: image.name.clone(),
                mode: if mode == PackMode::BootOnly { "boot-only" } else { "image-only" },
            })
        }
    };
    let mut report =
        |step: PackStep, bytes: u64, total: u64, rate: f64| progress(&PackProgress { step, bytes, total, rate });
    let archive_file = archive_name(&image.name);
    let archive_path = dir.join(&archive_file);

    // archive: written now, or the previous one reused (same bytes, so the same info dict).
    let (size, sha256, pieces, piece_length, tree_bytes) = if opts.mode == PackMode::BootOnly {
        let p = previous.expect("checked above");
        link_or_copy(&p.dir.join(&p.revision.archive), &archive_path)?;
        let prev_torrent = std::fs::read(p.dir.join(&p.revision.torrent)).map_err(io_err("cannot read", &p.dir))?;
        let t = metainfo::parse_full(&prev_torrent)?;
        (t.length, p.revision.sha256.clone(), t.pieces, t.piece_length, p.revision.tree_bytes)
    } else {
        let ex = Excludes::new(&image.grab_exclude)?;
        let root = Path::new(&image.path);
        if !report(PackStep::Scanning, 0, 0, 0.0) {
            return Err(ArchiveError::Cancelled.into());
        }
        let stats = archive::scan(root, &ex)?;
        let (low, high) = size_estimate(stats.data_bytes, opts.previous.as_ref().map(|p| &p.revision));
        let mut aopts = opts.archive.clone();
        aopts.piece_candidates = piece::candidates(low, high);
        let f = File::create(&archive_path).map_err(io_err("cannot create", &archive_path))?;
        let (f, sum) = archive::write_archive(root, &ex, f, &aopts, stats.data_bytes, &mut |p| {
            report(PackStep::Archiving, p.bytes, p.total, p.rate)
        })?;
        f.sync_all().map_err(io_err("cannot sync", &archive_path))?;
        tracing::info!(
            image = %image.name, bytes = sum.size, entries = sum.entries, piece_length = sum.pieces.piece_length,
            pieces = sum.pieces.hashes.len(), "archive written"
        );
        (sum.size, hex::encode(sum.sha256), sum.pieces.hashes, sum.pieces.piece_length, sum.data_bytes)
    };

    // kernel and initramfs
    let (kernel_version, kernel, initrd) = if opts.mode == PackMode::ImageOnly {
        let p = previous.expect("checked above");
        let r = &p.revision;
        link_or_copy(&p.dir.join(&r.kernel), &dir.join(&r.kernel))?;
        link_or_copy(&p.dir.join(&r.initrd), &dir.join(&r.initrd))?;
        (r.kernel_version.clone(), r.kernel.clone(), r.initrd.clone())
    } else {
        if !report(PackStep::Kernel, 0, 0, 0.0) {
            return Err(ArchiveError::Cancelled.into());
        }
        let k = kernel::detect(image)?;
        if !report(PackStep::Initramfs, 0, 0, 0.0) {
            return Err(ArchiveError::Cancelled.into());
        }
        let (kernel, initrd) = kernel::build(&opts.dracut, image, &k, dir)?;
        (k.version, kernel, initrd)
    };

    if !report(PackStep::Torrent, 0, 0, 0.0) {
        return Err(ArchiveError::Cancelled.into());
    }
    let url_list = opts.web_seed.iter().cloned().collect();
    let torrent_file = torrent_name(&image.name);
    let torrent_path = dir.join(&torrent_file);
    let info_hash = write_torrent(opts, &archive_file, size, piece_length, pieces, url_list, &torrent_path)?;

    for f in [&torrent_path, &dir.join(&kernel), &dir.join(&initrd), &archive_path] {
        sync_file(f)?;
    }
    // Recorded for the servers that replicate the revision (they check their copies).
    let (kernel_path, initrd_path) = (dir.join(&kernel), dir.join(&initrd));
    let kernel_sha256 = sha256_file(&kernel_path).map_err(io_err("cannot read", &kernel_path))?;
    let initrd_sha256 = sha256_file(&initrd_path).map_err(io_err("cannot read", &initrd_path))?;
    Verified::of(&archive_path, &sha256, &info_hash)
        .and_then(|v| v.write(dir))
        .map_err(io_err("cannot write marker in", dir))?;
    let squashfs = match &opts.squashfs {
        Some(sq) => {
            if !report(PackStep::Squashfs, 0, 0, 0.0) {
                return Err(ArchiveError::Cancelled.into());
            }
            Some(pack_squashfs(image, opts, sq, previous)?)
        }
        None => None,
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("cannot sync", dir))?;

    Ok(ImageRevision {
        id: opts.revision,
        created: opts.now,
        kernel_version,
        archive: archive_file,
        archive_size: size,
        sha256,
        kernel,
        initrd,
        kernel_sha256,
        initrd_sha256,
        torrent: torrent_file,
        info_hash,
        piece_length,
        tree_bytes,
        squashfs,
    })
}

/// Writes the private torrent of the revision's file `name` to `path`; returns its info hash (hex).
fn write_torrent(
    opts: &PackOptions,
    name: &str,
    length: u64,
    piece_length: u64,
    pieces: Vec<[u8; 20]>,
    url_list: Vec<String>,
    path: &Path,
) -> Result<String> {
    let meta = Metainfo {
        announce: opts.announce.clone(),
        url_list,
        name: name.into(),
        length,
        piece_length,
        pieces,
        private: true,
        creation_date: opts.now,
        created_by: concat!("luna ", env!("CARGO_PKG_VERSION")).into(),
    };
    std::fs::write(path, meta.to_bytes()).map_err(io_err("cannot write", path))?;
    Ok(hex::encode(meta.info_hash()))
}

/// The squashfs and its torrent (and marker): built from the tree, or, for a boot-only pack,
/// the previous revision's reused when it has one (same tree).
fn pack_squashfs(
    image: &Osimage,
    opts: &PackOptions,
    sq: &SquashfsOptions,
    previous: Option<&Previous>,
) -> Result<SquashfsImage> {
    let dir = &opts.out_dir;
    let file = squashfs_name(&image.name);
    let path = dir.join(&file);
    let reused = match (opts.mode, previous.and_then(|p| p.revision.squashfs.as_ref().map(|s| (p, s)))) {
        (PackMode::BootOnly, Some((p, s))) => {
            link_or_copy(&p.dir.join(&s.file), &path)?;
            let t = std::fs::read(p.dir.join(&s.torrent)).map_err(io_err("cannot read", &p.dir))?;
            let t = metainfo::parse_full(&t)?;
            Some((s.size, s.sha256.clone(), t.pieces, t.piece_length))
        }
        _ => None,
    };
    let (size, sha256, pieces, piece_length) = match reused {
        Some(r) => r,
        None => {
            let ex = Excludes::new(&image.grab_exclude)?;
            let built = squashfs::build(Path::new(&image.path), &ex, &path, dir, sq)?;
            tracing::info!(image = %image.name, bytes = built.size, "squashfs written");
            (built.size, built.sha256, built.pieces.hashes, built.pieces.piece_length)
        }
    };
    let torrent = squashfs_torrent_name(&image.name);
    let torrent_path = dir.join(&torrent);
    let info_hash = write_torrent(opts, &file, size, piece_length, pieces, Vec::new(), &torrent_path)?;
    sync_file(&torrent_path)?;
    sync_file(&path)?;
    Verified::of(&path, &sha256, &info_hash)
        .and_then(|v| v.write_named(dir, SQUASHFS_VERIFIED_MARKER))
        .map_err(io_err("cannot write marker in", dir))?;
    Ok(SquashfsImage { file, size, sha256, torrent, info_hash, piece_length })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_uses_the_previous_ratio() {
        let mut r = ImageRevision {
            id: 1,
            created: 0,
            kernel_version: String::new(),
            archive: String::new(),
            archive_size: 300,
            sha256: String::new(),
            kernel: String::new(),
            initrd: String::new(),
            kernel_sha256: String::new(),
            initrd_sha256: String::new(),
            torrent: String::new(),
            info_hash: String::new(),
            piece_length: 0,
            tree_bytes: 900,
            squashfs: None,
        };
        assert_eq!(size_estimate(9000, Some(&r)), (2000, 4500));
        r.tree_bytes = 0;
        assert_eq!(size_estimate(4000, Some(&r)), (1000, 4000 + 80 + (1 << 20)));
    }
}
