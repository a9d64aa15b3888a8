//! The luna-servers of one cluster: each server's identity and advertised addresses
//! (`[server]` in luna.toml), its heartbeat record in the shared store (`meta/servers/<id>`),
//! and the cluster-wide rules between them (DHCP slices do not overlap).
//!
//! Invariants:
//! - a server writes only its own record (`servers/<id>`), every `heartbeat_interval_s`; the
//!   record says where it answers (`urls`), where its seeder takes peers, its DHCP slice and
//!   which revisions it holds and seeds, so no server needs to ask another one anything;
//! - registering (at start) also rewrites `servers` (the list of ids) with compare-and-swap, and
//!   its slice is checked against every other record read in the same batch: of two servers
//!   starting at once with overlapping slices, one batch conflicts, re-reads and is refused;
//! - a record whose heartbeat is older than three intervals is stale: it is listed as such and
//!   its URLs are no longer handed to nodes (the record stays; its slice stays reserved).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use luna_core::api::{HeldRevision, ServerInfo};
use luna_core::model::IpRange;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{Collection, Expect, Store, StoreError, Write};

/// Key prefix of heartbeat records in [`Collection::Meta`].
pub const PREFIX: &str = "servers/";
/// The record listing every registered id (rewritten by each registration, so two registrations
/// race on it).
pub const INDEX: &str = "servers";

/// `[server]` in luna.toml.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// This server's identity in the cluster; empty = the host name.
    pub id: String,
    /// Addresses nodes and the other servers reach this server at (its provisioning
    /// addresses); empty = the cluster's frontend_address.
    pub advertise: Vec<Ipv4Addr>,
    /// Seconds between heartbeats written to the store.
    pub heartbeat_interval_s: u64,
    /// Seconds between looks at the store for revisions packed on another server.
    pub replicate_interval_s: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { id: String::new(), advertise: Vec::new(), heartbeat_interval_s: 5, replicate_interval_s: 10 }
    }
}

impl ServerConfig {
    pub fn documented_defaults() -> String {
        let d = ServerConfig::default();
        format!(
            r#"
# This server among the luna-servers of one cluster (all on one MongoDB replica set).
[server]
# Identity in the cluster (heartbeat record, `luna cluster show`); empty = the host name.
id = "{id}"
# Provisioning addresses nodes and other servers reach this server at; empty = the
# cluster's frontend_address. Boot scripts, plans and torrents name every server's.
advertise = []
# Seconds between heartbeats written to the store (three missed = stale).
heartbeat_interval_s = {hb}
# Seconds between looks for revisions packed on another server (downloaded through the swarm).
# (Each server's part of the discovery range is [dhcp] slice.)
replicate_interval_s = {rep}
"#,
            id = d.id,
            hb = d.heartbeat_interval_s,
            rep = d.replicate_interval_s,
        )
    }

    /// Checks the values themselves; `id` resolved by [`ServerConfig::identity`].
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval_s == 0 {
            return Err("[server] heartbeat_interval_s must be at least 1".into());
        }
        if self.replicate_interval_s == 0 {
            return Err("[server] replicate_interval_s must be at least 1".into());
        }
        if let Some(a) = self.advertise.iter().find(|a| a.is_unspecified() || a.is_broadcast()) {
            return Err(format!("[server] advertise: {a} is not an address others can reach"));
        }
        if !self.id.is_empty() {
            check_id(&self.id)?;
        }
        Ok(())
    }

    /// The configured id, or the host name.
    pub fn identity(&self) -> Result<String, String> {
        if !self.id.is_empty() {
            return Ok(self.id.clone());
        }
        let host = host_name().ok_or("[server] id is empty and the host name cannot be read; set an id")?;
        check_id(&host).map_err(|e| format!("{e} (the host name; set [server] id)"))?;
        Ok(host)
    }
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 63 {
        return Err(format!("[server] id '{id}' must have 1 to 63 characters"));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("[server] id '{id}': character '{c}' is not allowed (letters, digits, - _ .)"));
    }
    Ok(())
}

fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let s = std::str::from_utf8(&buf[..end]).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

#[derive(Debug, thiserror::Error)]
pub enum ServersError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("server record '{key}' in the store is not valid: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "[dhcp] slice {slice} overlaps server '{other}''s slice {theirs}; give each server its own part of the cluster's dhcp_range"
    )]
    SliceOverlap { slice: IpRange, other: String, theirs: IpRange },
    #[error("[dhcp] slice {slice} is not inside the cluster's dhcp_range {range}")]
    SliceOutside { slice: IpRange, range: IpRange },
    #[error(
        "server id '{id}' is in use by a running server at {urls} (heartbeat {age} s ago); give each server its own [server] id"
    )]
    IdInUse { id: String, urls: String, age: u64 },
    #[error("server registration kept meeting concurrent registrations; try again")]
    Busy,
}

/// Seconds without a heartbeat after which a server counts as gone.
pub fn stale_after(interval_s: u64) -> u64 {
    interval_s.saturating_mul(3).max(3)
}

/// Every server record, with `age_secs`/`stale` filled in against `now`.
pub async fn list(store: &dyn Store, now: u64, interval_s: u64) -> Result<Vec<ServerInfo>, ServersError> {
    let mut out = Vec::new();
    for rec in store.list(Collection::Meta, PREFIX).await? {
        let mut info: ServerInfo = serde_json::from_value(rec.doc).map_err(|e| StoreError::Corrupt {
            collection: Collection::Meta,
            key: rec.key.clone(),
            reason: e.to_string(),
        })?;
        let age = now.saturating_sub(info.heartbeat);
        info.age_secs = Some(age);
        info.stale = age > stale_after(interval_s);
        out.push(info);
    }
    Ok(out)
}

/// The sans-IO part of registering: may `me` join next to `others`?
pub fn check_registration(
    me: &ServerInfo,
    others: &[ServerInfo],
    range: Option<IpRange>,
    now: u64,
    interval_s: u64,
) -> Result<(), ServersError> {
    if let (Some(slice), Some(range)) = (me.dhcp_slice, range) {
        if !(range.contains(slice.start) && range.contains(slice.end)) {
            return Err(ServersError::SliceOutside { slice, range });
        }
    }
    for o in others {
        if o.id == me.id {
            let age = now.saturating_sub(o.heartbeat);
            // The same id from elsewhere while that one is alive: two machines configured alike.
            if age <= stale_after(interval_s) && o.urls != me.urls && o.started != me.started {
                return Err(ServersError::IdInUse { id: o.id.clone(), urls: o.urls.join(" "), age });
            }
            continue;
        }
        if let (Some(a), Some(b)) = (me.dhcp_slice, o.dhcp_slice) {
            if a.overlaps(&b) {
                return Err(ServersError::SliceOverlap { slice: a, other: o.id.clone(), theirs: b });
            }
        }
    }
    Ok(())
}

/// The servers as the last heartbeat read them, in memory for the boot path, the torrent
/// files and the replicator (none of them reads the store for it).
pub struct View {
    me: String,
    servers: std::sync::RwLock<Vec<ServerInfo>>,
}

impl View {
    /// The view of server `me`, empty until its registration.
    pub fn new(me: &str) -> Self {
        View { me: me.to_string(), servers: std::sync::RwLock::new(Vec::new()) }
    }

    pub fn id(&self) -> &str {
        &self.me
    }

    pub fn set(&self, servers: Vec<ServerInfo>) {
        if let Ok(mut s) = self.servers.write() {
            *s = servers;
        }
    }

    pub fn servers(&self) -> Vec<ServerInfo> {
        self.servers.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Base URLs of every live server, this one's first (see [`ordered_urls`]).
    pub fn urls(&self) -> Vec<String> {
        let all = self.servers();
        let mine: Vec<String> = all.iter().find(|s| s.id == self.me).map(|s| s.urls.clone()).unwrap_or_default();
        let mut out = mine.clone();
        for u in ordered_urls("", &all).into_iter().skip(1) {
            if !out.contains(&u) {
                out.push(u);
            }
        }
        out
    }

    /// `first` (the URL the client reached) leading, then every live server's.
    pub fn urls_from(&self, first: &str) -> Vec<String> {
        let mut out = vec![first.to_string()];
        for u in self.urls() {
            if !out.contains(&u) {
                out.push(u);
            }
        }
        out
    }

    /// Every live server's tracker, this one's first: the torrent's announce-list.
    pub fn trackers(&self) -> Vec<String> {
        self.urls().into_iter().map(|u| format!("{u}/announce")).collect()
    }
}

/// This server's record, kept up to date and written by [`Heartbeat`].
pub struct Heartbeat {
    store: Arc<dyn Store>,
    interval: Duration,
    info: std::sync::Mutex<ServerInfo>,
    /// What this server holds right now (called before every heartbeat).
    holds: Option<HoldsSource>,
    /// Refreshed with every heartbeat.
    view: Arc<View>,
    interval_s: u64,
}

/// Reports the revisions this server holds (the image state implements it in `wiring.rs`).
pub type HoldsSource = Arc<dyn Fn() -> futures::future::BoxFuture<'static, Vec<HeldRevision>> + Send + Sync>;

impl Heartbeat {
    /// Registers `info` (see the module invariants) and returns the heartbeat that keeps it fresh.
    pub async fn register(
        store: Arc<dyn Store>,
        info: ServerInfo,
        range: Option<IpRange>,
        interval_s: u64,
        now: u64,
        holds: Option<HoldsSource>,
        view: Arc<View>,
    ) -> Result<Arc<Heartbeat>, ServersError> {
        for _ in 0..16 {
            let mut writes = Vec::new();
            let index = store.get(Collection::Meta, INDEX).await?;
            let mut ids: Vec<String> = index
                .as_ref()
                .and_then(|r| r.doc.get("ids"))
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default();
            let mut others = Vec::new();
            let mut mine = None;
            for rec in store.list(Collection::Meta, PREFIX).await? {
                let o: ServerInfo = serde_json::from_value(rec.doc.clone())
                    .map_err(|e| ServersError::Corrupt { key: rec.key.clone(), reason: e.to_string() })?;
                if o.id == info.id {
                    mine = Some(rec.rev);
                } else {
                    writes.push(Write::Check {
                        collection: Collection::Meta,
                        key: rec.key.clone(),
                        expect: Expect::Rev(rec.rev),
                    });
                }
                others.push(o);
            }
            check_registration(&info, &others, range, now, interval_s)?;
            if !ids.contains(&info.id) {
                ids.push(info.id.clone());
                ids.sort();
            }
            writes.push(Write::Put {
                collection: Collection::Meta,
                key: INDEX.into(),
                expect: index.as_ref().map_or(Expect::Absent, |r| Expect::Rev(r.rev)),
                doc: serde_json::json!({ "ids": ids }),
            });
            writes.push(Write::Put {
                collection: Collection::Meta,
                key: format!("{PREFIX}{}", info.id),
                expect: mine.map_or(Expect::Absent, Expect::Rev),
                doc: record_doc(&info),
            });
            match store.commit(writes).await {
                Ok(()) => {
                    tracing::info!(id = %info.id, urls = ?info.urls, slice = ?info.dhcp_slice.map(|s| s.to_string()), "server registered in the store");
                    view.set(others.into_iter().filter(|o| o.id != info.id).chain([info.clone()]).collect());
                    return Ok(Arc::new(Heartbeat {
                        store,
                        interval: Duration::from_secs(interval_s),
                        info: std::sync::Mutex::new(info),
                        holds,
                        view,
                        interval_s,
                    }));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServersError::Busy)
    }

    /// The servers as of the last heartbeat.
    pub fn view(&self) -> Arc<View> {
        self.view.clone()
    }

    /// This server's record as last written.
    pub fn info(&self) -> ServerInfo {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Writes the record now (its own record only: a conflict means our last write's revision
    /// is unknown, so it re-reads once).
    pub async fn beat(&self, now: u64) -> Result<(), ServersError> {
        let holds = match &self.holds {
            Some(h) => Some(h().await),
            None => None,
        };
        let info = {
            let mut i = self.info.lock().unwrap_or_else(|p| p.into_inner());
            i.heartbeat = now;
            if let Some(h) = holds {
                i.holds = h;
            }
            i.clone()
        };
        let key = format!("{PREFIX}{}", info.id);
        for _ in 0..3 {
            let cur = self.store.get(Collection::Meta, &key).await?;
            let expect = cur.map_or(Expect::Absent, |r| Expect::Rev(r.rev));
            match self
                .store
                .commit(vec![Write::Put {
                    collection: Collection::Meta,
                    key: key.clone(),
                    expect,
                    doc: record_doc(&info),
                }])
                .await
            {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServersError::Busy)
    }

    /// Removes this server's record on a clean stop, so the others stop counting it at once and
    /// a restart under the same id (whatever its advertised URLs now) is not taken for a second
    /// machine with that id. A server that dies keeps its record until it goes stale.
    pub async fn leave(&self) -> Result<(), ServersError> {
        let key = format!("{PREFIX}{}", self.info().id);
        for _ in 0..3 {
            let Some(cur) = self.store.get(Collection::Meta, &key).await? else { return Ok(()) };
            let delete = Write::Delete { collection: Collection::Meta, key: key.clone(), expect: Expect::Rev(cur.rev) };
            match self.store.commit(vec![delete]).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServersError::Busy)
    }

    /// Beats every interval until `stop` is cancelled.
    pub async fn run(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            let now = crate::service::unix_now();
            if let Err(e) = self.beat(now).await {
                tracing::warn!(error = %e, "cannot write the heartbeat");
            }
            match list(self.store.as_ref(), now, self.interval_s).await {
                Ok(l) => self.view.set(l),
                Err(e) => tracing::warn!(error = %e, "cannot read the other servers' records"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }
}

fn record_doc(info: &ServerInfo) -> Value {
    let mut i = info.clone();
    i.age_secs = None;
    i.stale = false;
    serde_json::to_value(i).expect("server info serialises")
}

/// The base URLs (`http://ADDR:PORT`) of a server advertising `addrs` on `port`.
pub fn urls(addrs: &[Ipv4Addr], port: u16) -> Vec<String> {
    addrs.iter().map(|a| format!("http://{a}:{port}")).collect()
}

/// Every live server's base URLs, `first` (the answering server's) leading, the others after in
/// id order: what boot scripts, plans and torrents name so that clients fail over.
pub fn ordered_urls(first: &str, servers: &[ServerInfo]) -> Vec<String> {
    let mut out = vec![first.to_string()];
    let mut live: Vec<&ServerInfo> = servers.iter().filter(|s| !s.stale).collect();
    live.sort_by(|a, b| a.id.cmp(&b.id));
    for s in live {
        for u in &s.urls {
            if !out.contains(u) {
                out.push(u.clone());
            }
        }
    }
    out
}

/// The seeder addresses of the servers holding `info_hash` (not stale), for a replica to fetch
/// from.
pub fn holders_of(
    servers: &[ServerInfo],
    info_hash: &str,
    except: &str,
) -> Vec<(String, Vec<String>, Option<SocketAddrV4>)> {
    servers
        .iter()
        .filter(|s| !s.stale && s.id != except && s.holds.iter().any(|h| h.info_hash == info_hash))
        .map(|s| (s.id.clone(), s.urls.clone(), s.seeder))
        .collect()
}

/// `GET /api/v1/cluster/servers` (admin): every server record, oldest id first.
pub fn router(store: Arc<dyn Store>, interval_s: u64, app: Arc<crate::http::AppState>) -> axum::Router {
    use axum::routing::get;
    let st = Arc::new((store, interval_s));
    axum::Router::new()
        .route(
            &format!("{}/cluster/servers", luna_core::api::API_PREFIX),
            get(|axum::extract::State(st): axum::extract::State<Arc<(Arc<dyn Store>, u64)>>| async move {
                list(st.0.as_ref(), crate::service::unix_now(), st.1).await.map(axum::Json).map_err(|e| match e {
                    ServersError::Store(s) => crate::http::ApiError(s.into()),
                    other => {
                        crate::http::ApiError(crate::service::ServiceError::Store(StoreError::Task(other.to_string())))
                    }
                })
            }),
        )
        .route_layer(axum::middleware::from_fn_with_state(app, crate::http::require_token))
        .with_state(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, slice: Option<&str>, heartbeat: u64) -> ServerInfo {
        ServerInfo {
            id: id.into(),
            urls: vec![format!("http://10.0.0.{}:7050", id.len())],
            seeder: None,
            dhcp_slice: slice.map(|s| s.parse().unwrap()),
            heartbeat,
            started: heartbeat,
            version: "t".into(),
            holds: Vec::new(),
            age_secs: None,
            stale: false,
        }
    }

    #[test]
    fn defaults_parse_back_and_bad_values_are_named() {
        #[derive(Deserialize)]
        struct W {
            server: ServerConfig,
        }
        let w: W = toml::from_str(&ServerConfig::documented_defaults()).unwrap();
        assert_eq!(w.server, ServerConfig::default());
        let w: W = toml::from_str("[server]\nid = \"a\"\nadvertise = [\"10.0.0.1\"]\n").unwrap();
        assert_eq!(w.server.identity().unwrap(), "a");
        w.server.validate().unwrap();
        let e = toml::from_str::<W>("[server]\nid = \"a b\"\n").unwrap().server.validate().unwrap_err();
        assert!(e.contains("'a b'") && e.contains("' '"), "{e}");
        let e = toml::from_str::<W>("[server]\nadvertise = [\"0.0.0.0\"]\n").unwrap().server.validate().unwrap_err();
        assert!(e.contains("0.0.0.0"), "{e}");
        let e = toml::from_str::<W>("[server]\nheartbeat_interval_s = 0\n").unwrap().server.validate().unwrap_err();
        assert!(e.contains("heartbeat_interval_s"), "{e}");
    }

    #[test]
    fn slices_must_lie_in_the_range_and_not_overlap() {
        let range: IpRange = "10.0.0.100-10.0.0.199".parse().unwrap();
        let a = info("a", Some("10.0.0.100-10.0.0.149"), 100);
        let b = info("bb", Some("10.0.0.150-10.0.0.199"), 100);
        check_registration(&b, std::slice::from_ref(&a), Some(range), 100, 5).unwrap();
        let c = info("ccc", Some("10.0.0.140-10.0.0.160"), 100);
        let e = check_registration(&c, &[a.clone(), b.clone()], Some(range), 100, 5).unwrap_err().to_string();
        assert!(e.contains("'a'") && e.contains("10.0.0.140-10.0.0.160") && e.contains("10.0.0.100-10.0.0.149"), "{e}");
        let d = info("dddd", Some("10.0.0.190-10.0.0.210"), 100);
        let e = check_registration(&d, &[], Some(range), 100, 5).unwrap_err().to_string();
        assert!(e.contains("not inside") && e.contains("10.0.0.100-10.0.0.199"), "{e}");
        // a stale server's slice stays reserved
        let e = check_registration(&c, &[info("a", Some("10.0.0.100-10.0.0.149"), 1)], Some(range), 1000, 5);
        assert!(matches!(e, Err(ServersError::SliceOverlap { .. })));
    }

    #[test]
    fn an_id_alive_elsewhere_is_refused_and_a_restart_is_not() {
        let mut old = info("a", None, 100);
        let mut me = info("a", None, 105);
        // restart of the same machine: same urls
        check_registration(&me, std::slice::from_ref(&old), None, 105, 5).unwrap();
        me.urls = vec!["http://10.0.0.9:7050".into()];
        let e = check_registration(&me, std::slice::from_ref(&old), None, 105, 5).unwrap_err().to_string();
        assert!(e.contains("'a'") && e.contains("10.0.0.1:7050"), "{e}");
        // the other one stopped beating long ago: taken over
        old.heartbeat = 10;
        check_registration(&me, &[old], None, 105, 5).unwrap();
    }

    #[test]
    fn urls_put_the_answering_server_first_and_skip_stale_ones() {
        let mut a = info("a", None, 100);
        a.urls = vec!["http://10.0.0.1:7050".into()];
        let mut b = info("b", None, 100);
        b.urls = vec!["http://10.0.0.2:7050".into()];
        let mut c = info("c", None, 1);
        c.urls = vec!["http://10.0.0.3:7050".into()];
        c.stale = true;
        let all = [c, b, a];
        assert_eq!(ordered_urls("http://10.0.0.2:7050", &all), ["http://10.0.0.2:7050", "http://10.0.0.1:7050"]);
    }

    #[tokio::test]
    async fn registration_and_heartbeats_go_to_the_store() {
        let store = crate::store::open("sqlite://:memory:").await.unwrap();
        let range: IpRange = "10.0.0.100-10.0.0.199".parse().unwrap();
        let a = info("a", Some("10.0.0.100-10.0.0.149"), 100);
        let hb =
            Heartbeat::register(store.clone(), a, Some(range), 5, 100, None, Arc::new(View::new("a"))).await.unwrap();
        hb.beat(107).await.unwrap();
        let b = info("bb", Some("10.0.0.120-10.0.0.160"), 108);
        let e = Heartbeat::register(store.clone(), b, Some(range), 5, 108, None, Arc::new(View::new("bb")))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("overlaps"), "{e}");
        let b = info("bb", Some("10.0.0.150-10.0.0.199"), 108);
        Heartbeat::register(store.clone(), b, Some(range), 5, 108, None, Arc::new(View::new("bb"))).await.unwrap();
        let l = list(store.as_ref(), 130, 5).await.unwrap();
        assert_eq!(l.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["a", "bb"]);
        assert_eq!(l[0].heartbeat, 107);
        assert_eq!((l[0].age_secs, l[0].stale), (Some(23), true));
        assert_eq!((l[1].age_secs, l[1].stale), (Some(22), true));
        let l = list(store.as_ref(), 110, 5).await.unwrap();
        assert!(!l[0].stale && !l[1].stale);
        let ids = store.get(Collection::Meta, INDEX).await.unwrap().unwrap().doc;
        assert_eq!(ids["ids"], serde_json::json!(["a", "bb"]));

        // A clean stop removes the record: the same id starts again at once, even with other
        // URLs (before, a fresh heartbeat at other URLs read as a second machine with that id).
        hb.leave().await.unwrap();
        hb.leave().await.unwrap();
        assert_eq!(
            list(store.as_ref(), 110, 5).await.unwrap().iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["bb"]
        );
        let mut again = info("a", Some("10.0.0.100-10.0.0.149"), 111);
        again.urls = vec!["http://10.0.0.1:7050".into()];
        Heartbeat::register(store.clone(), again, Some(range), 5, 111, None, Arc::new(View::new("a"))).await.unwrap();
    }
}
