//! HTTP: `GET /api/v1/discovery/macs` (admin) and `GET /boot/ipxe/discover` (the discovery
//! menu's default entry), plus the hook `/boot/ipxe` calls for an unknown MAC.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use luna_core::api::API_PREFIX;
use luna_core::MacAddr;
use serde::Deserialize;

use super::BindOutcome;
use crate::api::{ApiError, AppState};
use crate::boot::ipxe::{self, MenuInput};
use crate::netboot::{self, BootPlan};

/// Tries of `/boot/ipxe/discover` before the menu's manual choices, and the pause between them.
pub const DISCOVER_TRIES: u32 = 5;
pub const DISCOVER_PAUSE_SECS: u32 = 2;

#[derive(Debug, Deserialize)]
struct MacsQuery {
    switch: Option<String>,
}

async fn macs(State(st): State<Arc<AppState>>, Query(q): Query<MacsQuery>) -> Response {
    match st.boot.discovery.list(q.switch.as_deref()).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}

/// `/api/v1/discovery/macs` (behind the admin token) and `/boot/ipxe/discover`.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route(&format!("{API_PREFIX}/discovery/macs"), get(macs))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), crate::api::require_token));
    Router::new().route("/boot/ipxe/discover", get(discover)).with_state(state.clone()).merge(api.with_state(state))
}

/// Called by `/boot/ipxe` for a MAC no node has: binds it from the tables already learned (no
/// poll, the boot path does not wait), else returns the menu with discovery as its default entry.
pub async fn on_unknown_mac(st: &AppState, mac: MacAddr, base: &str, menu: MenuInput) -> BootPlan {
    let d = &st.boot.discovery;
    let outcome = match d.try_bind(mac).await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(%mac, error = %e, "switch-port discovery failed");
            return BootPlan::Menu(menu);
        }
    };
    match outcome {
        BindOutcome::Bound(node, _) => plan_or_menu(st, &node, mac, base, menu).await,
        BindOutcome::NotLearned => {
            if d.has_switches().await {
                BootPlan::Menu(MenuInput {
                    discover_url: Some(ipxe::discover_url(base, 1)),
                    timeout_secs: ipxe::DISCOVER_MENU_SECS,
                    ..menu
                })
            } else {
                BootPlan::Menu(menu)
            }
        }
        other => BootPlan::Menu(MenuInput { note: note(&other), ..menu }),
    }
}

fn note(o: &BindOutcome) -> Option<String> {
    match o {
        BindOutcome::NoNode(loc) => Some(format!("this machine is on {loc}; no node is configured for that port")),
        BindOutcome::Refused(_, why) => Some(format!("not bound: {why}")),
        BindOutcome::NotLearned => Some("no switch has learned this machine's port".into()),
        BindOutcome::Bound(..) => None,
    }
}

async fn plan_or_menu(
    st: &AppState,
    node: &luna_core::model::Node,
    mac: MacAddr,
    base: &str,
    menu: MenuInput,
) -> BootPlan {
    match netboot::node_plan(&st.service, &st.boot.tokens, node, mac, base).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(node = %node.name, error = %e, "bound by discovery but no boot plan");
            BootPlan::Menu(menu)
        }
    }
}

#[derive(Debug, Deserialize)]
struct DiscoverQuery {
    mac: Option<String>,
    #[serde(rename = "try")]
    attempt: Option<u32>,
}

/// Polls the switches of the machine's segment now, binds it if its port is learned; else
/// waits a little and asks again, up to [`DISCOVER_TRIES`], then the menu's manual choices.
async fn discover(
    State(st): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<DiscoverQuery>,
) -> Response {
    let cluster = match st.service.cluster().await {
        Ok(c) => c,
        Err(e) => return ApiError(e).into_response(),
    };
    let base = netboot::base_url(&headers, cluster.frontend_address, cluster.http_port);
    let script = |body: String| ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response();
    let mac: MacAddr = match q.mac.as_deref().unwrap_or("").parse() {
        Ok(m) => m,
        Err(e) => return script(ipxe::render_error(&base, &format!("discover: {e}"))),
    };
    let attempt = q.attempt.unwrap_or(1).clamp(1, DISCOVER_TRIES);
    // Whatever happened meanwhile (bound from the menu, by the admin), the normal answer first.
    let plan = match netboot::boot_plan(&st.service, &st.boot.tokens, mac, &base).await {
        Ok(p) => p,
        Err(e) => return ApiError(e).into_response(),
    };
    let BootPlan::Menu(menu) = plan else { return script(netboot::render(&plan, &base)) };
    if let Err(e) = st.boot.discovery.poll_for(Some(remote.ip())).await {
        tracing::warn!(%mac, error = %e, "cannot poll switches for discovery");
    }
    let outcome = match st.boot.discovery.try_bind(mac).await {
        Ok(o) => o,
        Err(e) => return script(ipxe::render_error(&base, &format!("discovery: {e}"))),
    };
    let plan = match outcome {
        BindOutcome::Bound(node, _) => plan_or_menu(&st, &node, mac, &base, menu).await,
        BindOutcome::NotLearned if attempt < DISCOVER_TRIES => {
            let next = ipxe::discover_url(&base, attempt + 1);
            return script(ipxe::render_discover_wait(&next, attempt, DISCOVER_TRIES, DISCOVER_PAUSE_SECS));
        }
        other => {
            tracing::info!(%mac, "switch-port discovery gave up; manual choices offered");
            BootPlan::Menu(MenuInput { note: note(&other), ..menu })
        }
    };
    script(netboot::render(&plan, &base))
}
