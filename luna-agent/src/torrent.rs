//! The image over BitTorrent, with memory that does not grow with the image.
//!
//! # Storage: a bounded piece window
//!
//! librqbit writes pieces through a [`TorrentStorage`]. The default writes the archive to a file,
//! which on a diskless node means RAM for the archive *and* the unpacked tree. [`WindowStorage`]
//! instead keeps pieces in memory, at most `cap` bytes, and the agent reads the archive in order
//! through librqbit's `FileStream` (which also makes librqbit fetch pieces at the read position
//! first) and unpacks it while it arrives.
//!
//! Eviction, when a write pushes the window over `cap`: first pieces already read by the
//! unpacker, oldest first; only then verified pieces not yet read, farthest ahead first; never a
//! piece still being filled. The trade-off:
//! - memory stays at about `cap` plus what peers have in flight, whatever the image size;
//! - the node still seeds, but only the recent part of the archive it holds: since nodes booting
//!   together read at about the same place, that is what their peers ask for. A request for an
//!   evicted piece fails, librqbit drops that connection and the peer gets it from another node
//!   or the server's seeder (which has everything, once one of its upload slots is free);
//! - librqbit still announces evicted pieces as present (it has no "lost a piece" notion);
//! - if an unread piece had to be evicted, reading it fails and the agent continues over HTTP
//!   from that byte. To make that rare, as soon as more than half the window lies at or after
//!   the read position the session's download rate is throttled (checked on every new piece and
//!   every read, so a fast local seeder cannot outrun it), and each peer keeps at most 64 chunk
//!   requests (1 MiB) in flight, which bounds what still arrives after the throttle. The throttle
//!   slows rather than stops, so the piece at the read position still arrives;
//! - after a fallback to HTTP the download rate stays at the minimum (one chunk a second): the
//!   node keeps seeding what it holds without fetching the image twice.
//!
//! Writes are never refused: librqbit treats a failed write as fatal for the torrent.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use librqbit::storage::{StorageFactory, StorageFactoryExt, TorrentStorage};
use librqbit::{
    AddTorrent, AddTorrentOptions, ListenerMode, ListenerOptions, ManagedTorrent, ManagedTorrentShared,
    PeerConnectionOptions, Session, SessionOptions, TorrentMetadata,
};
use librqbit_core::lengths::ValidPieceIndex;
use parking_lot::Mutex;

/// Default window: the 64 MiB RSS budget minus librqbit, the HTTP client, zstd and the buffers
/// between the threads (measured: about 27 MiB besides the window).
pub const DEFAULT_WINDOW: u64 = 24 << 20;
/// Download rate while the unpacker is behind.
const THROTTLED_BPS: u32 = 512 << 10;
/// Download rate after the fallback to HTTP: one chunk a second, the smallest librqbit accepts.
const PARKED_BPS: u32 = 16 << 10;
/// Chunk requests in flight per peer (16 KiB each).
const PEER_REQUEST_WINDOW: usize = 64;

type SetRate = Box<dyn Fn(Option<NonZeroU32>) + Send + Sync>;

#[derive(Default)]
struct Piece {
    data: Box<[u8]>,
    verified: bool,
}

struct WindowState {
    pieces: BTreeMap<u32, Piece>,
    bytes: u64,
}

/// Shared between the storage objects librqbit creates and the agent's reader.
pub struct Window {
    cap: u64,
    piece_len: AtomicU64,
    /// Bytes of the file the unpacker has read.
    consumed: AtomicU64,
    state: Mutex<WindowState>,
    /// Highest byte count ever held, for tests and the report.
    peak: AtomicU64,
    evicted_unread: AtomicBool,
    /// The session's download limit, once there is a session.
    set_rate: std::sync::OnceLock<SetRate>,
    /// 0: unlimited, else the rate in force.
    rate: AtomicU64,
    parked: AtomicBool,
}

impl Window {
    pub fn new(cap: u64) -> Arc<Self> {
        Arc::new(Self {
            cap,
            piece_len: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            state: Mutex::new(WindowState { pieces: BTreeMap::new(), bytes: 0 }),
            peak: AtomicU64::new(0),
            evicted_unread: AtomicBool::new(false),
            set_rate: std::sync::OnceLock::new(),
            rate: AtomicU64::new(0),
            parked: AtomicBool::new(false),
        })
    }

    pub fn set_consumed(&self, bytes: u64) {
        self.consumed.store(bytes, Ordering::Relaxed);
        let st = self.state.lock();
        self.update_rate(&st);
    }

    /// After the fallback to HTTP: download next to nothing, keep seeding.
    pub fn park(&self) {
        self.parked.store(true, Ordering::Relaxed);
        let st = self.state.lock();
        self.update_rate(&st);
    }

    /// The download limit now in force (`None`: unlimited).
    pub fn rate_limit(&self) -> Option<u64> {
        Some(self.rate.load(Ordering::Relaxed)).filter(|r| *r > 0)
    }

    /// Throttles while more than half the window lies at or after the read position.
    fn update_rate(&self, st: &WindowState) {
        let read = self.read_piece();
        let ahead: u64 = st.pieces.range(read..).map(|(_, p)| p.data.len() as u64).sum();
        let want = if self.parked.load(Ordering::Relaxed) {
            u64::from(PARKED_BPS)
        } else if ahead > self.cap / 2 {
            u64::from(THROTTLED_BPS)
        } else {
            0
        };
        if self.rate.swap(want, Ordering::Relaxed) != want {
            tracing::debug!(ahead, want, "download rate limit changed");
            if let Some(set) = self.set_rate.get() {
                set(NonZeroU32::new(want as u32));
            }
        }
    }

    pub fn peak_bytes(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn held_bytes(&self) -> u64 {
        self.state.lock().bytes
    }

    /// Whether an unread piece had to be dropped (the reader will then fail over to HTTP).
    pub fn evicted_unread(&self) -> bool {
        self.evicted_unread.load(Ordering::Relaxed)
    }

    fn piece_len(&self) -> u64 {
        self.piece_len.load(Ordering::Relaxed).max(1)
    }

    fn read_piece(&self) -> u32 {
        (self.consumed.load(Ordering::Relaxed) / self.piece_len()) as u32
    }

    fn evict(&self, st: &mut WindowState, keep: u32) {
        let read = self.read_piece();
        while st.bytes > self.cap {
            let victim = st
                .pieces
                .iter()
                .find(|(i, p)| **i < read && **i != keep && p.verified)
                .map(|(i, _)| *i)
                .or_else(|| st.pieces.iter().rev().find(|(i, p)| **i != keep && p.verified).map(|(i, _)| *i));
            let Some(victim) = victim else { break };
            if victim >= read {
                self.evicted_unread.store(true, Ordering::Relaxed);
                tracing::warn!("piece window full: dropping unread piece {victim}");
            }
            if let Some(p) = st.pieces.remove(&victim) {
                st.bytes -= p.data.len() as u64;
            }
        }
    }

    fn write(&self, offset: u64, buf: &[u8], piece_sizes: &dyn Fn(u32) -> u64) -> anyhow::Result<()> {
        let plen = self.piece_len();
        let mut offset = offset;
        let mut buf = buf;
        while !buf.is_empty() {
            let index = (offset / plen) as u32;
            let within = (offset % plen) as usize;
            let mut st = self.state.lock();
            if let std::collections::btree_map::Entry::Vacant(slot) = st.pieces.entry(index) {
                let size = piece_sizes(index) as usize;
                slot.insert(Piece { data: vec![0; size].into_boxed_slice(), verified: false });
                st.bytes += size as u64;
                self.evict(&mut st, index);
                self.peak.fetch_max(st.bytes, Ordering::Relaxed);
                self.update_rate(&st);
            }
            let piece = st.pieces.get_mut(&index).context("piece vanished while writing")?;
            let n = buf.len().min(piece.data.len().saturating_sub(within));
            anyhow::ensure!(n > 0, "write at {offset} is past piece {index}");
            piece.data[within..within + n].copy_from_slice(&buf[..n]);
            buf = &buf[n..];
            offset += n as u64;
        }
        Ok(())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        let plen = self.piece_len();
        let mut offset = offset;
        let mut done = 0;
        while done < buf.len() {
            let index = (offset / plen) as u32;
            let within = (offset % plen) as usize;
            let st = self.state.lock();
            let piece = st.pieces.get(&index).with_context(|| format!("piece {index} is not in the window"))?;
            let n = (buf.len() - done).min(piece.data.len().saturating_sub(within));
            anyhow::ensure!(n > 0, "read at {offset} is past piece {index}");
            buf[done..done + n].copy_from_slice(&piece.data[within..within + n]);
            done += n;
            offset += n as u64;
        }
        Ok(())
    }

    fn completed(&self, index: u32) {
        if let Some(p) = self.state.lock().pieces.get_mut(&index) {
            p.verified = true;
        }
    }
}

#[derive(Clone)]
pub struct WindowStorageFactory {
    window: Arc<Window>,
}

impl WindowStorageFactory {
    pub fn new(window: Arc<Window>) -> Self {
        Self { window }
    }
}

pub struct WindowStorage {
    window: Arc<Window>,
    /// Length of every piece but the last, and the total.
    piece_len: u64,
    total: u64,
}

impl StorageFactory for WindowStorageFactory {
    type Storage = WindowStorage;

    fn create(&self, _shared: &ManagedTorrentShared, metadata: &TorrentMetadata) -> anyhow::Result<WindowStorage> {
        anyhow::ensure!(metadata.file_infos.len() == 1, "the image torrent must hold exactly one file");
        let lengths = metadata.lengths();
        let piece_len = u64::from(lengths.default_piece_length());
        self.window.piece_len.store(piece_len, Ordering::Relaxed);
        Ok(WindowStorage { window: self.window.clone(), piece_len, total: lengths.total_length() })
    }

    fn clone_box(&self) -> librqbit::storage::BoxStorageFactory {
        self.clone().boxed()
    }
}

impl WindowStorage {
    fn piece_size(&self, index: u32) -> u64 {
        let start = u64::from(index) * self.piece_len;
        self.piece_len.min(self.total.saturating_sub(start))
    }
}

impl TorrentStorage for WindowStorage {
    fn init(&mut self, _shared: &ManagedTorrentShared, _metadata: &TorrentMetadata) -> anyhow::Result<()> {
        Ok(())
    }

    fn pread_exact(&self, _file_id: usize, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        self.window.read(offset, buf)
    }

    fn pwrite_all(&self, _file_id: usize, offset: u64, buf: &[u8]) -> anyhow::Result<()> {
        self.window.write(offset, buf, &|i| self.piece_size(i))
    }

    fn pwrite_all_vectored(&self, file_id: usize, offset: u64, bufs: [IoSlice<'_>; 2]) -> anyhow::Result<usize> {
        let mut at = offset;
        for b in bufs {
            self.pwrite_all(file_id, at, &b)?;
            at += b.len() as u64;
        }
        Ok((at - offset) as usize)
    }

    fn remove_file(&self, _file_id: usize, _filename: &Path) -> anyhow::Result<()> {
        Ok(())
    }

    fn remove_directory_if_empty(&self, _path: &Path) -> anyhow::Result<()> {
        Ok(())
    }

    fn ensure_file_length(&self, _file_id: usize, _length: u64) -> anyhow::Result<()> {
        Ok(())
    }

    fn take(&self) -> anyhow::Result<Box<dyn TorrentStorage>> {
        Ok(Box::new(WindowStorage { window: self.window.clone(), piece_len: self.piece_len, total: self.total }))
    }

    fn on_piece_completed(&self, piece_index: ValidPieceIndex) -> anyhow::Result<()> {
        self.window.completed(piece_index.get());
        Ok(())
    }
}

/// Where the swarm client binds.
#[derive(Clone, Debug, Default)]
pub struct SwarmOptions {
    /// Address to listen on for peers (the torrent interface's address); `None`: all.
    pub listen_ip: Option<Ipv4Addr>,
    /// `SO_BINDTODEVICE` for outgoing peer connections (the torrent interface).
    pub device: Option<String>,
    /// Peers to contact besides those the tracker names (tests without a tracker).
    pub initial_peers: Vec<SocketAddr>,
    pub window: u64,
}

/// A running librqbit session leeching (and seeding) the image.
pub struct Swarm {
    session: Arc<Session>,
    handle: Arc<ManagedTorrent>,
    pub window: Arc<Window>,
}

impl Swarm {
    pub async fn start(torrent: Bytes, scratch: &Path, opts: SwarmOptions) -> anyhow::Result<Swarm> {
        let window = Window::new(opts.window.max(4 << 20));
        let listen_addr = SocketAddr::from((opts.listen_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), 0));
        let session = Session::new_with_opts(
            scratch.to_path_buf(),
            SessionOptions {
                dht: None,
                disable_local_service_discovery: true,
                persistence: None,
                fastresume: false,
                bind_device_name: opts.device.clone(),
                listen: Some(ListenerOptions {
                    mode: ListenerMode::TcpOnly,
                    listen_addr,
                    enable_upnp_port_forwarding: false,
                    ipv4_only: true,
                    ..Default::default()
                }),
                ipv4_only: true,
                default_storage_factory: Some(WindowStorageFactory::new(window.clone()).boxed()),
                ..Default::default()
            },
        )
        .await
        .context("start the torrent session")?;
        let added = session
            .add_torrent(
                AddTorrent::from_bytes(torrent),
                Some(AddTorrentOptions {
                    overwrite: true,
                    peer_opts: Some(PeerConnectionOptions {
                        max_request_window: Some(PEER_REQUEST_WINDOW),
                        ..Default::default()
                    }),
                    initial_peers: (!opts.initial_peers.is_empty()).then(|| opts.initial_peers.clone()),
                    ..Default::default()
                }),
            )
            .await
            .context("add the image torrent")?;
        let handle = added.into_handle().context("the torrent was only listed, not added")?;
        handle.wait_until_initialized().await.context("initialise the image torrent")?;
        let limits = Arc::downgrade(&session);
        let _ = window.set_rate.set(Box::new(move |bps| {
            if let Some(s) = limits.upgrade() {
                s.ratelimits.set_download_bps(bps);
            }
        }));
        Ok(Swarm { session, handle, window })
    }

    /// The archive in order (librqbit's `FileStream`, which is not nameable from outside).
    pub async fn stream(&self) -> anyhow::Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>> {
        Ok(Box::new(self.handle.clone().stream(0).await?))
    }

    /// Port peers can reach this node on.
    pub fn listen_port(&self) -> Option<u16> {
        self.session.announce_port()
    }

    pub async fn stop(self) {
        self.session.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(cap: u64, plen: u64) -> Arc<Window> {
        let w = Window::new(cap);
        w.piece_len.store(plen, Ordering::Relaxed);
        w
    }

    #[test]
    fn write_read_across_pieces() {
        let w = window(1 << 20, 4);
        let sizes = |i: u32| if i == 2 { 2 } else { 4 };
        w.write(2, b"abcdefgh", &sizes).unwrap();
        let mut buf = [0u8; 6];
        w.read(3, &mut buf).unwrap();
        assert_eq!(&buf, b"bcdefg");
        assert!(w.write(10, b"xyz", &sizes).is_err(), "past the short last piece");
    }

    #[test]
    fn evicts_read_pieces_first_then_farthest_unread() {
        let w = window(12, 4);
        let sizes = |_| 4;
        for i in 0..3u32 {
            w.write(u64::from(i) * 4, b"dddd", &sizes).unwrap();
            w.completed(i);
        }
        w.set_consumed(4); // piece 0 read
        w.write(12, b"eeee", &sizes).unwrap();
        let mut b = [0u8; 4];
        assert!(w.read(0, &mut b).is_err(), "read piece evicted");
        assert!(!w.evicted_unread());
        assert_eq!(w.held_bytes(), 12);
        w.completed(3);
        // Nothing read left to drop: the farthest verified unread piece goes, never the new one.
        w.write(16, b"ffff", &sizes).unwrap();
        assert!(w.evicted_unread());
        assert!(w.read(12, &mut b).is_err());
        assert!(w.read(16, &mut b).is_ok());
        assert_eq!(w.peak_bytes(), 12, "held bytes stay at the cap");
    }

    #[test]
    fn unverified_pieces_are_never_evicted() {
        let w = window(4, 4);
        let sizes = |_| 4;
        w.write(0, b"aa", &sizes).unwrap();
        w.write(4, b"bb", &sizes).unwrap();
        w.write(2, b"cc", &sizes).unwrap();
        let mut b = [0u8; 4];
        w.read(0, &mut b).unwrap();
        assert_eq!(&b, b"aacc");
        assert_eq!(w.held_bytes(), 8, "over the cap rather than lose a piece being filled");
    }

    #[test]
    fn throttles_when_half_the_window_is_ahead_and_parks_after_fallback() {
        let w = window(16, 4);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let _ = w.set_rate.set(Box::new(move |bps| s2.lock().push(bps.map(|b| b.get()))));
        let sizes = |_| 4;
        w.write(0, b"aaaa", &sizes).unwrap();
        w.write(4, b"bbbb", &sizes).unwrap();
        assert_eq!(w.rate_limit(), None, "8 bytes of 16 is not more than half");
        w.write(8, b"cc", &sizes).unwrap();
        assert_eq!(w.rate_limit(), Some(u64::from(THROTTLED_BPS)), "throttled at once, on the write");
        w.set_consumed(8);
        assert_eq!(w.rate_limit(), None, "the reader caught up");
        w.park();
        assert_eq!(w.rate_limit(), Some(u64::from(PARKED_BPS)));
        w.set_consumed(12);
        assert_eq!(w.rate_limit(), Some(u64::from(PARKED_BPS)), "parked for good");
        assert_eq!(*seen.lock(), vec![Some(THROTTLED_BPS), None, Some(PARKED_BPS)]);
    }
}
