//! `capabilities` (http://hl7.org/fhir/R4/http.html#capabilities): `GET /metadata`, open to all
//! (no token needed, no PHI).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::{negotiate, value_response, AppState, QueryParams};
use crate::error::ApiResult;

/// `GET /metadata`.
pub async fn capabilities(
    State(app): State<AppState>,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let format = negotiate(&query, &headers)?;
    value_response(StatusCode::OK, &app.capability_statement, format)
}
