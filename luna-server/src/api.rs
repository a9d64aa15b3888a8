//! The REST API (`/api/v1`): thin handlers over the service layer.
//!
//! Invariants: every request needs the admin bearer token; every error is an `ErrorBody` whose
//! HTTP status comes from [`status_of`] (the one place that maps errors to statuses); request bodies
//! are parsed strictly (unknown fields are errors); secrets are redacted unless `?secrets=1`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use axum::{Json, Router};
use luna_core::api::{Deleted, ErrorCode, NodeCreate, NodePatch, RangeRequest, RenameRequest, API_PREFIX};
use luna_core::model::{AnyObject, Kind};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::http::{error_response, require_token, ApiError, AppState};
use crate::service::ServiceError;

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
