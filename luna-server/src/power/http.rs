//! `POST /api/v1/power` (admin token, like every API route).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use luna_core::api::API_PREFIX;
use luna_core::power::{PowerReply, PowerRequest};

use super::Power;
use crate::http::ApiError;
use crate::service::{Service, ServiceError};

pub struct PowerState {
    pub service: Service,
    pub power: Power,
}

pub fn router(state: Arc<PowerState>) -> Router {
    Router::new().route(&format!("{API_PREFIX}/power"), post(power)).with_state(state)
}

async fn power(State(st): State<Arc<PowerState>>, body: Bytes) -> Result<Json<PowerReply>, ApiError> {
    let req: PowerRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError(ServiceError::BadRequest(format!("invalid power request body: {e}"))))?;
    Ok(Json(st.power.handle(&st.service, req).await?))
}
