//! The REST API (`/api/v1`): thin handlers over the service layer.
//!
//! Invariants: every request needs the admin bearer token; every error is an `ErrorBody` whose
//! HTTP status comes from [`status_of`] (the one place that maps errors to statuses); request bodies
//! are parsed strictly (unknown fields are errors); secrets are redacted unless `?secrets=1`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use luna_core::api::{Deleted, ErrorBody, ErrorCode, NodeCreate, NodePatch, RangeRequest, RenameRequest, API_PREFIX};
use luna_core::model::{AnyObject, Kind};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::service::{Service, ServiceError};
use crate::store::StoreError;

/// What every HTTP handler can reach.
pub struct AppState {
    pub service: Service,
    pub admin_token: String,
    pub boot: crate::netboot::BootContext,
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

type ApiResult<T> = Result<T, ApiError>;

fn parse_kind(kind: &str) -> ApiResult<Kind> {
    kind.parse::<Kind>().map_err(|e| ApiError(ServiceError::Invalid(e)))
}

fn parse_body<T: DeserializeOwned>(what: &str, body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError(ServiceError::BadRequest(format!("invalid {what} request body: {e}"))))
}

fn render(mut o: AnyObject, secrets: bool) -> Value {
    if !secrets {
        o.redact();
    }
    o.to_value()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    group: Option<String>,
    secrets: Option<String>,
}

impl ListQuery {
    fn secrets(&self) -> bool {
        matches!(self.secrets.as_deref(), Some("1" | "true" | "yes"))
    }
}

pub async fn require_token(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), state.admin_token.as_bytes()) {
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

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/{kind}", get(list).post(create).patch(patch_kind))
        .route("/{kind}/{name}", get(show).patch(change).delete(delete))
        .route("/{kind}/{name}/{action}", post(action))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .fallback(|| async {
            error_response(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such api endpoint".into())
        });
    Router::new().nest(API_PREFIX, api).with_state(state)
}

async fn list(
    State(st): State<Arc<AppState>>,
    Path(kind): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let kind = parse_kind(&kind)?;
    if kind == Kind::Cluster {
        let c = st.service.get(Kind::Cluster, "cluster").await?;
        return Ok(Json(render(c, q.secrets())));
    }
    let objs = st.service.list(kind).await?;
    let out: Vec<Value> = objs
        .into_iter()
        .filter(|o| match (&q.group, o) {
            (Some(g), AnyObject::Node(n)) => &n.group == g,
            _ => true,
        })
        .map(|o| render(o, q.secrets()))
        .collect();
    Ok(Json(Value::Array(out)))
}

async fn show(
    State(st): State<Arc<AppState>>,
    Path((kind, name)): Path<(String, String)>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let kind = parse_kind(&kind)?;
    Ok(Json(render(st.service.get(kind, &name).await?, q.secrets())))
}

async fn create(
    State(st): State<Arc<AppState>>,
    Path(kind): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let kind = parse_kind(&kind)?;
    let created: Vec<AnyObject> = if kind == Kind::Node {
        let req: NodeCreate = parse_body("node add", &body)?;
        st.service.add_nodes(req).await?.into_iter().map(AnyObject::Node).collect()
    } else {
        let doc: Value = parse_body(&format!("{kind} add"), &body)?;
        vec![st.service.create(kind, doc).await?]
    };
    let out = created.into_iter().map(|o| render(o, false)).collect();
    Ok((StatusCode::CREATED, Json(Value::Array(out))))
}

/// `PATCH /cluster`: the one object without a name in its path.
async fn patch_kind(State(st): State<Arc<AppState>>, Path(kind): Path<String>, body: Bytes) -> ApiResult<Json<Value>> {
    let kind = parse_kind(&kind)?;
    if kind != Kind::Cluster {
        return Err(ApiError(ServiceError::BadRequest(format!(
            "name the {kind} to change: PATCH {API_PREFIX}/{kind}/NAME"
        ))));
    }
    let patch: Value = parse_body("cluster change", &body)?;
    let c = st.service.update(Kind::Cluster, "cluster", patch).await?;
    Ok(Json(Value::Array(vec![render(c, false)])))
}

async fn change(
    State(st): State<Arc<AppState>>,
    Path((kind, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let kind = parse_kind(&kind)?;
    let changed: Vec<AnyObject> = if kind == Kind::Node {
        let patch: NodePatch = parse_body("node change", &body)?;
        st.service.change_nodes(&name, patch).await?.into_iter().map(AnyObject::Node).collect()
    } else {
        let patch: Value = parse_body(&format!("{kind} change"), &body)?;
        vec![st.service.update(kind, &name, patch).await?]
    };
    Ok(Json(Value::Array(changed.into_iter().map(|o| render(o, false)).collect())))
}

async fn delete(
    State(st): State<Arc<AppState>>,
    Path((kind, name)): Path<(String, String)>,
) -> ApiResult<Json<Deleted>> {
    let kind = parse_kind(&kind)?;
    let deleted = st.service.delete(kind, &name).await?;
    Ok(Json(Deleted { deleted }))
}

async fn action(
    State(st): State<Arc<AppState>>,
    Path((kind, name, action)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let kind = parse_kind(&kind)?;
    let obj = match (kind, action.as_str()) {
        (_, "rename") => {
            let r: RenameRequest = parse_body("rename", &body)?;
            st.service.rename(kind, &name, &r.new_name).await?
        }
        (_, "clone") => {
            let r: RenameRequest = parse_body("clone", &body)?;
            st.service.clone_object(kind, &name, &r.new_name).await?
        }
        (Kind::Network, "reserve") => {
            let r: RangeRequest = parse_body("reserve", &body)?;
            AnyObject::Network(st.service.reserve(&name, r.range).await?)
        }
        (Kind::Network, "release") => {
            let r: RangeRequest = parse_body("release", &body)?;
            AnyObject::Network(st.service.release(&name, r.range).await?)
        }
        _ => {
            return Err(ApiError(ServiceError::BadRequest(format!("unknown action '{action}' for {kind}"))));
        }
    };
    Ok(Json(render(obj, false)))
}
