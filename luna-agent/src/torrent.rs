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
//! What librqbit may fetch: only pieces from the read position to `cap` bytes ahead of it
//! ([`Window::wants`], asked through `TorrentStorage::wants_piece`, a luna patch to librqbit;
//! see `vendor/librqbit/LUNA-PATCH.md`). Whenever the reader enters a new piece, librqbit's idle
//! peers are woken to ask again. So however slow the reader, or before it starts (the agent
//! runs the partscript while the swarm already runs), the window never holds more than `cap`
//! of unread data, and no unread piece ever has to be dropped. Why not a rate limit: the
//! window used to throttle when half of it was ahead of the reader, which only slowed the
//! overflow; with nodes trading (HAVEs, upload slots) it filled, dropped unread pieces that
//! librqbit still counted as present, and the reader failed on them ("piece N is not in the
//! window") and fell back to HTTP.
//!
//! Eviction, when a write pushes the window over `cap`: pieces behind the read position,
//! oldest first; then verified pieces past the wanted span (librqbit asked for none; only a
//! safety net), farthest first; never an unread piece inside the span and never the piece
//! being written: the window goes over `cap` instead, by at most one piece. Writes to a verified
//! piece or to a piece behind the reader that the window no longer holds are ignored: librqbit
//! writes a chunk before it notices that another peer completed the piece ("was done by
//! someone else"), and such a write used to pin a never-verified piece behind the reader.
//!
//! The trade-off:
//! - memory stays at about `cap` plus what peers have in flight, whatever the image size;
//! - the node still seeds, but only the recent part of the archive it holds: since nodes booting
//!   together read at about the same place, that is what their peers ask for. A request for an
//!   evicted piece fails, librqbit drops that connection and the peer gets it from another node
//!   or the server's seeder (which has everything, once one of its upload slots is free);
//! - librqbit still announces evicted (read) pieces as present (it has no "lost a piece"
//!   notion);
//! - each peer keeps at most 64 chunk requests (1 MiB) in flight;
//! - if the swarm fails or stalls anyway, the agent continues over HTTP from that byte, and the
//!   download rate stays at the minimum (one chunk a second): the node keeps seeding what it
//!   holds without fetching the image twice.
//!
//! Writes are never refused: librqbit treats a failed write as fatal for the torrent.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
/// Download rate after the fallback to HTTP: one chunk a second, the smallest librqbit accepts.
const PARKED_BPS: u32 = 16 << 10;
/// Chunk requests in flight per peer (16 KiB each), at most: 2 MiB, enough for a peer on a
/// 10 Gbit/s LAN. How many are kept outstanding follows what the peer delivers (librqbit patch
/// 14, [`PEER_REQUEST_QUEUE_TIME`]). A fixed 64 (bench-swarm, 64 nodes) had a MiB queued for each
/// of 60 peers, and a request waited longer than the stall time on slow links.
const PEER_REQUEST_WINDOW: usize = 128;
/// Requests kept outstanding per peer: what it delivered in this long, at least 4 chunks. More
/// only wait in the peer's uplink queue, and the piece this node needs next waits behind them.
/// bench-swarm at 10 Mbit/s (where this keeps 4-8 chunks), against a fixed 16: 8 nodes 1.60 and
/// 1.63 S/B (a fixed 4) against 1.85 and 1.90; 64 nodes 2.60, 2.58, 2.78 against 2.90, 2.51, 2.86
/// (200 ms: 3.05, 2.95, 2.62).
const PEER_REQUEST_QUEUE_TIME: std::time::Duration = std::time::Duration::from_millis(100);
/// Keep-alive to every peer. librqbit drops a connection on which nothing arrived for its
/// read timeout (10 s) but sends keep-alives only every 120 s, so two nodes with nothing to
/// trade yet (all nodes of a cluster start empty, at the same place) dropped each other after
/// 10 s and met again only after librqbit's reconnect backoff (10 s, then 60 s, then 360 s).
const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(4);
/// How long a peer may send nothing (not even a keep-alive), or take to accept one message,
/// before the connection is dropped (librqbit's default: 10 s). On a full link a keep-alive
/// waits behind the data queued for every peer, and a dropped peer comes back only after
/// librqbit's backoff (10 s, then 60 s): bench-swarm, 64 nodes at 5 Mbit/s, dropped 1 597
/// connections for a timeout with 10 s, 62 with 30 s.
const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How often the debug timeline logs a [`Census`].
const CENSUS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// How often a lingering node asks the tracker whether nodes are still downloading.
const LINGER_POLL: std::time::Duration = std::time::Duration::from_millis(500);
/// A lingering node stops when no peer fetched anything from it for this long.
pub const LINGER_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

type SetRate = Box<dyn Fn(Option<NonZeroU32>) + Send + Sync>;
type Wake = Box<dyn Fn() + Send + Sync>;

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
    /// Makes librqbit's idle peers ask [`Window::wants`] again, once there is a torrent.
    wake: std::sync::OnceLock<Wake>,
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
            wake: std::sync::OnceLock::new(),
            rate: AtomicU64::new(0),
            parked: AtomicBool::new(false),
        })
    }

    pub fn set_consumed(&self, bytes: u64) {
        let before = self.read_piece();
        self.consumed.store(bytes, Ordering::Relaxed);
        if self.read_piece() != before {
            // The window moved: pieces librqbit was told to leave alone are wanted now.
            if let Some(wake) = self.wake.get() {
                wake();
            }
        }
    }

    /// Whether librqbit may request piece `index` now: only pieces from the read position to
    /// the window's size ahead of it. What is held ahead of the reader is bounded by the
    /// window however slow the reader is (or before it starts), so an unread piece never has
    /// to be evicted, and librqbit never reports a piece the window dropped unread.
    pub fn wants(&self, index: u32) -> bool {
        let read = self.read_piece();
        index >= read && u64::from(index - read) < self.span()
    }

    /// How many pieces from the read position on librqbit may fetch: the window's size.
    fn span(&self) -> u64 {
        (self.cap / self.piece_len()).max(1)
    }

    /// After the fallback to HTTP: download next to nothing, keep seeding.
    pub fn park(&self) {
        self.parked.store(true, Ordering::Relaxed);
        self.update_rate();
    }

    /// The download limit now in force (`None`: unlimited).
    pub fn rate_limit(&self) -> Option<u64> {
        Some(self.rate.load(Ordering::Relaxed)).filter(|r| *r > 0)
    }

    /// Parked after the fallback to HTTP, else unlimited ([`Window::wants`] bounds the window).
    fn update_rate(&self) {
        let want = if self.parked.load(Ordering::Relaxed) { u64::from(PARKED_BPS) } else { 0 };
        if self.rate.swap(want, Ordering::Relaxed) != want {
            tracing::debug!(want, "download rate limit changed");
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

    /// Pieces the window would give up first when full: every piece behind the read position
    /// (read, or a late write to one), oldest first; then verified pieces past what
    /// [`Window::wants`] allows, farthest first. An unread piece inside the wanted span is
    /// never dropped (librqbit would still count it as present and the reader would fail on
    /// it): the window goes over the cap instead, by at most the piece being filled, since
    /// librqbit requests nothing past the span.
    fn evict(&self, st: &mut WindowState, keep: u32) {
        let read = self.read_piece();
        let span_end = u64::from(read) + self.span();
        while st.bytes > self.cap {
            let victim = st.pieces.range(..read).map(|(i, _)| *i).find(|i| *i != keep).or_else(|| {
                st.pieces
                    .iter()
                    .rev()
                    .take_while(|(i, _)| u64::from(**i) >= span_end)
                    .find(|(i, p)| **i != keep && p.verified)
                    .map(|(i, _)| *i)
            });
            let Some(victim) = victim else { break };
            if victim >= read {
                self.evicted_unread.store(true, Ordering::Relaxed);
                tracing::warn!("piece window full: dropping unread piece {victim} past the wanted span");
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
            let size = piece_sizes(index) as usize;
            let n = buf.len().min(size.saturating_sub(within));
            anyhow::ensure!(n > 0, "write at {offset} is past piece {index}");
            let mut st = self.state.lock();
            // librqbit sometimes writes chunks of a piece it already has (seen: a piece the
            // reader had passed, written again from a second peer's late requests). Such data is
            // never read and never verified: keeping it would pin the memory for good. A
            // verified piece is never legitimately rewritten either.
            let stale = match st.pieces.get(&index) {
                Some(p) => p.verified,
                None => index < self.read_piece(),
            };
            if stale {
                tracing::debug!(index, "ignoring a write to a piece already complete");
            } else {
                if let std::collections::btree_map::Entry::Vacant(slot) = st.pieces.entry(index) {
                    slot.insert(Piece { data: vec![0; size].into_boxed_slice(), verified: false });
                    st.bytes += size as u64;
                    self.evict(&mut st, index);
                    self.peak.fetch_max(st.bytes, Ordering::Relaxed);
                }
                let piece = st.pieces.get_mut(&index).context("piece vanished while writing")?;
                anyhow::ensure!(piece.data.len() == size, "piece {index} changed size");
                piece.data[within..within + n].copy_from_slice(&buf[..n]);
            }
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

    fn wants_piece(&self, piece_index: ValidPieceIndex) -> bool {
        self.window.wants(piece_index.get())
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
    /// Addresses of the servers (their seeders), to tell bytes from the server from bytes from
    /// other nodes in [`Census`]; they are connected first and outside `peer_limit` (librqbit
    /// patch 12).
    pub servers: Vec<IpAddr>,
    /// Fetch a random one of the rarest of the next `piece_spread` pieces the reader needs that
    /// a peer has (luna patches 6 and 9 to librqbit; 1: strictly in order). Nodes booting together read the image
    /// at the same place: in order, they all asked for the same piece at the same moment, the
    /// server's upload slot holders got each piece twice, and nodes had little to trade.
    pub piece_spread: u32,
    /// Upload to at most this many peers at a time, handing the slots on in turn (a luna patch
    /// to librqbit, BitTorrent's choking; 0: every peer at once, librqbit's own way). Unchoking
    /// everyone, the first nodes to get a piece split their uplinks among the whole cluster,
    /// every copy came slowly, was asked for again elsewhere meanwhile, and half of what the
    /// nodes downloaded was such duplicates (bench-swarm, 64 nodes).
    pub upload_slots: u32,
    /// Peer connections kept at most (librqbit's live-peer limit; 0: its default, 128). Every
    /// connection costs keep-alives, a HAVE per piece and a place in the choker's turns, and
    /// two nodes that both connected to each other hold two. bench-swarm, 64 nodes, 10 Mbit/s:
    /// 20 gave 3.45 S/B against 3.96–4.12 with librqbit's default (every node connected to all
    /// the others, most of them twice).
    pub peer_limit: u32,
}

/// A running librqbit session leeching (and seeding) the image.
pub struct Swarm {
    session: Arc<Session>,
    handle: Arc<ManagedTorrent>,
    pub window: Arc<Window>,
    /// Ours, not librqbit's random one: [`Swarm::stop`] announces with it.
    peer_id: librqbit::dht::Id20,
    servers: Vec<IpAddr>,
    /// The debug timeline's task.
    census: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if let Some(t) = self.census.take() {
            t.abort();
        }
    }
}

impl Swarm {
    pub async fn start(torrent: Bytes, scratch: &Path, opts: SwarmOptions) -> anyhow::Result<Swarm> {
        let window = Window::new(opts.window.max(4 << 20));
        let listen_addr = SocketAddr::from((opts.listen_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), 0));
        let peer_id = librqbit_core::peer_id::generate_peer_id(b"-LU0001-");
        let session = Session::new_with_opts(
            scratch.to_path_buf(),
            SessionOptions {
                peer_id: Some(peer_id),
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
                        request_queue_time: Some(PEER_REQUEST_QUEUE_TIME),
                        keep_alive_interval: Some(KEEP_ALIVE),
                        read_write_timeout: Some(PEER_TIMEOUT),
                        piece_spread: Some(opts.piece_spread.max(1) as usize),
                        upload_slots: (opts.upload_slots > 0).then_some(opts.upload_slots as usize),
                        ..Default::default()
                    }),
                    initial_peers: (!opts.initial_peers.is_empty()).then(|| opts.initial_peers.clone()),
                    peer_limit: (opts.peer_limit > 0).then_some(opts.peer_limit as usize),
                    // The seeders are reached whatever the limit (librqbit patch 12).
                    priority_peers: {
                        let mut p = opts.servers.clone();
                        p.sort();
                        p.dedup();
                        p
                    },
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
        let torrent = Arc::downgrade(&handle);
        let _ = window.wake.set(Box::new(move || {
            if let Some(t) = torrent.upgrade() {
                t.wake_piece_requesters();
            }
        }));
        // A timeline of the swarm at debug level (`LUNA_LOG=luna_agent::torrent=debug`): how a
        // stall came about.
        let census = tracing::enabled!(tracing::Level::DEBUG).then(|| {
            let (torrent, servers) = (Arc::downgrade(&handle), opts.servers.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(CENSUS_EVERY);
                loop {
                    tick.tick().await;
                    let Some(t) = torrent.upgrade() else { break };
                    let progress = t.stats().progress_bytes;
                    tracing::debug!(progress, "{}", census_of(&t, &servers));
                }
            })
        });
        Ok(Swarm { session, handle, window, peer_id, servers: opts.servers, census })
    }

    /// The archive in order (librqbit's `FileStream`, which is not nameable from outside).
    pub async fn stream(&self) -> anyhow::Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>> {
        Ok(Box::new(self.handle.clone().stream(0).await?))
    }

    /// Bytes of the image librqbit has verified so far (anywhere in the file).
    pub fn progress(&self) -> u64 {
        self.handle.stats().progress_bytes
    }

    /// Port peers can reach this node on.
    pub fn listen_port(&self) -> Option<u16> {
        self.session.listen_addr().map(|a| a.port())
    }

    /// Where the image came from and the state of every peer librqbit knows, now.
    pub fn census(&self) -> Census {
        census_of(&self.handle, &self.servers)
    }

    /// Seeds on after the install, for the nodes still downloading: until the tracker lists
    /// none, no peer fetched anything for [`LINGER_IDLE`], or `max` is up (see [`Linger`]).
    /// Without an HTTP tracker to ask, it does not linger. Returns why it stopped.
    pub async fn linger(&self, max: std::time::Duration) -> &'static str {
        if max.is_zero() {
            return "lingering is off (luna.linger=0)";
        }
        let Some(port) = self.listen_port() else { return "not listening for peers" };
        let Some(tracker) = self.http_trackers().into_iter().next() else { return "no tracker to ask" };
        let client = match reqwest::Client::builder().timeout(std::time::Duration::from_secs(3)).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot ask the tracker whether nodes still download");
                return "no http client";
            }
        };
        let info_hash = self.handle.info_hash().0;
        let started = tokio::time::Instant::now();
        let mut linger = Linger::new(max, LINGER_IDLE, self.handle.stats().uploaded_bytes);
        tracing::info!("seeding on for the nodes still downloading (at most {} s)", max.as_secs());
        loop {
            let stats = self.handle.stats();
            let query =
                announce_query(&info_hash, &self.peer_id.0, port, stats.uploaded_bytes, stats.progress_bytes, 0, "");
            let sep = if tracker.contains('?') { '&' } else { '?' };
            let incomplete = match client.get(format!("{tracker}{sep}{query}&numwant=0")).send().await {
                Ok(r) => r.bytes().await.ok().and_then(|b| incomplete_in(&b)),
                Err(e) => {
                    tracing::debug!(%tracker, error = %e, "cannot announce while lingering");
                    None
                }
            };
            let elapsed = started.elapsed();
            if let Some(why) = linger.step(elapsed, self.handle.stats().uploaded_bytes, incomplete) {
                let c = self.census();
                tracing::info!("stopped seeding after {:.1} s: {why}; {c}", elapsed.as_secs_f64());
                return why;
            }
            tokio::time::sleep(LINGER_POLL).await;
        }
    }

    fn http_trackers(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .handle
            .shared()
            .trackers
            .iter()
            .map(|u| u.to_string())
            .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
            .collect();
        t.sort();
        t
    }

    /// Ends the session and tells the trackers: `completed` when the node got the whole
    /// image (`finished`, from peers or over HTTP), then `stopped`, so the tracker counts the
    /// node once and stops listing it at once. librqbit itself sends neither.
    pub async fn stop(self, finished: bool) {
        let stats = self.handle.stats();
        let port = self.listen_port();
        let trackers = self.http_trackers();
        let info_hash = self.handle.info_hash().0;
        self.session.stop().await;
        let Some(port) = port else { return };
        let left = if finished { 0 } else { stats.total_bytes.saturating_sub(stats.progress_bytes) };
        let client = match reqwest::Client::builder().timeout(std::time::Duration::from_secs(3)).build() {
            Ok(c) => c,
            Err(e) => return tracing::warn!(error = %e, "cannot announce the end of the download"),
        };
        let events: &[&str] = if finished { &["completed", "stopped"] } else { &["stopped"] };
        for tracker in &trackers {
            for event in events {
                let query = announce_query(
                    &info_hash,
                    &self.peer_id.0,
                    port,
                    stats.uploaded_bytes,
                    stats.progress_bytes,
                    left,
                    event,
                );
                let sep = if tracker.contains('?') { '&' } else { '?' };
                let url = format!("{tracker}{sep}{query}");
                match client.get(&url).send().await {
                    Ok(r) => tracing::debug!(%tracker, event, status = %r.status(), "announced"),
                    Err(e) => tracing::warn!(%tracker, event, error = %e, "cannot announce"),
                }
            }
        }
    }
}

/// The query of a BitTorrent announce (BEP 3), binary values percent-encoded.
fn announce_query(
    info_hash: &[u8; 20],
    peer_id: &[u8; 20],
    port: u16,
    uploaded: u64,
    downloaded: u64,
    left: u64,
    event: &str,
) -> String {
    fn enc(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len() * 3);
        for &b in bytes {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }
    let event = if event.is_empty() { String::new() } else { format!("&event={event}") };
    format!(
        "info_hash={}&peer_id={}&port={port}&uploaded={uploaded}&downloaded={downloaded}&left={left}{event}&compact=1",
        enc(info_hash),
        enc(peer_id)
    )
}

fn census_of(handle: &ManagedTorrent, servers: &[IpAddr]) -> Census {
    let stats = handle.stats();
    let mut c = Census { uploaded: stats.uploaded_bytes, ..Census::default() };
    if let Some(agg) = stats.live.as_ref().map(|l| &l.snapshot.peer_stats) {
        (c.seen, c.live, c.queued, c.connecting, c.dead, c.not_needed) =
            (agg.seen, agg.live, agg.queued, agg.connecting, agg.dead, agg.not_needed);
    }
    if let Some(live) = handle.live() {
        // librqbit's per-peer table is nameable only through its serde form.
        let filter = serde_json::from_value(serde_json::json!({"state": "all"}));
        let table = filter.map(|f| live.per_peer_stats_snapshot(f)).ok().and_then(|t| serde_json::to_value(t).ok());
        let peers = table.as_ref().and_then(|t| t["peers"].as_object());
        for (addr, p) in peers.into_iter().flatten() {
            let Ok(addr) = addr.parse::<SocketAddr>() else { continue };
            let n = |k: &str| p["counters"][k].as_u64().unwrap_or(0);
            c.add_peer(
                servers.contains(&addr.ip()),
                p["state"].as_str() == Some("live"),
                n("fetched_bytes"),
                n("uploaded_bytes"),
                n("errors") as u32,
            );
        }
    }
    c
}

/// `incomplete` of a tracker's announce answer (peers still downloading), if it has one.
fn incomplete_in(answer: &[u8]) -> Option<u32> {
    use bip_bencode::{BDecodeOpt, BRefAccess, BencodeRef};
    let root = BencodeRef::decode(answer, BDecodeOpt::default()).ok()?;
    let n = root.dict()?.lookup(b"incomplete")?.int()?;
    u32::try_from(n).ok()
}

/// When a node that has the image stops seeding it (sans-IO: elapsed time, upload counter and
/// the tracker's count of downloading peers in, a reason to stop out). Nodes of a cluster
/// booting together fetch the image in the same order, so the first to finish are the ones
/// the others were fetching from; when they left at once, the rest lost their sources
/// mid-piece and, at 64 nodes, stalled into the HTTP fallback.
#[derive(Debug)]
pub struct Linger {
    max: std::time::Duration,
    idle: std::time::Duration,
    uploaded: u64,
    last_upload: std::time::Duration,
}

impl Linger {
    pub fn new(max: std::time::Duration, idle: std::time::Duration, uploaded: u64) -> Self {
        Linger { max, idle, uploaded, last_upload: std::time::Duration::ZERO }
    }

    /// `None`: seed on. `incomplete` is the tracker's count of peers still downloading
    /// (`None` when it did not answer).
    pub fn step(
        &mut self,
        elapsed: std::time::Duration,
        uploaded: u64,
        incomplete: Option<u32>,
    ) -> Option<&'static str> {
        if uploaded > self.uploaded {
            self.uploaded = uploaded;
            self.last_upload = elapsed;
        }
        if incomplete == Some(0) {
            Some("no node is downloading any more")
        } else if elapsed.saturating_sub(self.last_upload) >= self.idle {
            Some("no peer fetched anything for a while")
        } else if elapsed >= self.max {
            Some("lingered as long as luna.linger allows")
        } else {
            None
        }
    }
}

/// Where the image came from and the peers librqbit knows: for the logs (a stalled swarm says
/// why) and the bench.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Verified-or-not bytes received from the servers' seeders and from other nodes.
    pub from_server: u64,
    pub from_nodes: u64,
    /// Nodes that sent us anything.
    pub nodes_fed_us: u32,
    /// Bytes uploaded, and to how many peers.
    pub uploaded: u64,
    pub fed_peers: u32,
    /// Peers by librqbit's state: connected, being connected, waiting to be tried, in
    /// reconnect backoff after an error, done with (left without error).
    pub live: u32,
    pub connecting: u32,
    pub queued: u32,
    pub dead: u32,
    pub not_needed: u32,
    pub seen: u32,
    pub server_live: bool,
    /// Connection errors over all peers.
    pub errors: u32,
}

impl Census {
    fn add_peer(&mut self, server: bool, live: bool, fetched: u64, uploaded: u64, errors: u32) {
        if server {
            self.from_server += fetched;
            self.server_live |= live;
        } else {
            self.from_nodes += fetched;
            self.nodes_fed_us += u32::from(fetched > 0);
        }
        self.fed_peers += u32::from(uploaded > 0);
        self.errors += errors;
    }
}

impl std::fmt::Display for Census {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "swarm census: {} bytes from the server ({}connected), {} bytes from {} nodes, {} bytes uploaded \
             to {} peers; peers seen {}, live {}, connecting {}, queued {}, in backoff {}, done {}; {} connection errors",
            self.from_server,
            if self.server_live { "" } else { "not " },
            self.from_nodes,
            self.nodes_fed_us,
            self.uploaded,
            self.fed_peers,
            self.seen,
            self.live,
            self.connecting,
            self.queued,
            self.dead,
            self.not_needed,
            self.errors
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announce_query_encodes_binary_values() {
        let q = announce_query(&[0xff; 20], b"-LU0001-abcdefghij+ ", 6881, 1, 2, 0, "completed");
        assert!(q.starts_with("info_hash=%FF%FF"), "{q}");
        assert!(
            q.contains("&peer_id=-LU0001-abcdefghij%2B%20&port=6881&uploaded=1&downloaded=2&left=0&event=completed"),
            "{q}"
        );
    }

    #[test]
    fn announce_without_event_has_no_event_key() {
        let q = announce_query(&[1; 20], &[2; 20], 1, 0, 0, 0, "");
        assert!(!q.contains("event="), "{q}");
        assert!(q.ends_with("&left=0&compact=1"), "{q}");
    }

    #[test]
    fn incomplete_is_read_from_the_trackers_answer() {
        assert_eq!(incomplete_in(b"d8:completei3e10:incompletei7e8:intervali30e5:peers0:e"), Some(7));
        assert_eq!(incomplete_in(b"d14:failure reason3:bade"), None);
        assert_eq!(incomplete_in(b"d10:incompletei-1ee"), None);
        assert_eq!(incomplete_in(b"not bencode"), None);
    }

    #[test]
    fn linger_stops_when_nobody_downloads_nobody_fetches_or_time_is_up() {
        let s = std::time::Duration::from_secs;
        let mut l = Linger::new(s(60), s(10), 100);
        assert_eq!(l.step(s(0), 100, Some(5)), None, "nodes downloading: seed on");
        assert_eq!(l.step(s(9), 100, None), None, "the tracker did not answer: seed on while not idle");
        assert_eq!(l.step(s(10), 100, Some(5)), Some("no peer fetched anything for a while"));
        let mut l = Linger::new(s(60), s(10), 100);
        for t in 1..60 {
            assert_eq!(l.step(s(t), 100 + t, Some(3)), None, "uploading at {t} s");
        }
        assert_eq!(l.step(s(60), 200, Some(3)), Some("lingered as long as luna.linger allows"));
        let mut l = Linger::new(s(60), s(10), 0);
        assert_eq!(l.step(s(1), 5, Some(0)), Some("no node is downloading any more"));
    }

    #[test]
    fn census_tells_the_server_from_the_nodes() {
        let mut c = Census::default();
        c.add_peer(true, true, 1000, 0, 0);
        c.add_peer(false, true, 300, 50, 1);
        c.add_peer(false, false, 0, 20, 2);
        c.add_peer(false, false, 0, 0, 0);
        assert_eq!((c.from_server, c.from_nodes, c.nodes_fed_us, c.fed_peers, c.errors), (1000, 300, 1, 2, 3));
        assert!(c.server_live);
        assert!(c.to_string().contains("1000 bytes from the server (connected), 300 bytes from 1 nodes"), "{c}");
    }

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
    fn evicts_what_is_behind_the_reader_and_never_an_unread_wanted_piece() {
        let w = window(12, 4); // a span of 3 pieces
        let sizes = |_| 4;
        for i in 0..3u32 {
            w.write(u64::from(i) * 4, b"dddd", &sizes).unwrap();
            w.completed(i);
        }
        w.set_consumed(4); // piece 0 read
        w.write(12, b"eeee", &sizes).unwrap();
        let mut b = [0u8; 4];
        assert!(w.read(0, &mut b).is_err(), "read piece evicted");
        assert_eq!(w.held_bytes(), 12);
        w.completed(3);
        // Nothing behind the reader, everything wanted: over the cap rather than drop one.
        w.write(16, b"ffff", &sizes).unwrap();
        assert!(!w.evicted_unread());
        assert!((1..5u32).all(|i| w.read(u64::from(i) * 4, &mut b).is_ok()));
        assert_eq!(w.peak_bytes(), 16, "the cap plus the piece being filled");
        // A piece past the span (librqbit was not asked for it) goes first, unread or not.
        w.completed(4);
        w.write(40, b"gggg", &sizes).unwrap();
        w.completed(10);
        w.set_consumed(8); // piece 1 read
        w.write(20, b"hhhh", &sizes).unwrap();
        assert!(w.read(4, &mut b).is_err(), "read piece 1 went first");
        w.write(24, b"iiii", &sizes).unwrap();
        assert!(w.evicted_unread());
        assert!(w.read(40, &mut b).is_err(), "the unwanted piece 10 went next");
        assert!(w.read(8, &mut b).is_ok());
    }

    #[test]
    fn late_writes_to_complete_pieces_are_ignored() {
        let w = window(16, 4);
        let sizes = |_| 4;
        w.write(0, b"aaaa", &sizes).unwrap();
        w.completed(0);
        w.write(4, b"bbbb", &sizes).unwrap();
        w.completed(1);
        w.set_consumed(6); // piece 0 read and evictable, piece 1 being read
        w.write(4, b"xx", &sizes).unwrap();
        let mut b = [0u8; 4];
        w.read(4, &mut b).unwrap();
        assert_eq!(&b, b"bbbb", "a verified piece is not overwritten");
        w.write(8, b"cccc", &sizes).unwrap();
        w.write(12, b"dddd", &sizes).unwrap();
        w.write(16, b"eeee", &sizes).unwrap(); // over the cap: piece 0 goes
        assert!(w.read(0, &mut b).is_err());
        let held = w.held_bytes();
        w.write(0, b"zzzz", &sizes).unwrap();
        assert_eq!(w.held_bytes(), held, "a late write behind the reader takes no memory");
        assert!(w.read(0, &mut b).is_err());
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
    fn librqbit_may_request_only_the_window_ahead_of_the_reader() {
        let w = window(16, 4); // room for 4 pieces
        let woken = Arc::new(AtomicU64::new(0));
        let w2 = woken.clone();
        let _ = w.wake.set(Box::new(move || {
            w2.fetch_add(1, Ordering::Relaxed);
        }));
        // Before the reader starts: only the first window's worth, never the far pieces
        // (the regression: librqbit fetched on, the window dropped unread pieces it still
        // announced, and the reader failed on them).
        assert!((0..4).all(|i| w.wants(i)));
        assert!(!w.wants(4));
        assert!(!w.wants(400));
        w.set_consumed(3);
        assert_eq!(woken.load(Ordering::Relaxed), 0, "still in piece 0: nothing new is wanted");
        w.set_consumed(9); // in piece 2
        assert_eq!(woken.load(Ordering::Relaxed), 1, "the window moved: idle peers look again");
        assert!(!w.wants(1), "read already");
        assert!(w.wants(2) && w.wants(5));
        assert!(!w.wants(6));
    }

    #[test]
    fn a_window_of_wanted_pieces_never_drops_an_unread_one() {
        // librqbit writes only wanted pieces, in any order; the reader lags behind.
        let w = window(16, 4);
        let sizes = |_| 4;
        let mut next_unwritten = 0u32;
        for step in 0..40u32 {
            // Fill every wanted piece, farthest first.
            let wanted: Vec<u32> = (next_unwritten..next_unwritten + 8).filter(|i| w.wants(*i)).collect();
            for &i in wanted.iter().rev() {
                w.write(u64::from(i) * 4, b"pppp", &sizes).unwrap();
                w.completed(i);
            }
            next_unwritten = wanted.last().map_or(next_unwritten, |l| l + 1);
            // The reader takes one piece every other step.
            if step % 2 == 1 {
                let read = step / 2;
                let mut b = [0u8; 4];
                w.read(u64::from(read) * 4, &mut b).unwrap();
                w.set_consumed(u64::from(read + 1) * 4);
            }
            assert!(w.held_bytes() <= 16 + 4, "held {} at step {step}", w.held_bytes());
        }
        assert!(!w.evicted_unread());
        assert!(w.peak_bytes() <= 20);
    }

    #[test]
    fn parks_after_fallback() {
        let w = window(16, 4);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let _ = w.set_rate.set(Box::new(move |bps| s2.lock().push(bps.map(|b| b.get()))));
        let sizes = |_| 4;
        w.write(0, b"aaaa", &sizes).unwrap();
        w.write(4, b"bbbb", &sizes).unwrap();
        w.write(8, b"cc", &sizes).unwrap();
        assert_eq!(w.rate_limit(), None, "the window bounds what is fetched, not a rate");
        w.park();
        assert_eq!(w.rate_limit(), Some(u64::from(PARKED_BPS)));
        w.set_consumed(12);
        assert_eq!(w.rate_limit(), Some(u64::from(PARKED_BPS)), "parked for good");
        assert_eq!(*seen.lock(), vec![Some(PARKED_BPS)]);
    }
}
