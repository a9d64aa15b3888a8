//! The image archive: one pass over the chroot tree into a zstd-compressed tar, hashed as it is
//! written (SHA-256 of the archive and the torrent's SHA-1 pieces), so the archive is never read
//! back.
//!
//! What goes in: every file of the chroot's own file system (mount points are kept as empty
//! directories, like `tar --one-file-system`), in name order so the same tree gives the same
//! archive; numeric owners, modes and mtimes; symlinks; hard links once (later names are link
//! entries); device nodes and FIFOs; sparse files as GNU sparse entries; every extended attribute
//! (`security.capability`, POSIX ACLs as `system.posix_acl_*`, SELinux labels, `user.*`) as
//! `SCHILY.xattr.*` PAX records, which GNU tar restores with `--xattrs --xattrs-include='*'`.
//! Sockets are skipped (tar cannot hold them; they are recreated by whoever listens).
//!
//! Exclusions ([`Excludes`]): `grab_exclude` globs, relative to the chroot. A pattern with a `/`
//! is matched against the whole path (`proc/*`, `var/cache/*`); one without is matched against
//! the file name at any depth (`*.pyc`). `*` and `?` stop at `/`, `**` crosses it. An excluded
//! directory is left out with everything below it.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{File, Metadata};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use sha2::{Digest, Sha256};
use tar::{EntryType, GnuExtSparseHeader, Header};

use super::piece::{PieceHasher, Pieces};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("invalid grab_exclude pattern '{pattern}': {reason}")]
    Pattern { pattern: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write the archive: {0}")]
    Write(io::Error),
    #[error("{path} cannot be archived: {reason}")]
    Entry { path: PathBuf, reason: String },
    #[error("packing was cancelled")]
    Cancelled,
}

type Result<T, E = ArchiveError> = std::result::Result<T, E>;

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Read { path: path.to_path_buf(), source }
}

/// Compiled `grab_exclude` patterns.
#[derive(Debug, Clone)]
pub struct Excludes {
    anchored: GlobSet,
    basename: GlobSet,
}

impl Excludes {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self> {
        let mut anchored = GlobSetBuilder::new();
        let mut basename = GlobSetBuilder::new();
        for p in patterns {
            let raw = p.as_ref();
            let pat = raw.trim().trim_start_matches("./").trim_start_matches('/').trim_end_matches('/');
            if pat.is_empty() {
                return Err(ArchiveError::Pattern { pattern: raw.into(), reason: "matches the whole image".into() });
            }
            let glob = GlobBuilder::new(pat)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| ArchiveError::Pattern { pattern: raw.into(), reason: e.kind().to_string() })?;
            if pat.contains('/') {
                anchored.add(glob);
            } else {
                basename.add(glob);
            }
        }
        let build = |b: GlobSetBuilder| {
            b.build().map_err(|e| ArchiveError::Pattern {
                pattern: patterns.iter().map(|p| p.as_ref()).collect::<Vec<_>>().join(","),
                reason: e.to_string(),
            })
        };
        Ok(Excludes { anchored: build(anchored)?, basename: build(basename)? })
    }

    /// Whether `rel` (relative to the chroot, no leading `/`) is left out.
    pub fn is_excluded(&self, rel: &Path) -> bool {
        if rel.as_os_str().is_empty() {
            return false;
        }
        self.anchored.is_match(rel) || rel.file_name().is_some_and(|n| self.basename.is_match(Path::new(n)))
    }
}

/// What a pass over the tree (metadata only) found: how many bytes of file data packing will
/// read, for the progress bar and the piece-size estimate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    pub entries: u64,
    pub data_bytes: u64,
}

/// Progress of the one pass: file data bytes read so far of `total`, and the rate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    pub bytes: u64,
    pub total: u64,
    /// Bytes per second since the start.
    pub rate: f64,
}

/// One entry of the tree as the walk yields it.
struct Entry {
    rel: PathBuf,
    abs: PathBuf,
    meta: Metadata,
    /// A directory on another file system: archived, not entered.
    mount_point: bool,
}

/// Walks `root` in name order without crossing file systems, skipping what `ex` excludes.
fn walk(root: &Path, ex: &Excludes, visit: &mut dyn FnMut(Entry) -> Result<()>) -> Result<()> {
    let meta = std::fs::symlink_metadata(root).map_err(read_err(root))?;
    if !meta.is_dir() {
        return Err(ArchiveError::Entry { path: root.into(), reason: "the image path is not a directory".into() });
    }
    let dev = meta.dev();
    visit(Entry { rel: PathBuf::new(), abs: root.into(), meta, mount_point: false })?;
    walk_dir(root, Path::new(""), dev, ex, visit)
}

fn walk_dir(abs: &Path, rel: &Path, dev: u64, ex: &Excludes, visit: &mut dyn FnMut(Entry) -> Result<()>) -> Result<()> {
    let mut names: Vec<std::ffi::OsString> = Vec::new();
    for e in std::fs::read_dir(abs).map_err(read_err(abs))? {
        names.push(e.map_err(read_err(abs))?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let rel = rel.join(&name);
        if ex.is_excluded(&rel) {
            continue;
        }
        let abs = abs.join(&name);
        let meta = match std::fs::symlink_metadata(&abs) {
            Ok(m) => m,
            // Removed while we walk (a live chroot): nothing to archive.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ArchiveError::Read { path: abs, source: e }),
        };
        let is_dir = meta.is_dir();
        let other_fs = meta.dev() != dev;
        if other_fs && !is_dir {
            tracing::warn!(path = %abs.display(), "skipping a file on another file system");
            continue;
        }
        visit(Entry { rel: rel.clone(), abs: abs.clone(), meta, mount_point: is_dir && other_fs })?;
        if is_dir && !other_fs {
            walk_dir(&abs, &rel, dev, ex, visit)?;
        }
    }
    Ok(())
}

/// Counts what [`write_archive`] will read; metadata only.
pub fn scan(root: &Path, ex: &Excludes) -> Result<TreeStats> {
    let mut st = TreeStats::default();
    let mut seen = std::collections::HashSet::new();
    walk(root, ex, &mut |e| {
        st.entries += 1;
        if e.meta.is_file() && (e.meta.nlink() < 2 || seen.insert((e.meta.dev(), e.meta.ino()))) {
            // Holes are not read: count what is allocated when that is less.
            st.data_bytes += e.meta.len().min(e.meta.blocks() * 512);
        }
        Ok(())
    })?;
    Ok(st)
}

/// The sink at the bottom of the stack: the compressed bytes go to the file and through both
/// hashes on their way. Hashing and writing run on two threads of their own (file + SHA-256,
/// torrent pieces), fed in order through bounded channels, so the thread that reads the tree and
/// feeds zstd never waits for them; the hashes still see exactly the bytes written, in order.
pub struct HashingWriter<W: Write + Send + 'static> {
    /// Bytes waiting to be sent, gathered up to `CHUNK` so channel traffic stays small.
    pending: Vec<u8>,
    file_tx: Option<std::sync::mpsc::SyncSender<Arc<Vec<u8>>>>,
    piece_tx: Option<std::sync::mpsc::SyncSender<PieceMsg>>,
    file_thread: Option<std::thread::JoinHandle<FileResult<W>>>,
    piece_thread: Option<std::thread::JoinHandle<Pieces>>,
    written: u64,
}

/// What the writer thread hands back: the writer and the SHA-256 of what went through it.
type FileResult<W> = io::Result<(W, [u8; 32])>;

enum PieceMsg {
    Data(Arc<Vec<u8>>),
    /// See [`PieceHasher::narrow`].
    Narrow(u64),
}

const CHUNK: usize = 1 << 20;
/// Chunks in flight per thread (32 MiB at most, shared by both): rides out scheduling hiccups.
const IN_FLIGHT: usize = 32;

impl<W: Write + Send + 'static> HashingWriter<W> {
    pub fn new(mut inner: W, mut pieces: PieceHasher) -> io::Result<Self> {
        let (file_tx, file_rx) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(IN_FLIGHT);
        let (piece_tx, piece_rx) = std::sync::mpsc::sync_channel::<PieceMsg>(IN_FLIGHT);
        let file_thread = std::thread::Builder::new().name("pack-write".into()).spawn(move || {
            let mut sha = Sha256::new();
            for chunk in file_rx {
                inner.write_all(&chunk)?;
                sha.update(&chunk[..]);
            }
            inner.flush()?;
            Ok((inner, sha.finalize().into()))
        })?;
        let piece_thread = std::thread::Builder::new().name("pack-pieces".into()).spawn(move || {
            for msg in piece_rx {
                match msg {
                    PieceMsg::Data(chunk) => pieces.update(&chunk),
                    PieceMsg::Narrow(predicted) => pieces.narrow(predicted),
                }
            }
            pieces.finish()
        })?;
        Ok(HashingWriter {
            pending: Vec::with_capacity(CHUNK),
            file_tx: Some(file_tx),
            piece_tx: Some(piece_tx),
            file_thread: Some(file_thread),
            piece_thread: Some(piece_thread),
            written: 0,
        })
    }

    fn send(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = Arc::new(std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK)));
        let dead = || io::Error::other("archive writer stopped");
        let file_ok = self.file_tx.as_ref().is_some_and(|tx| tx.send(chunk.clone()).is_ok());
        let piece_ok = self.piece_tx.as_ref().is_some_and(|tx| tx.send(PieceMsg::Data(chunk)).is_ok());
        if file_ok && piece_ok {
            Ok(())
        } else {
            // The writer thread ended early: its error says why.
            Err(self.join_file().err().unwrap_or_else(dead))
        }
    }

    /// Bytes handed to this writer so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Tells the piece hasher the archive's predicted final size (see [`PieceHasher::narrow`]).
    pub fn narrow_pieces(&mut self, predicted: u64) -> io::Result<()> {
        self.send()?;
        match &self.piece_tx {
            Some(tx) if tx.send(PieceMsg::Narrow(predicted)).is_ok() => Ok(()),
            _ => Err(io::Error::other("piece hashing stopped")),
        }
    }

    fn join_file(&mut self) -> io::Result<(W, [u8; 32])> {
        self.file_tx = None;
        match self.file_thread.take() {
            Some(h) => h.join().unwrap_or_else(|_| Err(io::Error::other("archive writer thread panicked"))),
            None => Err(io::Error::other("archive writer already finished")),
        }
    }

    /// Flushes everything and returns the writer, the SHA-256, the pieces and the size.
    pub fn finish(mut self) -> io::Result<(W, [u8; 32], Pieces, u64)> {
        self.send()?;
        self.piece_tx = None;
        let (w, sha) = self.join_file()?;
        let pieces = match self.piece_thread.take() {
            Some(h) => h.join().map_err(|_| io::Error::other("piece hashing thread panicked"))?,
            None => return Err(io::Error::other("piece hashing already finished")),
        };
        Ok((w, sha, pieces, self.written))
    }
}

impl<W: Write + Send + 'static> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        self.written += buf.len() as u64;
        if self.pending.len() >= CHUNK {
            self.send()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

impl<W: Write + Send + 'static> Drop for HashingWriter<W> {
    fn drop(&mut self) {
        // Closing the channels ends both threads; their results are not wanted any more.
        self.file_tx = None;
        self.piece_tx = None;
        if let Some(h) = self.file_thread.take() {
            let _ = h.join();
        }
        if let Some(h) = self.piece_thread.take() {
            let _ = h.join();
        }
    }
}

#[derive(Debug, Clone)]
pub struct ArchiveOptions {
    pub zstd_level: i32,
    /// zstd worker threads; 0 = one per core.
    pub zstd_threads: u32,
    /// Candidate piece sizes (see [`super::piece::candidates`]).
    pub piece_candidates: Vec<u64>,
}

impl Default for ArchiveOptions {
    fn default() -> Self {
        ArchiveOptions { zstd_level: 3, zstd_threads: 0, piece_candidates: Vec::new() }
    }
}

/// The archive as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSummary {
    pub size: u64,
    pub sha256: [u8; 32],
    pub pieces: Pieces,
    pub entries: u64,
    /// File data bytes read from the tree.
    pub data_bytes: u64,
}

const COPY_BUF: usize = 1 << 20;

type Stack<O> = io::BufWriter<zstd::Encoder<'static, HashingWriter<O>>>;

struct Writer<'a, O: Write + Send + 'static> {
    builder: tar::Builder<Stack<O>>,
    /// The piece hasher was told the predicted archive size.
    narrowed: bool,
    links: HashMap<(u64, u64), PathBuf>,
    buf: Vec<u8>,
    bytes: u64,
    total: u64,
    started: Instant,
    last_report: Instant,
    progress: &'a mut dyn FnMut(&Progress) -> bool,
    entries: u64,
}

impl<O: Write + Send + 'static> Writer<'_, O> {
    /// Once an eighth of the tree (at least 64 MiB) went through, the compression ratio so far
    /// predicts the archive size well enough to keep a single piece size.
    fn maybe_narrow(&mut self) -> Result<()> {
        if self.narrowed || self.total == 0 || self.bytes < (self.total / 8).max(64 << 20) {
            return Ok(());
        }
        self.narrowed = true;
        let sink = self.builder.get_mut().get_mut().get_mut();
        let predicted = (sink.written() as f64 * self.total as f64 / self.bytes as f64) as u64;
        sink.narrow_pieces(predicted).map_err(ArchiveError::Write)
    }

    fn report(&mut self, force: bool) -> Result<()> {
        let now = Instant::now();
        if !force && now.duration_since(self.last_report).as_millis() < 200 {
            return Ok(());
        }
        self.last_report = now;
        let secs = now.duration_since(self.started).as_secs_f64();
        let rate = if secs > 0.0 { self.bytes as f64 / secs } else { 0.0 };
        let p = Progress { bytes: self.bytes, total: self.total.max(self.bytes), rate };
        if !(self.progress)(&p) {
            return Err(ArchiveError::Cancelled);
        }
        Ok(())
    }

    fn entry(&mut self, e: Entry) -> Result<()> {
        self.entries += 1;
        let ft = e.meta.file_type();
        if ft.is_socket() {
            return Ok(());
        }
        let mut h = Header::new_gnu();
        h.set_metadata_in_mode(&e.meta, tar::HeaderMode::Complete);
        h.set_mtime(e.meta.mtime().max(0) as u64);
        let name: PathBuf = if e.rel.as_os_str().is_empty() { PathBuf::from(".") } else { e.rel.clone() };
        let xattrs = if e.mount_point { Vec::new() } else { read_xattrs(&e.abs)? };
        self.pax_xattrs(&xattrs)?;
        let w = ArchiveError::Write;
        if ft.is_dir() {
            h.set_entry_type(EntryType::Directory);
            h.set_size(0);
            let mut dir = name.into_os_string();
            dir.push("/");
            self.builder.append_data(&mut h, dir, io::empty()).map_err(w)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&e.abs).map_err(read_err(&e.abs))?;
            h.set_entry_type(EntryType::Symlink);
            h.set_size(0);
            self.builder.append_link(&mut h, &name, &target).map_err(w)?;
        } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
            h.set_entry_type(if ft.is_fifo() {
                EntryType::Fifo
            } else if ft.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            });
            h.set_size(0);
            let rdev = e.meta.rdev();
            let (major, minor) = (libc::major(rdev), libc::minor(rdev));
            h.set_device_major(major).map_err(w)?;
            h.set_device_minor(minor).map_err(w)?;
            self.builder.append_data(&mut h, &name, io::empty()).map_err(w)?;
        } else if ft.is_file() {
            let key = (e.meta.dev(), e.meta.ino());
            if e.meta.nlink() > 1 {
                if let Some(first) = self.links.get(&key) {
                    let first = first.clone();
                    h.set_entry_type(EntryType::Link);
                    h.set_size(0);
                    self.builder.append_link(&mut h, &name, &first).map_err(w)?;
                    return Ok(());
                }
                self.links.insert(key, name.clone());
            }
            self.file(h, &name, &e)?;
        } else {
            return Err(ArchiveError::Entry { path: e.abs, reason: "unknown file type".into() });
        }
        Ok(())
    }

    /// One `x` header with the entry's extended attributes, read by GNU tar as `SCHILY.xattr.*`.
    fn pax_xattrs(&mut self, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        if xattrs.is_empty() {
            return Ok(());
        }
        let mut records = Vec::new();
        for (k, v) in xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            records.extend(pax_record(&key, v));
        }
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::XHeader);
        h.set_mode(0o644);
        h.set_size(records.len() as u64);
        h.set_mtime(0);
        self.builder.append_data(&mut h, "././@PaxHeader", &records[..]).map_err(ArchiveError::Write)
    }

    fn file(&mut self, mut h: Header, name: &Path, e: &Entry) -> Result<()> {
        let mut f = match File::open(&e.abs) {
            Ok(f) => f,
            Err(err) => return Err(ArchiveError::Read { path: e.abs.clone(), source: err }),
        };
        // The header must describe the bytes that follow exactly: take the size from the open
        // file and copy exactly that much, zero-filled if the file shrinks under us.
        let meta = f.metadata().map_err(read_err(&e.abs))?;
        let size = meta.len();
        let regions = if meta.blocks() * 512 < size { data_regions(&f, size).map_err(read_err(&e.abs))? } else { None };
        let w = ArchiveError::Write;
        match regions {
            None => {
                h.set_entry_type(EntryType::Regular);
                h.set_size(size);
                self.builder.append_data(&mut h, name, io::empty()).map_err(w)?;
                self.copy(&mut f, &e.abs, &[(0, size)])?;
                pad(self.builder.get_mut(), size).map_err(w)?;
            }
            Some(regions) => {
                let stored: u64 = regions.iter().map(|r| r.1).sum();
                h.set_entry_type(EntryType::GNUSparse);
                h.set_size(stored);
                let ext = {
                    let gnu = h.as_gnu_mut().ok_or_else(|| ArchiveError::Entry {
                        path: e.abs.clone(),
                        reason: "sparse entry needs a gnu header".into(),
                    })?;
                    gnu.set_real_size(size);
                    for (slot, (off, len)) in gnu.sparse.iter_mut().zip(&regions) {
                        slot.set_offset(*off);
                        slot.set_length(*len);
                    }
                    gnu.set_is_extended(regions.len() > gnu.sparse.len());
                    ext_sparse_blocks(&regions[gnu.sparse.len().min(regions.len())..])
                };
                self.builder.append_data(&mut h, name, io::empty()).map_err(w)?;
                self.builder.get_mut().write_all(&ext).map_err(w)?;
                self.copy(&mut f, &e.abs, &regions)?;
                pad(self.builder.get_mut(), stored).map_err(w)?;
            }
        }
        Ok(())
    }

    /// Copies exactly the given regions of `f` into the archive.
    fn copy(&mut self, f: &mut File, path: &Path, regions: &[(u64, u64)]) -> Result<()> {
        let mut changed = false;
        for &(off, len) in regions {
            if len == 0 {
                continue;
            }
            f.seek(SeekFrom::Start(off)).map_err(read_err(path))?;
            let mut left = len;
            while left > 0 {
                let want = (left as usize).min(COPY_BUF);
                let n = if changed {
                    0
                } else {
                    match f.read(&mut self.buf[..want]) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(ArchiveError::Read { path: path.into(), source: e }),
                    }
                };
                let n = if n == 0 {
                    if !changed {
                        tracing::warn!(path = %path.display(), "file shrank while being packed; padding with zeros");
                        changed = true;
                    }
                    self.buf[..want].fill(0);
                    want
                } else {
                    n
                };
                self.builder.get_mut().write_all(&self.buf[..n]).map_err(ArchiveError::Write)?;
                left -= n as u64;
                self.bytes += n as u64;
                self.report(false)?;
                self.maybe_narrow()?;
            }
        }
        Ok(())
    }
}

fn pad(w: &mut impl Write, len: u64) -> io::Result<()> {
    let rem = (512 - len % 512) % 512;
    w.write_all(&[0u8; 512][..rem as usize])
}

fn ext_sparse_blocks(rest: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    let chunks: Vec<&[(u64, u64)]> = rest.chunks(21).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut ext = GnuExtSparseHeader::new();
        for (slot, (off, len)) in ext.sparse_mut().iter_mut().zip(chunk.iter()) {
            slot.set_offset(*off);
            slot.set_length(*len);
        }
        ext.set_is_extended(i + 1 < chunks.len());
        out.extend_from_slice(ext.as_bytes());
    }
    out
}

/// One PAX record: `"<len> <key>=<value>\n"` where `len` counts the whole record.
pub fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut r = Vec::with_capacity(len);
    r.extend_from_slice(len.to_string().as_bytes());
    r.push(b' ');
    r.extend_from_slice(key);
    r.push(b'=');
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

/// Data regions of a file with holes (SEEK_DATA/SEEK_HOLE), GNU style: ending with a
/// zero-length region at the end of the file. `None` when the file has no holes after all or the
/// file system cannot tell.
fn data_regions(f: &File, size: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
    let fd = f.as_raw_fd();
    let seek = |off: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let r = unsafe { libc::lseek64(fd, off as libc::off64_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    };
    let mut regions = Vec::new();
    let mut off = 0u64;
    while off < size {
        let Some(start) = seek(off, libc::SEEK_DATA)? else { break };
        if start >= size {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if end <= start {
            break;
        }
        regions.push((start, end - start));
        off = end;
    }
    if regions.len() == 1 && regions[0] == (0, size) {
        return Ok(None);
    }
    regions.push((size, 0));
    Ok(Some(regions))
}

/// Extended attributes of `path` itself (not following symlinks), sorted by name.
pub fn read_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| ArchiveError::Entry { path: path.into(), reason: "path has a NUL byte".into() })?;
    let names = xattr_call(path, |buf, len| {
        // SAFETY: buf is valid for len bytes (or null with len 0), c is NUL-terminated.
        unsafe { libc::llistxattr(c.as_ptr(), buf as *mut libc::c_char, len) }
    })?;
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Ok(cname) = CString::new(name) else { continue };
        let value = match xattr_call(path, |buf, len| {
            // SAFETY: as above.
            unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), buf as *mut libc::c_void, len) }
        }) {
            Ok(v) => v,
            // Removed between list and get.
            Err(ArchiveError::Read { source, .. }) if source.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

/// Runs a size-probing xattr call: first with no buffer for the size, then for real (retrying if
/// the value grew in between).
fn xattr_call(path: &Path, call: impl Fn(*mut u8, usize) -> isize) -> Result<Vec<u8>> {
    for _ in 0..8 {
        let n = call(std::ptr::null_mut(), 0);
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::ENOTSUP)) {
                return Ok(Vec::new());
            }
            return Err(ArchiveError::Read { path: path.into(), source: e });
        }
        let mut buf = vec![0u8; n as usize];
        let m = call(buf.as_mut_ptr(), buf.len());
        if m < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(ArchiveError::Read { path: path.into(), source: e });
        }
        buf.truncate(m as usize);
        return Ok(buf);
    }
    Err(ArchiveError::Read { path: path.into(), source: io::Error::other("extended attributes keep changing") })
}

/// Writes the archive of `root` into `out`: one pass, hashed on the way. `total` is the
/// [`scan`] estimate for progress; `progress` returning `false` cancels.
pub fn write_archive<W: Write + Send + 'static>(
    root: &Path,
    ex: &Excludes,
    out: W,
    opts: &ArchiveOptions,
    total: u64,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<(W, ArchiveSummary)> {
    let threads = if opts.zstd_threads == 0 {
        std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
    } else {
        opts.zstd_threads
    };
    let sink = HashingWriter::new(out, PieceHasher::new(&opts.piece_candidates)).map_err(ArchiveError::Write)?;
    let mut enc = zstd::Encoder::new(sink, opts.zstd_level).map_err(ArchiveError::Write)?;
    enc.multithread(threads).map_err(ArchiveError::Write)?;
    // zstd records the content checksum so a damaged archive fails to decompress.
    enc.include_checksum(true).map_err(ArchiveError::Write)?;
    let buffered = io::BufWriter::with_capacity(256 * 1024, enc);
    let now = Instant::now();
    let mut w = Writer {
        builder: tar::Builder::new(buffered),
        narrowed: false,
        links: HashMap::new(),
        buf: vec![0u8; COPY_BUF],
        bytes: 0,
        total,
        started: now,
        last_report: now,
        progress,
        entries: 0,
    };
    w.report(true)?;
    walk(root, ex, &mut |e| w.entry(e))?;
    w.report(true)?;
    let (entries, data_bytes) = (w.entries, w.bytes);
    let buffered = w.builder.into_inner().map_err(ArchiveError::Write)?;
    let enc = buffered.into_inner().map_err(|e| ArchiveError::Write(e.into_error()))?;
    let sink = enc.finish().map_err(ArchiveError::Write)?;
    let (out, sha256, pieces, size) = sink.finish().map_err(ArchiveError::Write)?;
    Ok((out, ArchiveSummary { size, sha256, pieces, entries, data_bytes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: &[&str]) -> Excludes {
        Excludes::new(p).unwrap()
    }

    #[test]
    fn default_excludes_keep_the_directories_but_not_their_contents() {
        let e = ex(&luna_core::model::default_grab_exclude().iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!e.is_excluded(Path::new("proc")));
        assert!(e.is_excluded(Path::new("proc/1")));
        assert!(e.is_excluded(Path::new("var/cache/apt")));
        assert!(!e.is_excluded(Path::new("var/lib/apt")));
        assert!(!e.is_excluded(Path::new("etc/proc")));
        assert!(!e.is_excluded(Path::new("")));
    }

    #[test]
    fn patterns_without_slash_match_names_at_any_depth() {
        let e = ex(&["*.pyc", "/root/.ssh", "./home/**/.cache"]);
        assert!(e.is_excluded(Path::new("usr/lib/x/__init__.pyc")));
        assert!(e.is_excluded(Path::new("root/.ssh")));
        assert!(!e.is_excluded(Path::new("home/root/.ssh")));
        assert!(e.is_excluded(Path::new("home/a/b/.cache")));
        assert!(!e.is_excluded(Path::new("usr/lib/x.py")));
    }

    #[test]
    fn single_star_does_not_cross_slashes() {
        let e = ex(&["var/log/*.log"]);
        assert!(e.is_excluded(Path::new("var/log/syslog.log")));
        assert!(!e.is_excluded(Path::new("var/log/apt/term.log")));
    }

    #[test]
    fn bad_patterns_are_named() {
        let err = Excludes::new(&["var/[log"]).unwrap_err().to_string();
        assert!(err.contains("var/[log"), "{err}");
        let err = Excludes::new(&["/"]).unwrap_err().to_string();
        assert!(err.contains("whole image"), "{err}");
    }

    #[test]
    fn pax_record_length_counts_itself() {
        assert_eq!(pax_record(b"a", b"b"), b"6 a=b\n");
        let r = pax_record(b"SCHILY.xattr.user.x", &[0u8; 80]);
        let text_len: usize =
            std::str::from_utf8(&r[..r.iter().position(|&c| c == b' ').unwrap()]).unwrap().parse().unwrap();
        assert_eq!(text_len, r.len());
        // crossing a digit boundary: body 95 + "2" = 97 < 100, body 98 + 2 = 100 needs 3 digits
        for vlen in 0..200 {
            let r = pax_record(b"k", &vec![b'v'; vlen]);
            let n: usize =
                std::str::from_utf8(&r[..r.iter().position(|&c| c == b' ').unwrap()]).unwrap().parse().unwrap();
            assert_eq!(n, r.len(), "value length {vlen}");
        }
    }

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("etc/hostname"), b"node001\n").unwrap();
        std::fs::create_dir_all(d.path().join("var/cache/apt")).unwrap();
        std::fs::write(d.path().join("var/cache/apt/big"), vec![1u8; 100_000]).unwrap();
        std::fs::write(d.path().join("data"), vec![2u8; 3 * COPY_BUF + 17]).unwrap();
        d
    }

    #[test]
    fn scan_counts_only_included_file_data() {
        let d = tree();
        let st = scan(d.path(), &ex(&["var/cache/*"])).unwrap();
        assert_eq!(st.data_bytes, 8 + 3 * COPY_BUF as u64 + 17);
        // root, etc, etc/hostname, var, var/cache, data
        assert_eq!(st.entries, 6);
    }

    #[test]
    fn progress_reaches_the_total_and_rate_is_positive_and_cancel_stops() {
        let d = tree();
        let e = ex(&["var/cache/*"]);
        let total = scan(d.path(), &e).unwrap().data_bytes;
        let mut seen = Vec::new();
        let (_out, sum) = write_archive(d.path(), &e, Vec::new(), &ArchiveOptions::default(), total, &mut |p| {
            seen.push(*p);
            true
        })
        .unwrap();
        let last = seen.last().unwrap();
        assert_eq!((last.bytes, last.total), (total, total));
        assert!(last.rate > 0.0);
        assert!(seen.windows(2).all(|w| w[0].bytes <= w[1].bytes));
        assert_eq!(sum.data_bytes, total);

        let err = write_archive(d.path(), &e, Vec::new(), &ArchiveOptions::default(), total, &mut |p| p.bytes == 0)
            .unwrap_err();
        assert!(matches!(err, ArchiveError::Cancelled), "{err}");
    }

    #[test]
    fn archive_hashes_are_those_of_the_bytes_written() {
        let d = tree();
        let e = ex(&[]);
        let (out, sum) = write_archive(d.path(), &e, Vec::new(), &ArchiveOptions::default(), 0, &mut |_| true).unwrap();
        assert_eq!(sum.size, out.len() as u64);
        let sha: [u8; 32] = Sha256::digest(&out).into();
        assert_eq!(sum.sha256, sha);
        let pieces: Vec<[u8; 20]> =
            out.chunks(sum.pieces.piece_length as usize).map(|c| sha1::Sha1::digest(c).into()).collect();
        assert_eq!(sum.pieces.hashes, pieces);
        // and it is a zstd tar with our files
        let dec = zstd::decode_all(&out[..]).unwrap();
        let mut ar = tar::Archive::new(&dec[..]);
        let names: Vec<String> =
            ar.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(
            names,
            ["./", "data", "etc/", "etc/hostname", "var/", "var/cache/", "var/cache/apt/", "var/cache/apt/big"]
        );
    }

    #[test]
    fn same_tree_same_archive() {
        let d = tree();
        let e = ex(&[]);
        let a = write_archive(d.path(), &e, Vec::new(), &ArchiveOptions::default(), 0, &mut |_| true).unwrap().1;
        let b = write_archive(d.path(), &e, Vec::new(), &ArchiveOptions::default(), 0, &mut |_| true).unwrap().1;
        assert_eq!(a.sha256, b.sha256);
    }
}
