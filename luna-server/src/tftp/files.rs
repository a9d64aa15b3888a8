//! Turning a requested file name into bytes to serve, confined to the TFTP root.
//!
//! Two steps: [`sanitize`] is pure and refuses every name that could leave the root before
//! the file system is touched (`..` in any spelling, NUL); [`Resolver::open`] then resolves
//! symlinks with `canonicalize` and refuses anything whose real path is not inside the real
//! root. Names from the `ipxe_files` map are served from their configured source paths, but
//! only on an exact match of the whole (sanitized) name.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::packet::{ErrorCode, Mode};
use super::transfer::BlockSource;

/// Files up to this size are kept in memory: boot loaders are fetched by every node at once.
pub const CACHE_MAX_FILE: u64 = 16 << 20;
/// Upper bound on all cached bytes together.
pub const CACHE_MAX_TOTAL: u64 = 128 << 20;
/// Netascii is meant for small text files; counting the converted size of a bigger one for
/// every request would cost a read of the whole file each time.
pub const NETASCII_MAX_FILE: u64 = 64 << 20;

/// Why a request is refused; maps onto a TFTP error code and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("file not found")]
    NotFound,
    #[error("access violation")]
    AccessViolation,
    #[error("file too large for netascii mode ({0} bytes)")]
    TooLargeForNetascii(u64),
    #[error("cannot read file: {0}")]
    Io(String),
}

impl Refusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::NotFound => ErrorCode::FileNotFound,
            Refusal::AccessViolation => ErrorCode::AccessViolation,
            Refusal::TooLargeForNetascii(_) | Refusal::Io(_) => ErrorCode::NotDefined,
        }
    }
}

/// Checks a requested name and returns it as a path relative to the root.
///
/// - NUL anywhere: refused (cannot come from a well-formed packet, but be sure);
/// - `\` is read as `/` (Windows-style clients), so `..\x` is a traversal like `../x`;
/// - an absolute name is taken relative to the root; when it spells out the root itself
///   (`/var/lib/luna/tftpboot/x`), that prefix is dropped;
/// - a `..` component anywhere is refused, even if it would stay inside: nothing legitimate
///   needs it and it keeps the check obviously correct;
/// - empty and `.` components are dropped; an empty result (the root itself) is not found.
pub fn sanitize(name: &[u8], root: &Path) -> Result<PathBuf, Refusal> {
    if name.contains(&0) {
        return Err(Refusal::AccessViolation);
    }
    let name: Vec<u8> = name.iter().map(|&c| if c == b'\\' { b'/' } else { c }).collect();
    let mut path = Path::new(OsStr::from_bytes(&name));
    if path.has_root() {
        if let Ok(rest) = path.strip_prefix(root) {
            path = rest;
        }
    }
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => rel.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(Refusal::AccessViolation),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(Refusal::NotFound);
    }
    Ok(rel)
}

/// An opened file ready to serve.
pub enum Source {
    Memory(Arc<[u8]>),
    File(File),
    /// Converted to netascii while it is read, from the shared cached bytes or the file.
    Netascii(Box<Netascii<Raw>>),
}

/// The unconverted bytes behind a [`Source::Netascii`].
pub enum Raw {
    Memory(Arc<[u8]>),
    File(File),
}

impl BlockSource for Raw {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Raw::Memory(data) => BlockSource::read_at(&mut &data[..], offset, buf),
            Raw::File(f) => BlockSource::read_at(f, offset, buf),
        }
    }
}

impl BlockSource for Source {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Memory(data) => BlockSource::read_at(&mut &data[..], offset, buf),
            Source::File(f) => BlockSource::read_at(f, offset, buf),
            Source::Netascii(n) => n.read_at(offset, buf),
        }
    }
}

/// A place in the converted stream: `conv` bytes of output correspond to `raw` bytes of input,
/// plus `pending`, the second byte of the last input byte's expansion when only its first byte
/// was emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    conv: u64,
    raw: u64,
    pending: Option<u8>,
}

/// Places remembered for going back (a TFTP window goes back at most `windowsize` blocks).
const NETASCII_MARKS: usize = 128;
/// Input bytes read per step.
const NETASCII_CHUNK: usize = 8192;

/// RFC 1350 netascii (LF → CR LF, CR → CR NUL) computed while the transfer reads, with bounded
/// memory: an 8 KiB input buffer and the last [`NETASCII_MARKS`] read positions, whatever the
/// file's size. Sequential reads continue from the last position; a read further back (a
/// retransmitted window) restarts from the nearest remembered position at or before it, or
/// from the start of the file. Why not convert once into memory: every request held its own
/// converted copy, 500 netascii requests of `ipxe.efi` took the server from 56 to 565 MB.
pub struct Netascii<S> {
    inner: S,
    raw_len: u64,
    pos: Mark,
    marks: VecDeque<Mark>,
    chunk: Vec<u8>,
    /// `chunk` holds the input from this offset.
    chunk_at: u64,
}

impl<S: BlockSource> Netascii<S> {
    /// Converts the `raw_len` bytes of `inner`.
    pub fn new(inner: S, raw_len: u64) -> Netascii<S> {
        let start = Mark { conv: 0, raw: 0, pending: None };
        Netascii { inner, raw_len, pos: start, marks: VecDeque::new(), chunk: Vec::new(), chunk_at: 0 }
    }

    /// The input byte at `raw` (which is below `raw_len`).
    fn byte(&mut self, raw: u64) -> io::Result<u8> {
        let in_chunk = raw.checked_sub(self.chunk_at).filter(|&d| d < self.chunk.len() as u64);
        if let Some(d) = in_chunk {
            return Ok(self.chunk[d as usize]);
        }
        let want = (self.raw_len - raw).min(NETASCII_CHUNK as u64) as usize;
        self.chunk.resize(want, 0);
        let mut filled = 0;
        while filled < want {
            let n = self.inner.read_at(raw + filled as u64, &mut self.chunk[filled..])?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while being served"));
            }
            filled += n;
        }
        self.chunk_at = raw;
        Ok(self.chunk[0])
    }

    /// Emits converted bytes from the current position into `out` (or only moves on, when
    /// `out` is `None`) until `n` bytes are done or the input ends; returns how many.
    fn advance(&mut self, mut out: Option<&mut [u8]>, n: usize) -> io::Result<usize> {
        let mut done = 0;
        while done < n {
            let c = if let Some(p) = self.pos.pending.take() {
                p
            } else {
                if self.pos.raw >= self.raw_len {
                    break;
                }
                let c = self.byte(self.pos.raw)?;
                self.pos.raw += 1;
                match c {
                    b'\n' => {
                        self.pos.pending = Some(b'\n');
                        b'\r'
                    }
                    b'\r' => {
                        self.pos.pending = Some(0);
                        b'\r'
                    }
                    c => c,
                }
            };
            if let Some(o) = out.as_deref_mut() {
                o[done] = c;
            }
            done += 1;
            self.pos.conv += 1;
        }
        Ok(done)
    }

    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset != self.pos.conv {
            let back = self.marks.iter().rev().find(|m| m.conv <= offset).copied();
            if offset < self.pos.conv {
                self.pos = back.unwrap_or(Mark { conv: 0, raw: 0, pending: None });
            } else if let Some(m) = back.filter(|m| m.conv > self.pos.conv) {
                self.pos = m;
            }
            while self.pos.conv < offset {
                let gap = usize::try_from(offset - self.pos.conv).unwrap_or(usize::MAX);
                if self.advance(None, gap)? == 0 {
                    return Ok(0);
                }
            }
        }
        if self.marks.back().is_none_or(|m| m.conv < offset) {
            if self.marks.len() == NETASCII_MARKS {
                self.marks.pop_front();
            }
            self.marks.push_back(self.pos);
        }
        let n = buf.len();
        self.advance(Some(buf), n)
    }
}

/// The length of `raw` once converted to netascii: every CR and LF becomes two bytes.
pub fn netascii_len(raw: &[u8]) -> u64 {
    raw.len() as u64 + raw.iter().filter(|&&c| c == b'\n' || c == b'\r').count() as u64
}

/// [`netascii_len`] of a file, read in 64 KiB pieces (nothing of it is kept).
fn netascii_len_of_file(file: &File, len: u64) -> Result<u64, Refusal> {
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0u64;
    let mut total = 0u64;
    while at < len {
        let want = (len - at).min(buf.len() as u64) as usize;
        let n = FileExt::read_at(file, &mut buf[..want], at).map_err(|e| Refusal::Io(e.to_string()))?;
        if n == 0 {
            return Err(Refusal::Io("file changed while being read".into()));
        }
        total += netascii_len(&buf[..n]);
        at += n as u64;
    }
    Ok(total)
}

/// What [`Resolver::open`] hands back.
pub struct Opened {
    pub source: Source,
    /// Length of the bytes served (after netascii conversion).
    pub len: u64,
    /// The real path, for logs.
    pub path: PathBuf,
}

#[derive(Clone)]
struct CacheEntry {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    data: Arc<[u8]>,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<PathBuf, CacheEntry>,
    total: u64,
}

/// Resolves names to files. Cheap to share: one per server, used from blocking threads.
pub struct Resolver {
    root: PathBuf,
    virtual_files: BTreeMap<PathBuf, PathBuf>,
    cache: Mutex<Cache>,
}

impl Resolver {
    /// `virtual_files` maps served names to source paths; names must pass [`sanitize`].
    pub fn new(root: PathBuf, virtual_files: &BTreeMap<String, PathBuf>) -> Result<Resolver, String> {
        let mut map = BTreeMap::new();
        for (name, src) in virtual_files {
            let rel = sanitize(name.as_bytes(), &root)
                .map_err(|_| format!("invalid ipxe_files name '{name}': must be a relative path without '..'"))?;
            map.insert(rel, src.clone());
        }
        Ok(Resolver { root, virtual_files: map, cache: Mutex::new(Cache::default()) })
    }

    /// Finds and opens `name`. Files in the root win over the virtual map, so a custom build
    /// dropped into the root replaces the packaged one.
    pub fn open(&self, name: &[u8], mode: Mode) -> Result<Opened, Refusal> {
        let rel = sanitize(name, &self.root)?;
        let (file, path) = match self.open_in_root(&rel) {
            Ok(found) => found,
            Err(Refusal::NotFound) => match self.virtual_files.get(&rel) {
                // Configured by the admin, so symlinks (ipxe.efi → /boot/ipxe.efi) are fine.
                Some(src) => (open_regular(src, false)?, src.clone()),
                None => return Err(Refusal::NotFound),
            },
            Err(e) => return Err(e),
        };
        let (source, len) = self.load(file, &path, mode)?;
        Ok(Opened { source, len, path })
    }

    fn open_in_root(&self, rel: &Path) -> Result<(File, PathBuf), Refusal> {
        // Canonicalized per request: the root may be created or re-pointed while running.
        let root = match self.root.canonicalize() {
            Ok(r) => r,
            Err(_) => return Err(Refusal::NotFound),
        };
        let real = match root.join(rel).canonicalize() {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(Refusal::AccessViolation),
            Err(_) => return Err(Refusal::NotFound),
        };
        if !real.starts_with(&root) {
            tracing::warn!(requested = %rel.display(), resolved = %real.display(), "tftp: refused path outside root");
            return Err(Refusal::AccessViolation);
        }
        // `real` has no symlinks left; O_NOFOLLOW refuses one swapped in since.
        Ok((open_regular(&real, true)?, real))
    }

    fn load(&self, mut file: File, path: &Path, mode: Mode) -> Result<(Source, u64), Refusal> {
        let meta = file.metadata().map_err(|e| Refusal::Io(e.to_string()))?;
        let len = meta.len();
        let data = if len <= CACHE_MAX_FILE { Some(self.cached(&mut file, path, &meta)?) } else { None };
        match mode {
            Mode::Octet => Ok(match data {
                Some(d) => (Source::Memory(d), len),
                None => (Source::File(file), len),
            }),
            Mode::Netascii => {
                if len > NETASCII_MAX_FILE {
                    return Err(Refusal::TooLargeForNetascii(len));
                }
                // The converted size (what tsize announces and where the last block ends) is
                // counted, not produced: the cached bytes are shared, an uncached file is read
                // through once in pieces.
                let (raw, converted_len) = match data {
                    Some(d) => {
                        let n = netascii_len(&d);
                        (Raw::Memory(d), n)
                    }
                    None => {
                        let n = netascii_len_of_file(&file, len)?;
                        (Raw::File(file), n)
                    }
                };
                Ok((Source::Netascii(Box::new(Netascii::new(raw, len))), converted_len))
            }
        }
    }

    fn cached(&self, file: &mut File, path: &Path, meta: &std::fs::Metadata) -> Result<Arc<[u8]>, Refusal> {
        let key = CacheEntry {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            data: Arc::from(Vec::new()),
        };
        let same = |e: &CacheEntry| {
            (e.dev, e.ino, e.len, e.mtime_ns, e.ctime_ns) == (key.dev, key.ino, key.len, key.mtime_ns, key.ctime_ns)
        };
        if let Some(hit) = self.lock().entries.get(path).filter(|e| same(e)) {
            return Ok(hit.data.clone());
        }
        let data: Arc<[u8]> = read_all(file, key.len)?.into();
        let mut cache = self.lock();
        if let Some(old) = cache.entries.remove(path) {
            cache.total -= old.len;
        }
        // Crude but bounded: when full, start over. Boot files are few and re-read cheaply.
        if cache.total + key.len > CACHE_MAX_TOTAL {
            cache.entries.clear();
            cache.total = 0;
        }
        cache.total += key.len;
        cache.entries.insert(path.to_path_buf(), CacheEntry { data: data.clone(), ..key });
        Ok(data)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock leaves a consistent map (inserts are single calls).
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn open_regular(path: &Path, no_follow: bool) -> Result<File, Refusal> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    if no_follow {
        opts.custom_flags(libc::O_NOFOLLOW);
    }
    let file = opts.open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Refusal::NotFound,
        io::ErrorKind::PermissionDenied => Refusal::AccessViolation,
        _ if e.raw_os_error() == Some(libc::ELOOP) => Refusal::AccessViolation,
        _ => Refusal::Io(e.to_string()),
    })?;
    let meta = file.metadata().map_err(|e| Refusal::Io(e.to_string()))?;
    if !meta.is_file() {
        // Directories, devices, fifos: nothing a boot client should read.
        return Err(Refusal::NotFound);
    }
    Ok(file)
}

fn read_all(file: &mut File, len: u64) -> Result<Vec<u8>, Refusal> {
    let mut buf = Vec::with_capacity(len as usize);
    file.read_to_end(&mut buf).map_err(|e| Refusal::Io(e.to_string()))?;
    if buf.len() as u64 != len {
        return Err(Refusal::Io("file changed while being read".into()));
    }
    Ok(buf)
}

/// RFC 1350 netascii: LF → CR LF, CR → CR NUL.
pub fn to_netascii(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 16);
    for &c in raw {
        match c {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tftpboot");
        let outside = dir.path().join("secret");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(&outside, b"top secret").unwrap();
        std::fs::write(root.join("boot.ipxe"), b"#!ipxe\n").unwrap();
        std::fs::write(root.join("sub/file"), b"nested").unwrap();
        Fixture { _dir: dir, root, outside }
    }

    fn resolver(f: &Fixture, virt: &[(&str, &Path)]) -> Resolver {
        let map = virt.iter().map(|(n, p)| (n.to_string(), p.to_path_buf())).collect();
        Resolver::new(f.root.clone(), &map).unwrap()
    }

    fn read(o: Opened) -> Vec<u8> {
        let mut src = o.source;
        let mut buf = vec![0; o.len as usize];
        let n = src.read_at(0, &mut buf).unwrap();
        assert_eq!(n as u64, o.len);
        buf
    }

    fn get(r: &Resolver, name: &[u8]) -> Result<Vec<u8>, Refusal> {
        r.open(name, Mode::Octet).map(read)
    }

    #[test]
    fn sanitize_accepts_plain_and_normalises() {
        let root = Path::new("/srv/tftp");
        assert_eq!(sanitize(b"undionly.kpxe", root), Ok(PathBuf::from("undionly.kpxe")));
        assert_eq!(sanitize(b"./a//b/./c", root), Ok(PathBuf::from("a/b/c")));
        assert_eq!(sanitize(b"/a/b", root), Ok(PathBuf::from("a/b")));
        assert_eq!(sanitize(b"/srv/tftp/a/b", root), Ok(PathBuf::from("a/b")));
        assert_eq!(sanitize(b"pxelinux.cfg\\default", root), Ok(PathBuf::from("pxelinux.cfg/default")));
        assert_eq!(sanitize(b"", root), Err(Refusal::NotFound));
        assert_eq!(sanitize(b"/", root), Err(Refusal::NotFound));
        assert_eq!(sanitize(b"/srv/tftp", root), Err(Refusal::NotFound));
    }

    #[test]
    fn sanitize_refuses_every_traversal_spelling() {
        let root = Path::new("/srv/tftp");
        for bad in [
            &b".."[..],
            b"../etc/passwd",
            b"a/../../etc/passwd",
            b"a/..",
            b"/../etc/passwd",
            b"/srv/tftp/../etc/passwd",
            b"..\\..\\etc\\passwd",
            b"a\\..\\..\\x",
            b"\\..\\x",
            b"a/\\../x",
            b"ok\0../../etc/passwd",
        ] {
            assert_eq!(sanitize(bad, root), Err(Refusal::AccessViolation), "{}", String::from_utf8_lossy(bad));
        }
        // Look-alikes that are plain names, not traversals: harmless, served only if present.
        assert_eq!(sanitize(b"...", root), Ok(PathBuf::from("...")));
        assert_eq!(sanitize(b"..a", root), Ok(PathBuf::from("..a")));
    }

    #[test]
    fn serves_files_in_root_and_subdirs() {
        let f = fixture();
        let r = resolver(&f, &[]);
        assert_eq!(get(&r, b"boot.ipxe").unwrap(), b"#!ipxe\n");
        assert_eq!(get(&r, b"/sub/file").unwrap(), b"nested");
        assert_eq!(get(&r, b"sub\\file").unwrap(), b"nested");
        let abs = f.root.join("sub/file");
        assert_eq!(get(&r, abs.as_os_str().as_bytes()).unwrap(), b"nested");
    }

    #[test]
    fn missing_files_and_directories_are_not_found() {
        let f = fixture();
        let r = resolver(&f, &[]);
        assert_eq!(get(&r, b"nope"), Err(Refusal::NotFound));
        assert_eq!(get(&r, b"sub"), Err(Refusal::NotFound));
        assert_eq!(get(&r, b"/"), Err(Refusal::NotFound));
    }

    #[test]
    fn dotdot_never_reaches_a_file_outside() {
        let f = fixture();
        let r = resolver(&f, &[]);
        for bad in [&b"../secret"[..], b"sub/../../secret", b"..\\secret", b"/../secret"] {
            assert_eq!(get(&r, bad), Err(Refusal::AccessViolation));
        }
    }

    #[test]
    fn absolute_host_paths_stay_under_root() {
        let f = fixture();
        let r = resolver(&f, &[]);
        // The host's file exists but "/<outside>" means "<root>/<outside>", which does not.
        assert_eq!(get(&r, f.outside.as_os_str().as_bytes()), Err(Refusal::NotFound));
        assert_eq!(get(&r, b"/etc/passwd"), Err(Refusal::NotFound));
    }

    #[test]
    fn symlinks_out_of_root_are_refused() {
        let f = fixture();
        symlink(&f.outside, f.root.join("link-file")).unwrap();
        symlink(f.outside.parent().unwrap(), f.root.join("link-dir")).unwrap();
        symlink("../secret", f.root.join("relative-link")).unwrap();
        symlink("/etc", f.root.join("etc")).unwrap();
        let r = resolver(&f, &[]);
        assert_eq!(get(&r, b"link-file"), Err(Refusal::AccessViolation));
        assert_eq!(get(&r, b"link-dir/secret"), Err(Refusal::AccessViolation));
        assert_eq!(get(&r, b"relative-link"), Err(Refusal::AccessViolation));
        assert_eq!(get(&r, b"etc/passwd"), Err(Refusal::AccessViolation));
        assert_eq!(get(&r, b"/etc/passwd"), Err(Refusal::AccessViolation));
    }

    #[test]
    fn symlinks_inside_root_are_followed() {
        let f = fixture();
        symlink("sub/file", f.root.join("alias")).unwrap();
        let r = resolver(&f, &[]);
        assert_eq!(get(&r, b"alias").unwrap(), b"nested");
    }

    #[test]
    fn root_that_is_a_symlink_works() {
        let f = fixture();
        let link = f.root.parent().unwrap().join("root-link");
        symlink(&f.root, &link).unwrap();
        let r = Resolver::new(link, &BTreeMap::new()).unwrap();
        assert_eq!(get(&r, b"boot.ipxe").unwrap(), b"#!ipxe\n");
        assert_eq!(get(&r, b"../secret"), Err(Refusal::AccessViolation));
    }

    #[test]
    fn virtual_files_match_only_their_exact_names() {
        let f = fixture();
        let src = f.root.parent().unwrap().join("undionly.kpxe");
        std::fs::write(&src, b"UNDI").unwrap();
        let r = resolver(&f, &[("undionly.kpxe", &src)]);
        assert_eq!(get(&r, b"undionly.kpxe").unwrap(), b"UNDI");
        assert_eq!(get(&r, b"/undionly.kpxe").unwrap(), b"UNDI");
        assert_eq!(get(&r, b"undionly.kpxe/"), Ok(b"UNDI".to_vec()));
        assert_eq!(get(&r, b"sub/undionly.kpxe"), Err(Refusal::NotFound));
        assert_eq!(get(&r, b"undionly"), Err(Refusal::NotFound));
        // Its neighbours in the source directory are not reachable.
        assert_eq!(get(&r, b"secret"), Err(Refusal::NotFound));
    }

    #[test]
    fn file_in_root_overrides_virtual_file() {
        let f = fixture();
        let src = f.root.parent().unwrap().join("packaged");
        std::fs::write(&src, b"packaged").unwrap();
        std::fs::write(f.root.join("ipxe.efi"), b"custom").unwrap();
        let r = resolver(&f, &[("ipxe.efi", &src)]);
        assert_eq!(get(&r, b"ipxe.efi").unwrap(), b"custom");
    }

    #[test]
    fn virtual_map_rejects_traversing_names() {
        let map = [("../x".to_string(), PathBuf::from("/dev/null"))].into_iter().collect();
        assert!(Resolver::new(PathBuf::from("/srv"), &map).is_err());
    }

    #[test]
    fn missing_root_still_serves_virtual_files() {
        let f = fixture();
        let src = f.root.parent().unwrap().join("snp");
        std::fs::write(&src, b"SNP").unwrap();
        let map = [("snponly.efi".to_string(), src)].into_iter().collect();
        let r = Resolver::new(f.root.join("does-not-exist"), &map).unwrap();
        assert_eq!(get(&r, b"snponly.efi").unwrap(), b"SNP");
        assert_eq!(get(&r, b"boot.ipxe"), Err(Refusal::NotFound));
    }

    #[test]
    fn cache_notices_changed_files() {
        let f = fixture();
        let r = resolver(&f, &[]);
        assert_eq!(get(&r, b"boot.ipxe").unwrap(), b"#!ipxe\n");
        // Replace by rename (new inode), the way package managers update files.
        let tmp = f.root.join(".tmp");
        std::fs::write(&tmp, b"#!ipxe\nchain x\n").unwrap();
        std::fs::rename(&tmp, f.root.join("boot.ipxe")).unwrap();
        assert_eq!(get(&r, b"boot.ipxe").unwrap(), b"#!ipxe\nchain x\n");
        // In-place rewrite with a different length.
        std::fs::write(f.root.join("boot.ipxe"), b"x").unwrap();
        assert_eq!(get(&r, b"boot.ipxe").unwrap(), b"x");
    }

    /// Reads `src` in `block`-sized pieces at the given block indices.
    fn netascii_blocks(raw: &[u8], block: usize, order: &[usize]) -> Vec<(usize, Vec<u8>)> {
        let mut n = Netascii::new(raw, raw.len() as u64);
        order
            .iter()
            .map(|&i| {
                let mut buf = vec![0u8; block];
                let got = n.read_at((i * block) as u64, &mut buf).unwrap();
                buf.truncate(got);
                (i, buf)
            })
            .collect()
    }

    #[test]
    fn netascii_streams_in_order_and_back() {
        let raw: Vec<u8> = (0..5000u32).map(|i| [b'a', b'\n', b'\r', b'x', 0][(i * 7 % 5) as usize]).collect();
        let want = to_netascii(&raw);
        assert_eq!(netascii_len(&raw), want.len() as u64);
        for block in [1usize, 2, 3, 512, 4096] {
            let count = want.len().div_ceil(block);
            // In order, then a go-back-N retransmission from the middle, then a jump back to
            // the start and one forward past a gap.
            let mut order: Vec<usize> = (0..count).collect();
            order.extend(count / 2..count);
            order.extend([0, 1, count - 1, count / 3]);
            for (i, got) in netascii_blocks(&raw, block, &order) {
                let end = ((i + 1) * block).min(want.len());
                assert_eq!(got, want[i * block..end], "block size {block}, block {i}");
            }
        }
        // Past the end: nothing.
        let mut n = Netascii::new(&raw[..], raw.len() as u64);
        let mut buf = [0u8; 4];
        assert_eq!(n.read_at(want.len() as u64, &mut buf).unwrap(), 0);
        assert_eq!(n.read_at(want.len() as u64 + 10, &mut buf).unwrap(), 0);
    }

    #[test]
    fn netascii_of_a_shrunken_file_is_an_error() {
        let raw = b"a\nb\n";
        let mut n = Netascii::new(&raw[..], 100);
        let mut buf = [0u8; 16];
        assert_eq!(n.read_at(0, &mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn netascii_converts_line_ends() {
        assert_eq!(to_netascii(b"a\nb\rc\r\n"), b"a\r\nb\r\0c\r\0\r\n");
        let f = fixture();
        std::fs::write(f.root.join("cfg"), b"l1\nl2\n").unwrap();
        let r = resolver(&f, &[]);
        let o = r.open(b"cfg", Mode::Netascii).unwrap();
        assert_eq!(o.len, 8);
        assert_eq!(read(o), b"l1\r\nl2\r\n");
    }
}
