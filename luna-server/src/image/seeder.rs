//! The server's seeder: every kept revision of every osimage, seeded from the archive in its
//! revision directory (librqbit's output folder is that directory, so the file is complete and
//! nothing is downloaded), on a configured address, with DHT, LSD and UPnP off; the tracker is the
//! one in the torrent (ours).
//!
//! Restarts do not re-hash gigabytes: librqbit 9.1's fast-resume (`SessionOptions::fastresume`
//! with its JSON persistence) keeps one bitfield file per torrent and, on add, only spot-checks
//! pieces (one per file plus a random sample). For a freshly packed revision there is no bitfield
//! yet, but packing computed every piece hash from the bytes it wrote, so we write the "all
//! pieces present" bitfield ourselves when the revision's `.verified` marker (size, mtime, inode
//! of the archive when it was hashed) still matches the file. When it does not match (the archive
//! was modified or replaced), the bitfield is deleted, librqbit re-checks every piece, and a
//! revision with bad pieces is reported unhealthy: librqbit never serves a piece it does not have.
//! A damage that leaves size and mtime alone (bit rot) is found by the spot-check or by nodes,
//! which verify each piece and fetch it elsewhere.
//!
//! Which torrents are seeded comes from the store, not from librqbit's session file, which is
//! removed at start (the bitfields stay).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use librqbit::api::TorrentIdOrHash;
use librqbit::dht::Id20;
use librqbit::limits::LimitsConfig;
use librqbit::{
    AddTorrent, AddTorrentOptions, ListenerMode, ListenerOptions, Session, SessionOptions, SessionPersistenceConfig,
    TorrentStatsState,
};
use luna_core::model::{AnyObject, Kind};
use tokio::sync::watch;

use super::metainfo;
use super::pack::{Verified, SQUASHFS_VERIFIED_MARKER, VERIFIED_MARKER};
use super::{ImageState, SeedStatus};

#[derive(Debug, thiserror::Error)]
pub enum SeederError {
    #[error("cannot start the seeder on {addr}: {reason}")]
    Start { addr: SocketAddr, reason: String },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Service(#[from] crate::service::ServiceError),
}

/// Tells the tracker about the seeder: `(info_hash, address peers should connect to)`.
pub type PeerRegistrar = Arc<dyn Fn([u8; 20], SocketAddrV4) + Send + Sync>;

#[derive(Debug, Clone)]
struct Seeded {
    image: String,
    rev: u32,
    dir: PathBuf,
    archive: String,
    /// Its `.verified` marker's name (the archive's or the squashfs's).
    marker: &'static str,
    /// The archive did not match its marker: librqbit re-checked every piece.
    rechecked: bool,
    registered: bool,
}

pub struct Seeder {
    session: Arc<Session>,
    state: Arc<ImageState>,
    state_dir: PathBuf,
    listen: SocketAddr,
    register: Option<PeerRegistrar>,
    seeded: Mutex<HashMap<[u8; 20], Seeded>>,
    /// Revisions added with every piece to be checked (their marker did not match).
    full_checks: std::sync::atomic::AtomicUsize,
}

/// A revision that should be seeded.
#[derive(Debug, Clone)]
struct Wanted {
    image: String,
    rev: u32,
    dir: PathBuf,
    torrent: Vec<u8>,
    summary: metainfo::TorrentSummary,
    marker: &'static str,
}

/// Keep-alive to every node. librqbit (the nodes' agent too) drops a connection on which nothing
/// arrived for 10 s but sends keep-alives only every 120 s: a node that fetched its pieces from
/// other nodes for 10 s lost its connection to the seeder, and came back only after librqbit's
/// reconnect backoff (10 s, then 60 s, then 360 s).
const SEEDER_KEEP_ALIVE: Duration = Duration::from_secs(4);

/// librqbit's live-peer limit for `[image] seeder_peer_slots` (0 = librqbit's default).
fn slots(configured: u32) -> Option<usize> {
    (configured > 0).then_some(configured as usize)
}

/// librqbit's fast-resume bitfield: one bit per piece, most significant bit first.
pub fn full_bitfield(pieces: usize) -> Vec<u8> {
    let mut v = vec![0xffu8; pieces.div_ceil(8)];
    if !pieces.is_multiple_of(8) {
        if let Some(last) = v.last_mut() {
            *last = 0xffu8 << (8 - pieces % 8);
        }
    }
    v
}

fn bitv_path(state_dir: &Path, info_hash: &[u8; 20]) -> PathBuf {
    state_dir.join(format!("{}.bitv", hex::encode(info_hash)))
}

impl Seeder {
    /// Starts the BitTorrent session and seeds what the store lists. `register` is called once per
    /// torrent when it is fully verified, with the address the tracker should hand out.
    pub async fn start(state: Arc<ImageState>, register: Option<PeerRegistrar>) -> Result<Arc<Seeder>, SeederError> {
        let listen = state.config.seed_listen;
        let state_dir = state.layout.seeder_dir();
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| SeederError::Io { what, path, source }
        };
        std::fs::create_dir_all(&state_dir).map_err(io("cannot create", &state_dir))?;
        for f in ["session.json", "session.json.tmp"] {
            let p = state_dir.join(f);
            if p.exists() {
                std::fs::remove_file(&p).map_err(io("cannot remove", &p))?;
            }
        }
        let limit = state.config.upload_limit_bytes_per_s.min(u64::from(u32::MAX)) as u32;
        let opts = SessionOptions {
            dht: None,
            fastresume: true,
            persistence: Some(SessionPersistenceConfig::Json { folder: Some(state_dir.clone()) }),
            listen: Some(ListenerOptions {
                // uTP too, on the same port: transmission tries uTP first and, refused with ICMP
                // port-unreachable, never falls back to TCP.
                mode: ListenerMode::TcpAndUtp,
                listen_addr: listen,
                enable_upnp_port_forwarding: false,
                ipv4_only: listen.is_ipv4(),
                ..Default::default()
            }),
            disable_local_service_discovery: true,
            ipv4_only: listen.is_ipv4(),
            ratelimits: LimitsConfig { upload_bps: NonZeroU32::new(limit), download_bps: None },
            ..Default::default()
        };
        let session = Session::new_with_opts(state_dir.join("downloads"), opts)
            .await
            .map_err(|e| SeederError::Start { addr: listen, reason: format!("{e:#}") })?;
        let listen = session.listen_addr().unwrap_or(listen);
        tracing::info!(%listen, upload_slots = state.config.seeder_peer_slots, "seeder listening");
        let s = Arc::new(Seeder {
            session,
            state,
            state_dir,
            listen,
            register,
            seeded: Mutex::new(HashMap::new()),
            full_checks: Default::default(),
        });
        s.reconcile().await?;
        Ok(s)
    }

    /// How many revisions this seeder had to check piece by piece since it started (their
    /// archive did not match its `.verified` marker).
    pub fn full_checks(&self) -> usize {
        self.full_checks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The address peers connect to (the port is the real one when 0 was configured).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The address the tracker hands out for us: the listen address, or the cluster's frontend
    /// address with our port when listening on all addresses.
    async fn public_addr(&self) -> Option<SocketAddrV4> {
        match self.listen.ip() {
            IpAddr::V4(ip) if !ip.is_unspecified() => Some(SocketAddrV4::new(ip, self.listen.port())),
            _ => {
                let fe = self.state.service.cluster().await.ok()?.frontend_address?;
                Some(SocketAddrV4::new(fe, self.listen.port()))
            }
        }
    }

    async fn wanted(&self) -> Result<HashMap<[u8; 20], Wanted>, SeederError> {
        let mut out: HashMap<[u8; 20], Wanted> = HashMap::new();
        for o in self.state.service.list(Kind::Osimage).await? {
            let AnyObject::Osimage(img) = o else { continue };
            // Every revision's archive, and its squashfs when it has one (overlay nodes).
            let files = img.revisions.iter().flat_map(|r| {
                std::iter::once((r, r.torrent.as_str(), VERIFIED_MARKER))
                    .chain(r.squashfs.as_ref().map(|s| (r, s.torrent.as_str(), SQUASHFS_VERIFIED_MARKER)))
            });
            for (r, torrent_file, marker) in files {
                let dir = self.state.layout.revision_dir(&img.name, r.id);
                let torrent = match std::fs::read(dir.join(torrent_file)) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(image = %img.name, rev = r.id, error = %e, "cannot read torrent; not seeding");
                        continue;
                    }
                };
                let summary = match metainfo::parse(&torrent) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(image = %img.name, rev = r.id, error = %e, "bad torrent; not seeding");
                        continue;
                    }
                };
                // Revisions sharing an archive (boot-only packs) share the torrent: seed the newest.
                let newer = out.get(&summary.info_hash).is_none_or(|w| w.rev < r.id);
                if newer {
                    out.insert(
                        summary.info_hash,
                        Wanted { image: img.name.clone(), rev: r.id, dir, torrent, summary, marker },
                    );
                }
            }
        }
        Ok(out)
    }

    /// Brings the session in line with the store: adds kept revisions, drops the others.
    pub async fn reconcile(&self) -> Result<(), SeederError> {
        let wanted = self.wanted().await?;
        let current: Vec<([u8; 20], Seeded)> =
            self.seeded.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (*k, v.clone())).collect();
        for (hash, s) in current {
            let keep = wanted.get(&hash).is_some_and(|w| w.dir == s.dir);
            if !keep {
                tracing::info!(image = %s.image, rev = s.rev, "no longer seeding");
                if let Err(e) = self.session.delete(TorrentIdOrHash::Hash(Id20::new(hash)), false).await {
                    tracing::warn!(image = %s.image, rev = s.rev, error = %format!("{e:#}"), "cannot remove torrent");
                }
                self.seeded.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
                if let Ok(mut m) = self.state.seeding.write() {
                    m.remove(&hex::encode(hash));
                }
            }
        }
        for (hash, w) in wanted {
            let known = self.seeded.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&hash);
            if !known {
                self.add(hash, w).await;
            }
        }
        self.refresh().await;
        Ok(())
    }

    async fn add(&self, hash: [u8; 20], w: Wanted) {
        let archive = w.dir.join(&w.summary.name);
        let marker_ok = Verified::read_named(&w.dir, w.marker)
            .is_some_and(|v| v.info_hash == hex::encode(hash) && v.matches(&archive));
        let bitv = bitv_path(&self.state_dir, &hash);
        if marker_ok {
            if !bitv.exists() {
                if let Err(e) = std::fs::write(&bitv, full_bitfield(w.summary.pieces)) {
                    tracing::warn!(path = %bitv.display(), error = %e, "cannot write fast-resume bitfield; librqbit will hash the archive");
                }
            }
        } else {
            self.full_checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                image = %w.image, rev = w.rev,
                "archive differs from what was packed (size, mtime or inode changed); checking every piece"
            );
            if let Err(e) = std::fs::remove_file(&bitv) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %bitv.display(), error = %e, "cannot remove fast-resume bitfield");
                }
            }
        }
        let opts = AddTorrentOptions {
            output_folder: Some(w.dir.to_string_lossy().into_owned()),
            overwrite: true,
            paused: false,
            // Upload slots: the peers beyond them are refused (librqbit drops incoming peers
            // above its live-peer limit) and get the pieces from the slot holders.
            peer_limit: slots(self.state.config.seeder_peer_slots),
            super_seed: self.state.config.seeder_super_seed,
            peer_opts: Some(librqbit::PeerConnectionOptions {
                keep_alive_interval: Some(SEEDER_KEEP_ALIVE),
                ..Default::default()
            }),
            ..Default::default()
        };
        match self.session.add_torrent(AddTorrent::from_bytes(w.torrent.clone()), Some(opts)).await {
            Ok(_) => {
                tracing::info!(image = %w.image, rev = w.rev, info_hash = %hex::encode(hash), "seeding");
                self.seeded.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    hash,
                    Seeded {
                        image: w.image,
                        rev: w.rev,
                        dir: w.dir,
                        archive: w.summary.name,
                        marker: w.marker,
                        rechecked: !marker_ok,
                        registered: false,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(image = %w.image, rev = w.rev, error = %format!("{e:#}"), "cannot seed");
                if let Ok(mut m) = self.state.seeding.write() {
                    m.insert(
                        hex::encode(hash),
                        SeedStatus { state: "error".into(), error: Some(format!("{e:#}")), ..Default::default() },
                    );
                }
            }
        }
    }

    /// Updates the status of every seeded torrent; registers newly verified ones with the tracker
    /// and renews the marker of archives that passed a full re-check.
    pub async fn refresh(&self) {
        let entries: Vec<([u8; 20], Seeded)> =
            self.seeded.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (*k, v.clone())).collect();
        let public = self.public_addr().await;
        for (hash, s) in entries {
            let Some(h) = self.session.get(TorrentIdOrHash::Hash(Id20::new(hash))) else { continue };
            let st = h.stats();
            let state = st.state.to_string();
            let live = matches!(st.state, TorrentStatsState::Live);
            let healthy = live && st.total_bytes > 0 && st.progress_bytes == st.total_bytes;
            let status = SeedStatus {
                state,
                healthy,
                have_bytes: st.progress_bytes,
                total_bytes: st.total_bytes,
                uploaded_bytes: st.uploaded_bytes,
                peers: st.live.as_ref().map(|l| l.snapshot.peer_stats.live).unwrap_or(0),
                error: st.error.clone().or_else(|| {
                    (live && !healthy).then(|| {
                        format!(
                            "archive is damaged: {} of {} bytes verified; bad pieces are not served",
                            st.progress_bytes, st.total_bytes
                        )
                    })
                }),
            };
            if live && !healthy {
                tracing::warn!(image = %s.image, rev = s.rev, have = st.progress_bytes, total = st.total_bytes, "revision unhealthy");
            }
            if healthy && s.rechecked {
                // Every piece matched the torrent, so the archive is the packed one: trust it again.
                let archive = s.dir.join(&s.archive);
                if let Some(old) = Verified::read_named(&s.dir, s.marker) {
                    match Verified::of(&archive, &old.sha256, &old.info_hash)
                        .and_then(|v| v.write_named(&s.dir, s.marker))
                    {
                        Ok(()) => tracing::info!(image = %s.image, rev = s.rev, "archive re-verified"),
                        Err(e) => {
                            tracing::warn!(image = %s.image, rev = s.rev, error = %e, "cannot renew {}", s.marker)
                        }
                    }
                }
            }
            let mut register_now = false;
            if let Some(e) = self.seeded.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&hash) {
                if healthy {
                    e.rechecked = false;
                    if !e.registered && public.is_some() && self.register.is_some() {
                        e.registered = true;
                        register_now = true;
                    }
                }
            }
            if register_now {
                if let (Some(reg), Some(addr)) = (&self.register, public) {
                    reg(hash, addr);
                }
            }
            if let Ok(mut m) = self.state.seeding.write() {
                m.insert(hex::encode(hash), status);
            }
        }
    }

    /// Downloads a torrent into `out_dir` through this seeder's session (the swarm: `peers`,
    /// the other servers' seeders, and the torrent's trackers), then drops it from the session
    /// (the files stay) so that the caller can verify and publish the directory. Gives up when
    /// no byte arrived for `stall`.
    pub async fn fetch(
        &self,
        torrent: Vec<u8>,
        out_dir: &Path,
        peers: Vec<SocketAddr>,
        stall: Duration,
    ) -> Result<(), String> {
        let summary = metainfo::parse(&torrent).map_err(|e| e.to_string())?;
        let id = TorrentIdOrHash::Hash(Id20::new(summary.info_hash));
        let opts = AddTorrentOptions {
            output_folder: Some(out_dir.to_string_lossy().into_owned()),
            overwrite: true,
            paused: false,
            initial_peers: Some(peers),
            ..Default::default()
        };
        // A torrent of the same hash must not be in the session (a second fetch, or seeding).
        if self.session.get(id).is_some() {
            return Err("torrent is already in the seeder's session".into());
        }
        let handle = self
            .session
            .add_torrent(AddTorrent::from_bytes(torrent), Some(opts))
            .await
            .map_err(|e| format!("cannot add the torrent: {e:#}"))?
            .into_handle()
            .ok_or("librqbit listed the torrent only")?;
        let mut last = (0u64, tokio::time::Instant::now());
        let result = loop {
            let st = handle.stats();
            if st.total_bytes > 0 && st.progress_bytes == st.total_bytes && st.finished {
                break Ok(());
            }
            if let Some(e) = st.error {
                break Err(format!("download failed: {e}"));
            }
            if st.progress_bytes > last.0 {
                last = (st.progress_bytes, tokio::time::Instant::now());
            } else if last.1.elapsed() > stall {
                break Err(format!(
                    "no progress for {} s ({} of {} bytes)",
                    stall.as_secs(),
                    st.progress_bytes,
                    st.total_bytes
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        if let Err(e) = self.session.delete(id, false).await {
            tracing::warn!(error = %format!("{e:#}"), "cannot drop a fetched torrent from the session");
        }
        result
    }

    /// Seeder status by hex info hash.
    pub fn status(&self) -> HashMap<String, SeedStatus> {
        self.state.seeding.read().map(|m| m.clone()).unwrap_or_default()
    }

    /// Reconciles when revisions change (and every minute, for changes made by other servers),
    /// refreshes status every few seconds, and stops the session when `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut changed = self.state.changed.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let mut since_reconcile = 0u32;
        loop {
            tokio::select! {
                r = changed.changed() => {
                    if r.is_err() { break; }
                    if let Err(e) = self.reconcile().await {
                        tracing::warn!(error = %e, "seeder reconcile failed");
                    }
                    since_reconcile = 0;
                }
                _ = tick.tick() => {
                    since_reconcile += 1;
                    if since_reconcile >= 30 {
                        since_reconcile = 0;
                        if let Err(e) = self.reconcile().await {
                            tracing::warn!(error = %e, "seeder reconcile failed");
                        }
                    } else {
                        self.refresh().await;
                    }
                }
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() { break; }
                }
            }
        }
        self.stop().await;
    }

    /// Stops seeding (flushing fast-resume state).
    pub async fn stop(&self) {
        self.session.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_slots_means_librqbits_default_limit() {
        assert_eq!(slots(0), None);
        assert_eq!(slots(1), Some(1));
        assert_eq!(slots(super::super::DEFAULT_SEEDER_PEER_SLOTS), Some(8));
    }

    #[test]
    fn bitfield_sets_one_bit_per_piece_msb_first() {
        assert_eq!(full_bitfield(0), Vec::<u8>::new());
        assert_eq!(full_bitfield(1), vec![0x80]);
        assert_eq!(full_bitfield(8), vec![0xff]);
        assert_eq!(full_bitfield(11), vec![0xff, 0xe0]);
    }
}
