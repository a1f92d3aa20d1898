//! Liveness (`/health`: the process answers) and readiness (`/ready`: the database answers too).
//! Neither needs a token nor says anything about data.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

/// `GET /health`: 200 while the process runs, with the data-key cache counters (no key
/// material, no ids).
pub async fn live(State(app): State<AppState>) -> Json<Value> {
    Json(json!({ "status": "up", "dataKeyCache": app.vault.cache_stats() }))
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
