//! The built-in BitTorrent HTTP tracker: images are distributed as torrents, and every node that
//! boots announces itself here.
//!
//! Protocol: `GET /announce` and `GET /scrape` as in BEP 3, with compact peers (BEP 23) and the
//! scrape convention (BEP 48). Every answer is bencoded with HTTP status 200; a rejected request
//! gets a `failure reason` dictionary whose text names the bad parameter. Unknown torrents are
//! not an error: the first announce gets an empty peer list and the torrent is tracked from then
//! on (until its last peer is gone, unless the server registered it).
//!
//! Layout: [`query`] parses raw query strings (the binary `info_hash` and `peer_id` are
//! percent-decoded by hand; `+` is a space as in form encoding), [`swarm`] is the sans-IO state
//! ([`Tracker`]: requests and `Instant`s in, responses out), [`encode`] turns responses into
//! bytes, and [`http`] is the thin axum layer ([`router`], [`TrackerHandle`]).
//!
//! # Peer addresses
//!
//! The peer's address is the `ip` parameter when [`TrackerConfig::trust_ip_param`] is set (the
//! default: nodes on the provisioning network announce their provisioning address, which may
//! differ from the address the request comes from), else the connection's remote address.
//! Only IPv4 peers are tracked.
//!
//! # Peer lifetime and counters
//!
//! A peer is forgotten `max(2 × interval, min_peer_lifetime)` after its last announce, or at
//! once on `event=stopped`. A clean server stop saves the swarms and the next start restores
//! them ([`persist`]): peers keep what is left of their lifetime and counters go on.
//! `left=0` makes a peer a seeder (clients need not send `event=completed`; librqbit never does).
//! A torrent's `downloaded` counter goes up once per peer, on `event=completed` or when the peer
//! goes from `left>0` to `left=0`, whichever comes first. Uploaded/downloaded byte totals are the
//! sum, over every peer seen, of its latest report (a peer that left keeps its last report).
//!
//! # Peer selection
//!
//! An announce returns at most `min(numwant, max_peers)` peers (`numwant` defaults to 50;
//! `max_peers` is the cluster's `tracker_max_peers`). The requester never gets itself back (same
//! `peer_id`, or same ip:port). The rest is chosen in this order:
//!
//! 1. Peers behind the requester's switch (as the [`Topology`] tells), then all others. Traffic
//!    that stays inside a rack does not load the uplinks. A requester whose switch is unknown has
//!    no "same switch" class.
//! 2. Within each of those two classes, a leecher (`left>0`) gets seeders first, then other
//!    leechers; a seeder gets leechers first (they are the ones that need it), then seeders.
//! 3. Within each of those sub-classes the choice is uniformly random, so that load spreads over
//!    all peers instead of piling onto the first ones that arrived.
//! 4. The torrent's permanent peers (the server's own seeder) come last but are always included
//!    whenever at least one peer is asked for: they take the last slots, so peers prefer each other
//!    and fall back to the server.
//!
//! Permanent peers are registered with [`TrackerHandle::register_permanent_peer`] (any address),
//! or with [`TrackerHandle::register_torrent`] for torrents served by the configured
//! [`TrackerConfig::seeder`]. They never expire and count as seeders in `complete`.

pub mod encode;
/// The old hand-written fast path, kept only as `bench_tracker … fast`'s comparison: not in a
/// production build.
#[cfg(feature = "test-support")]
pub mod fast;
pub mod http;
pub mod persist;
pub mod query;
pub mod swarm;

use std::net::{IpAddr, SocketAddr, SocketAddrV4};

pub use self::encode::{encode_announce, encode_failure, encode_scrape};
pub use self::http::{router, TrackerHandle};
pub use self::query::{parse_announce, parse_scrape, percent_decode};
pub use self::swarm::{
    AnnounceResponse, NoTopology, Peer, SavedPeer, SavedTorrent, ScrapeEntry, ScrapeResponse, SwitchId, Topology,
    TorrentStats, Tracker, TrackerConfig,
};

/// The `[tracker]` section of the configuration (the announce interval and peer limit are the
/// cluster object's `tracker_interval` and `tracker_max_peers`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackerSettings {
    /// Take a peer's address from the announce's `ip` parameter instead of the connection.
    /// Default false: trusting it lets anyone register any address as a seeder.
    pub trust_ip_param: bool,
    /// Seconds a peer is kept after its last announce, at least (two intervals if longer).
    pub min_peer_lifetime_s: u32,
    /// Torrents followed at most; the server's own images always are.
    pub max_torrents: usize,
}

impl Default for TrackerSettings {
    fn default() -> Self {
        let c = TrackerConfig::default();
        TrackerSettings {
            trust_ip_param: c.trust_ip_param,
            min_peer_lifetime_s: c.min_peer_lifetime,
            max_torrents: c.max_torrents,
        }
    }
}

impl TrackerSettings {
    /// The tracker's configuration: these settings and the cluster's interval and peer limit.
    pub fn config(&self, cluster: &luna_core::model::Cluster) -> TrackerConfig {
        TrackerConfig {
            trust_ip_param: self.trust_ip_param,
            min_peer_lifetime: self.min_peer_lifetime_s,
            max_torrents: self.max_torrents,
            ..TrackerConfig::from_cluster(cluster)
        }
    }

    /// The `[tracker]` section for `--print-config`.
    pub fn documented_defaults() -> String {
        let d = TrackerSettings::default();
        format!(
            r#"
# The BitTorrent tracker (interval and peer limit: the cluster object's tracker_interval and
# tracker_max_peers).
[tracker]
# Take a peer's address from the announce's ip= parameter instead of the connection
# (lets anyone on the network register any address as a seeder).
trust_ip_param = {}
# Seconds a peer is listed after its last announce, at least (libtorrent clients such as
# qBittorrent announce only every 300 s; two intervals if that is longer).
min_peer_lifetime_s = {}
# Torrents followed at most; announces of more unknown info hashes are refused.
max_torrents = {}
"#,
            d.trust_ip_param, d.min_peer_lifetime_s, d.max_torrents
        )
    }
}

/// A torrent's SHA-1 info hash.
pub type InfoHash = [u8; 20];
/// A client's self-chosen 20-byte identity.
pub type PeerId = [u8; 20];

/// Why a tracker request was refused; the text goes to the client as `failure reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackerError {
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("invalid {param}: {reason}")]
    Invalid { param: String, reason: String },
    #[error("cannot tell the peer's ipv4 address: the request came from {0} and carries no usable ipv4 ip parameter")]
    NoIpv4(IpAddr),
    #[error("peer_id is registered from another address")]
    PeerIdElsewhere,
    #[error("peer address {0} is registered from another address")]
    AddressElsewhere(SocketAddrV4),
    #[error("tracker follows its maximum of {0} torrents; unknown info_hash refused")]
    TooManyTorrents(usize),
}

impl TrackerError {
    pub(crate) fn invalid(param: impl Into<String>, reason: impl Into<String>) -> Self {
        TrackerError::Invalid { param: param.into(), reason: reason.into() }
    }
}

/// The `event` parameter of an announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Event {
    /// Absent or empty: a regular periodic announce.
    #[default]
    None,
    Started,
    Stopped,
    Completed,
}

/// One parsed `GET /announce`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceRequest {
    pub info_hash: InfoHash,
    pub peer_id: PeerId,
    pub port: u16,
    pub uploaded: u64,
    pub downloaded: u64,
    pub left: u64,
    pub event: Event,
    /// How many peers the client wants; `None` means the default (50).
    pub numwant: Option<u32>,
    /// BEP 23 compact peer list (the default when the client does not say).
    pub compact: bool,
    /// Leave `peer id` out of dictionary-model peers.
    pub no_peer_id: bool,
    /// The `ip` parameter, if any; used only when the tracker trusts it.
    pub ip: Option<IpAddr>,
    /// Where the request came from.
    pub remote: SocketAddr,
}

/// The number of peers returned when the client does not send `numwant`.
pub const DEFAULT_NUMWANT: u32 = 50;

impl AnnounceRequest {
    /// The address other peers should connect to.
    pub fn peer_addr(&self, trust_ip_param: bool) -> Result<SocketAddrV4, TrackerError> {
        let from_param = if trust_ip_param { self.ip.and_then(ipv4_of) } else { None };
        match from_param.or_else(|| ipv4_of(self.remote.ip())) {
            Some(ip) => Ok(SocketAddrV4::new(ip, self.port)),
            None => Err(TrackerError::NoIpv4(self.remote.ip())),
        }
    }
}

/// IPv4 addresses, including IPv4-mapped IPv6 ones (a dual-stack listener reports those);
/// 0.0.0.0 is nobody's address (and stands for "unknown" when there is no connection info).
fn ipv4_of(ip: IpAddr) -> Option<std::net::Ipv4Addr> {
    let v4 = match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    v4.filter(|a| !a.is_unspecified())
}
