//! HTTP: `GET /api/v1/discovery/macs` (admin): the learned tables. The boot path's side of
//! discovery (`/boot/ipxe` for an unknown MAC, `/boot/ipxe/discover`) is in `crate::boot::discover`.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use luna_core::api::API_PREFIX;
use serde::Deserialize;

use super::Discovery;
use crate::http::{ApiError, AppState};

#[derive(Debug, Deserialize)]
struct MacsQuery {
    switch: Option<String>,
}

async fn macs(State(d): State<Arc<Discovery>>, Query(q): Query<MacsQuery>) -> Response {
    match d.list(q.switch.as_deref()).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}

/// `/api/v1/discovery/macs`, behind the admin token.
pub fn router(discovery: Arc<Discovery>, app: Arc<AppState>) -> Router {
    Router::new()
        .route(&format!("{API_PREFIX}/discovery/macs"), get(macs))
        .with_state(discovery)
        .route_layer(axum::middleware::from_fn_with_state(app, crate::http::require_token))
}
