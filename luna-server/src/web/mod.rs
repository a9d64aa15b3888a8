//! The live view and the metrics: `GET /` (the page), `GET /web/{app.js,style.css}`,
//! `GET /api/v1/live` (Server-Sent Events), `GET /api/v1/live/node/{name}` (a node's last
//! steps) and `GET /metrics` (Prometheus text).
//!
//! The page is plain HTML, CSS and JavaScript embedded in the binary (`assets/`, no CDN, no
//! build step). It holds no data: everything comes from the event stream, which needs the
//! admin token (a browser's `EventSource` cannot send headers, so the token may come as
//! `?token=`; the page keeps it in the tab's session storage).
//!
//! Events come from [`crate::live::Live`] (what the store commits) and from [`sampler`], which
//! once a second reads the image revisions, the tracker's and seeder's counters and the nodes'
//! byte reports into a `stats` event and into the gauges of `/metrics`.
//!
//! Depends on `http/` (state, token check), `live`, `metrics` and `image`; nothing depends on it
//! but `server.rs`.

mod sse;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ipnet::IpNet;
use luna_core::api::{ErrorCode, LiveEvent, LiveImage, LiveNode, LiveStats};
use luna_core::model::{AnyObject, Kind};
use serde::{Deserialize, Serialize};

use crate::http::{constant_time_eq, error_response, is_admin, ApiError, AppState};
use crate::image::ImageState;
use crate::metrics::{l1, l2};
use crate::service::{Service, ServiceError};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// How often `stats` events go out (and the gauges of `/metrics` are refreshed).
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// Seconds over which the upload rate is averaged.
const RATE_WINDOW: usize = 5;

/// `[metrics]` in the config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Addresses that may read `/metrics` without the admin token (Prometheus scrapers carry
    /// none). Everyone else needs the token.
    pub allow: Vec<IpNet>,
}

impl MetricsConfig {
    pub fn documented_defaults() -> String {
        r#"
# GET /metrics (Prometheus text format) needs the admin token, except from these networks
# (scrapers carry no token), e.g. allow = ["127.0.0.1/32", "10.141.0.0/16"].
[metrics]
allow = []
"#
        .to_string()
    }

    /// Whether `ip` may read `/metrics` without a token.
    pub fn allows(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.allow.iter().any(|net| net.contains(&ip))
    }
}

/// What the web routes share.
pub struct Web {
    pub app: Arc<AppState>,
    pub images: Option<Arc<ImageState>>,
    pub metrics_config: MetricsConfig,
    /// The latest `stats` event, sent to a new client right after its snapshot.
    latest: Mutex<Option<LiveStats>>,
}

impl Web {
    pub fn new(app: Arc<AppState>, images: Option<Arc<ImageState>>, metrics_config: MetricsConfig) -> Arc<Web> {
        Arc::new(Web { app, images, metrics_config, latest: Mutex::new(None) })
    }

    fn latest(&self) -> Option<LiveStats> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/web/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/web/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/api/v1/live", get(sse::live))
        .route("/api/v1/live/node/{name}", get(node_history))
        .route("/metrics", get(metrics))
        .with_state(web)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `?token=` for clients that cannot send headers (the browser's `EventSource`).
#[derive(Debug, Default, Deserialize)]
pub struct TokenQuery {
    pub token: Option<String>,
}

/// Whether the request carries the admin token, as a bearer header or as `?token=`.
pub fn authorized(admin_token: &str, headers: &HeaderMap, query: &TokenQuery) -> bool {
    is_admin(admin_token, headers)
        || query.token.as_deref().is_some_and(|t| constant_time_eq(t.as_bytes(), admin_token.as_bytes()))
}

fn unauthorized() -> Response {
    error_response(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthorized,
        "missing or wrong admin token: send it as a bearer token or as ?token=".into(),
    )
}

async fn metrics(
    State(web): State<Arc<Web>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Response {
    if !web.metrics_config.allows(remote.ip()) && !authorized(&web.app.admin_token, &headers, &q) {
        return unauthorized();
    }
    // The live gauges are as fresh as the last sample (at most a second old).
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], web.app.metrics.encode())
        .into_response()
}

/// `GET /api/v1/live/node/{name}`: the node's status and its last steps (since the server
/// started; the server log has all of them).
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeHistory {
    pub node: String,
    pub group: String,
    pub status: Option<luna_core::model::NodeStatus>,
    pub history: VecDeque<luna_core::model::NodeStatus>,
}

async fn node_history(
    State(web): State<Arc<Web>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Response {
    if !authorized(&web.app.admin_token, &headers, &q) {
        return unauthorized();
    }
    match web.app.service.node(&name).await {
        Ok(n) => {
            Json(NodeHistory { history: web.app.live.history(&n.name), node: n.name, group: n.group, status: n.status })
                .into_response()
        }
        Err(e) => ApiError(e).into_response(),
    }
}

/// Every node with its group, switch and status, sorted by name.
pub async fn snapshot(service: &Service) -> Result<Vec<LiveNode>, ServiceError> {
    let mut nodes: Vec<LiveNode> = service
        .list(Kind::Node)
        .await?
        .into_iter()
        .filter_map(|o| match o {
            AnyObject::Node(n) => {
                Some(LiveNode { name: n.name, group: Some(n.group), switch: n.switch, status: Some(n.status) })
            }
            _ => None,
        })
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nodes)
}

/// Once a second until `stop`: a `stats` event and the gauges of `/metrics`.
pub async fn sampler(web: Arc<Web>, stop: tokio_util::sync::CancellationToken) {
    let mut sent: VecDeque<(Instant, u64)> = VecDeque::with_capacity(RATE_WINDOW + 1);
    let mut steps_seen = BTreeSet::new();
    let mut hashes_seen = BTreeSet::new();
    let mut revs_seen = BTreeSet::new();
    loop {
        let stats = sample(&web, &mut sent, &mut steps_seen, &mut hashes_seen, &mut revs_seen).await;
        *web.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats.clone());
        web.app.live.publish(LiveEvent::Stats(stats));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(STATS_INTERVAL) => {}
        }
    }
}

async fn sample(
    web: &Web,
    sent: &mut VecDeque<(Instant, u64)>,
    steps_seen: &mut BTreeSet<String>,
    hashes_seen: &mut BTreeSet<String>,
    revs_seen: &mut BTreeSet<(String, String)>,
) -> LiveStats {
    let m = &web.app.metrics;
    let mut images = Vec::new();
    let mut hashes = BTreeMap::new();
    if let Some(state) = &web.images {
        match web.app.service.list(Kind::Osimage).await {
            Ok(list) => {
                for o in list {
                    let name = o.name().to_string();
                    let Ok(revs) = crate::image::revisions(state, &name).await else { continue };
                    for r in revs {
                        let t = r.tracker.unwrap_or_default();
                        let up = r.seeder.as_ref().map_or(0, |s| s.uploaded_bytes);
                        hashes.insert(r.revision.info_hash.clone(), (t.seeders, t.leechers));
                        images.push(LiveImage {
                            osimage: name.clone(),
                            revision: r.revision.id,
                            current: r.current,
                            seeders: t.seeders,
                            leechers: t.leechers,
                            completed: t.completed,
                            seeder_uploaded_bytes: up,
                        });
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "live view: cannot list images"),
        }
    }
    // Gauges: set what is there, zero what was there before and is gone.
    for img in &images {
        let rev = (img.osimage.clone(), img.revision.to_string());
        m.seeder_uploaded_bytes
            .get_or_create(&l2("osimage", rev.0.clone(), "revision", rev.1.clone()))
            .set(i64::try_from(img.seeder_uploaded_bytes).unwrap_or(i64::MAX));
        revs_seen.insert(rev);
    }
    for (hash, (seeders, leechers)) in &hashes {
        m.tracker_peers.get_or_create(&l2("info_hash", hash.clone(), "kind", "seeders")).set(i64::from(*seeders));
        m.tracker_peers.get_or_create(&l2("info_hash", hash.clone(), "kind", "leechers")).set(i64::from(*leechers));
        hashes_seen.insert(hash.clone());
    }
    hashes_seen.retain(|h| {
        let keep = hashes.contains_key(h);
        if !keep {
            m.tracker_peers.remove(&l2("info_hash", h.clone(), "kind", "seeders"));
            m.tracker_peers.remove(&l2("info_hash", h.clone(), "kind", "leechers"));
        }
        keep
    });
    revs_seen.retain(|(o, r)| {
        let keep = images.iter().any(|i| &i.osimage == o && &i.revision.to_string() == r);
        if !keep {
            m.seeder_uploaded_bytes.remove(&l2("osimage", o.clone(), "revision", r.clone()));
        }
        keep
    });
    let counts = web.app.live.step_counts();
    for (step, n) in &counts {
        m.nodes_by_step.get_or_create(&l1("step", step.clone())).set(i64::try_from(*n).unwrap_or(i64::MAX));
        steps_seen.insert(step.clone());
    }
    for step in steps_seen.iter().filter(|s| !counts.contains_key(*s)) {
        m.nodes_by_step.get_or_create(&l1("step", step.clone())).set(0);
    }

    let seeder_bytes: u64 = images.iter().map(|i| i.seeder_uploaded_bytes).sum();
    let http_bytes = m.http_fallback_bytes.get();
    let now = Instant::now();
    let total = seeder_bytes + http_bytes;
    sent.push_back((now, total));
    while sent.len() > RATE_WINDOW + 1 {
        sent.pop_front();
    }
    let upload_rate = match sent.front() {
        Some((t0, b0)) if now > *t0 => total.saturating_sub(*b0) as f64 / now.duration_since(*t0).as_secs_f64(),
        _ => 0.0,
    };
    let (node_bytes_from_peers, node_bytes_over_http) = web.app.live.node_byte_totals();
    LiveStats {
        time: crate::service::unix_now(),
        images,
        seeder_bytes,
        http_bytes,
        upload_rate,
        node_bytes_from_peers,
        node_bytes_over_http,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_allow_list_matches_v4_and_mapped_v4() {
        let c = MetricsConfig { allow: vec!["127.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()] };
        assert!(c.allows("127.0.0.1".parse().unwrap()));
        assert!(c.allows("::ffff:127.0.0.2".parse().unwrap()));
        assert!(c.allows("fd00::1".parse().unwrap()));
        assert!(!c.allows("10.0.0.1".parse().unwrap()));
        assert!(!MetricsConfig::default().allows("127.0.0.1".parse().unwrap()));
        let parsed: MetricsConfig = toml::from_str("allow = [\"10.141.0.0/16\"]").unwrap();
        assert!(parsed.allows("10.141.3.4".parse().unwrap()));
        let bad = toml::from_str::<MetricsConfig>("allow = [\"10.141.0.0/33\"]").unwrap_err().to_string();
        assert!(bad.contains("allow"), "{bad}");
    }

    #[test]
    fn token_as_header_or_query() {
        let mut h = HeaderMap::new();
        let none = TokenQuery::default();
        assert!(!authorized("s3cret", &h, &none));
        assert!(authorized("s3cret", &h, &TokenQuery { token: Some("s3cret".into()) }));
        assert!(!authorized("s3cret", &h, &TokenQuery { token: Some("s3cre".into()) }));
        h.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(authorized("s3cret", &h, &none));
    }
}
