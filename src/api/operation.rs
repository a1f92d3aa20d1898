//! Instance-level operations (http://hl7.org/fhir/R4/operations.html): `/{type}/{id}/${name}`,
//! dispatched by type and name, and the server's own OperationDefinitions.
//!
//! Served: `GET /Patient/{id}/$everything` ([`super::everything`]) and
//! `POST /Patient/{id}/$erase` ([`super::erase`]). Another name is 404; a known one with the
//! other method is 405. `GET /OperationDefinition/erase` is open like `/metadata`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;

use super::{negotiate, value_response, AppState, Caller, QueryParams};
use crate::error::{ApiError, ApiResult};

/// `GET /{type}/{id}/${operation}`.
pub async fn instance_get(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    match (resource_type.as_str(), operation.as_str()) {
        ("Patient", "$everything") => {
            super::everything::everything(app, principal, id, query, headers).await
        }
        ("Patient", "$erase") => Err(ApiError::MethodNotAllowed),
        _ => Err(unknown()),
    }
}

/// `POST /{type}/{id}/${operation}`.
pub async fn instance_post(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    match (resource_type.as_str(), operation.as_str()) {
        ("Patient", "$erase") => super::erase::erase(app, principal, id, query, headers).await,
        ("Patient", "$everything") => Err(ApiError::MethodNotAllowed),
        _ => Err(unknown()),
    }
}

fn unknown() -> ApiError {
    ApiError::NotFound("no such operation".into())
}

/// `GET /OperationDefinition/{id}`: the definitions of the operations this server defines.
pub async fn operation_definition(
    State(app): State<AppState>,
    Path(id): Path<String>,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let format = negotiate(&query, &headers)?;
    match id.as_str() {
        "erase" => value_response(
            StatusCode::OK,
            &super::erase::operation_definition(&app.base_url),
            format,
        ),
        _ => Err(ApiError::resource_not_found("OperationDefinition", &id)),
    }
}
