//! The thin HTTP layer: `GET /announce` and `GET /scrape` over a sharded [`Tracker`].

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::swarm::{AnnounceResponse, SavedTorrent, ScrapeResponse, Topology, TorrentStats, Tracker, TrackerConfig};
use super::{encode, query, AnnounceRequest, InfoHash, TrackerError};

/// Independent trackers, one per group of torrents: announces for different torrents do not
/// wait for each other. A power of two so the shard is a mask of the hash.
const SHARDS: usize = 16;

/// The tracker as the server shares it: the sans-IO [`Tracker`] split into shards by info hash,
/// each behind its own mutex (an announce holds it for a few microseconds).
pub struct TrackerHandle {
    shards: Box<[Mutex<Tracker>]>,
}

impl std::fmt::Debug for TrackerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackerHandle").field("config", &self.config()).finish()
    }
}

impl TrackerHandle {
    pub fn new(config: TrackerConfig, topology: Arc<dyn Topology>) -> Self {
        let shards =
            (0..SHARDS).map(|_| Mutex::new(Tracker::sharded(config.clone(), topology.clone(), SHARDS))).collect();
        TrackerHandle { shards }
    }

    fn lock(shard: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
        // A panic under the lock leaves at worst a half-updated counter: keep serving.
        shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn shard(&self, info_hash: &InfoHash) -> MutexGuard<'_, Tracker> {
        // Info hashes are SHA-1 output: any byte spreads evenly.
        Self::lock(&self.shards[usize::from(info_hash[19]) % SHARDS])
    }

    pub fn config(&self) -> TrackerConfig {
        Self::lock(&self.shards[0]).config().clone()
    }

    pub fn set_config(&self, config: TrackerConfig) {
        for s in self.shards.iter() {
            Self::lock(s).set_config(config.clone());
        }
    }

    /// Applies the cluster object's `tracker_interval` and `tracker_max_peers`.
    pub fn set_limits(&self, interval: u32, max_peers: u32) {
        self.set_config(TrackerConfig { interval, max_peers, ..self.config() });
    }

    /// Where the server's seeder listens (it knows only once it has bound its socket).
    pub fn set_seeder(&self, seeder: Option<SocketAddrV4>) {
        self.set_config(TrackerConfig { seeder, ..self.config() });
    }

    /// A peer of `info_hash` that never expires and is always handed out, last.
    pub fn register_permanent_peer(&self, info_hash: InfoHash, addr: SocketAddrV4) {
        self.shard(&info_hash).register_permanent_peer(info_hash, addr);
    }

    pub fn unregister_permanent_peer(&self, info_hash: &InfoHash, addr: SocketAddrV4) -> bool {
        self.shard(info_hash).unregister_permanent_peer(info_hash, addr)
    }

    /// A torrent the server serves: kept while nobody announces it, and served by the
    /// configured seeder ([`TrackerHandle::set_seeder`]).
    pub fn register_torrent(&self, info_hash: InfoHash) {
        self.shard(&info_hash).register_torrent(info_hash);
    }

    pub fn unregister_torrent(&self, info_hash: &InfoHash) {
        self.shard(info_hash).unregister_torrent(info_hash);
    }

    pub fn announce(&self, req: &AnnounceRequest) -> Result<AnnounceResponse, TrackerError> {
        self.shard(&req.info_hash).announce(req, Instant::now())
    }

    /// Counters for the given torrents, or all of them when `info_hashes` is empty.
    pub fn scrape(&self, info_hashes: &[InfoHash]) -> ScrapeResponse {
        let now = Instant::now();
        if info_hashes.is_empty() {
            let files = self.shards.iter().flat_map(|s| Self::lock(s).scrape(&[], now).files).collect();
            return ScrapeResponse { files };
        }
        let files = info_hashes.iter().flat_map(|h| self.shard(h).scrape(std::slice::from_ref(h), now).files).collect();
        ScrapeResponse { files }
    }

    /// A raw announce query to the bencoded answer (a `failure reason` if refused).
    pub fn announce_bytes(&self, raw_query: &str, remote: SocketAddr) -> Vec<u8> {
        let result =
            query::parse_announce(raw_query, remote).and_then(|req| self.announce(&req).map(|resp| (req, resp)));
        let event = match &result {
            Ok((req, _)) => match req.event {
                super::Event::None => "none",
                super::Event::Started => "started",
                super::Event::Stopped => "stopped",
                super::Event::Completed => "completed",
            },
            Err(_) => "refused",
        };
        crate::metrics::global().tracker_announces.get_or_create(&crate::metrics::l1("event", event)).inc();
        match result {
            Ok((req, resp)) => encode::encode_announce(&resp, req.compact, req.no_peer_id),
            Err(e) => {
                tracing::debug!(%remote, error = %e, "announce refused");
                encode::encode_failure(&e)
            }
        }
    }

    /// A raw scrape query to the bencoded answer (a `failure reason` if refused).
    pub fn scrape_bytes(&self, raw_query: &str) -> Vec<u8> {
        match query::parse_scrape(raw_query) {
            Ok(hashes) => encode::encode_scrape(&self.scrape(&hashes)),
            Err(e) => encode::encode_failure(&e),
        }
    }

    /// Counters of every tracked torrent (expired peers are dropped first).
    pub fn stats(&self) -> Vec<TorrentStats> {
        let now = Instant::now();
        let mut all: Vec<TorrentStats> = self
            .shards
            .iter()
            .flat_map(|s| {
                let mut t = Self::lock(s);
                t.sweep(now);
                t.stats()
            })
            .collect();
        all.sort_by_key(|a| a.info_hash);
        all
    }

    pub fn torrent_stats(&self, info_hash: &InfoHash) -> Option<TorrentStats> {
        let mut t = self.shard(info_hash);
        t.scrape(std::slice::from_ref(info_hash), Instant::now());
        t.torrent_stats(info_hash)
    }

    /// Every shard's swarms (see [`Tracker::save`]).
    pub fn save(&self) -> Vec<SavedTorrent> {
        let now = Instant::now();
        let mut all: Vec<SavedTorrent> = self.shards.iter().flat_map(|s| Self::lock(s).save(now)).collect();
        all.sort_by(|a, b| a.info_hash.cmp(&b.info_hash));
        all
    }

    /// Gives each shard its torrents back, `since` after they were saved (see
    /// [`Tracker::restore`]); returns how many peers were restored.
    pub fn restore(&self, saved: &[SavedTorrent], since: Duration) -> usize {
        let now = Instant::now();
        let mut per_shard: Vec<Vec<SavedTorrent>> = vec![Vec::new(); SHARDS];
        for t in saved {
            // the same shard as announces of that hash; a malformed hash is skipped by restore
            let last = hex::decode(&t.info_hash).ok().and_then(|h| h.get(19).copied()).unwrap_or(0);
            per_shard[usize::from(last) % SHARDS].push(t.clone());
        }
        self.shards.iter().zip(per_shard).map(|(s, ts)| Self::lock(s).restore(&ts, now, since)).sum()
    }
}

/// `GET /announce` and `GET /scrape`. The peer's address comes from the `ip` parameter (if
/// trusted) or from `ConnectInfo<SocketAddr>`, so serve the app with
/// `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn router(tracker: Arc<TrackerHandle>) -> Router {
    Router::new().route("/announce", get(announce)).route("/scrape", get(scrape)).with_state(tracker)
}

fn bencoded(body: Vec<u8>) -> Response {
    // Trackers conventionally answer text/plain, failures included, with status 200.
    ([(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

async fn announce(State(tracker): State<Arc<TrackerHandle>>, req: Request) -> Response {
    // Without ConnectInfo the address is unspecified and only a trusted `ip` parameter can help.
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |ConnectInfo(a)| *a);
    bencoded(tracker.announce_bytes(req.uri().query().unwrap_or(""), remote))
}

async fn scrape(State(tracker): State<Arc<TrackerHandle>>, req: Request) -> Response {
    bencoded(tracker.scrape_bytes(req.uri().query().unwrap_or("")))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use axum::body::{to_bytes, Body};
    use axum::http::{Request, StatusCode};
    use bip_bencode::{BDecodeOpt, BRefAccess, BencodeRef};
    use tower::ServiceExt;

    use super::super::{query::percent_encode, swarm::SwitchId, NoTopology};
    use super::*;

    const HASH: InfoHash = [
        0x12, 0x00, 0xff, b'+', b' ', b'%', b'&', b'=', 0x80, b'?', 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
        0x09, 0x0a,
    ];

    /// A tracker that trusts `ip=` (most tests give addresses that way).
    fn handle() -> Arc<TrackerHandle> {
        Arc::new(TrackerHandle::new(
            TrackerConfig { trust_ip_param: true, ..TrackerConfig::default() },
            Arc::new(NoTopology),
        ))
    }

    fn announce_uri(hash: &InfoHash, n: u8, left: u64, extra: &str) -> String {
        let mut peer_id = *b"-XX0001-000000000000";
        peer_id[19] = n;
        format!(
            "/announce?info_hash={}&peer_id={}&port={}&uploaded=0&downloaded=0&left={left}{extra}",
            percent_encode(hash),
            percent_encode(&peer_id),
            6000 + u16::from(n)
        )
    }

    async fn get(app: &Router, uri: &str, remote: Option<SocketAddr>) -> (StatusCode, Vec<u8>) {
        let mut req = Request::get(uri).body(Body::empty()).unwrap();
        if let Some(r) = remote {
            req.extensions_mut().insert(ConnectInfo(r));
        }
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/plain");
        (status, to_bytes(resp.into_body(), 1 << 20).await.unwrap().to_vec())
    }

    fn failure(reason: &str) -> Vec<u8> {
        format!("d14:failure reason{}:{reason}e", reason.len()).into_bytes()
    }

    fn from(n: u8) -> Option<SocketAddr> {
        Some(SocketAddr::from(([192, 0, 2, n], 40000)))
    }

    #[tokio::test]
    async fn announce_with_binary_hash_over_http() {
        let app = router(handle());
        let (status, body) = get(&app, &announce_uri(&HASH, 1, 100, "&event=started"), from(1)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"d8:completei0e10:incompletei1e8:intervali30e12:min intervali30e5:peers0:e");

        let (_, body) = get(&app, &announce_uri(&HASH, 2, 0, ""), from(2)).await;
        // Peer 1 from its connection's address, port from its query.
        let mut want = b"d8:completei1e10:incompletei1e8:intervali30e12:min intervali30e5:peers6:".to_vec();
        want.extend_from_slice(&[192, 0, 2, 1, 0x17, 0x71]);
        want.push(b'e');
        assert_eq!(body, want);
    }

    #[tokio::test]
    async fn trusted_ip_parameter_wins_over_the_connection() {
        let app = router(handle());
        get(&app, &announce_uri(&HASH, 1, 100, "&ip=10.9.8.7"), from(1)).await;
        let (_, body) = get(&app, &announce_uri(&HASH, 2, 100, "&compact=0"), from(2)).await;
        let b = BencodeRef::decode(&body, BDecodeOpt::default()).unwrap();
        let peers = b.dict().unwrap().lookup(b"peers").unwrap().list().unwrap();
        let p = peers.get(0).unwrap().dict().unwrap();
        assert_eq!(p.lookup(b"ip").unwrap().str(), Some("10.9.8.7"));
        assert_eq!(p.lookup(b"port").unwrap().int(), Some(6001));
        assert_eq!(p.lookup(b"peer id").unwrap().bytes(), Some(&b"-XX0001-00000000000\x01"[..]));
    }

    #[tokio::test]
    async fn untrusted_ip_parameter_is_ignored() {
        assert!(!TrackerConfig::default().trust_ip_param, "ip= is ignored unless configured");
        let h = Arc::new(TrackerHandle::new(TrackerConfig::default(), Arc::new(NoTopology)));
        let app = router(h);
        get(&app, &announce_uri(&HASH, 1, 100, "&ip=10.9.8.7"), from(1)).await;
        let (_, body) = get(&app, &announce_uri(&HASH, 2, 100, ""), from(2)).await;
        assert!(body.windows(6).any(|w| w == [192, 0, 2, 1, 0x17, 0x71]), "{body:?}");
    }

    #[tokio::test]
    async fn failures_are_bencoded_with_status_200() {
        let app = router(handle());
        let (status, body) = get(&app, "/announce?port=1", from(1)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"d14:failure reason17:missing info_hashe");
        let (_, body) = get(&app, &announce_uri(&HASH, 1, 1, "").replace("port=6001", "port=0"), from(1)).await;
        assert_eq!(body, failure("invalid port: must be 1 to 65535, got 0"));
        // No connection address and no ip parameter: the peer cannot be reached.
        let (_, body) = get(&app, &announce_uri(&HASH, 1, 1, ""), None).await;
        assert!(body.starts_with(b"d14:failure reason"), "{}", String::from_utf8_lossy(&body));
        // ... but a trusted ip parameter is enough.
        let (_, body) = get(&app, &announce_uri(&HASH, 1, 1, "&ip=10.0.0.1"), None).await;
        assert!(body.starts_with(b"d8:complete"), "{}", String::from_utf8_lossy(&body));
    }

    #[tokio::test]
    async fn scrape_several_binary_hashes_over_http() {
        let h = handle();
        let app = router(h.clone());
        let other = [7u8; 20];
        get(&app, &announce_uri(&HASH, 1, 0, ""), from(1)).await;
        get(&app, &announce_uri(&HASH, 2, 10, ""), from(2)).await;
        get(&app, &announce_uri(&other, 3, 10, ""), from(3)).await;
        let uri = format!("/scrape?info_hash={}&info_hash={}", percent_encode(&HASH), percent_encode(&other));
        let (status, body) = get(&app, &uri, None).await;
        assert_eq!(status, StatusCode::OK);
        let mut want = b"d5:filesd20:".to_vec();
        want.extend_from_slice(&other);
        want.extend_from_slice(b"d8:completei0e10:downloadedi0e10:incompletei1ee20:");
        want.extend_from_slice(&HASH);
        want.extend_from_slice(b"d8:completei1e10:downloadedi0e10:incompletei1eeee");
        assert_eq!(body, want);
        // A full scrape lists only the server's torrents: none yet, then both.
        let (_, none) = get(&app, "/scrape", None).await;
        assert_eq!(none, b"d5:filesdee");
        h.register_torrent(HASH);
        h.register_torrent(other);
        let (_, all) = get(&app, "/scrape", None).await;
        assert_eq!(all, want);
        // Asking for too many at once is refused.
        let many: String = (0..=64u8).map(|n| format!("info_hash={}&", percent_encode(&[n; 20]))).collect();
        let (_, too_many) = get(&app, &format!("/scrape?{many}"), None).await;
        assert_eq!(too_many, failure("invalid info_hash: at most 64 different ones per scrape"));
        let (_, bad) = get(&app, "/scrape?info_hash=abc", None).await;
        assert_eq!(bad, failure("invalid info_hash: must be 20 bytes, got 3"));
    }

    #[tokio::test]
    async fn handle_stats_and_permanent_seeder() {
        let h = Arc::new(TrackerHandle::new(
            TrackerConfig { trust_ip_param: true, ..TrackerConfig::default() },
            Arc::new(|ip: Ipv4Addr| -> Option<SwitchId> { Some(if ip.octets()[2] == 1 { "a" } else { "b" }.into()) }),
        ));
        let seeder = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 7000);
        h.set_seeder(Some(seeder));
        h.register_torrent(HASH);
        h.set_limits(60, 10);
        let app = router(h.clone());
        let (_, body) = get(&app, &announce_uri(&HASH, 1, 100, "&ip=10.0.1.5"), None).await;
        let mut want = b"d8:completei1e10:incompletei1e8:intervali60e12:min intervali60e5:peers6:".to_vec();
        want.extend_from_slice(&[10, 0, 0, 1, 0x1b, 0x58]);
        want.push(b'e');
        assert_eq!(body, want);
        get(&app, &announce_uri(&HASH, 2, 0, "&ip=10.0.2.5&event=completed"), None).await;
        let s = h.torrent_stats(&HASH).unwrap();
        assert_eq!((s.seeders, s.leechers, s.permanent, s.completed, s.registered), (1, 1, 1, 1, true));
        assert_eq!(h.stats(), vec![s]);
        assert_eq!(h.config().max_peers, 10);
    }
}
