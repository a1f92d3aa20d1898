//! `vread` (http://hl7.org/fhir/R4/http.html#vread): `GET /{type}/{id}/_history/{vid}` → 200;
//! 404 for an unknown version or a resource outside the caller's reach; 410 for the version that
//! records a deletion. Versions before a deletion stay readable.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;

use super::{check_resource_type, negotiate, AppState, Caller, QueryParams, VersionResponse};
use crate::authz::decision::Interaction;
use crate::error::{ApiError, ApiResult};

/// `GET /{type}/{id}/_history/{vid}`.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn vread(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path((resource_type, id, version)): Path<(String, String, String)>,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_resource_type(&resource_type)?;
    let format = negotiate(&query, &headers)?;
    let permit = app
        .decide(&principal, Interaction::VRead, Some(&resource_type))
        .await?;
    let not_found = || ApiError::NotFound(format!("{resource_type}/{id} has no such version"));
    let version: i64 = version.parse().map_err(|_| not_found())?;
    if !crate::fhir::is_valid_id(&id) {
        return Err(not_found());
    }
    let record = app
        .store
        .read_version(permit.scope(), &resource_type, &id, version)
        .await?
        .ok_or_else(not_found)?;
    let record = app
        .open_visible(&permit, record)
        .await?
        .ok_or_else(not_found)?;
    if record.deleted {
        return Err(ApiError::Gone(format!(
            "version {version} of {resource_type}/{id} records its deletion"
        )));
    }
    VersionResponse::representation(&app, &record, format).into_response()
}
