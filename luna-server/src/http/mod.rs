//! What every HTTP part shares: the state handlers reach, the admin-token check and the one
//! mapping from service errors to HTTP statuses and `ErrorBody`s.
//!
//! `api` (admin routes), `boot` (the node's boot path), `image::http` and `web` depend on this module;
//! it depends on none of them.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use luna_core::api::{ErrorBody, ErrorCode};

use crate::live::Live;
use crate::metrics::Metrics;
use crate::service::{Service, ServiceError};
use crate::store::StoreError;

/// What every HTTP handler can reach.
pub struct AppState {
    pub service: Service,
    pub admin_token: String,
    /// The server's metrics (the process-wide registry, `metrics::global()`).
    pub metrics: Arc<Metrics>,
    /// The live view's feed (status changes, node bytes).
    pub live: Arc<Live>,
}

impl AppState {
    /// The state with the process's metrics and a feed of its own. `serve` uses
    /// [`AppState::with_live`] instead, with the feed that watches the service's store.
    pub fn new(service: Service, admin_token: String) -> Self {
        let metrics = crate::metrics::global().clone();
        let live = Arc::new(Live::new(metrics.clone()));
        AppState { service, admin_token, metrics, live }
    }

    pub fn with_live(service: Service, admin_token: String, live: Arc<Live>) -> Self {
        AppState { service, admin_token, metrics: live.metrics().clone(), live }
    }
}

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError(pub ServiceError);

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        ApiError(e)
    }
}

/// The one mapping from service errors to HTTP statuses and error codes.
pub fn status_of(e: &ServiceError) -> (StatusCode, ErrorCode) {
    match e {
        ServiceError::NotFound { .. } => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
        ServiceError::AlreadyExists { .. } => (StatusCode::CONFLICT, ErrorCode::AlreadyExists),
        ServiceError::InUse { .. } => (StatusCode::CONFLICT, ErrorCode::InUse),
        ServiceError::Taken { .. } => (StatusCode::CONFLICT, ErrorCode::AlreadyExists),
        ServiceError::Stale { .. } => (StatusCode::CONFLICT, ErrorCode::Conflict),
        ServiceError::Alloc(luna_core::ipalloc::AllocError::Exhausted { .. }) => {
            (StatusCode::CONFLICT, ErrorCode::Exhausted)
        }
        ServiceError::Invalid(_) | ServiceError::Alloc(_) | ServiceError::Hostlist(_) | ServiceError::BadRequest(_) => {
            (StatusCode::BAD_REQUEST, ErrorCode::BadRequest)
        }
        ServiceError::Busy(_) | ServiceError::Store(StoreError::Conflict { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable)
        }
        ServiceError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = status_of(&self.0);
        if status.is_server_error() {
            tracing::error!(error = %self.0, "request failed");
        }
        error_response(status, code, self.0.to_string())
    }
}

pub fn error_response(status: StatusCode, code: ErrorCode, error: String) -> Response {
    (status, Json(ErrorBody { code, error })).into_response()
}

pub async fn require_token(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if !is_admin(&state.admin_token, req.headers()) {
        return error_response(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing or wrong admin token: set LUNA_TOKEN or read the token file".into(),
        );
    }
    next.run(req).await
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() || b.is_empty() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request carries the admin bearer token.
pub fn is_admin(admin_token: &str, headers: &HeaderMap) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(given.as_bytes(), admin_token.as_bytes())
}
