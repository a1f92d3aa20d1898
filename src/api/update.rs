//! `update` (http://hl7.org/fhir/R4/http.html#update): `PUT /{type}/{id}`; creates the resource
//! with the client's id when it does not exist (201), else a new version (200). `If-Match`
//! makes it a version-aware update (412 on a stale version). Conditional update
//! (http://hl7.org/fhir/R4/http.html#cond-update): `PUT /{type}?criteria` → no match: create,
//! one match: update it, several: 412.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use serde_json::{Map, Value};

use super::{
    check_resource_type, conditional, if_match_version, negotiate, read_resource,
    return_preference, write, App, AppState, Caller, QueryParams, VersionResponse,
};
use crate::authz::decision::{Interaction, Permit};
use crate::error::{ApiError, ApiResult, Issue, IssueCode};
use crate::fhir::format::Format;
use crate::store::WriteMethod;

/// `PUT /{type}/{id}`.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn update(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path((resource_type, id)): Path<(String, String)>,
    query: QueryParams,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    check_resource_type(&resource_type)?;
    let format = negotiate(&query, &headers)?;
    let permit = app
        .decide(&principal, Interaction::Update, Some(&resource_type))
        .await?;
    let resource = read_resource(&app, &headers, body, &resource_type).await?;
    if !crate::fhir::is_valid_id(&id) {
        return Err(ApiError::invalid(
            IssueCode::Value,
            "the id in the URL is not a valid FHIR id",
        ));
    }
    match resource.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id == id => {}
        Some(_) => {
            return Err(id_error(
                "the id in the body differs from the id in the URL",
            ))
        }
        None => return Err(id_error("an update must carry the resource id in its body")),
    }
    let if_match = if_match_version(&headers)?;
    respond(
        &app,
        &permit,
        &headers,
        format,
        (&resource_type, &id),
        resource,
        if_match,
    )
    .await
}

/// `PUT /{type}?criteria`.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn conditional_update(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path(resource_type): Path<String>,
    query: QueryParams,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    check_resource_type(&resource_type)?;
    let format = negotiate(&query, &headers)?;
    let resource = read_resource(&app, &headers, body, &resource_type).await?;
    let permit = app
        .decide(&principal, Interaction::Update, Some(&resource_type))
        .await?;
    let search = app
        .decide(&principal, Interaction::Search, Some(&resource_type))
        .await?;
    let matches = conditional::find(&app, &search, &resource_type, &query).await?;
    let body_id = resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let id = match (matches.as_slice(), body_id) {
        ([], Some(body_id)) => body_id,
        ([], None) => uuid::Uuid::new_v4().to_string(),
        ([only], Some(body_id)) if body_id != only.id => {
            return Err(id_error(
                "the id in the body differs from the resource the criteria match",
            ))
        }
        ([only], _) => only.id.clone(),
        _ => {
            return Err(ApiError::MultipleMatches(
                "the criteria match more than one resource".into(),
            ))
        }
    };
    if !crate::fhir::is_valid_id(&id) {
        return Err(id_error("the id in the body is not a valid FHIR id"));
    }
    let if_match = if_match_version(&headers)?;
    respond(
        &app,
        &permit,
        &headers,
        format,
        (&resource_type, &id),
        resource,
        if_match,
    )
    .await
}

async fn respond(
    app: &App,
    permit: &Permit,
    headers: &HeaderMap,
    format: Format,
    (resource_type, id): (&str, &str),
    resource: Map<String, Value>,
    if_match: Option<i64>,
) -> ApiResult<Response> {
    let written = write::put_version(
        app,
        permit,
        resource_type,
        id,
        resource,
        if_match,
        WriteMethod::Put,
    )
    .await?;
    tracing::info!(
        version = written.record.version,
        created = written.created,
        "updated"
    );
    VersionResponse {
        app,
        record: &written.record,
        status: if written.created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        format,
        preference: return_preference(headers),
        outcome_message: format!(
            "{resource_type}/{id} is now at version {}",
            written.record.version
        ),
    }
    .into_response()
}

fn id_error(message: &str) -> ApiError {
    ApiError::Invalid(vec![Issue::new(IssueCode::Invalid, message).at(
        // The location names the element, never its value.
        "id",
    )])
}
