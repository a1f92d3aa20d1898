//! `delete` (http://hl7.org/fhir/R4/http.html#delete): `DELETE /{type}/{id}` records a deletion
//! as a new version (204). Afterwards `read` answers 410 and earlier versions stay readable with
//! `vread`. Deleting an already deleted resource changes nothing (204); an unknown one is 404.
//! Conditional delete (http://hl7.org/fhir/R4/http.html#cdelete), single-match only:
//! `DELETE /{type}?criteria` → none: 204, one: delete it, several: 412.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::{
    check_resource_type, conditional, http_date, if_match_version, insert_header, write, AppState,
    Caller, QueryParams,
};
use crate::authz::decision::Interaction;
use crate::error::{ApiError, ApiResult};
use crate::fhir::bundle::etag;
use crate::store::VersionRecord;

/// `DELETE /{type}/{id}`.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn delete(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_resource_type(&resource_type)?;
    let permit = app
        .decide(&principal, Interaction::Delete, Some(&resource_type))
        .await?;
    if !crate::fhir::is_valid_id(&id) {
        return Err(ApiError::resource_not_found(&resource_type, "(invalid id)"));
    }
    let if_match = if_match_version(&headers)?;
    let deleted = write::delete_version(&app, &permit, &resource_type, &id, if_match).await?;
    Ok(no_content(deleted.as_ref()))
}

/// `DELETE /{type}?criteria`.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn conditional_delete(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path(resource_type): Path<String>,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_resource_type(&resource_type)?;
    let permit = app
        .decide(&principal, Interaction::Delete, Some(&resource_type))
        .await?;
    let search = app
        .decide(&principal, Interaction::Search, Some(&resource_type))
        .await?;
    let matches = conditional::find(&app, &search, &resource_type, &query).await?;
    match matches.as_slice() {
        [] => Ok(no_content(None)),
        [only] => {
            let if_match = if_match_version(&headers)?;
            let deleted =
                write::delete_version(&app, &permit, &resource_type, &only.id, if_match).await?;
            Ok(no_content(deleted.as_ref()))
        }
        _ => Err(ApiError::MultipleMatches(
            "the criteria match more than one resource".into(),
        )),
    }
}

fn no_content(deleted: Option<&VersionRecord>) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Some(record) = deleted {
        tracing::info!(version = record.version, "deleted");
        let headers = response.headers_mut();
        insert_header(headers, axum::http::header::ETAG, &etag(record.version));
        insert_header(
            headers,
            axum::http::header::LAST_MODIFIED,
            &http_date(record.last_updated),
        );
    }
    response
}
