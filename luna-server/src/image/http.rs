//! HTTP routes: the pack/rollback/revisions/jobs API (behind the admin token, which the
//! integrator's middleware checks) and the image file downloads nodes use (no auth; HTTP Range
//! is honoured, so an interrupted download resumes).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::TryStreamExt as _;
use luna_core::api::ErrorCode;
use luna_core::model::{validate_name, Kind};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tower::ServiceExt;
use tower_http::services::ServeFile;

use super::{ImageError, ImageState, JobId, PackRequest, RollbackRequest};
use crate::http::{error_response, status_of};

impl ImageError {
    pub fn status(&self) -> (StatusCode, ErrorCode) {
        match self {
            ImageError::Service(e) => status_of(e),
            ImageError::InLchroot { .. } | ImageError::AlreadyPacking { .. } => {
                (StatusCode::CONFLICT, ErrorCode::Conflict)
            }
            ImageError::BadRequest(_) | ImageError::NoFrontend => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            ImageError::NoJob(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            ImageError::Pack(_) | ImageError::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
        }
    }
}

impl IntoResponse for ImageError {
    fn into_response(self) -> Response {
        let (status, code) = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "image request failed");
        }
        error_response(status, code, self.to_string())
    }
}

fn body<T: DeserializeOwned + Default>(what: &str, b: &Bytes) -> Result<T, ImageError> {
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(b).map_err(|e| ImageError::BadRequest(format!("invalid {what} request body: {e}")))
}

/// The API routes, with full paths: `POST /api/v1/osimage/{name}/pack`,
/// `POST /api/v1/osimage/{name}/rollback`, `GET /api/v1/osimage/{name}/revisions`, `GET /api/v1/osimage/{name}/kernels`,
/// `GET /api/v1/jobs/{id}`. Put them behind the admin-token middleware.
pub fn router(state: Arc<ImageState>) -> Router {
    Router::new()
        .route("/api/v1/osimage/{name}/pack", post(pack))
        .route("/api/v1/osimage/{name}/rollback", post(rollback))
        .route("/api/v1/osimage/{name}/revisions", get(revisions))
        .route("/api/v1/osimage/{name}/kernels", get(kernels))
        .route("/api/v1/jobs/{id}", get(job))
        .with_state(state)
}

/// `GET /images/{osimage}/{rev}/{file}`: a published revision's files, no auth.
pub fn files_router(state: Arc<ImageState>) -> Router {
    Router::new().route("/images/{osimage}/{rev}/{file}", get(download)).with_state(state)
}

async fn pack(State(st): State<Arc<ImageState>>, Path(name): Path<String>, b: Bytes) -> Result<Response, ImageError> {
    let req: PackRequest = body("pack", &b)?;
    let id = super::start_pack(&st, &name, req).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "job": id }))).into_response())
}

async fn rollback(
    State(st): State<Arc<ImageState>>,
    Path(name): Path<String>,
    b: Bytes,
) -> Result<Json<Value>, ImageError> {
    let req: RollbackRequest = body("rollback", &b)?;
    let o = super::rollback(&st, &name, req.revision).await?;
    Ok(Json(serde_json::to_value(o).unwrap_or(Value::Null)))
}

async fn revisions(State(st): State<Arc<ImageState>>, Path(name): Path<String>) -> Result<Json<Value>, ImageError> {
    let list = super::revisions(&st, &name).await?;
    Ok(Json(serde_json::to_value(list).unwrap_or(Value::Null)))
}

async fn kernels(State(st): State<Arc<ImageState>>, Path(name): Path<String>) -> Result<Json<Value>, ImageError> {
    let k = super::kernels(&st, &name).await?;
    Ok(Json(serde_json::to_value(k).unwrap_or(Value::Null)))
}

async fn job(State(st): State<Arc<ImageState>>, Path(id): Path<String>) -> Result<Json<Value>, ImageError> {
    let id: JobId = id.parse().map_err(|_| ImageError::BadRequest(format!("invalid job id '{id}'")))?;
    let j = super::job(&st, id)?;
    Ok(Json(serde_json::to_value(j).unwrap_or(Value::Null)))
}

fn not_found(what: String) -> Response {
    error_response(StatusCode::NOT_FOUND, ErrorCode::NotFound, what)
}

async fn download(
    State(st): State<Arc<ImageState>>,
    Path((image, rev, file)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    // Only names that can be published: no traversal, no hidden files (markers, tmp dirs).
    let rev_ok =
        !rev.is_empty() && rev.len() <= 10 && rev.bytes().all(|c| c.is_ascii_digit()) && rev.parse::<u32>().is_ok();
    let file_ok = !file.is_empty() && !file.starts_with('.') && !file.contains('/') && !file.contains('\\');
    if validate_name(Kind::Osimage, &image).is_err() || !rev_ok || !file_ok {
        return not_found(format!("no file /images/{image}/{rev}/{file}"));
    }
    let path = st.layout.images().join(&image).join(&rev).join(&file);
    if !path.is_file() {
        return not_found(format!("no file /images/{image}/{rev}/{file}"));
    }
    // A torrent names every live server's tracker (BEP 12, outside the info dict: same hash).
    if let (true, Some(view)) = (file.ends_with(".torrent"), st.view.as_ref()) {
        let trackers = view.trackers();
        let rewritten = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| super::metainfo::with_trackers(&b, &trackers).map_err(|e| e.to_string()));
        return match rewritten {
            Ok(b) => ([(axum::http::header::CONTENT_TYPE, "application/x-bittorrent")], b).into_response(),
            Err(e) => error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                format!("cannot serve {}: {e}", path.display()),
            ),
        };
    }
    match ServeFile::new(&path).oneshot(req).await {
        Ok(resp) => resp.map(|body| {
            // Counted as the bytes go out (a Range answer counts only its part).
            let sent = Body::new(body).into_data_stream().inspect_ok(|chunk| {
                crate::metrics::global().http_fallback_bytes.inc_by(chunk.len() as u64);
            });
            Body::from_stream(sent)
        }),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("cannot serve {}: {e}", path.display()),
        ),
    }
}
