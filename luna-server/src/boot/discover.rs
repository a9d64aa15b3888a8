//! Switch-port discovery on the boot path: what `/boot/ipxe` does for a MAC no node has, and
//! `/boot/ipxe/discover` (the discovery menu's default entry). The learning and the binding rules
//! are `crate::discovery`'s; this module only turns their outcome into iPXE scripts.
//!
//! A machine bound here still has its discovery address, so it never gets the node's script (and
//! token) in the same answer: it gets `render_rebound` (DHCP again, now for the node's own address,
//! then `/boot/ipxe` from there), as a machine bound from the menu does.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use luna_core::MacAddr;
use serde::Deserialize;

use super::handlers::{base_url, boot_plan, render, script, BootPlan, BootState};
use super::ipxe::{self, MenuInput};
use crate::discovery::BindOutcome;
use crate::http::ApiError;

/// Tries of `/boot/ipxe/discover` before the menu's manual choices, and the pause between them.
pub const DISCOVER_TRIES: u32 = 5;
pub const DISCOVER_PAUSE_SECS: u32 = 2;

/// Called by `/boot/ipxe` for a MAC no node has: binds it from the tables already learned (no
/// poll, the boot path does not wait) and answers with the rebound script, else returns the menu
/// with discovery as its default entry.
pub async fn on_unknown_mac(st: &BootState, mac: MacAddr, base: &str, menu: MenuInput) -> Result<String, MenuInput> {
    let Some(d) = &st.boot.discovery else { return Err(menu) };
    let outcome = match d.try_bind(mac).await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(%mac, error = %e, "switch-port discovery failed");
            return Err(menu);
        }
    };
    match outcome {
        BindOutcome::Bound(..) => Ok(ipxe::render_rebound(base)),
        BindOutcome::NotLearned if d.has_switches().await => Err(MenuInput {
            discover_url: Some(ipxe::discover_url(base, 1)),
            timeout_secs: ipxe::DISCOVER_MENU_SECS,
            ..menu
        }),
        BindOutcome::NotLearned => Err(menu),
        other => Err(MenuInput { note: note(&other), ..menu }),
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

#[derive(Debug, Deserialize)]
pub struct DiscoverQuery {
    mac: Option<String>,
    #[serde(rename = "try")]
    attempt: Option<u32>,
}

/// Polls the switches of the machine's segment now, binds it if its port is learned; else
/// waits a little and asks again, up to [`DISCOVER_TRIES`], then the menu's manual choices.
pub async fn discover(
    State(st): State<Arc<BootState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<DiscoverQuery>,
) -> Response {
    let cluster = match st.app.service.cluster().await {
        Ok(c) => c,
        Err(e) => return ApiError(e).into_response(),
    };
    let base = base_url(&headers, cluster.frontend_address, cluster.http_port);
    let mac: MacAddr = match q.mac.as_deref().unwrap_or("").parse() {
        Ok(m) => m,
        Err(e) => return script(ipxe::render_error(&base, &format!("discover: {e}"))),
    };
    let attempt = q.attempt.unwrap_or(1).clamp(1, DISCOVER_TRIES);
    // Whatever happened meanwhile (bound from the menu, by the admin): the node's address first.
    let menu = match boot_plan(&st.app.service, mac, &base).await {
        Ok(BootPlan::Menu(menu)) => menu,
        Ok(BootPlan::Node(_)) => return script(ipxe::render_rebound(&base)),
        Ok(plan @ BootPlan::Error(_)) => return script(render(&plan, &base)),
        Err(e) => return ApiError(e).into_response(),
    };
    let Some(d) = &st.boot.discovery else { return script(render(&BootPlan::Menu(menu), &base)) };
    if let Err(e) = d.poll_for(Some(remote.ip())).await {
        tracing::warn!(%mac, error = %e, "cannot poll switches for discovery");
    }
    let outcome = match d.try_bind(mac).await {
        Ok(o) => o,
        Err(e) => return script(ipxe::render_error(&base, &format!("discovery: {e}"))),
    };
    let menu = match outcome {
        BindOutcome::Bound(..) => return script(ipxe::render_rebound(&base)),
        BindOutcome::NotLearned if attempt < DISCOVER_TRIES => {
            let next = ipxe::discover_url(&base, attempt + 1);
            return script(ipxe::render_discover_wait(&next, attempt, DISCOVER_TRIES, DISCOVER_PAUSE_SECS));
        }
        other => {
            tracing::info!(%mac, "switch-port discovery gave up; manual choices offered");
            MenuInput { note: note(&other), ..menu }
        }
    };
    script(render(&BootPlan::Menu(menu), &base))
}
