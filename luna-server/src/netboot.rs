//! The HTTP side of a network boot: iPXE scripts, the discovery menu, kernel and initrd.
//!
//! Invariants:
//! - a node is identified by its BOOTIF MAC; an unknown MAC gets the menu, never another node's script;
//! - what a node is served is computed by [`boot_plan`] from the store alone, so
//!   `luna node show NAME --script boot` (a preview, no status change) prints exactly that;
//! - script rendering is `boot::ipxe` (pure); this module only gathers values and does I/O;
//! - kernel and initrd are the node's osimage's *current* revision, served with Range support;
//! - the per-boot token handed to the agent is an HMAC over node name and issue time, so the server
//!   can check "this request comes from the node it claims to be" without storing anything.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hmac::{Hmac, Mac};
use luna_core::api::{ErrorCode, InstallPlan, PlanBmc, PlanImage, PlanInterface, StatusReport};
use luna_core::model::{AnyObject, Kind, Node, Osimage, BOOTIF};
use luna_core::MacAddr;
use serde::Deserialize;
use sha2::Sha256;
use tower::ServiceExt;

use crate::api::{error_response, ApiError, AppState};
use crate::boot::ipxe::{self, MenuInput, NodeBoot};
use crate::object_as;
use crate::service::{unix_now, Service, ServiceError};

/// How long a boot token stays valid: an install that takes longer has bigger problems.
pub const BOOT_TOKEN_TTL_SECS: u64 = 24 * 3600;

/// Signs and checks per-boot tokens.
#[derive(Clone)]
pub struct BootTokens {
    key: Vec<u8>,
}

impl BootTokens {
    pub fn new(secret: &[u8]) -> Self {
        // Derived, so the admin token itself never travels on a kernel command line.
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key length");
        mac.update(b"luna boot token v1");
        BootTokens { key: mac.finalize().into_bytes().to_vec() }
    }

    fn sign(&self, node: &str, issued: u64) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac takes any key length");
        mac.update(node.as_bytes());
        mac.update(b"\0");
        mac.update(issued.to_string().as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    pub fn issue(&self, node: &str, now: u64) -> String {
        format!("{now}.{}", self.sign(node, now))
    }

    /// Whether `token` was issued for `node` and is still fresh.
    pub fn verify(&self, node: &str, token: &str, now: u64) -> bool {
        let Some((ts, sig)) = token.split_once('.') else { return false };
        let Ok(issued) = ts.parse::<u64>() else { return false };
        if issued > now + 300 || now.saturating_sub(issued) > BOOT_TOKEN_TTL_SECS {
            return false;
        }
        let want = self.sign(node, issued);
        want.len() == sig.len() && want.bytes().zip(sig.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
    }
}

/// What the boot path needs besides the service.
pub struct BootContext {
    pub tokens: BootTokens,
    pub data_dir: PathBuf,
    /// Switch-port autodiscovery (learned tables, binding of unknown MACs).
    pub discovery: Arc<crate::discovery::Discovery>,
}

/// What a MAC gets at the iPXE stage.
#[derive(Debug, Clone, PartialEq)]
pub enum BootPlan {
    Node(Box<NodeBoot>),
    Menu(MenuInput),
    /// Something the admin must fix; the node shows it and asks again.
    Error(String),
}

/// Base URL of this server as the node sees it: the Host it connected to, else the cluster's
/// frontend address.
pub fn base_url(headers: &HeaderMap, frontend: Option<Ipv4Addr>, http_port: u16) -> String {
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        if !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || ".:-[]".contains(c)) {
            return format!("http://{host}");
        }
    }
    let addr = frontend.map(|a| a.to_string()).unwrap_or_else(|| "127.0.0.1".into());
    format!("http://{addr}:{http_port}")
}

/// Decides what `mac` is served: its node's script, the discovery menu, or an explanation.
pub async fn boot_plan(
    service: &Service,
    tokens: &BootTokens,
    mac: MacAddr,
    base: &str,
) -> Result<BootPlan, ServiceError> {
    let Some(node) = service.shared_node_by_mac(mac).await? else {
        let mut unbound: Vec<String> = service
            .list(Kind::Node)
            .await?
            .into_iter()
            .filter_map(|o| match o {
                AnyObject::Node(n) if n.mac.is_none() => Some(n.name),
                _ => None,
            })
            .collect();
        unbound.truncate(500);
        return Ok(BootPlan::Menu(MenuInput {
            base_url: base.to_string(),
            unbound_nodes: unbound,
            timeout_secs: ipxe::MENU_TIMEOUT_SECS,
            discover_url: None,
            note: None,
        }));
    };
    let node = object_as!(node, Node).ok_or_else(|| ServiceError::BadRequest("not a node".into()))?;
    node_plan(service, tokens, node, mac, base).await
}

/// What kind `k` of a shared object is, or an internal error (the store returned another kind).
fn kind_error(kind: Kind, name: &str) -> ServiceError {
    ServiceError::BadRequest(format!("{kind} '{name}' is not stored as a {kind}"))
}

pub async fn node_plan(
    service: &Service,
    tokens: &BootTokens,
    node: &Node,
    mac: MacAddr,
    base: &str,
) -> Result<BootPlan, ServiceError> {
    // Shared, decoded objects: the boot path reads these for every request.
    let (cluster, group) =
        tokio::try_join!(service.shared(Kind::Cluster, ""), service.shared(Kind::Group, &node.group))?;
    let cluster = object_as!(cluster, Cluster).ok_or_else(|| kind_error(Kind::Cluster, "cluster"))?;
    let group = object_as!(group, Group).ok_or_else(|| kind_error(Kind::Group, &node.group))?;
    let image = service.shared(Kind::Osimage, &group.osimage).await?;
    let image = object_as!(image, Osimage).ok_or_else(|| kind_error(Kind::Osimage, &group.osimage))?;
    if image.current().is_none() {
        return Ok(BootPlan::Error(format!(
            "osimage {} of node {} has no packed revision: run luna osimage pack {}",
            image.name, node.name, image.name
        )));
    }
    let Some(bootif) = node.interface(BOOTIF) else {
        return Ok(BootPlan::Error(format!(
            "node {} has no BOOTIF interface: give group {} one",
            node.name, group.name
        )));
    };
    let Some(ip) = bootif.ip else {
        return Ok(BootPlan::Error(format!("node {} has no address on its BOOTIF interface", node.name)));
    };
    let network = service.shared(Kind::Network, &bootif.network).await?;
    let network = object_as!(network, Network).ok_or_else(|| kind_error(Kind::Network, &bootif.network))?;
    Ok(BootPlan::Node(Box::new(NodeBoot {
        name: node.name.clone(),
        mac,
        ip,
        netmask: network.cidr.netmask(),
        gateway: network.gateway,
        dns: network.dns_server.map(std::net::IpAddr::V4).into_iter().collect(),
        hostname: node.name.clone(),
        domain: Some(group.domain.clone().unwrap_or(cluster.domain.clone())),
        base_url: base.to_string(),
        kernel_url: format!("{base}/boot/node/{}/kernel", node.name),
        initrd_url: format!("{base}/boot/node/{}/initrd", node.name),
        kernel_opts: image.kernel_opts.clone(),
        localboot: node.localboot,
        service: node.service,
        token: tokens.issue(&node.name, unix_now()),
    })))
}

pub fn render(plan: &BootPlan, base: &str) -> String {
    match plan {
        BootPlan::Node(n) => ipxe::render_node_script(n),
        BootPlan::Menu(m) => ipxe::render_menu(m),
        BootPlan::Error(e) => ipxe::render_error(base, e),
    }
}

#[derive(Debug, Deserialize)]
pub struct IpxeQuery {
    mac: Option<String>,
    /// Admin preview (`luna node show --script boot`): no status change; needs the admin token.
    preview: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct BindQuery {
    mac: Option<String>,
    node: Option<String>,
}

fn script(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

fn parse_mac(mac: Option<&str>) -> Result<MacAddr, String> {
    let raw = mac.unwrap_or("");
    if raw.is_empty() {
        return Err("missing mac parameter: chain /boot/ipxe?mac=${net0/mac}".into());
    }
    raw.parse().map_err(|e: luna_core::mac::MacParseError| e.to_string())
}

fn is_admin(st: &AppState, headers: &HeaderMap) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    crate::api::constant_time_eq(given.as_bytes(), st.admin_token.as_bytes())
}

async fn ipxe_script(State(st): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<IpxeQuery>) -> Response {
    let preview = matches!(q.preview.as_deref(), Some("1" | "true" | "yes"));
    let cluster = match st.service.shared(Kind::Cluster, "").await {
        Ok(c) => c,
        Err(e) => return ApiError(e).into_response(),
    };
    let Some(cluster) = object_as!(cluster, Cluster) else {
        return ApiError(kind_error(Kind::Cluster, "cluster")).into_response();
    };
    let base = base_url(&headers, cluster.frontend_address, cluster.http_port);
    if preview && !is_admin(&st, &headers) {
        return error_response(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "preview needs the admin token".into(),
        );
    }
    let mac = match parse_mac(q.mac.as_deref()) {
        Ok(m) => m,
        Err(e) if preview => return error_response(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e),
        Err(e) => return script(ipxe::render_error(&base, &e)),
    };
    let plan = match boot_plan(&st.service, &st.boot.tokens, mac, &base).await {
        Ok(p) => p,
        Err(e) => return ApiError(e).into_response(),
    };
    // An unknown MAC: switch-port discovery may know which node it is.
    let plan = match plan {
        BootPlan::Menu(m) if !preview => crate::discovery::http::on_unknown_mac(&st, mac, &base, m).await,
        other => other,
    };
    if !preview {
        match &plan {
            BootPlan::Node(n) => record(&st.service, &n.name, "ipxe", "boot script served"),
            BootPlan::Menu(_) => tracing::info!(%mac, "unknown mac got the discovery menu"),
            BootPlan::Error(e) => tracing::warn!(%mac, error = %e, "boot refused"),
        }
    }
    script(render(&plan, &base))
}

async fn bind(State(st): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<BindQuery>) -> Response {
    let cluster = match st.service.cluster().await {
        Ok(c) => c,
        Err(e) => return ApiError(e).into_response(),
    };
    let base = base_url(&headers, cluster.frontend_address, cluster.http_port);
    let mac = match parse_mac(q.mac.as_deref()) {
        Ok(m) => m,
        Err(e) => return script(ipxe::render_error(&base, &e)),
    };
    let name = q.node.unwrap_or_default();
    let retry = |msg: String| script(ipxe::render_error(&base, &format!("{msg}; back to the menu")));
    let node = match st.service.bind_mac(&name, mac).await {
        Ok(n) => n,
        Err(e) => return retry(e.to_string()),
    };
    tracing::info!(node = %node.name, %mac, "mac bound from the boot menu");
    match node_plan(&st.service, &st.boot.tokens, &node, mac, &base).await {
        Ok(plan) => {
            if let BootPlan::Node(n) = &plan {
                record(&st.service, &n.name, "ipxe", "bound from the boot menu");
            }
            script(render(&plan, &base))
        }
        Err(e) => retry(e.to_string()),
    }
}

/// Serves the node's kernel or initrd (the current revision of its osimage), Range included.
async fn node_file(
    State(st): State<Arc<AppState>>,
    Path((name, file)): Path<(String, String)>,
    req: Request,
) -> Response {
    let path = match node_file_path(&st, &name, &file).await {
        Ok(p) => p,
        Err(e) => return ApiError(e).into_response(),
    };
    // A ranged request continues a transfer: only the first fetch is a step worth recording.
    if file == "kernel" && !req.headers().contains_key(header::RANGE) {
        record(&st.service, &name, "kernel", "kernel fetched");
    }
    match tower_http::services::ServeFile::new(path).oneshot(req).await {
        Ok(resp) => resp.into_response(),
        Err(e) => match e {},
    }
}

async fn node_file_path(st: &AppState, name: &str, file: &str) -> Result<PathBuf, ServiceError> {
    let node = st.service.node(name).await?;
    let group = st.service.group(&node.group).await?;
    let image: Osimage = match st.service.get(Kind::Osimage, &group.osimage).await? {
        AnyObject::Osimage(o) => o,
        _ => unreachable!("kind checked by get"),
    };
    let rev = image.current().ok_or_else(|| {
        ServiceError::BadRequest(format!(
            "osimage {} has no packed revision: run luna osimage pack {}",
            image.name, image.name
        ))
    })?;
    let fname = match file {
        "kernel" => &rev.kernel,
        "initrd" => &rev.initrd,
        other => {
            return Err(ServiceError::BadRequest(format!("unknown boot file '{other}': expected kernel or initrd")))
        }
    };
    Ok(image_dir(&st.boot.data_dir, &image.name, rev.id).join(fname))
}

/// Where a published revision's files live.
pub fn image_dir(data_dir: &std::path::Path, osimage: &str, rev: u32) -> PathBuf {
    data_dir.join("images").join(osimage).join(rev.to_string())
}

/// Records a boot step through the group-commit queue without waiting for it: the answer
/// need not wait for the store, and the status is in it within about one round
/// (`status.rs`). An unknown node name records nothing (the writer skips it).
fn record(service: &Service, node: &str, step: &str, message: &str) {
    service.queue_node_status(node, step, message.to_string());
}

#[derive(Debug, Deserialize)]
pub struct NodeQuery {
    node: Option<String>,
    token: Option<String>,
}

/// Checks that a boot-path request comes from the node it names: a valid boot token, or the
/// request arriving from the node's own BOOTIF address.
async fn authenticate_node(st: &AppState, q: &NodeQuery, remote: SocketAddr) -> Result<Node, Response> {
    let name = q.node.as_deref().unwrap_or("");
    let denied =
        || error_response(StatusCode::FORBIDDEN, ErrorCode::Forbidden, format!("request is not from node '{name}'"));
    let node = match st.service.node(name).await {
        Ok(n) => n,
        Err(ServiceError::NotFound { .. }) => return Err(denied()),
        Err(e) => return Err(ApiError(e).into_response()),
    };
    let token_ok = q.token.as_deref().is_some_and(|t| st.boot.tokens.verify(name, t, unix_now()));
    let ip_ok = match remote {
        SocketAddr::V4(v4) => node.boot_ip() == Some(*v4.ip()),
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some_and(|ip| node.boot_ip() == Some(ip)),
    };
    if token_ok || ip_ok {
        Ok(node)
    } else {
        Err(denied())
    }
}

/// Everything the agent needs, from the store alone.
pub async fn install_plan(service: &Service, node: &Node, base: &str) -> Result<InstallPlan, ServiceError> {
    let cluster = service.cluster().await?;
    let group = service.group(&node.group).await?;
    let image = match service.get(Kind::Osimage, &group.osimage).await? {
        AnyObject::Osimage(o) => o,
        _ => unreachable!("kind checked by get"),
    };
    let mut interfaces = Vec::new();
    let mut bmc_if = None;
    for i in &node.interfaces {
        let net = service.network(&i.network).await?;
        let params = group.interface(&i.name).map(|g| g.params.clone()).unwrap_or_default();
        let pi = PlanInterface {
            name: i.name.clone(),
            mac: if i.name == BOOTIF { node.mac.or(i.mac) } else { i.mac },
            ip: i.ip,
            prefix: net.cidr.prefix_len(),
            gateway: net.gateway,
            dns: net.dns_server,
            mtu: net.mtu,
            params,
        };
        if i.name == luna_core::model::BMC {
            bmc_if = Some(pi);
        } else {
            interfaces.push(pi);
        }
    }
    // The BMC password travels only to nodes asked to set their BMC up.
    let bmc = match group.bmcsetup.as_ref().filter(|_| node.setupbmc) {
        Some(b) => match service.get(Kind::Bmcsetup, b).await? {
            AnyObject::Bmcsetup(b) => Some(PlanBmc {
                protocol: b.protocol,
                userid: b.userid,
                user: b.user,
                password: b.password,
                netchannel: b.netchannel,
                mgmtchannel: b.mgmtchannel,
                ip: bmc_if.as_ref().and_then(|i| i.ip),
                prefix: bmc_if.as_ref().map_or(0, |i| i.prefix),
                gateway: bmc_if.as_ref().and_then(|i| i.gateway),
            }),
            _ => None,
        },
        None => None,
    };
    let plan_image = image.current().map(|rev| {
        let dir = format!("{base}/images/{}/{}", image.name, rev.id);
        PlanImage {
            osimage: image.name.clone(),
            revision: rev.id,
            torrent_url: format!("{dir}/{}", rev.torrent),
            http_url: format!("{dir}/{}", rev.archive),
            sha256: rev.sha256.clone(),
            size: rev.archive_size,
            info_hash: rev.info_hash.clone(),
        }
    });
    Ok(InstallPlan {
        node: node.name.clone(),
        hostname: node.name.clone(),
        domain: group.domain.clone().unwrap_or(cluster.domain),
        interfaces,
        image: plan_image,
        prescript: group.prescript.clone(),
        partscript: group.partscript.clone(),
        postscript: group.postscript.clone(),
        torrent_interface: group.torrent_interface.clone(),
        service: node.service,
        setupbmc: node.setupbmc,
        bmc,
        server_url: base.to_string(),
    })
}

async fn plan(
    State(st): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<NodeQuery>,
) -> Response {
    let node = match authenticate_node(&st, &q, remote).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    let cluster = match st.service.cluster().await {
        Ok(c) => c,
        Err(e) => return ApiError(e).into_response(),
    };
    let base = base_url(&headers, cluster.frontend_address, cluster.http_port);
    match install_plan(&st.service, &node, &base).await {
        Ok(p) => {
            // Waits: the agent's next report must not be overtaken by this one.
            st.service.record_node_status(&node.name, "plan", "install plan fetched".into(), true).await;
            axum::Json(p).into_response()
        }
        Err(e) => ApiError(e).into_response(),
    }
}

async fn status(
    State(st): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Query(q): Query<NodeQuery>,
    body: Bytes,
) -> Response {
    let node = match authenticate_node(&st, &q, remote).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    let report: StatusReport = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("invalid status report: {e}"),
            )
        }
    };
    if report.progress.is_some_and(|p| p > 100) || report.step.is_empty() || report.step.len() > 32 {
        return error_response(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            format!("invalid status step '{}'", report.step),
        );
    }
    if report.progress.is_none() {
        // The log is the node's boot history: the store keeps only the latest step.
        let detail = report.message.as_deref().unwrap_or("");
        tracing::info!(node = %node.name, step = %report.step, detail, "node status");
    }
    match st.service.set_node_status(&node.name, &report.step, report.progress, report.message).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/boot/plan", get(plan))
        .route("/boot/status", post(status))
        .route("/boot/ipxe", get(ipxe_script))
        .route("/boot/ipxe/bind", get(bind))
        .route("/boot/node/{name}/{file}", get(node_file))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_node_and_time() {
        let t = BootTokens::new(b"admin");
        let tok = t.issue("node001", 1_000_000);
        assert!(t.verify("node001", &tok, 1_000_100));
        assert!(!t.verify("node002", &tok, 1_000_100));
        assert!(!t.verify("node001", &tok, 1_000_000 + BOOT_TOKEN_TTL_SECS + 1));
        assert!(!BootTokens::new(b"other").verify("node001", &tok, 1_000_100));
        assert!(!t.verify("node001", "garbage", 1_000_100));
        assert!(!t.verify("node001", &tok.replace('.', ""), 1_000_100));
    }

    #[test]
    fn base_url_prefers_host_header() {
        let mut h = HeaderMap::new();
        assert_eq!(base_url(&h, Some("10.141.255.254".parse().unwrap()), 7050), "http://10.141.255.254:7050");
        h.insert(header::HOST, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(base_url(&h, None, 7050), "http://10.0.0.1:8080");
        h.insert(header::HOST, "evil\"host".parse().unwrap());
        assert_eq!(base_url(&h, None, 7050), "http://127.0.0.1:7050");
    }
}
