//! `read` (http://hl7.org/fhir/R4/http.html#read): `GET /{type}/{id}` → 200 with `ETag` and
//! `Last-Modified`; 404 when unknown; 410 when deleted.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;

use super::{check_resource_type, negotiate, AppState, QueryParams, VersionResponse};
use crate::error::{ApiError, ApiResult};

/// `GET /{type}/{id}`.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn read(
    State(app): State<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_resource_type(&resource_type)?;
    let format = negotiate(&query, &headers)?;
    if !crate::fhir::is_valid_id(&id) {
        return Err(ApiError::resource_not_found(&resource_type, "(invalid id)"));
    }
    let record = app
        .store
        .read_current(&app.scope(), &resource_type, &id)
        .await?
        .ok_or_else(|| ApiError::resource_not_found(&resource_type, &id))?;
    if record.deleted {
        return Err(ApiError::Gone(format!("{resource_type}/{id} was deleted")));
    }
    let record = app.open(record).await?;
    VersionResponse::representation(&app, &record, format).into_response()
}
