//! The HTTP side of a network boot: iPXE scripts, the discovery menu, kernel and initrd, and the
//! agent's install plan and status reports.
//!
//! Invariants:
//! - a node is identified by its BOOTIF MAC; an unknown MAC gets the menu, never another node's script;
//! - what a node is served is computed by [`boot_plan`] from the store alone, so
//!   `luna node show NAME --script boot` (a preview, no status change, no token) prints exactly that;
//! - script rendering is `boot::ipxe` (pure); this module only gathers values and does I/O;
//! - kernel and initrd are the node's osimage's *current* revision, served with Range support;
//! - the per-boot token is issued only to a request from the address DHCP gives the node's MAC,
//!   and what it unlocks (the plan once, reports until `installed`, then `booted` only) is
//!   decided by `boot::token` (sans-IO); a source address alone unlocks nothing.
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
use luna_core::api::{ErrorCode, InstallPlan, PlanBmc, PlanImage, PlanInterface, StatusReport};
use luna_core::model::{AnyObject, ImageRevision, Kind, Node, Osimage, RootMode, BOOTIF};
use luna_core::MacAddr;
use serde::Deserialize;
use tower::ServiceExt;

use crate::boot::ipxe::{self, MenuInput, NodeBoot};
use crate::boot::token::{Binding, BootTokens, Ledger, LedgerError, Refusal};
use crate::http::{error_response, is_admin, ApiError, AppState};
use crate::object_as;
use crate::service::{unix_now, Service, ServiceError};

/// What the boot path needs besides the service.
pub struct BootContext {
    /// Signs and checks per-boot tokens; what each may still do is in the store's ledger.
    tokens: BootTokens,
    pub data_dir: PathBuf,
    /// Switch-port autodiscovery (learned tables, binding of unknown MACs); none: off.
    pub discovery: Option<Arc<crate::discovery::Discovery>>,
    /// The cluster's other luna-servers: node scripts name their kernel and initramfs URLs as
    /// fallbacks; none: this server alone.
    pub servers: Option<Arc<crate::servers::View>>,
}

impl BootContext {
    /// The boot path; tokens are checked against the ledger in the service's store, so a token
    /// any server of the cluster issued is honoured here.
    pub fn new(tokens: BootTokens, data_dir: PathBuf) -> Self {
        BootContext { tokens, data_dir, discovery: None, servers: None }
    }

    /// Node scripts fall back to the kernel and initramfs of the other live servers in `view`.
    pub fn with_servers(mut self, view: Arc<crate::servers::View>) -> Self {
        self.servers = Some(view);
        self
    }

    /// Unknown MACs are looked up in `discovery`'s learned switch tables.
    pub fn with_discovery(mut self, discovery: Arc<crate::discovery::Discovery>) -> Self {
        self.discovery = Some(discovery);
        self
    }
}

/// The boot routes' state: the shared HTTP state and the boot context.
pub struct BootState {
    pub app: Arc<AppState>,
    pub boot: BootContext,
    /// The boot-token ledger in the store.
    pub ledger: Ledger,
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
pub async fn boot_plan(service: &Service, mac: MacAddr, base: &str) -> Result<BootPlan, ServiceError> {
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
    node_plan(service, node, mac, base).await
}

/// What kind `k` of a shared object is, or an internal error (the store returned another kind).
fn kind_error(kind: Kind, name: &str) -> ServiceError {
    ServiceError::BadRequest(format!("{kind} '{name}' is not stored as a {kind}"))
}

/// The node's boot script values; `token` is left empty for the caller to fill in (a real token
/// only for the node's own request, see [`ipxe_script`]).
async fn node_plan(service: &Service, node: &Node, mac: MacAddr, base: &str) -> Result<BootPlan, ServiceError> {
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
        fallback_bases: Vec::new(),
        kernel_opts: image.kernel_opts.clone(),
        localboot: node.localboot,
        service: node.service,
        token: String::new(),
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

pub(crate) fn script(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

fn parse_mac(mac: Option<&str>) -> Result<MacAddr, String> {
    let raw = mac.unwrap_or("");
    if raw.is_empty() {
        return Err("missing mac parameter: chain /boot/ipxe?mac=${net0/mac}".into());
    }
    raw.parse().map_err(|e: luna_core::mac::MacParseError| e.to_string())
}

/// The IPv4 address a request came from (an IPv4-mapped IPv6 peer counts as IPv4).
pub fn remote_ipv4(remote: SocketAddr) -> Option<Ipv4Addr> {
    match remote {
        SocketAddr::V4(v4) => Some(*v4.ip()),
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped(),
    }
}

/// What the node's token is checked against: its name, MAC and BOOTIF address now.
fn binding(node: &Node) -> Option<Binding<'_>> {
    Some(Binding { node: &node.name, mac: node.mac?, ip: node.boot_ip()? })
}

/// Text of the script a refused boot request gets: it names neither the node nor its address.
const NOT_FROM_NODE: &str = "boot refused: this request does not come from the address DHCP gives this mac";

async fn ipxe_script(
    State(st): State<Arc<BootState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<IpxeQuery>,
) -> Response {
    let preview = matches!(q.preview.as_deref(), Some("1" | "true" | "yes"));
    let cluster = match st.app.service.shared(Kind::Cluster, "").await {
        Ok(c) => c,
        Err(e) => return ApiError(e).into_response(),
    };
    let Some(cluster) = object_as!(cluster, Cluster) else {
        return ApiError(kind_error(Kind::Cluster, "cluster")).into_response();
    };
    // A preview comes over the admin API's HTTPS port: its Host is not the boot port nodes use.
    let base = match preview {
        true => base_url(&HeaderMap::new(), cluster.frontend_address, cluster.http_port),
        false => base_url(&headers, cluster.frontend_address, cluster.http_port),
    };
    if preview && !is_admin(&st.app.admin_token, &headers) {
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
    let plan = match boot_plan(&st.app.service, mac, &base).await {
        Ok(p) => p,
        Err(e) => return ApiError(e).into_response(),
    };
    // An unknown MAC: switch-port discovery may know which node it is (then it asks DHCP again).
    let plan = match plan {
        BootPlan::Menu(m) if !preview => match super::discover::on_unknown_mac(&st, mac, &base, m).await {
            Ok(rebound) => {
                tracing::info!(%mac, "unknown mac bound by switch-port discovery");
                return script(rebound);
            }
            Err(menu) => BootPlan::Menu(menu),
        },
        other => other,
    };
    let mut plan = plan;
    if let (BootPlan::Node(n), Some(view)) = (&mut plan, &st.boot.servers) {
        n.fallback_bases = view.urls_from(&base).into_iter().skip(1).collect();
    }
    if preview {
        if let BootPlan::Node(n) = &mut plan {
            n.token = PREVIEW_TOKEN.into();
        }
        return script(render(&plan, &base));
    }
    match &mut plan {
        BootPlan::Node(n) => {
            let b = Binding { node: &n.name, mac: n.mac, ip: n.ip };
            let from = remote_ipv4(remote).unwrap_or(Ipv4Addr::UNSPECIFIED);
            let issued = st.ledger.issue(&b, from, unix_now(), rand::random()).await;
            match issued {
                Ok(token) => n.token = token,
                Err(LedgerError::Refused(why)) => {
                    tracing::warn!(node = %n.name, %mac, %remote, reason = %why, "boot script refused");
                    return script(ipxe::render_refused_redhcp(&base, NOT_FROM_NODE));
                }
                Err(e) => {
                    // The node retries; the script says why without naming the node.
                    tracing::error!(node = %n.name, %mac, error = %e, "boot token not recorded");
                    return script(ipxe::render_error(&base, "the boot server cannot record a boot token now"));
                }
            }
            record(&st.app.service, &n.name, "ipxe", "boot script served");
        }
        BootPlan::Menu(_) => tracing::info!(%mac, "unknown mac got the discovery menu"),
        BootPlan::Error(e) => tracing::warn!(%mac, error = %e, "boot refused"),
    }
    script(render(&plan, &base))
}

/// What an admin preview shows where the node's script has its per-boot token.
pub const PREVIEW_TOKEN: &str = "PER-BOOT-TOKEN";

/// Why a MAC may not be bound to a node from the boot menu.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("discovery is off (the cluster has no dhcp_range): an admin sets the node's mac")]
    DiscoveryOff,
    #[error("request from {from} does not come from the address DHCP leased to mac {mac}")]
    NotLeased { mac: MacAddr, from: String },
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// Binds `mac` to the unbound node `name` for a machine in the discovery menu, and logs it.
/// Allowed only while discovery is on (the cluster has a `dhcp_range`), only for a node without a
/// MAC (`Service::bind_mac`), and only from the address DHCP leased to `mac` right now, so a
/// machine can bind its own MAC and nobody else's. The one place binding is decided.
pub async fn bind_node(service: &Service, name: &str, mac: MacAddr, remote: SocketAddr) -> Result<Node, BindError> {
    let cluster = service.cluster().await?;
    if cluster.dhcp_range.is_none() {
        return Err(BindError::DiscoveryOff);
    }
    let not_leased = || BindError::NotLeased { mac, from: remote.ip().to_string() };
    let from = remote_ipv4(remote).ok_or_else(not_leased)?;
    let lease = service
        .store()
        .get(crate::store::Collection::Lease, &crate::dhcp::lease::Lease::ip_key(from))
        .await
        .map_err(ServiceError::from)?
        .map(crate::dhcp::lease::Versioned::from_record)
        .transpose()
        .map_err(ServiceError::from)?;
    let now = unix_now();
    if !lease.is_some_and(|l| l.value.held_by(&mac) && l.value.expires > now) {
        return Err(not_leased());
    }
    let node = service.bind_mac(name, mac).await?;
    tracing::warn!(node = %node.name, %mac, %remote, "mac bound to node from the boot menu");
    Ok(node)
}

async fn bind(
    State(st): State<Arc<BootState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<BindQuery>,
) -> Response {
    let cluster = match st.app.service.cluster().await {
        Ok(c) => c,
        Err(e) => return ApiError(e).into_response(),
    };
    let base = base_url(&headers, cluster.frontend_address, cluster.http_port);
    let mac = match parse_mac(q.mac.as_deref()) {
        Ok(m) => m,
        Err(e) => return script(ipxe::render_error(&base, &e)),
    };
    let name = q.node.unwrap_or_default();
    match bind_node(&st.app.service, &name, mac, remote).await {
        Ok(node) => {
            record(&st.app.service, &node.name, "ipxe", "bound from the boot menu");
            // The machine still has its discovery address: it asks DHCP again for the node's own
            // address and then fetches its script (and token) from there.
            script(ipxe::render_rebound(&base))
        }
        Err(e) => {
            tracing::warn!(node = %name, %mac, %remote, error = %e, "boot menu binding refused");
            script(ipxe::render_error(&base, &format!("{e}; back to the menu")))
        }
    }
}

/// Serves the node's kernel or initrd (the current revision of its osimage), Range included.
async fn node_file(
    State(st): State<Arc<BootState>>,
    Path((name, file)): Path<(String, String)>,
    req: Request,
) -> Response {
    let path = match node_file_path(&st, &name, &file).await {
        Ok(p) => p,
        Err(e) => return ApiError(e).into_response(),
    };
    // A ranged request continues a transfer: only the first fetch is a step worth recording.
    if file == "kernel" && !req.headers().contains_key(header::RANGE) {
        record(&st.app.service, &name, "kernel", "kernel fetched");
    }
    match tower_http::services::ServeFile::new(path).oneshot(req).await {
        Ok(resp) => resp.into_response(),
        Err(e) => match e {},
    }
}

async fn node_file_path(st: &BootState, name: &str, file: &str) -> Result<PathBuf, ServiceError> {
    let node = st.app.service.node(name).await?;
    let group = st.app.service.group(&node.group).await?;
    let image: Osimage = match st.app.service.get(Kind::Osimage, &group.osimage).await? {
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

/// The node a boot-path request names, with the token and address it came with; the ledger
/// decides what that unlocks.
async fn requesting_node(
    st: &BootState,
    q: &NodeQuery,
    remote: SocketAddr,
) -> Result<(Node, String, Ipv4Addr), Response> {
    let name = q.node.as_deref().unwrap_or("");
    let node = match st.app.service.node(name).await {
        Ok(n) => n,
        Err(ServiceError::NotFound { .. }) => return Err(denied(name)),
        Err(e) => return Err(ApiError(e).into_response()),
    };
    let token = q.token.clone().unwrap_or_default();
    let from = remote_ipv4(remote).unwrap_or(Ipv4Addr::UNSPECIFIED);
    Ok((node, token, from))
}

fn denied(name: &str) -> Response {
    error_response(
        StatusCode::FORBIDDEN,
        ErrorCode::Forbidden,
        format!("request is not from node '{name}' or its token is spent"),
    )
}

fn refused(node: &str, remote: SocketAddr, why: Refusal) -> Response {
    tracing::warn!(node, %remote, reason = %why, "boot request refused");
    denied(node)
}

/// A ledger answer as a response: a refusal is a 403 naming nothing; a store failure a 5xx.
fn ledger_failed(node: &str, remote: SocketAddr, e: LedgerError) -> Response {
    match e {
        LedgerError::Refused(why) => refused(node, remote, why),
        LedgerError::Store(e) => ApiError(ServiceError::Store(e)).into_response(),
        LedgerError::Corrupt { .. } => {
            tracing::error!(node, error = %e, "boot request failed");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                "boot token ledger unreadable".into(),
            )
        }
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
                password: if b.per_node_password { service.node_bmc_password(&node.name).await? } else { b.password },
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
    let root = group.root.unwrap_or(image.root);
    let plan_image = match image.current() {
        Some(rev) => Some(plan_image(&image, rev, root, base)?),
        None => None,
    };
    Ok(InstallPlan {
        node: node.name.clone(),
        hostname: node.name.clone(),
        domain: group.domain.clone().unwrap_or(cluster.domain),
        interfaces,
        image: plan_image,
        root,
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

/// The archive and torrent URLs of the other live servers that hold the image's revision (this
/// server's, `base`, stays first in `http_url`/`torrent_url`).
pub fn add_mirrors(image: &mut PlanImage, base: &str, servers: &[luna_core::api::ServerInfo]) {
    let base = base.trim_end_matches('/');
    let (Some(archive), Some(torrent)) =
        (image.http_url.strip_prefix(base).map(String::from), image.torrent_url.strip_prefix(base).map(String::from))
    else {
        return;
    };
    let mut holders: Vec<&luna_core::api::ServerInfo> = servers
        .iter()
        .filter(|s| !s.stale && s.holds.iter().any(|h| h.osimage == image.osimage && h.revision == image.revision))
        .collect();
    holders.sort_by(|a, b| a.id.cmp(&b.id));
    for u in holders.iter().flat_map(|s| s.urls.iter()) {
        let u = u.trim_end_matches('/');
        if u != base && !image.http_mirrors.iter().any(|m| m.starts_with(&format!("{u}/"))) {
            image.http_mirrors.push(format!("{u}{archive}"));
            image.torrent_mirrors.push(format!("{u}{torrent}"));
        }
    }
}

/// What the node downloads: the archive, or for `overlay` the squashfs (a revision packed while
/// no node used overlay has none: the admin must pack again, and the plan says so).
pub fn plan_image(image: &Osimage, rev: &ImageRevision, root: RootMode, base: &str) -> Result<PlanImage, ServiceError> {
    let dir = format!("{base}/images/{}/{}", image.name, rev.id);
    if root == RootMode::Overlay {
        let Some(sq) = &rev.squashfs else {
            return Err(ServiceError::BadRequest(format!(
                "osimage '{}' revision {} has no squashfs for root mode overlay: run 'luna osimage pack {}'",
                image.name, rev.id, image.name
            )));
        };
        return Ok(PlanImage {
            osimage: image.name.clone(),
            revision: rev.id,
            torrent_url: format!("{dir}/{}", sq.torrent),
            http_url: format!("{dir}/{}", sq.file),
            sha256: sq.sha256.clone(),
            size: sq.size,
            info_hash: sq.info_hash.clone(),
            http_mirrors: Vec::new(),
            torrent_mirrors: Vec::new(),
        });
    }
    Ok(PlanImage {
        osimage: image.name.clone(),
        revision: rev.id,
        torrent_url: format!("{dir}/{}", rev.torrent),
        http_url: format!("{dir}/{}", rev.archive),
        sha256: rev.sha256.clone(),
        size: rev.archive_size,
        info_hash: rev.info_hash.clone(),
        http_mirrors: Vec::new(),
        torrent_mirrors: Vec::new(),
    })
}

async fn plan(
    State(st): State<Arc<BootState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<NodeQuery>,
) -> Response {
    let (node, token, from) = match requesting_node(&st, &q, remote).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    let Some(b) = binding(&node) else { return refused(&node.name, remote, Refusal::Invalid) };
    // Checked before the plan is built (no work for a stranger) and taken after (a plan that
    // failed to build does not use the token up).
    if let Err(e) = st.ledger.check_plan(&b, &token, from, unix_now()).await {
        return ledger_failed(&node.name, remote, e);
    }
    let cluster = match st.app.service.cluster().await {
        Ok(c) => c,
        Err(e) => return ApiError(e).into_response(),
    };
    let base = base_url(&headers, cluster.frontend_address, cluster.http_port);
    let mut p = match install_plan(&st.app.service, &node, &base).await {
        Ok(p) => p,
        Err(e) => return ApiError(e).into_response(),
    };
    if let (Some(image), Some(view)) = (p.image.as_mut(), &st.boot.servers) {
        add_mirrors(image, &base, &view.servers());
    }
    if let Err(e) = st.ledger.take_plan(&b, &token, from, unix_now()).await {
        return ledger_failed(&node.name, remote, e);
    }
    // Waits: the agent's next report must not be overtaken by this one.
    st.app.service.record_node_status(&node.name, "plan", "install plan fetched".into(), true).await;
    axum::Json(p).into_response()
}

/// `GET /boot/nocloud/{file}?node=&token=`: the node's cloud-init NoCloud data (`meta-data`,
/// `user-data`, `network-config`), for its agent to write a seed directory into an image that
/// has cloud-init. Only the node itself, with its current token, before `installed`
/// ([`Ledger::check_agent`]).
async fn nocloud(
    State(st): State<Arc<BootState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(file): Path<String>,
    Query(q): Query<NodeQuery>,
) -> Response {
    if !super::nocloud::FILES.contains(&file.as_str()) {
        return error_response(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("no nocloud file '{file}' (there are {})", super::nocloud::FILES.join(", ")),
        );
    }
    let (node, token, from) = match requesting_node(&st, &q, remote).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    let Some(b) = binding(&node) else { return refused(&node.name, remote, Refusal::Invalid) };
    if let Err(e) = st.ledger.check_agent(&b, &token, from, unix_now()).await {
        return ledger_failed(&node.name, remote, e);
    }
    let cluster = match st.app.service.cluster().await {
        Ok(c) => c,
        Err(e) => return ApiError(e).into_response(),
    };
    let base = base_url(&headers, cluster.frontend_address, cluster.http_port);
    let plan = match install_plan(&st.app.service, &node, &base).await {
        Ok(p) => p,
        Err(e) => return ApiError(e).into_response(),
    };
    let keys = &cluster.ssh_authorized_keys;
    let body = match file.as_str() {
        "meta-data" => super::nocloud::meta_data(&plan, keys),
        "network-config" => super::nocloud::network_config(&plan, node.mac),
        _ => match st.app.service.group(&node.group).await {
            Ok(g) => super::nocloud::user_data(&plan, &g.cloudinit_userdata, keys),
            Err(e) => return ApiError(e).into_response(),
        },
    };
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

async fn status(
    State(st): State<Arc<BootState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Query(q): Query<NodeQuery>,
    body: Bytes,
) -> Response {
    let (node, token, from) = match requesting_node(&st, &q, remote).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    let Some(b) = binding(&node) else { return refused(&node.name, remote, Refusal::Invalid) };
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
    if let Err(e) = st.ledger.report(&b, &token, &report.step, from, unix_now()).await {
        return ledger_failed(&node.name, remote, e);
    }
    if report.progress.is_none() {
        // The log is the node's boot history: the store keeps only the latest step.
        let detail = report.message.as_deref().unwrap_or("");
        tracing::info!(node = %node.name, step = %report.step, detail, "node status");
    }
    // `installed` also decides whether the node boots from its disk from now on.
    let bytes = (report.bytes_from_peers, report.bytes_over_http);
    let recorded = if report.step == "installed" && report.progress.is_none() {
        st.app.service.set_node_installed(&node.name, report.message).await
    } else {
        st.app.service.set_node_status(&node.name, &report.step, report.progress, report.message).await
    };
    match recorded {
        Ok(_) => {
            if let (Some(peers), Some(http)) = bytes {
                st.app.live.node_bytes(&node.name, peers, http);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => ApiError(e).into_response(),
    }
}

/// `served` (2xx), `refused` (4xx) or `error`, for the boot counters.
fn outcome(resp: &Response) -> [crate::metrics::Label; 1] {
    let s = resp.status();
    let o = if s.is_success() {
        "served"
    } else if s.is_client_error() {
        "refused"
    } else {
        "error"
    };
    crate::metrics::l1("outcome", o)
}

async fn count_plan(resp: Response) -> Response {
    crate::metrics::global().plan_requests.get_or_create(&outcome(&resp)).inc();
    resp
}

async fn count_script(resp: Response) -> Response {
    crate::metrics::global().boot_scripts.get_or_create(&outcome(&resp)).inc();
    resp
}

pub fn router(app: Arc<AppState>, boot: BootContext) -> Router {
    let ledger = Ledger::new(boot.tokens.clone(), app.service.store().clone());
    let state = Arc::new(BootState { app, boot, ledger });
    Router::new()
        .route("/boot/plan", get(plan).layer(axum::middleware::map_response(count_plan)))
        .route("/boot/status", post(status))
        .route("/boot/nocloud/{file}", get(nocloud))
        .route("/boot/ipxe", get(ipxe_script).layer(axum::middleware::map_response(count_script)))
        .route("/boot/ipxe/bind", get(bind))
        .route("/boot/ipxe/discover", get(super::discover::discover))
        .route("/boot/node/{name}/{file}", get(node_file))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_prefers_host_header() {
        let mut h = HeaderMap::new();
        assert_eq!(base_url(&h, Some("10.141.255.254".parse().unwrap()), 7050), "http://10.141.255.254:7050");
        h.insert(header::HOST, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(base_url(&h, None, 7050), "http://10.0.0.1:8080");
        h.insert(header::HOST, "evil\"host".parse().unwrap());
        assert_eq!(base_url(&h, None, 7050), "http://127.0.0.1:7050");
    }

    #[test]
    fn mirrors_are_the_other_live_holders_of_the_revision() {
        let held = |id: &str, url: &str, rev: u32, stale: bool| luna_core::api::ServerInfo {
            id: id.into(),
            urls: vec![url.into()],
            seeder: None,
            dhcp_slice: None,
            heartbeat: 0,
            started: 0,
            version: "t".into(),
            holds: vec![luna_core::api::HeldRevision {
                osimage: "compute".into(),
                revision: rev,
                info_hash: "h".into(),
                seeding: true,
            }],
            age_secs: None,
            stale,
        };
        let mut image = PlanImage {
            osimage: "compute".into(),
            revision: 3,
            torrent_url: "http://10.0.0.1:7050/images/compute/3/compute.torrent".into(),
            http_url: "http://10.0.0.1:7050/images/compute/3/compute.tar.zst".into(),
            sha256: String::new(),
            size: 0,
            info_hash: "h".into(),
            http_mirrors: Vec::new(),
            torrent_mirrors: Vec::new(),
        };
        let servers = [
            held("c", "http://10.0.0.3:7050", 3, false),
            held("a", "http://10.0.0.1:7050", 3, false),
            held("b", "http://10.0.0.2:7050", 3, false),
            held("d", "http://10.0.0.4:7050", 2, false),
            held("e", "http://10.0.0.5:7050", 3, true),
        ];
        add_mirrors(&mut image, "http://10.0.0.1:7050", &servers);
        assert_eq!(
            image.http_mirrors,
            [
                "http://10.0.0.2:7050/images/compute/3/compute.tar.zst",
                "http://10.0.0.3:7050/images/compute/3/compute.tar.zst"
            ]
        );
        assert_eq!(
            image.torrent_mirrors,
            [
                "http://10.0.0.2:7050/images/compute/3/compute.torrent",
                "http://10.0.0.3:7050/images/compute/3/compute.torrent"
            ]
        );
    }
}
