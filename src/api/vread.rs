//! `vread` (http://hl7.org/fhir/R4/http.html#vread): `GET /{type}/{id}/_history/{vid}` → 200;
//! 404 for an unknown version; 410 for the version that records a deletion. Versions before a
//! deletion stay readable.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;

use super::{check_resource_type, negotiate, AppState, QueryParams, VersionResponse};
use crate::error::{ApiError, ApiResult};

/// `GET /{type}/{id}/_history/{vid}`.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn vread(
    State(app): State<AppState>,
    Path((resource_type, id, version)): Path<(String, String, String)>,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_resource_type(&resource_type)?;
    let format = negotiate(&query, &headers)?;
    let not_found = || ApiError::NotFound(format!("{resource_type}/{id} has no such version"));
    let version: i64 = version.parse().map_err(|_| not_found())?;
    if !crate::fhir::is_valid_id(&id) {
        return Err(not_found());
    }
    let record = app
        .store
        .read_version(&app.scope(), &resource_type, &id, version)
        .await?
        .ok_or_else(not_found)?;
    if record.deleted {
        return Err(ApiError::Gone(format!(
            "version {version} of {resource_type}/{id} records its deletion"
        )));
    }
    let record = app.open(record).await?;
    VersionResponse::representation(&app, &record, format).into_response()
}
