//! `read` (http://hl7.org/fhir/R4/http.html#read): `GET /{type}/{id}` → 200 with `ETag` and
//! `Last-Modified`; 404 when unknown or outside the caller's reach; 410 when deleted.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;

use super::{check_resource_type, negotiate, AppState, Caller, QueryParams, VersionResponse};
use crate::authz::decision::Interaction;
use crate::error::{ApiError, ApiResult};

/// `GET /{type}/{id}`.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn read(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path((resource_type, id)): Path<(String, String)>,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_resource_type(&resource_type)?;
    let format = negotiate(&query, &headers)?;
    let permit = app
        .decide(&principal, Interaction::Read, Some(&resource_type))
        .await?;
    let not_found = || ApiError::resource_not_found(&resource_type, &id);
    if !crate::fhir::is_valid_id(&id) {
        return Err(not_found());
    }
    let record = app
        .store
        .read_current(permit.scope(), &resource_type, &id)
        .await?
        .ok_or_else(not_found)?;
    let record = app
        .open_visible(&permit, record)
        .await?
        .ok_or_else(not_found)?;
    if record.deleted {
        return Err(ApiError::Gone(format!("{resource_type}/{id} was deleted")));
    }
    VersionResponse::representation(&app, &record, format).into_response()
}
