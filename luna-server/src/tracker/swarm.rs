//! The sans-IO tracker state: swarms of peers per torrent, peer selection, expiry and counters.
//! Requests and the current `Instant` go in, responses come out; no sockets, no clock, no store.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use luna_core::model::Cluster;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{AnnounceRequest, Event, InfoHash, PeerId, TrackerError, DEFAULT_NUMWANT};

/// Names a switch (rack). Peers behind the same switch are preferred for each other.
pub type SwitchId = Arc<str>;

/// Where machines sit in the network. The tracker asks it on every announce while holding its
/// lock, so it must answer from memory, quickly, without blocking (e.g. from a snapshot of the
/// nodes' switches that is replaced when the store changes).
pub trait Topology: Send + Sync {
    /// The switch the machine with this address hangs off, if known.
    fn switch_of(&self, ip: Ipv4Addr) -> Option<SwitchId>;
}

impl<F> Topology for F
where
    F: Fn(Ipv4Addr) -> Option<SwitchId> + Send + Sync,
{
    fn switch_of(&self, ip: Ipv4Addr) -> Option<SwitchId> {
        self(ip)
    }
}

/// A topology that knows nothing: every peer is in the same single class.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTopology;

impl Topology for NoTopology {
    fn switch_of(&self, _ip: Ipv4Addr) -> Option<SwitchId> {
        None
    }
}

/// The shortest peer lifetime by default: libtorrent (qBittorrent, Deluge) announces at most
/// every 300 s whatever interval a tracker asks for (its `min_announce_interval`), so a peer must
/// outlive that plus a minute of slack (a slow announce, a retry) or a seeding libtorrent client
/// is listed only part of the time.
pub const DEFAULT_MIN_PEER_LIFETIME: u32 = 360;

/// The most torrents one tracker follows by default. Torrents the server registers (its images)
/// are always followed; beyond this, announces of unknown info hashes are refused, so random
/// info hashes cannot grow the tracker's memory without bound (a tracked torrent with one peer
/// costs a few hundred bytes: 10 000 of them a few MB).
pub const DEFAULT_MAX_TORRENTS: usize = 10_000;

/// Tracker settings. `interval` and `max_peers` come from the cluster object
/// ([`TrackerConfig::from_cluster`]); the caller updates them when the cluster changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Seconds between announces asked of clients (also sent as `min interval`).
    pub interval: u32,
    /// The most peers one announce returns, whatever `numwant` says.
    pub max_peers: u32,
    /// Take the peer's address from the `ip` parameter; otherwise (the default) from the
    /// connection. Trusting it lets anyone on the network register any address as a peer.
    pub trust_ip_param: bool,
    /// A peer is kept `max(2 × interval, min_peer_lifetime)` seconds after its last announce.
    pub min_peer_lifetime: u32,
    /// The most torrents followed (the server's registered torrents always are).
    pub max_torrents: usize,
    /// The server's own seeder: a permanent peer of every torrent registered with
    /// [`Tracker::register_torrent`].
    pub seeder: Option<SocketAddrV4>,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        let cluster = Cluster::default();
        TrackerConfig {
            interval: cluster.tracker_interval,
            max_peers: cluster.tracker_max_peers,
            trust_ip_param: false,
            min_peer_lifetime: DEFAULT_MIN_PEER_LIFETIME,
            max_torrents: DEFAULT_MAX_TORRENTS,
            seeder: None,
        }
    }
}

impl TrackerConfig {
    /// Defaults with the cluster's announce interval and peer limit.
    pub fn from_cluster(cluster: &Cluster) -> Self {
        TrackerConfig { interval: cluster.tracker_interval, max_peers: cluster.tracker_max_peers, ..Default::default() }
    }

    /// How long a peer lives without announcing: two intervals, but never less than
    /// `min_peer_lifetime` (real clients announce less often than asked).
    pub fn peer_ttl(&self) -> Duration {
        Duration::from_secs((2 * u64::from(self.interval.max(1))).max(u64::from(self.min_peer_lifetime)))
    }
}

/// A peer handed to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// `None` for permanent peers, which never announced one.
    pub peer_id: Option<PeerId>,
    pub addr: SocketAddrV4,
}

/// The answer to an announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceResponse {
    pub interval: u32,
    /// Sent as `min interval`: clients should not announce more often than this.
    pub min_interval: u32,
    /// Seeders, permanent peers included.
    pub complete: u32,
    pub incomplete: u32,
    pub peers: Vec<Peer>,
}

/// One torrent in a scrape answer (BEP 48).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeEntry {
    pub info_hash: InfoHash,
    pub complete: u32,
    pub incomplete: u32,
    pub downloaded: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScrapeResponse {
    pub files: Vec<ScrapeEntry>,
}

/// Counters of one torrent, for the REST API and monitoring.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TorrentStats {
    #[serde(serialize_with = "hex_hash")]
    pub info_hash: InfoHash,
    /// Announced peers with nothing left to download.
    pub seeders: u32,
    pub leechers: u32,
    /// Permanent peers (the server's seeder); not part of `seeders`.
    pub permanent: u32,
    /// Peers that finished downloading (`event=completed` or `left` dropping to 0), once each.
    pub completed: u64,
    /// Sum over every peer seen of its latest `uploaded` report.
    pub uploaded: u64,
    /// Sum over every peer seen of its latest `downloaded` report.
    pub downloaded: u64,
    /// Registered by the server (kept even when nobody announces it).
    pub registered: bool,
}

fn hex_hash<S: serde::Serializer>(h: &InfoHash, s: S) -> Result<S::Ok, S::Error> {
    let mut text = String::with_capacity(40);
    for b in h {
        text.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        text.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    s.serialize_str(&text)
}

#[derive(Debug)]
struct PeerEntry {
    addr: SocketAddrV4,
    left: u64,
    uploaded: u64,
    downloaded: u64,
    last_seen: Instant,
    switch: Option<SwitchId>,
    /// Already counted in `Torrent::completed`.
    counted_complete: bool,
    /// Where the announce that registered this peer id came from (the connection's address,
    /// whatever `ip` said): only announces from there may change or stop it.
    source: IpAddr,
}

#[derive(Debug, Default)]
struct Torrent {
    peers: IndexMap<PeerId, PeerEntry>,
    /// Which peer holds an address: a client restarted with a new peer id replaces its old self.
    by_addr: HashMap<SocketAddrV4, PeerId>,
    /// Announced peers with `left == 0`.
    seeders: u32,
    permanent: Vec<SocketAddrV4>,
    /// Served by the configured seeder.
    registered: bool,
    completed: u64,
    uploaded: u64,
    downloaded: u64,
    /// No peer was seen before this: nothing can expire before `oldest + ttl`.
    oldest: Option<Instant>,
    /// Restored with completions by [`Tracker::restore`]: kept until then even without peers,
    /// so the server's seeder has time to register it again.
    keep_until: Option<Instant>,
}

impl Torrent {
    /// A peer id belongs to the address that registered it, and so does a peer address: an
    /// announce from elsewhere may neither change, stop nor replace them.
    fn check_owner(&self, req: &AnnounceRequest, addr: SocketAddrV4, source: IpAddr) -> Result<(), TrackerError> {
        if let Some(p) = self.peers.get(&req.peer_id) {
            if p.source != source {
                return Err(TrackerError::PeerIdElsewhere);
            }
        }
        if req.event != Event::Stopped {
            if let Some(holder) = self.by_addr.get(&addr).filter(|id| **id != req.peer_id) {
                if self.peers.get(holder).is_some_and(|p| p.source != source) {
                    return Err(TrackerError::AddressElsewhere(addr));
                }
            }
        }
        Ok(())
    }

    fn expire(&mut self, now: Instant, ttl: Duration) {
        if self.keep_until.is_some_and(|k| now >= k) {
            self.keep_until = None;
        }
        match self.oldest {
            Some(oldest) if now.saturating_duration_since(oldest) >= ttl => {}
            _ => return,
        }
        let Torrent { peers, by_addr, seeders, oldest, .. } = self;
        let mut new_oldest: Option<Instant> = None;
        peers.retain(|_, p| {
            if now.saturating_duration_since(p.last_seen) >= ttl {
                by_addr.remove(&p.addr);
                if p.left == 0 {
                    *seeders -= 1;
                }
                false
            } else {
                new_oldest = Some(new_oldest.map_or(p.last_seen, |o| o.min(p.last_seen)));
                true
            }
        });
        *oldest = new_oldest;
    }

    fn remove(&mut self, peer_id: &PeerId) -> Option<PeerEntry> {
        let p = self.peers.swap_remove(peer_id)?;
        if self.by_addr.get(&p.addr) == Some(peer_id) {
            self.by_addr.remove(&p.addr);
        }
        if p.left == 0 {
            self.seeders -= 1;
        }
        if self.peers.is_empty() {
            self.oldest = None;
        }
        Some(p)
    }

    /// The permanent peers in force, the configured seeder last.
    fn permanent_peers(&self, seeder: Option<SocketAddrV4>) -> Vec<SocketAddrV4> {
        let mut all = self.permanent.clone();
        if let Some(s) = seeder.filter(|_| self.registered) {
            if !all.contains(&s) {
                all.push(s);
            }
        }
        all
    }

    /// Permanent peers that do not also announce (a seeder that announces is counted once).
    fn permanent_count(&self, seeder: Option<SocketAddrV4>) -> u32 {
        let n = self.permanent_peers(seeder).iter().filter(|a| !self.by_addr.contains_key(a)).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn leechers(&self) -> u32 {
        debug_assert!(self.seeders as usize <= self.peers.len());
        u32::try_from(self.peers.len()).unwrap_or(u32::MAX).saturating_sub(self.seeders)
    }

    /// The bookkeeping agrees with the peers themselves.
    #[cfg(test)]
    fn check(&self) {
        let seeders = self.peers.values().filter(|p| p.left == 0).count();
        assert_eq!(self.seeders as usize, seeders, "seeder count");
        assert_eq!(self.by_addr.len(), self.peers.len(), "one address per peer");
        for (id, p) in &self.peers {
            assert_eq!(self.by_addr.get(&p.addr), Some(id), "address index");
        }
        if let Some(oldest) = self.oldest {
            assert!(self.peers.values().all(|p| p.last_seen >= oldest), "oldest is a lower bound");
        } else {
            assert!(self.peers.is_empty());
        }
    }

    /// Nothing worth keeping: no peers, not the server's, no permanent peers (and not just
    /// restored with completions).
    fn forgettable(&self) -> bool {
        self.peers.is_empty() && !self.registered && self.permanent.is_empty() && self.keep_until.is_none()
    }

    fn stats(&self, info_hash: InfoHash, seeder: Option<SocketAddrV4>) -> TorrentStats {
        TorrentStats {
            info_hash,
            seeders: self.seeders,
            leechers: self.leechers(),
            permanent: self.permanent_count(seeder),
            completed: self.completed,
            uploaded: self.uploaded,
            downloaded: self.downloaded,
            registered: self.registered,
        }
    }
}

/// The tracker's state. One `Tracker` is single-threaded; [`super::TrackerHandle`] shards several
/// behind mutexes.
pub struct Tracker {
    config: TrackerConfig,
    topology: Arc<dyn Topology>,
    torrents: HashMap<InfoHash, Torrent>,
    rng: StdRng,
    /// How many trackers share `config.max_torrents` (the shards of a [`super::TrackerHandle`]).
    share_of: usize,
    /// When every torrent is next checked for expired peers (torrents nobody announces to
    /// would otherwise keep their dead peers).
    next_sweep: Option<Instant>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker").field("config", &self.config).field("torrents", &self.torrents.len()).finish()
    }
}

impl Tracker {
    pub fn new(config: TrackerConfig, topology: Arc<dyn Topology>) -> Self {
        Self::sharded(config, topology, 1)
    }

    /// One of `shards` trackers that together follow at most `config.max_torrents` torrents.
    pub fn sharded(config: TrackerConfig, topology: Arc<dyn Topology>, shards: usize) -> Self {
        Tracker {
            config,
            topology,
            torrents: HashMap::new(),
            rng: StdRng::from_entropy(),
            share_of: shards.max(1),
            next_sweep: None,
        }
    }

    /// The most torrents this tracker follows.
    fn torrent_cap(&self) -> usize {
        self.config.max_torrents.div_ceil(self.share_of)
    }

    pub fn config(&self) -> &TrackerConfig {
        &self.config
    }

    pub fn set_config(&mut self, config: TrackerConfig) {
        self.config = config;
    }

    /// Makes `addr` a peer of the torrent that never expires and is handed out last.
    pub fn register_permanent_peer(&mut self, info_hash: InfoHash, addr: SocketAddrV4) {
        let t = self.torrents.entry(info_hash).or_default();
        if !t.permanent.contains(&addr) {
            t.permanent.push(addr);
        }
    }

    /// Undoes [`Tracker::register_permanent_peer`]; false if it was not registered.
    pub fn unregister_permanent_peer(&mut self, info_hash: &InfoHash, addr: SocketAddrV4) -> bool {
        let Some(t) = self.torrents.get_mut(info_hash) else { return false };
        let before = t.permanent.len();
        t.permanent.retain(|a| *a != addr);
        let removed = t.permanent.len() != before;
        if t.forgettable() {
            self.torrents.remove(info_hash);
        }
        removed
    }

    /// Marks a torrent as the server's: kept while nobody announces it, and served by the
    /// configured seeder (if any).
    pub fn register_torrent(&mut self, info_hash: InfoHash) {
        self.torrents.entry(info_hash).or_default().registered = true;
    }

    pub fn unregister_torrent(&mut self, info_hash: &InfoHash) {
        if let Some(t) = self.torrents.get_mut(info_hash) {
            t.registered = false;
            if t.forgettable() {
                self.torrents.remove(info_hash);
            }
        }
    }

    /// Handles one announce: records the requester (or forgets it on `stopped`) and picks peers
    /// for it. Fails, changing nothing, when the peer's IPv4 address cannot be told, when the
    /// peer id or the address belongs to a peer registered from another address, or when the
    /// torrent is unknown and the tracker follows as many torrents as it may.
    pub fn announce(&mut self, req: &AnnounceRequest, now: Instant) -> Result<AnnounceResponse, TrackerError> {
        let addr = req.peer_addr(self.config.trust_ip_param)?;
        let source = req.remote.ip().to_canonical();
        self.sweep_if_due(now);
        let ttl = self.config.peer_ttl();
        let seeder = self.config.seeder;
        let interval = self.config.interval;
        let mut resp =
            AnnounceResponse { interval, min_interval: interval, complete: 0, incomplete: 0, peers: Vec::new() };

        if req.event == Event::Stopped {
            if let Some(t) = self.torrents.get_mut(&req.info_hash) {
                t.expire(now, ttl);
                t.check_owner(req, addr, source)?;
                if let Some(p) = t.remove(&req.peer_id) {
                    // The final report still counts, a finish included (aria2 sends only
                    // `started` and then `stopped` with left=0).
                    t.uploaded = t.uploaded.saturating_sub(p.uploaded).saturating_add(req.uploaded);
                    t.downloaded = t.downloaded.saturating_sub(p.downloaded).saturating_add(req.downloaded);
                    if p.left > 0 && req.left == 0 && !p.counted_complete {
                        t.completed += 1;
                    }
                }
                resp.complete = t.seeders.saturating_add(t.permanent_count(seeder));
                resp.incomplete = t.leechers();
                if t.forgettable() {
                    self.torrents.remove(&req.info_hash);
                }
            }
            return Ok(resp);
        }

        if !self.torrents.contains_key(&req.info_hash) && self.torrents.len() >= self.torrent_cap() {
            // Dead peers may have left room.
            self.sweep(now);
            if self.torrents.len() >= self.torrent_cap() {
                return Err(TrackerError::TooManyTorrents(self.config.max_torrents));
            }
        }
        let switch = self.topology.switch_of(*addr.ip());
        let t = self.torrents.entry(req.info_hash).or_default();
        t.expire(now, ttl);
        if let Err(e) = t.check_owner(req, addr, source) {
            if t.forgettable() {
                self.torrents.remove(&req.info_hash);
            }
            return Err(e);
        }
        upsert(t, req, addr, source, switch.clone(), now);

        let want = req.numwant.unwrap_or(DEFAULT_NUMWANT).min(self.config.max_peers);
        resp.peers = select(t, req, addr, switch.as_ref(), want as usize, seeder, &mut self.rng);
        resp.complete = t.seeders.saturating_add(t.permanent_count(seeder));
        resp.incomplete = t.leechers();
        Ok(resp)
    }

    /// Counters for the given torrents, or for every torrent the server registered when
    /// `info_hashes` is empty (a full scrape never lists what strangers announced, so its size
    /// is the server's own images, not what anyone made up). Unknown torrents get zeros and
    /// are not tracked because of a scrape.
    pub fn scrape(&mut self, info_hashes: &[InfoHash], now: Instant) -> ScrapeResponse {
        self.sweep_if_due(now);
        let ttl = self.config.peer_ttl();
        let seeder = self.config.seeder;
        let entry = |h: InfoHash, t: Option<&mut Torrent>| match t {
            Some(t) => {
                t.expire(now, ttl);
                ScrapeEntry {
                    info_hash: h,
                    complete: t.seeders.saturating_add(t.permanent_count(seeder)),
                    incomplete: t.leechers(),
                    downloaded: t.completed,
                }
            }
            None => ScrapeEntry { info_hash: h, complete: 0, incomplete: 0, downloaded: 0 },
        };
        let files = if info_hashes.is_empty() {
            self.torrents.iter_mut().filter(|(_, t)| t.registered).map(|(h, t)| entry(*h, Some(t))).collect()
        } else {
            info_hashes.iter().map(|h| entry(*h, self.torrents.get_mut(h))).collect()
        };
        ScrapeResponse { files }
    }

    /// Forgets expired peers everywhere, and torrents left with nothing worth keeping.
    pub fn sweep(&mut self, now: Instant) {
        let ttl = self.config.peer_ttl();
        self.torrents.retain(|_, t| {
            t.expire(now, ttl);
            !t.forgettable()
        });
        self.next_sweep = Some(now + Duration::from_secs(u64::from(self.config.interval.max(1))));
    }

    fn sweep_if_due(&mut self, now: Instant) {
        match self.next_sweep {
            Some(at) if now < at => {}
            _ => self.sweep(now),
        }
    }

    /// Counters of every tracked torrent as of the last announce, scrape or sweep.
    pub fn stats(&self) -> Vec<TorrentStats> {
        self.torrents.iter().map(|(h, t)| t.stats(*h, self.config.seeder)).collect()
    }

    pub fn torrent_stats(&self, info_hash: &InfoHash) -> Option<TorrentStats> {
        self.torrents.get(info_hash).map(|t| t.stats(*info_hash, self.config.seeder))
    }

    /// The swarms as they are at `now`, to be [restored](Tracker::restore) by the next server
    /// start: every torrent with announced peers or completions, with each peer's idle time.
    /// Registration and permanent peers are left out (the seeder registers again).
    pub fn save(&self, now: Instant) -> Vec<SavedTorrent> {
        let mut out: Vec<SavedTorrent> = self
            .torrents
            .iter()
            .filter(|(_, t)| !t.peers.is_empty() || t.completed > 0)
            .map(|(h, t)| SavedTorrent {
                info_hash: hex::encode(h),
                completed: t.completed,
                uploaded: t.uploaded,
                downloaded: t.downloaded,
                peers: t
                    .peers
                    .iter()
                    .map(|(id, p)| SavedPeer {
                        peer_id: hex::encode(id),
                        addr: p.addr,
                        source: p.source,
                        left: p.left,
                        uploaded: p.uploaded,
                        downloaded: p.downloaded,
                        idle_s: now.saturating_duration_since(p.last_seen).as_secs(),
                        counted_complete: p.counted_complete,
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.info_hash.cmp(&b.info_hash));
        out
    }

    /// Takes back what [`Tracker::save`] gave, `since` after it was saved: counters are added,
    /// peers keep what was left of their lifetime (those past it are dropped), so a server
    /// restart neither forgets a seeding client that announces only every few minutes nor
    /// counts its completion again. Meant for a fresh tracker; a restored torrent with completions but no live peers is kept for one peer
    /// lifetime, for the server's seeder to register it again. Bad entries (a malformed hash or peer id, an
    /// address or peer id already held) are skipped; returns how many peers were restored.
    pub fn restore(&mut self, saved: &[SavedTorrent], now: Instant, since: Duration) -> usize {
        let ttl = self.config.peer_ttl();
        let cap = self.torrent_cap();
        let mut restored = 0;
        for st in saved {
            let Some(hash) = decode_id(&st.info_hash) else { continue };
            if !self.torrents.contains_key(&hash) && self.torrents.len() >= cap {
                continue;
            }
            let t = self.torrents.entry(hash).or_default();
            if st.completed > 0 {
                t.keep_until = Some(now + ttl);
            }
            t.completed = t.completed.saturating_add(st.completed);
            t.uploaded = t.uploaded.saturating_add(st.uploaded);
            t.downloaded = t.downloaded.saturating_add(st.downloaded);
            for sp in &st.peers {
                let Some(id) = decode_id(&sp.peer_id) else { continue };
                let idle = Duration::from_secs(sp.idle_s).saturating_add(since);
                let Some(last_seen) = now.checked_sub(idle).filter(|_| idle < ttl) else { continue };
                if t.peers.contains_key(&id) || t.by_addr.contains_key(&sp.addr) {
                    continue;
                }
                if sp.left == 0 {
                    t.seeders += 1;
                }
                t.peers.insert(
                    id,
                    PeerEntry {
                        addr: sp.addr,
                        left: sp.left,
                        uploaded: sp.uploaded,
                        downloaded: sp.downloaded,
                        last_seen,
                        switch: self.topology.switch_of(*sp.addr.ip()),
                        counted_complete: sp.counted_complete,
                        source: sp.source,
                    },
                );
                t.by_addr.insert(sp.addr, id);
                t.oldest = Some(t.oldest.map_or(last_seen, |o| o.min(last_seen)));
                restored += 1;
            }
        }
        self.torrents.retain(|_, t| !t.forgettable());
        restored
    }
}

fn decode_id(text: &str) -> Option<[u8; 20]> {
    hex::decode(text).ok()?.try_into().ok()
}

/// One torrent as [`Tracker::save`] keeps it across a server restart.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedTorrent {
    /// Hex.
    pub info_hash: String,
    pub completed: u64,
    pub uploaded: u64,
    pub downloaded: u64,
    pub peers: Vec<SavedPeer>,
}

/// One announced peer as [`Tracker::save`] keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedPeer {
    /// Hex.
    pub peer_id: String,
    pub addr: SocketAddrV4,
    /// Where its announces come from.
    pub source: IpAddr,
    pub left: u64,
    pub uploaded: u64,
    pub downloaded: u64,
    /// Seconds since its last announce when saved.
    pub idle_s: u64,
    /// Its completion is already counted.
    pub counted_complete: bool,
}

/// Records the requester's announce in its torrent.
fn upsert(
    t: &mut Torrent,
    req: &AnnounceRequest,
    addr: SocketAddrV4,
    source: IpAddr,
    switch: Option<SwitchId>,
    now: Instant,
) {
    let completed_event = req.event == Event::Completed;
    if let Some(p) = t.peers.get_mut(&req.peer_id) {
        let finished = p.left > 0 && req.left == 0;
        match (p.left == 0, req.left == 0) {
            (false, true) => t.seeders += 1,
            (true, false) => t.seeders -= 1,
            _ => {}
        }
        t.uploaded = t.uploaded.saturating_sub(p.uploaded).saturating_add(req.uploaded);
        t.downloaded = t.downloaded.saturating_sub(p.downloaded).saturating_add(req.downloaded);
        p.left = req.left;
        p.uploaded = req.uploaded;
        p.downloaded = req.downloaded;
        p.last_seen = now;
        p.switch = switch;
        if (finished || completed_event) && !p.counted_complete {
            p.counted_complete = true;
            t.completed += 1;
        }
        if p.addr != addr {
            let old = std::mem::replace(&mut p.addr, addr);
            if t.by_addr.get(&old) == Some(&req.peer_id) {
                t.by_addr.remove(&old);
            }
            if let Some(other) = t.by_addr.insert(addr, req.peer_id) {
                if other != req.peer_id {
                    t.remove(&other);
                    t.by_addr.insert(addr, req.peer_id);
                }
            }
        }
        return;
    }

    // A new peer id at an address someone else holds: the same client, restarted.
    if let Some(other) = t.by_addr.get(&addr).copied() {
        t.remove(&other);
    }
    if req.left == 0 {
        t.seeders += 1;
    }
    t.uploaded = t.uploaded.saturating_add(req.uploaded);
    t.downloaded = t.downloaded.saturating_add(req.downloaded);
    if completed_event {
        t.completed += 1;
    }
    t.peers.insert(
        req.peer_id,
        PeerEntry {
            addr,
            left: req.left,
            uploaded: req.uploaded,
            downloaded: req.downloaded,
            last_seen: now,
            switch,
            counted_complete: completed_event,
            source,
        },
    );
    t.by_addr.insert(addr, req.peer_id);
    t.oldest.get_or_insert(now);
}

/// Picks up to `want` peers for the requester; the rule is in the module documentation.
fn select(
    t: &Torrent,
    req: &AnnounceRequest,
    addr: SocketAddrV4,
    switch: Option<&SwitchId>,
    want: usize,
    seeder: Option<SocketAddrV4>,
    rng: &mut StdRng,
) -> Vec<Peer> {
    if want == 0 {
        return Vec::new();
    }
    let mut permanent = t.permanent_peers(seeder);
    permanent.retain(|a| *a != addr);
    let permanent_slots = permanent.len().min(want);
    let peer_slots = want - permanent_slots;

    let mut peers = Vec::with_capacity(want);
    if peer_slots > 0 {
        let leecher = req.left > 0;
        // [same switch, preferred], [same switch, other], [elsewhere, preferred], [elsewhere, other]
        let mut classes: [Vec<usize>; 4] = Default::default();
        for (i, (id, p)) in t.peers.iter().enumerate() {
            if *id == req.peer_id || p.addr == addr || permanent.contains(&p.addr) {
                continue;
            }
            let same_switch = switch.is_some() && p.switch.as_ref() == switch;
            let preferred = if leecher { p.left == 0 } else { p.left > 0 };
            classes[usize::from(!same_switch) * 2 + usize::from(!preferred)].push(i);
        }
        for class in &mut classes {
            let room = peer_slots - peers.len();
            if room == 0 {
                break;
            }
            let (chosen, _) = class.partial_shuffle(rng, room);
            for &i in chosen.iter() {
                if let Some((id, p)) = t.peers.get_index(i) {
                    peers.push(Peer { peer_id: Some(*id), addr: p.addr });
                }
            }
        }
    }
    let (chosen, _) = permanent.partial_shuffle(rng, permanent_slots);
    peers.extend(chosen.iter().map(|&addr| Peer { peer_id: None, addr }));
    peers
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::SocketAddr;

    fn hash(n: u8) -> InfoHash {
        [n; 20]
    }

    fn pid(n: u32) -> PeerId {
        let mut id = *b"-TT0001-000000000000";
        id[8..12].copy_from_slice(&n.to_be_bytes());
        id
    }

    fn ip(n: u32) -> Ipv4Addr {
        Ipv4Addr::from(0x0a00_0000 + n)
    }

    fn req(h: InfoHash, n: u32, left: u64) -> AnnounceRequest {
        AnnounceRequest {
            info_hash: h,
            peer_id: pid(n),
            port: 6881,
            uploaded: 0,
            downloaded: 0,
            left,
            event: Event::None,
            numwant: None,
            compact: true,
            no_peer_id: false,
            ip: Some(ip(n).into()),
            remote: SocketAddr::from(([127, 0, 0, 1], 1)),
        }
    }

    fn addr(n: u32) -> SocketAddrV4 {
        SocketAddrV4::new(ip(n), 6881)
    }

    fn config() -> TrackerConfig {
        // Two intervals are the lifetime here (min_peer_lifetime 0) unless a test says otherwise.
        TrackerConfig {
            interval: 30,
            max_peers: 50,
            trust_ip_param: true,
            min_peer_lifetime: 0,
            max_torrents: 100,
            seeder: None,
        }
    }

    fn tracker() -> Tracker {
        Tracker::new(config(), Arc::new(NoTopology))
    }

    fn addrs(r: &AnnounceResponse) -> Vec<SocketAddrV4> {
        r.peers.iter().map(|p| p.addr).collect()
    }

    fn stats_at(t: &mut Tracker, h: InfoHash, now: Instant) -> Option<(u32, u32, u64)> {
        t.scrape(&[h], now);
        t.torrent_stats(&h).map(|s| (s.seeders, s.leechers, s.completed))
    }

    #[test]
    fn a_restart_keeps_peers_their_lifetime_and_counts_no_completion_twice() {
        // lifetime 60 s (two intervals)
        let mut before = tracker();
        let t0 = Instant::now();
        before.announce(&req(hash(1), 1, 100), t0).unwrap();
        before.announce(&req(hash(1), 1, 0), t0 + Duration::from_secs(10)).unwrap();
        before.announce(&req(hash(1), 2, 100), t0 + Duration::from_secs(20)).unwrap();
        before.announce(&req(hash(1), 3, 0), t0).unwrap();
        assert_eq!(stats_at(&mut before, hash(1), t0 + Duration::from_secs(30)), Some((2, 1, 1)));
        let saved = before.save(t0 + Duration::from_secs(30));
        assert_eq!(saved.len(), 1);
        assert_eq!(saved[0].peers.len(), 3);

        // the server was down 10 s: peer 3 (idle 30 + 10 s) has 20 s left, peer 1 30 s
        let mut after = tracker();
        let now = Instant::now();
        assert_eq!(after.restore(&saved, now, Duration::from_secs(10)), 3);
        after.torrents[&hash(1)].check();
        assert_eq!(stats_at(&mut after, hash(1), now), Some((2, 1, 1)));
        let r = after.announce(&req(hash(1), 4, 100), now).unwrap();
        assert_eq!(addrs(&r).into_iter().collect::<HashSet<_>>(), HashSet::from([addr(1), addr(2), addr(3)]));
        after.announce(&AnnounceRequest { event: Event::Stopped, ..req(hash(1), 4, 100) }, now).unwrap();
        // a restored finished peer says `completed` again: not counted; a restored leecher
        // that finishes now is
        after
            .announce(&AnnounceRequest { event: Event::Completed, ..req(hash(1), 1, 0) }, now + Duration::from_secs(5))
            .unwrap();
        after.announce(&req(hash(1), 2, 0), now + Duration::from_secs(5)).unwrap();
        assert_eq!(stats_at(&mut after, hash(1), now + Duration::from_secs(6)), Some((3, 0, 2)));
        // peer 3 never announced again: gone once its lifetime is over, not before
        assert_eq!(stats_at(&mut after, hash(1), now + Duration::from_secs(19)), Some((3, 0, 2)));
        assert_eq!(stats_at(&mut after, hash(1), now + Duration::from_secs(21)), Some((2, 0, 2)));
        after.torrents[&hash(1)].check();
    }

    #[test]
    fn a_long_restart_keeps_completions_for_the_seeder_and_drops_bad_entries() {
        let mut before = tracker();
        let t0 = Instant::now();
        for h in [hash(1), hash(2)] {
            before.announce(&req(h, 1, 100), t0).unwrap();
            before.announce(&req(h, 1, 0), t0).unwrap();
        }
        let mut saved = before.save(t0);
        assert_eq!(saved.len(), 2);
        saved.push(SavedTorrent { info_hash: "not hex".into(), ..saved[0].clone() });
        let bad_id = SavedPeer { peer_id: "abcd".into(), ..saved[1].peers[0].clone() };
        saved[1].peers.push(bad_id);

        // down longer than a lifetime: no peer comes back, the completions do
        let mut after = tracker();
        let now = Instant::now();
        assert_eq!(after.restore(&saved, now, Duration::from_secs(61)), 0);
        assert_eq!(stats_at(&mut after, hash(1), now), Some((0, 0, 1)));
        // the server's seeder registers hash 1 again; nobody registers hash 2, which is
        // forgotten after one lifetime like any torrent without peers
        after.register_permanent_peer(hash(1), addr(99));
        after.sweep(now + Duration::from_secs(61));
        assert_eq!(stats_at(&mut after, hash(1), now + Duration::from_secs(61)), Some((0, 0, 1)));
        assert_eq!(after.torrent_stats(&hash(2)), None);
        assert_eq!(after.torrents.len(), 1);
    }

    #[test]
    fn unknown_torrent_gets_empty_list_and_is_tracked() {
        let mut t = tracker();
        let now = Instant::now();
        let r = t.announce(&req(hash(1), 1, 100), now).unwrap();
        assert_eq!(r.peers, vec![]);
        assert_eq!((r.complete, r.incomplete, r.interval), (0, 1, 30));
        let r = t.announce(&req(hash(1), 2, 100), now).unwrap();
        assert_eq!(r.peers, vec![Peer { peer_id: Some(pid(1)), addr: addr(1) }]);
        assert_eq!((r.complete, r.incomplete), (0, 2));
    }

    #[test]
    fn requester_is_never_returned_to_itself() {
        let mut t = tracker();
        let now = Instant::now();
        for n in 1..=5 {
            t.announce(&req(hash(1), n, 10), now).unwrap();
        }
        let r = t.announce(&req(hash(1), 3, 10), now).unwrap();
        assert_eq!(r.peers.len(), 4);
        assert!(!addrs(&r).contains(&addr(3)));
        assert!(r.peers.iter().all(|p| p.peer_id != Some(pid(3))));
    }

    #[test]
    fn new_peer_id_at_same_address_replaces_the_old_one() {
        let mut t = tracker();
        let now = Instant::now();
        t.announce(&req(hash(1), 1, 10), now).unwrap();
        let mut restarted = req(hash(1), 2, 10);
        restarted.ip = Some(ip(1).into());
        let r = t.announce(&restarted, now).unwrap();
        assert_eq!(r.peers, vec![], "its old self is not a peer");
        assert_eq!(r.incomplete, 1);
    }

    #[test]
    fn numwant_and_max_peers_are_honoured() {
        let mut t = tracker();
        t.set_config(TrackerConfig { max_peers: 8, ..config() });
        let now = Instant::now();
        for n in 1..=20 {
            t.announce(&req(hash(1), n, 10), now).unwrap();
        }
        let mut r = req(hash(1), 100, 10);
        assert_eq!(t.announce(&r, now).unwrap().peers.len(), 8, "max_peers caps the default 50");
        r.numwant = Some(3);
        assert_eq!(t.announce(&r, now).unwrap().peers.len(), 3);
        r.numwant = Some(0);
        assert_eq!(t.announce(&r, now).unwrap().peers.len(), 0);
        r.numwant = Some(1000);
        let peers = t.announce(&r, now).unwrap().peers;
        assert_eq!(peers.len(), 8);
        let unique: HashSet<_> = peers.iter().map(|p| p.addr).collect();
        assert_eq!(unique.len(), 8, "no duplicates");
    }

    #[test]
    fn default_numwant_is_50() {
        let mut t = tracker();
        t.set_config(TrackerConfig { max_peers: 500, ..config() });
        let now = Instant::now();
        for n in 1..=80 {
            t.announce(&req(hash(1), n, 10), now).unwrap();
        }
        assert_eq!(t.announce(&req(hash(1), 100, 10), now).unwrap().peers.len(), 50);
    }

    #[test]
    fn peers_expire_after_twice_the_interval() {
        let mut t = tracker();
        let t0 = Instant::now();
        t.announce(&req(hash(1), 1, 10), t0).unwrap();
        t.announce(&req(hash(1), 2, 10), t0 + Duration::from_secs(40)).unwrap();
        // Peer 1 was last seen 59 s ago: still there.
        let r = t.announce(&req(hash(1), 3, 10), t0 + Duration::from_secs(59)).unwrap();
        assert_eq!(r.peers.len(), 2);
        // At 60 s (2 × 30) peer 1 is gone; peer 2 (seen at 40 s) stays.
        let r = t.announce(&req(hash(1), 3, 10), t0 + Duration::from_secs(60)).unwrap();
        assert_eq!(addrs(&r), vec![addr(2)]);
        assert_eq!(r.incomplete, 2);
        // Re-announcing keeps a peer alive.
        let r = t.announce(&req(hash(1), 2, 10), t0 + Duration::from_secs(95)).unwrap();
        assert_eq!(addrs(&r), vec![addr(3)]);
    }

    #[test]
    fn peers_outlive_a_libtorrent_announce_cycle() {
        let mut t = tracker();
        t.set_config(TrackerConfig { min_peer_lifetime: DEFAULT_MIN_PEER_LIFETIME, ..config() });
        assert_eq!(t.config().peer_ttl(), Duration::from_secs(360));
        let t0 = Instant::now();
        // qBittorrent announces every 300 s even when asked for 30 s.
        let first = t.announce(&req(hash(1), 1, 0), t0).unwrap();
        assert_eq!((first.interval, first.min_interval), (30, 30));
        for k in 1..=3u64 {
            let at = t0 + Duration::from_secs(300 * k - 1);
            let r = t.announce(&req(hash(1), 2, 10), at).unwrap();
            assert_eq!(addrs(&r), vec![addr(1)], "listed {} s after its last announce", 299);
            t.announce(&req(hash(1), 1, 0), at).unwrap();
        }
        // Two long intervals win over the minimum.
        t.set_config(TrackerConfig { interval: 600, min_peer_lifetime: DEFAULT_MIN_PEER_LIFETIME, ..config() });
        assert_eq!(t.config().peer_ttl(), Duration::from_secs(1200));
        let late = t0 + Duration::from_secs(900 - 1 + 1000);
        let r = t.announce(&req(hash(1), 2, 10), late).unwrap();
        assert_eq!(addrs(&r), vec![addr(1)]);
    }

    #[test]
    fn stopped_with_left_zero_counts_a_finish_once() {
        let mut t = tracker();
        let now = Instant::now();
        // aria2: started, then stopped with left=0 and nothing in between.
        let mut a = req(hash(1), 1, 1000);
        a.event = Event::Started;
        t.announce(&a, now).unwrap();
        a.event = Event::Stopped;
        a.left = 0;
        t.announce(&a, now).unwrap();
        assert_eq!(t.torrent_stats(&hash(1)), None, "nobody left");
        t.register_torrent(hash(1));
        // luna's agent: started, completed, stopped: one completion.
        let mut b = req(hash(1), 2, 1000);
        b.event = Event::Started;
        t.announce(&b, now).unwrap();
        b.event = Event::Completed;
        b.left = 0;
        t.announce(&b, now).unwrap();
        b.event = Event::Stopped;
        t.announce(&b, now).unwrap();
        // A seeder that stops never counts.
        let mut c = req(hash(1), 3, 0);
        t.announce(&c, now).unwrap();
        c.event = Event::Stopped;
        t.announce(&c, now).unwrap();
        // A leecher that gives up does not count either.
        let mut d = req(hash(1), 4, 10);
        t.announce(&d, now).unwrap();
        d.event = Event::Stopped;
        t.announce(&d, now).unwrap();
        let s = t.torrent_stats(&hash(1)).unwrap();
        assert_eq!((s.completed, s.seeders, s.leechers), (1, 0, 0));
        // The first torrent's count went with it, but a torrent that stays counts aria2 too.
        let mut e = req(hash(1), 5, 10);
        t.announce(&e, now).unwrap();
        e.event = Event::Stopped;
        e.left = 0;
        t.announce(&e, now).unwrap();
        assert_eq!(t.torrent_stats(&hash(1)).unwrap().completed, 2);
    }

    #[test]
    fn a_peer_id_belongs_to_the_address_that_registered_it() {
        let mut t = tracker();
        t.set_config(TrackerConfig { trust_ip_param: false, ..config() });
        let now = Instant::now();
        let mut victim = req(hash(1), 1, 10);
        victim.ip = None;
        victim.remote = SocketAddr::from(([192, 0, 2, 1], 1000));
        t.announce(&victim, now).unwrap();
        // Someone else stopping, completing or moving the victim's id is refused and changes nothing.
        for event in [Event::Stopped, Event::Completed, Event::None] {
            let mut evil = victim.clone();
            evil.remote = SocketAddr::from(([192, 0, 2, 66], 1000));
            evil.event = event;
            evil.left = 0;
            assert_eq!(t.announce(&evil, now).unwrap_err(), TrackerError::PeerIdElsewhere, "{event:?}");
        }
        let s = t.torrent_stats(&hash(1)).unwrap();
        assert_eq!((s.leechers, s.seeders, s.completed), (1, 0, 0));
        // The owner itself may, also from another port of its address.
        let mut own = victim.clone();
        own.remote = SocketAddr::from(([192, 0, 2, 1], 2000));
        own.event = Event::Stopped;
        t.announce(&own, now).unwrap();
        assert_eq!(t.torrent_stats(&hash(1)), None);
    }

    #[test]
    fn a_trusted_ip_parameter_cannot_take_over_another_sources_address() {
        let mut t = tracker();
        let now = Instant::now();
        let mut victim = req(hash(1), 1, 10);
        victim.remote = SocketAddr::from(([192, 0, 2, 1], 1000));
        t.announce(&victim, now).unwrap();
        let mut evil = req(hash(1), 2, 0);
        evil.ip = victim.ip;
        evil.remote = SocketAddr::from(([192, 0, 2, 66], 1000));
        assert_eq!(t.announce(&evil, now).unwrap_err(), TrackerError::AddressElsewhere(addr(1)));
        let s = t.torrent_stats(&hash(1)).unwrap();
        assert_eq!((s.leechers, s.seeders), (1, 0));
    }

    #[test]
    fn unknown_torrents_are_capped_but_the_servers_are_not() {
        let mut t = tracker();
        t.set_config(TrackerConfig { max_torrents: 3, ..config() });
        t.register_torrent(hash(200));
        let now = Instant::now();
        t.announce(&req(hash(1), 1, 10), now).unwrap();
        t.announce(&req(hash(2), 1, 10), now).unwrap();
        assert_eq!(t.announce(&req(hash(3), 1, 10), now).unwrap_err(), TrackerError::TooManyTorrents(3));
        assert!(t.torrent_stats(&hash(3)).is_none());
        // Known torrents and the server's own still work.
        t.announce(&req(hash(1), 2, 10), now).unwrap();
        t.announce(&req(hash(200), 2, 10), now).unwrap();
        // Once peers expire, there is room again.
        let later = now + Duration::from_secs(61);
        t.announce(&req(hash(3), 1, 10), later).unwrap();
        // A full scrape lists only the server's torrents.
        let all = t.scrape(&[], later).files;
        assert_eq!(all.iter().map(|e| e.info_hash).collect::<Vec<_>>(), vec![hash(200)]);
    }

    #[test]
    fn sweep_forgets_dead_torrents_but_keeps_registered_ones() {
        let mut t = tracker();
        let t0 = Instant::now();
        t.register_torrent(hash(2));
        t.announce(&req(hash(1), 1, 10), t0).unwrap();
        t.announce(&req(hash(2), 1, 10), t0).unwrap();
        assert_eq!(t.stats().len(), 2);
        t.sweep(t0 + Duration::from_secs(61));
        let stats = t.stats();
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].info_hash, hash(2));
        assert_eq!((stats[0].leechers, stats[0].registered), (0, true));
    }

    #[test]
    fn lazy_sweep_reaches_torrents_nobody_announces() {
        let mut t = tracker();
        let t0 = Instant::now();
        t.announce(&req(hash(1), 1, 10), t0).unwrap();
        t.announce(&req(hash(2), 1, 10), t0 + Duration::from_secs(100)).unwrap();
        assert!(t.torrent_stats(&hash(1)).is_none(), "hash 1's only peer expired and the torrent went");
    }

    #[test]
    fn stopped_removes_the_peer() {
        let mut t = tracker();
        let now = Instant::now();
        t.announce(&req(hash(1), 1, 10), now).unwrap();
        t.announce(&req(hash(1), 2, 0), now).unwrap();
        let mut stop = req(hash(1), 1, 10);
        stop.event = Event::Stopped;
        let r = t.announce(&stop, now).unwrap();
        assert_eq!(r.peers, vec![]);
        assert_eq!((r.complete, r.incomplete), (1, 0));
        let r = t.announce(&req(hash(1), 3, 10), now).unwrap();
        assert_eq!(addrs(&r), vec![addr(2)]);
        // Stopping on a torrent nobody knows does not start tracking it.
        let mut stop = req(hash(9), 1, 10);
        stop.event = Event::Stopped;
        t.announce(&stop, now).unwrap();
        assert!(t.torrent_stats(&hash(9)).is_none());
    }

    #[test]
    fn left_zero_without_completed_event_counts_once() {
        let mut t = tracker();
        let now = Instant::now();
        let mut r = req(hash(1), 1, 1000);
        r.event = Event::Started;
        t.announce(&r, now).unwrap();
        r.event = Event::None;
        r.left = 0;
        r.downloaded = 1000;
        let resp = t.announce(&r, now).unwrap();
        assert_eq!((resp.complete, resp.incomplete), (1, 0));
        // Another announce at left=0, then a late completed event: still one completion.
        t.announce(&r, now).unwrap();
        r.event = Event::Completed;
        t.announce(&r, now).unwrap();
        let s = t.torrent_stats(&hash(1)).unwrap();
        assert_eq!((s.seeders, s.leechers, s.completed), (1, 0, 1));
        // A peer that starts out complete (restarted seeder) did not download anything here.
        t.announce(&req(hash(1), 2, 0), now).unwrap();
        assert_eq!(t.torrent_stats(&hash(1)).unwrap().completed, 1);
        // An explicit completed event from a new peer counts.
        let mut c = req(hash(1), 3, 0);
        c.event = Event::Completed;
        t.announce(&c, now).unwrap();
        let s = t.torrent_stats(&hash(1)).unwrap();
        assert_eq!((s.seeders, s.completed), (3, 2));
    }

    #[test]
    fn byte_counters_sum_latest_reports() {
        let mut t = tracker();
        let now = Instant::now();
        let mut a = req(hash(1), 1, 10);
        let mut b = req(hash(1), 2, 10);
        a.uploaded = 100;
        a.downloaded = 50;
        b.uploaded = 7;
        b.downloaded = 3;
        t.announce(&a, now).unwrap();
        t.announce(&b, now).unwrap();
        a.uploaded = 300;
        a.downloaded = 60;
        t.announce(&a, now).unwrap();
        let s = t.torrent_stats(&hash(1)).unwrap();
        assert_eq!((s.uploaded, s.downloaded), (307, 63));
        // A peer that stops keeps its final report in the totals.
        b.event = Event::Stopped;
        b.uploaded = 8;
        t.announce(&b, now).unwrap();
        let s = t.torrent_stats(&hash(1)).unwrap();
        assert_eq!((s.uploaded, s.downloaded, s.leechers), (308, 63, 1));
    }

    #[test]
    fn leecher_transitions_keep_seeder_count_right() {
        let mut t = tracker();
        let now = Instant::now();
        t.announce(&req(hash(1), 1, 0), now).unwrap();
        t.announce(&req(hash(1), 1, 5), now).unwrap();
        let s = t.torrent_stats(&hash(1)).unwrap();
        assert_eq!((s.seeders, s.leechers), (0, 1));
        t.announce(&req(hash(1), 1, 0), now).unwrap();
        let s = t.torrent_stats(&hash(1)).unwrap();
        assert_eq!((s.seeders, s.leechers, s.completed), (1, 0, 1));
    }

    #[test]
    fn seeder_is_always_included_and_last() {
        let mut t = tracker();
        let seeder = SocketAddrV4::new(Ipv4Addr::new(10, 255, 0, 1), 50000);
        t.set_config(TrackerConfig { max_peers: 5, seeder: Some(seeder), ..config() });
        t.register_torrent(hash(1));
        let now = Instant::now();
        let r = t.announce(&req(hash(1), 1, 10), now).unwrap();
        assert_eq!(r.peers, vec![Peer { peer_id: None, addr: seeder }], "known torrent: the seeder at once");
        assert_eq!((r.complete, r.incomplete), (1, 1));
        for n in 2..=20 {
            let r = t.announce(&req(hash(1), n, 0), now).unwrap();
            assert_eq!(r.peers.last().map(|p| p.addr), Some(seeder), "peer {n}");
            assert!(r.peers.len() <= 5);
        }
        let mut r = req(hash(1), 100, 10);
        r.numwant = Some(1);
        assert_eq!(addrs(&t.announce(&r, now).unwrap()), vec![seeder], "even with one slot");
        // An unregistered torrent does not get the server's seeder.
        assert_eq!(t.announce(&req(hash(2), 1, 10), now).unwrap().peers, vec![]);
        // Explicit permanent peers work for any torrent.
        let other = SocketAddrV4::new(Ipv4Addr::new(10, 255, 0, 2), 50001);
        t.register_permanent_peer(hash(2), other);
        assert_eq!(addrs(&t.announce(&req(hash(2), 2, 10), now).unwrap()), vec![addr(1), other]);
        assert!(t.unregister_permanent_peer(&hash(2), other));
        assert_eq!(addrs(&t.announce(&req(hash(2), 2, 10), now).unwrap()), vec![addr(1)]);
    }

    #[test]
    fn permanent_peer_is_not_its_own_peer_nor_counted_twice() {
        let mut t = tracker();
        let now = Instant::now();
        t.register_permanent_peer(hash(1), addr(1));
        // The seeder announcing itself as a client.
        let r = t.announce(&req(hash(1), 1, 0), now).unwrap();
        assert_eq!(r.peers, vec![]);
        assert_eq!(r.complete, 1);
        let r = t.announce(&req(hash(1), 2, 10), now).unwrap();
        assert_eq!(r.peers, vec![Peer { peer_id: None, addr: addr(1) }]);
        assert_eq!((r.complete, r.incomplete), (1, 1));
    }

    #[test]
    fn permanent_peers_never_expire() {
        let mut t = tracker();
        let t0 = Instant::now();
        t.register_permanent_peer(hash(1), addr(99));
        t.sweep(t0 + Duration::from_secs(3600));
        let r = t.announce(&req(hash(1), 1, 10), t0 + Duration::from_secs(7200)).unwrap();
        assert_eq!(addrs(&r), vec![addr(99)]);
    }

    /// Peers 1..=4 on switch "a", 5..=8 on switch "b", 9..=10 unknown.
    fn racked() -> Tracker {
        let topo = |ip: Ipv4Addr| -> Option<SwitchId> {
            match u32::from(ip) - 0x0a00_0000 {
                1..=4 => Some("a".into()),
                5..=8 => Some("b".into()),
                100..=199 => Some("a".into()),
                _ => None,
            }
        };
        Tracker::new(config(), Arc::new(topo))
    }

    #[test]
    fn same_switch_first_then_seeders_then_the_rest() {
        let now = Instant::now();
        for round in 0..50 {
            let mut t = racked();
            // Seeders: 2 (a), 6 (b), 9 (unknown); leechers: everything else.
            for n in 1..=10 {
                let left = if [2, 6, 9].contains(&n) { 0 } else { 10 };
                t.announce(&req(hash(1), n, left), now).unwrap();
            }
            let r = t.announce(&req(hash(1), 100, 10), now).unwrap();
            let got = addrs(&r);
            assert_eq!(got.len(), 10);
            // Same switch: seeder 2 first, then leechers 1, 3, 4 in some order.
            assert_eq!(got[0], addr(2), "round {round}");
            let rest_a: HashSet<_> = got[1..4].iter().copied().collect();
            assert_eq!(rest_a, [addr(1), addr(3), addr(4)].into_iter().collect());
            // Elsewhere: seeders 6 and 9, then leechers 5, 7, 8, 10.
            let seeders: HashSet<_> = got[4..6].iter().copied().collect();
            assert_eq!(seeders, [addr(6), addr(9)].into_iter().collect());
            let leechers: HashSet<_> = got[6..].iter().copied().collect();
            assert_eq!(leechers, [addr(5), addr(7), addr(8), addr(10)].into_iter().collect());
        }
    }

    #[test]
    fn seeders_get_leechers_first() {
        let now = Instant::now();
        let mut t = racked();
        for n in 1..=4 {
            t.announce(&req(hash(1), n, if n <= 2 { 0 } else { 10 }), now).unwrap();
        }
        let got = addrs(&t.announce(&req(hash(1), 100, 0), now).unwrap());
        let first: HashSet<_> = got[..2].iter().copied().collect();
        assert_eq!(first, [addr(3), addr(4)].into_iter().collect());
    }

    #[test]
    fn choice_within_a_class_is_random() {
        let now = Instant::now();
        let mut t = tracker();
        for n in 1..=40 {
            t.announce(&req(hash(1), n, 10), now).unwrap();
        }
        let mut r = req(hash(1), 100, 10);
        r.numwant = Some(5);
        let mut seen = HashSet::new();
        for _ in 0..50 {
            seen.extend(addrs(&t.announce(&r, now).unwrap()));
        }
        // 250 draws of 5 out of 40: a fixed choice would show 5 addresses.
        assert!(seen.len() > 30, "only {} distinct peers handed out", seen.len());
    }

    #[test]
    fn untrusted_ip_param_uses_remote_address() {
        let mut t = tracker();
        t.set_config(TrackerConfig { trust_ip_param: false, ..config() });
        let now = Instant::now();
        let mut a = req(hash(1), 1, 10);
        a.remote = SocketAddr::from(([192, 0, 2, 1], 5555));
        t.announce(&a, now).unwrap();
        let r = t.announce(&req(hash(1), 2, 10), now).unwrap();
        assert_eq!(addrs(&r), vec![SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 6881)]);
    }

    #[test]
    fn ipv6_only_peer_is_refused() {
        let mut t = tracker();
        let mut a = req(hash(1), 1, 10);
        a.ip = None;
        a.remote = "[2001:db8::1]:5000".parse().unwrap();
        let err = t.announce(&a, Instant::now()).unwrap_err();
        assert!(matches!(err, TrackerError::NoIpv4(_)), "{err}");
        // IPv4-mapped addresses from a dual-stack socket are fine.
        a.remote = "[::ffff:192.0.2.9]:5000".parse().unwrap();
        t.announce(&a, Instant::now()).unwrap();
        let r = t.announce(&req(hash(1), 2, 10), Instant::now()).unwrap();
        assert_eq!(addrs(&r), vec![SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 9), 6881)]);
    }

    proptest::proptest! {
        /// Random announces (peer ids and addresses colliding on purpose, all events, time
        /// moving on) keep the counters consistent with the peers and never hand out the
        /// requester or more than asked.
        #[test]
        fn bookkeeping_survives_random_announces(
            steps in proptest::collection::vec(
                (0u32..6, 0u32..4, 0u64..3, 0u8..4, 0u64..40, proptest::option::of(0u32..6), 0u8..3),
                1..80,
            )
        ) {
            let mut t = tracker();
            t.set_config(TrackerConfig { max_peers: 4, interval: 10, ..config() });
            t.register_permanent_peer(hash(1), addr(5));
            let mut now = Instant::now();
            for (id, host, left, event, wait, numwant, torrent) in steps {
                now += Duration::from_secs(wait);
                let mut r = req(hash(torrent), id, left);
                r.ip = Some(ip(host).into());
                r.event = [Event::None, Event::Started, Event::Stopped, Event::Completed][usize::from(event)];
                r.numwant = numwant;
                let resp = t.announce(&r, now).unwrap();
                proptest::prop_assert!(resp.peers.len() <= numwant.unwrap_or(50).min(4) as usize);
                proptest::prop_assert!(resp.peers.iter().all(|p| p.addr != addr(host) && p.peer_id != Some(pid(id))));
                let unique: HashSet<_> = resp.peers.iter().map(|p| p.addr).collect();
                proptest::prop_assert_eq!(unique.len(), resp.peers.len());
                for torrent in t.torrents.values() {
                    torrent.check();
                }
            }
        }
    }

    #[test]
    fn scrape_reports_counts_for_many_hashes() {
        let mut t = tracker();
        let now = Instant::now();
        t.announce(&req(hash(1), 1, 0), now).unwrap();
        t.announce(&req(hash(1), 2, 10), now).unwrap();
        t.announce(&req(hash(1), 2, 0), now).unwrap();
        t.announce(&req(hash(1), 3, 10), now).unwrap();
        t.announce(&req(hash(2), 1, 10), now).unwrap();
        let s = t.scrape(&[hash(1), hash(2), hash(3)], now);
        assert_eq!(
            s.files,
            vec![
                ScrapeEntry { info_hash: hash(1), complete: 2, incomplete: 1, downloaded: 1 },
                ScrapeEntry { info_hash: hash(2), complete: 0, incomplete: 1, downloaded: 0 },
                ScrapeEntry { info_hash: hash(3), complete: 0, incomplete: 0, downloaded: 0 },
            ]
        );
        assert!(t.torrent_stats(&hash(3)).is_none(), "scrape does not start tracking");
        t.register_torrent(hash(1));
        t.register_torrent(hash(2));
        let mut all = t.scrape(&[], now).files;
        all.sort_by_key(|e| e.info_hash);
        assert_eq!(all.iter().map(|e| e.info_hash).collect::<Vec<_>>(), vec![hash(1), hash(2)]);
    }
}
