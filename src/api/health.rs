//! Liveness (`/health`: the process answers) and readiness (`/ready`: the database answers too).
//! Neither needs a token nor says anything about data.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

/// `GET /health`: 200 while the process runs.
pub async fn live() -> Json<Value> {
    Json(json!({ "status": "up" }))
}

/// `GET /ready`: 200 when the database answers, else 503.
pub async fn ready(State(app): State<AppState>) -> (StatusCode, Json<Value>) {
    match app.store.ping().await {
        Ok(()) => (StatusCode::OK, Json(json!({ "status": "ready" }))),
        Err(error) => {
            tracing::warn!(%error, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "database unavailable" })),
            )
        }
    }
}
