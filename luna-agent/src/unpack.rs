//! Streaming tar(.zst) unpack into the target root.
//!
//! The `tar` crate parses headers (ustar, GNU long names, PAX, sparse); the file system work is
//! done here because the crate turns device nodes and FIFOs into empty files and applies
//! ownership and modes in an order that loses setuid bits. Per entry:
//! create → content → `lchown` → `chmod` (after chown, which clears setuid) → xattrs (after
//! chown, which clears `security.capability`) → mtime. Directories get mode and mtime at the
//! end, deepest first, so their children do not disturb them.
//! Privileged calls (chown, mknod, mkfifo, setxattr) go through [`Os`].

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use filetime::FileTime;
use tar::EntryType;

use crate::os::{DeviceKind, Os};

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("archive entry '{path}' escapes the target root")]
    UnsafePath { path: String },
    #[error("unpack '{path}': {source}")]
    Io { path: String, source: io::Error },
    #[error("corrupt archive: {0}")]
    Archive(io::Error),
}

fn io_err(path: &Path, source: io::Error) -> UnpackError {
    UnpackError::Io { path: path.display().to_string(), source }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub devices: u64,
    pub fifos: u64,
    pub bytes: u64,
}

/// Archive path → path relative to the root; `None` for the root itself (`./`).
fn relative(raw: &Path) -> Result<Option<PathBuf>, UnpackError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(UnpackError::UnsafePath { path: raw.display().to_string() })
            }
        }
    }
    Ok(if out.as_os_str().is_empty() { None } else { Some(out) })
}

struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: FileTime,
    xattrs: Vec<(String, Vec<u8>)>,
}

pub struct Unpacker<'a> {
    root: PathBuf,
    os: &'a dyn Os,
    /// Directories known to be real directories inside the root: parents found here skip the
    /// symlink-escape check (one `canonicalize` per new directory instead of per entry).
    safe_dirs: HashSet<PathBuf>,
    deferred_dirs: Vec<(PathBuf, u32, FileTime)>,
    /// Who owns what we create: files that should be owned so need no chown...
    owner: (u32, u32),
    /// ...unless their directory hands its group down (setgid); known per directory.
    setgid: std::collections::HashMap<PathBuf, bool>,
    stats: UnpackStats,
    buf: Vec<u8>,
}

impl<'a> Unpacker<'a> {
    pub fn new(root: &Path, os: &'a dyn Os) -> Result<Self, UnpackError> {
        let root = root.canonicalize().map_err(|e| io_err(root, e))?;
        Ok(Self {
            safe_dirs: HashSet::from([root.clone()]),
            root,
            os,
            deferred_dirs: Vec::new(),
            owner: (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw()),
            setgid: std::collections::HashMap::new(),
            stats: UnpackStats::default(),
            buf: vec![0; 256 * 1024],
        })
    }

    /// Unpacks a plain tar stream to its end-of-archive marker (the reader may hold more).
    pub fn unpack<R: Read>(mut self, reader: R) -> Result<UnpackStats, UnpackError> {
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(UnpackError::Archive)?;
        for entry in entries {
            let mut entry = entry.map_err(UnpackError::Archive)?;
            self.entry(&mut entry)?;
        }
        self.finish_dirs()?;
        Ok(self.stats)
    }

    fn meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, UnpackError> {
        let h = entry.header();
        let bad = |e: io::Error| UnpackError::Archive(e);
        let mut meta = Meta {
            mode: h.mode().map_err(bad)?,
            uid: h.uid().map_err(bad)? as u32,
            gid: h.gid().map_err(bad)? as u32,
            mtime: FileTime::from_unix_time(h.mtime().map_err(bad)? as i64, 0),
            xattrs: Vec::new(),
        };
        if let Some(exts) = entry.pax_extensions().map_err(bad)? {
            for ext in exts {
                let ext = ext.map_err(bad)?;
                let Ok(key) = ext.key() else { continue };
                let value = ext.value_bytes();
                let text = std::str::from_utf8(value).unwrap_or("");
                match key {
                    "uid" => meta.uid = text.parse().unwrap_or(meta.uid),
                    "gid" => meta.gid = text.parse().unwrap_or(meta.gid),
                    "mtime" => {
                        let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
                        if let Ok(secs) = secs.parse::<i64>() {
                            let frac = format!("{frac:0<9}");
                            let nanos = frac.get(..9).and_then(|f| f.parse::<u32>().ok()).unwrap_or(0);
                            meta.mtime = FileTime::from_unix_time(secs, nanos);
                        }
                    }
                    k if k.starts_with("SCHILY.xattr.") => {
                        meta.xattrs.push((k["SCHILY.xattr.".len()..].to_string(), value.to_vec()));
                    }
                    _ => {}
                }
            }
        }
        Ok(meta)
    }

    /// Creates the parent of `full` if needed, refusing parents reached through a symlink that
    /// leads outside the root.
    fn parent(&mut self, full: &Path) -> Result<(), UnpackError> {
        let Some(parent) = full.parent() else { return Ok(()) };
        if self.safe_dirs.contains(parent) {
            return Ok(());
        }
        fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
        let real = parent.canonicalize().map_err(|e| io_err(parent, e))?;
        if !real.starts_with(&self.root) {
            return Err(UnpackError::UnsafePath { path: full.display().to_string() });
        }
        self.safe_dirs.insert(parent.to_path_buf());
        Ok(())
    }

    /// Runs `create`; when the path exists (a duplicate entry, a re-run), removes it and retries.
    fn replace<T>(full: &Path, mut create: impl FnMut() -> io::Result<T>) -> Result<T, UnpackError> {
        match create() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let md = fs::symlink_metadata(full).map_err(|e| io_err(full, e))?;
                if md.is_dir() {
                    fs::remove_dir_all(full).map_err(|e| io_err(full, e))?;
                } else {
                    fs::remove_file(full).map_err(|e| io_err(full, e))?;
                }
                create().map_err(|e| io_err(full, e))
            }
            other => other.map_err(|e| io_err(full, e)),
        }
    }

    /// Whether new files in `full`'s directory take its group (setgid), so need a chown even when
    /// the archive names our own ids. One stat per directory.
    fn setgid_parent(&mut self, full: &Path) -> bool {
        let Some(parent) = full.parent() else { return false };
        if let Some(&known) = self.setgid.get(parent) {
            return known;
        }
        use std::os::unix::fs::MetadataExt;
        // Unknown counts as setgid: then the chown is done, as before.
        let setgid = fs::metadata(parent).map_or(true, |m| m.mode() & 0o2000 != 0);
        self.setgid.insert(parent.to_path_buf(), setgid);
        setgid
    }

    fn attrs(&self, full: &Path, meta: &Meta, chmod: bool) -> Result<(), UnpackError> {
        self.os.lchown(full, meta.uid, meta.gid).map_err(|e| io_err(full, e))?;
        if chmod {
            fs::set_permissions(full, fs::Permissions::from_mode(meta.mode & 0o7777)).map_err(|e| io_err(full, e))?;
        }
        for (name, value) in &meta.xattrs {
            self.os.lsetxattr(full, name, value).map_err(|e| io_err(full, e))?;
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let raw = entry.path().map_err(UnpackError::Archive)?.into_owned();
        let meta = Self::meta(entry)?;
        let Some(rel) = relative(&raw)? else {
            // `./`: the root itself.
            if kind == EntryType::Directory {
                self.os.lchown(&self.root, meta.uid, meta.gid).map_err(|e| io_err(&self.root, e))?;
                self.deferred_dirs.push((self.root.clone(), meta.mode, meta.mtime));
            }
            return Ok(());
        };
        let full = self.root.join(&rel);
        self.parent(&full)?;
        match kind {
            EntryType::Directory => {
                match fs::create_dir(&full) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && full.is_dir() && !full.is_symlink() => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        fs::remove_file(&full).map_err(|e| io_err(&full, e))?;
                        fs::create_dir(&full).map_err(|e| io_err(&full, e))?;
                    }
                    Err(e) => return Err(io_err(&full, e)),
                }
                // Keep it writable for its children until the end.
                self.attrs(&full, &meta, false)?;
                self.safe_dirs.insert(full.clone());
                self.deferred_dirs.push((full, meta.mode, meta.mtime));
                self.stats.dirs += 1;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let mut file =
                    Self::replace(&full, || OpenOptions::new().write(true).create_new(true).mode(0o600).open(&full))?;
                let written = copy(entry, &mut file, &mut self.buf).map_err(|e| io_err(&full, e))?;
                // Most of an OS image is owned by root, as the file we just made: skip that chown.
                if (meta.uid, meta.gid) != self.owner || self.setgid_parent(&full) {
                    self.os.lchown(&full, meta.uid, meta.gid).map_err(|e| io_err(&full, e))?;
                }
                // Through the open file: no second path lookup.
                file.set_permissions(fs::Permissions::from_mode(meta.mode & 0o7777)).map_err(|e| io_err(&full, e))?;
                for (name, value) in &meta.xattrs {
                    self.os.lsetxattr(&full, name, value).map_err(|e| io_err(&full, e))?;
                }
                filetime::set_file_handle_times(&file, Some(meta.mtime), Some(meta.mtime))
                    .map_err(|e| io_err(&full, e))?;
                self.stats.files += 1;
                self.stats.bytes += written;
            }
            EntryType::Symlink => {
                let target = entry.link_name().map_err(UnpackError::Archive)?.ok_or_else(|| {
                    UnpackError::Archive(io::Error::other(format!("symlink '{}' without a target", raw.display())))
                })?;
                Self::replace(&full, || std::os::unix::fs::symlink(&target, &full))?;
                self.safe_dirs.remove(&full);
                self.attrs(&full, &meta, false)?;
                filetime::set_symlink_file_times(&full, meta.mtime, meta.mtime).map_err(|e| io_err(&full, e))?;
                self.stats.symlinks += 1;
            }
            EntryType::Link => {
                let target = entry.link_name().map_err(UnpackError::Archive)?.ok_or_else(|| {
                    UnpackError::Archive(io::Error::other(format!("hard link '{}' without a target", raw.display())))
                })?;
                let target_rel =
                    relative(&target)?.ok_or_else(|| UnpackError::UnsafePath { path: target.display().to_string() })?;
                let source = self.root.join(target_rel);
                Self::replace(&full, || fs::hard_link(&source, &full))?;
                self.stats.hardlinks += 1;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let h = entry.header();
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                Self::replace(&full, || match kind {
                    EntryType::Char => self.os.mknod(&full, DeviceKind::Char, meta.mode, major, minor),
                    EntryType::Block => self.os.mknod(&full, DeviceKind::Block, meta.mode, major, minor),
                    _ => self.os.mkfifo(&full, meta.mode),
                })?;
                self.attrs(&full, &meta, true)?;
                filetime::set_symlink_file_times(&full, meta.mtime, meta.mtime).map_err(|e| io_err(&full, e))?;
                if kind == EntryType::Fifo {
                    self.stats.fifos += 1;
                } else {
                    self.stats.devices += 1;
                }
            }
            other => tracing::debug!("skipping archive entry '{}' of type {other:?}", raw.display()),
        }
        Ok(())
    }

    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        for (dir, mode, mtime) in self.deferred_dirs.drain(..).rev() {
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode & 0o7777)).map_err(|e| io_err(&dir, e))?;
            filetime::set_symlink_file_times(&dir, mtime, mtime).map_err(|e| io_err(&dir, e))?;
        }
        Ok(())
    }
}

fn copy(from: &mut impl Read, to: &mut File, buf: &mut [u8]) -> io::Result<u64> {
    use std::io::Write;
    let mut total = 0u64;
    loop {
        let n = match from.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Blocks a [`BlockReader`] has finished with, for the producer to fill again. Every hand-off
/// between threads (network → zstd → tar) goes through one: with musl's allocator a fresh 64 KiB
/// block per chunk was an mmap/munmap pair and 16 page faults, about 10 000 of each per GiB,
/// which made the agent's unpack 1.2× slower than `zstd -dc | tar -x` instead of faster.
/// The blocks in use stay bounded: a new one is made only when none has come back.
pub struct BlockPool(std::sync::mpsc::Receiver<Vec<u8>>);

impl BlockPool {
    /// The pool, and the sender its [`BlockReader`] returns blocks through.
    pub fn new() -> (Self, std::sync::mpsc::Sender<Vec<u8>>) {
        let (tx, rx) = std::sync::mpsc::channel();
        (Self(rx), tx)
    }

    /// A block of `len` bytes (contents unspecified): a returned one if there is one.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut block = self.0.try_recv().unwrap_or_default();
        block.resize(len, 0);
        block
    }
}

/// Reads the blocks `next` delivers (until it gives `None`), in order, and hands each finished
/// one back to its [`BlockPool`].
pub struct BlockReader<N> {
    next: N,
    recycle: std::sync::mpsc::Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl<N: FnMut() -> Option<Vec<u8>>> BlockReader<N> {
    pub fn new(next: N, recycle: std::sync::mpsc::Sender<Vec<u8>>) -> Self {
        Self { next, recycle, cur: Vec::new(), pos: 0 }
    }
}

impl<N: FnMut() -> Option<Vec<u8>>> Read for BlockReader<N> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            let Some(block) = (self.next)() else { return Ok(0) };
            let done = std::mem::replace(&mut self.cur, block);
            // The producer may be gone (end of stream): then the block is just freed.
            let _ = self.recycle.send(done);
            self.pos = 0;
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Decompressed bytes per block handed from the zstd thread to the tar thread, and blocks in
/// flight: about 2.5 MiB between the two, the recycled ones included.
const BLOCK: usize = 256 << 10;
const BLOCKS: usize = 8;

/// Decompresses `reader` into blocks until its end, then reads what follows the zstd frames to
/// the end too (so a hash over the compressed bytes sees all of them). Stops early when `abort`
/// is set (the unpacker failed).
fn decompress(
    reader: impl Read,
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    pool: BlockPool,
    abort: &AtomicBool,
) -> io::Result<()> {
    let mut decoder = zstd::stream::read::Decoder::new(reader)?;
    let mut receiver_gone = false;
    loop {
        if abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut block = pool.take(BLOCK);
        let mut filled = 0;
        while filled < BLOCK {
            match decoder.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            break;
        }
        block.truncate(filled);
        // Once tar has seen its end marker it stops listening: the rest is only drained.
        if !receiver_gone && tx.send(block).is_err() {
            receiver_gone = true;
        }
    }
    drop(tx);
    let mut rest = decoder.finish();
    io::copy(&mut rest, &mut io::sink())?;
    Ok(())
}

/// Unpacks a zstd-compressed tar stream: one thread decompresses, this one writes the tree (as
/// `zstd -dc | tar -x` does with two processes).
pub fn unpack_tar_zst<R: Read + Send>(reader: R, root: &Path, os: &dyn Os) -> Result<UnpackStats, UnpackError> {
    let unpacker = Unpacker::new(root, os)?;
    let abort = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(BLOCKS);
        let (pool, recycle) = BlockPool::new();
        let abort = &abort;
        let decoder = scope.spawn(move || decompress(reader, tx, pool, abort));
        let unpacked = unpacker.unpack(BlockReader::new(move || rx.recv().ok(), recycle));
        if unpacked.is_err() {
            abort.store(true, Ordering::Relaxed);
        }
        let decoded = decoder.join().unwrap_or_else(|_| Err(io::Error::other("zstd thread panicked")));
        let stats = unpacked?;
        decoded.map_err(UnpackError::Archive)?;
        Ok(stats)
    })
}

/// Empties `root` (a mount point: the directory itself stays).
pub fn clear_dir(root: &Path) -> io::Result<()> {
    for entry in fs::read_dir(root)? {
        let path = entry?.path();
        match fs::symlink_metadata(&path) {
            Ok(md) if md.is_dir() => fs::remove_dir_all(&path)?,
            Ok(_) => fs::remove_file(&path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::{OsCall, RecordingOs};
    use std::os::unix::fs::MetadataExt;

    fn header(kind: EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid + 1);
        h.set_mtime(1_600_000_000);
        h.set_size(size);
        h
    }

    /// An archive with one of everything an OS image holds.
    pub(crate) fn sample_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(EntryType::Directory, 0o755, 0, 0);
        b.append_data(&mut h, "./", io::empty()).unwrap();
        let mut h = header(EntryType::Directory, 0o700, 0, 0);
        b.append_data(&mut h, "./etc", io::empty()).unwrap();
        let mut h = header(EntryType::Directory, 0o755, 0, 0);
        b.append_data(&mut h, "./usr/bin", io::empty()).unwrap();
        let mut h = header(EntryType::Regular, 0o4755, 0, 5);
        b.append_data(&mut h, "./usr/bin/su", &b"hello"[..]).unwrap();
        let mut h = header(EntryType::Regular, 0o644, 1000, 3);
        b.append_data(&mut h, "./etc/motd", &b"hi\n"[..]).unwrap();
        // xattr through PAX, as `tar --xattrs` writes it.
        b.append_pax_extensions([("SCHILY.xattr.security.capability", &b"\x01\x02"[..])]).unwrap();
        let mut h = header(EntryType::Regular, 0o755, 0, 4);
        b.append_data(&mut h, "./usr/bin/ping", &b"ping"[..]).unwrap();
        let mut h = header(EntryType::Symlink, 0o777, 0, 0);
        b.append_link(&mut h, "./bin", "usr/bin").unwrap();
        let mut h = header(EntryType::Link, 0o644, 0, 0);
        b.append_link(&mut h, "./etc/motd.link", "./etc/motd").unwrap();
        let mut h = header(EntryType::Directory, 0o755, 0, 0);
        b.append_data(&mut h, "./dev", io::empty()).unwrap();
        let mut h = header(EntryType::Char, 0o666, 0, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        b.append_data(&mut h, "./dev/null", io::empty()).unwrap();
        let mut h = header(EntryType::Block, 0o660, 0, 0);
        h.set_device_major(8).unwrap();
        h.set_device_minor(1).unwrap();
        b.append_data(&mut h, "./dev/sda1", io::empty()).unwrap();
        let mut h = header(EntryType::Fifo, 0o600, 0, 0);
        b.append_data(&mut h, "./dev/initctl", io::empty()).unwrap();
        // A long name (GNU extension) deep in a fresh directory.
        let long = format!("./usr/share/{}/file", "x".repeat(150));
        let mut h = header(EntryType::Regular, 0o644, 0, 2);
        b.append_data(&mut h, &long, &b"ok"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn files_already_ours_are_not_chowned_unless_the_directory_is_setgid() {
        let (uid, gid) = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
        let mut b = tar::Builder::new(Vec::new());
        for path in ["./plain/mine", "./shared/mine"] {
            let mut h = header(EntryType::Regular, 0o640, u64::from(uid), 2);
            h.set_gid(u64::from(gid));
            b.append_data(&mut h, path, &b"ok"[..]).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        fs::create_dir(root.join("shared")).unwrap();
        fs::set_permissions(root.join("shared"), fs::Permissions::from_mode(0o2775)).unwrap();
        let os = RecordingOs::default();
        Unpacker::new(&root, &os).unwrap().unpack(&b.into_inner().unwrap()[..]).unwrap();
        let chowned: Vec<PathBuf> = os
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                OsCall::Lchown { path, .. } => Some(path),
                _ => None,
            })
            .collect();
        assert_eq!(chowned, [root.join("shared/mine")]);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(root.join("plain/mine")).unwrap().mode() & 0o7777, 0o640);
    }

    #[test]
    fn unpacks_everything_with_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let os = RecordingOs::default();
        let stats = Unpacker::new(dir.path(), &os).unwrap().unpack(&sample_tar()[..]).unwrap();
        let root = dir.path().canonicalize().unwrap();
        assert_eq!((stats.files, stats.symlinks, stats.hardlinks, stats.devices, stats.fifos), (4, 1, 1, 2, 1));
        assert_eq!(fs::read(root.join("usr/bin/su")).unwrap(), b"hello");
        let su = fs::metadata(root.join("usr/bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!(su.mtime(), 1_600_000_000);
        assert_eq!(fs::metadata(root.join("etc")).unwrap().mode() & 0o7777, 0o700);
        assert_eq!(fs::metadata(root.join("etc")).unwrap().mtime(), 1_600_000_000, "dir mtime set after children");
        assert_eq!(fs::read_link(root.join("bin")).unwrap(), Path::new("usr/bin"));
        let motd = fs::metadata(root.join("etc/motd")).unwrap();
        assert_eq!(motd.ino(), fs::metadata(root.join("etc/motd.link")).unwrap().ino(), "hard link");
        assert_eq!(fs::read(root.join(format!("usr/share/{}/file", "x".repeat(150)))).unwrap(), b"ok");

        let calls = os.calls();
        assert!(calls.contains(&OsCall::Mknod {
            path: root.join("dev/null"),
            kind: DeviceKind::Char,
            mode: 0o666,
            major: 1,
            minor: 3
        }));
        assert!(calls.contains(&OsCall::Mknod {
            path: root.join("dev/sda1"),
            kind: DeviceKind::Block,
            mode: 0o660,
            major: 8,
            minor: 1
        }));
        assert!(calls.contains(&OsCall::Mkfifo { path: root.join("dev/initctl"), mode: 0o600 }));
        assert!(calls.contains(&OsCall::Lchown { path: root.join("etc/motd"), uid: 1000, gid: 1001 }));
        assert!(calls.contains(&OsCall::Lchown { path: root.join("bin"), uid: 0, gid: 1 }));
        // The capability comes after the chown (which would clear it).
        let chown = calls
            .iter()
            .position(|c| matches!(c, OsCall::Lchown { path, .. } if path.ends_with("usr/bin/ping")))
            .unwrap();
        let xattr = calls
            .iter()
            .position(|c| {
                *c == OsCall::Setxattr {
                    path: root.join("usr/bin/ping"),
                    name: "security.capability".into(),
                    value: vec![1, 2],
                }
            })
            .unwrap();
        assert!(chown < xattr);
    }

    #[test]
    fn refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("root");
        fs::create_dir(&inner).unwrap();
        let os = RecordingOs::default();

        // Raw `..` in a name (the builder refuses to write one, so patch the header bytes).
        let mut h = header(EntryType::Regular, 0o644, 0, 1);
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &b"x"[..]).unwrap();
        let err = Unpacker::new(&inner, &os).unwrap().unpack(&b.into_inner().unwrap()[..]).unwrap_err();
        assert!(matches!(err, UnpackError::UnsafePath { .. }), "{err}");

        // Through a symlink pointing outside.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(EntryType::Symlink, 0o777, 0, 0);
        b.append_link(&mut h, "out", dir.path()).unwrap();
        let mut h = header(EntryType::Regular, 0o644, 0, 1);
        b.append_data(&mut h, "out/evil", &b"x"[..]).unwrap();
        let err = Unpacker::new(&inner, &os).unwrap().unpack(&b.into_inner().unwrap()[..]).unwrap_err();
        assert!(matches!(err, UnpackError::UnsafePath { .. }), "{err}");
        assert!(!dir.path().join("evil").exists());
    }

    #[test]
    fn zst_and_rerun_replace() {
        let dir = tempfile::tempdir().unwrap();
        let os = RecordingOs::default();
        let zst = zstd::encode_all(&sample_tar()[..], 3).unwrap();
        unpack_tar_zst(&zst[..], dir.path(), &os).unwrap();
        // Same archive again over the tree: every entry replaced, no EEXIST.
        let stats = unpack_tar_zst(&zst[..], dir.path(), &os).unwrap();
        assert_eq!(stats.files, 4);
        clear_dir(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn corrupt_input_is_an_archive_error() {
        let dir = tempfile::tempdir().unwrap();
        let os = RecordingOs::default();
        let mut zst = zstd::encode_all(&sample_tar()[..], 3).unwrap();
        let mid = zst.len() / 2;
        zst[mid] ^= 0xff;
        zst.truncate(mid + 10);
        assert!(unpack_tar_zst(&zst[..], dir.path(), &os).is_err());
    }
}
