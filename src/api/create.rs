//! `create` (http://hl7.org/fhir/R4/http.html#create): `POST /{type}` with a server-assigned
//! id; 201 + `Location` + `ETag`. With `If-None-Exist` it is a conditional create
//! (http://hl7.org/fhir/R4/http.html#ccreate): no match → create, one match → 200 with the
//! existing resource and nothing written, several → 412.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;

use super::{
    check_resource_type, conditional, negotiate, read_resource, return_preference, write, AppState,
    Caller, QueryParams, VersionResponse,
};
use crate::authz::decision::Interaction;
use crate::error::{ApiError, ApiResult, IssueCode};

/// How often a conditional create retries after losing its claim to a concurrent one.
const CLAIM_ATTEMPTS: u64 = 5;

/// `POST /{type}`.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn create(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path(resource_type): Path<String>,
    query: QueryParams,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    check_resource_type(&resource_type)?;
    let format = negotiate(&query, &headers)?;
    let permit = app
        .decide(&principal, Interaction::Create, Some(&resource_type))
        .await?;
    let resource = read_resource(&app, &headers, body, &resource_type).await?;

    let record = match headers.get("if-none-exist") {
        None => write::create_new(&app, &permit, &resource_type, resource).await?,
        Some(criteria) => {
            let criteria = criteria.to_str().map_err(|_| {
                ApiError::invalid(IssueCode::Value, "If-None-Exist must be a query string")
            })?;
            let criteria = QueryParams::parse(criteria.trim_start_matches('?'));
            // Matching is a search: it needs search permission and sees only what the caller
            // may see, so If-None-Exist cannot probe for resources outside the caller's reach.
            let search = app
                .decide(&principal, Interaction::Search, Some(&resource_type))
                .await?;
            let claim = write::claim_key(&app, permit.scope(), &resource_type, &criteria.0).await?;
            let mut attempt = 0;
            loop {
                attempt += 1;
                let mut matches =
                    conditional::find(&app, &search, &resource_type, &criteria).await?;
                match matches.len() {
                    0 => {}
                    1 => {
                        let existing = matches.remove(0);
                        return VersionResponse {
                            app: &app,
                            record: &existing,
                            status: StatusCode::OK,
                            format,
                            preference: return_preference(&headers),
                            outcome_message: "a matching resource exists; nothing was created"
                                .into(),
                        }
                        .into_response();
                    }
                    _ => {
                        return Err(ApiError::MultipleMatches(
                            "If-None-Exist matches more than one resource".into(),
                        ))
                    }
                }
                // A concurrent create with the same criteria holds the claim: search again,
                // it finds that resource once committed.
                match write::claiming(
                    claim.clone(),
                    write::create_new(&app, &permit, &resource_type, resource.clone()),
                )
                .await
                {
                    Err(ApiError::Conflict(_)) if attempt < CLAIM_ATTEMPTS => {
                        tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
                    }
                    other => break other?,
                }
            }
        }
    };
    tracing::info!(version = record.version, "created");
    VersionResponse {
        app: &app,
        record: &record,
        status: StatusCode::CREATED,
        format,
        preference: return_preference(&headers),
        outcome_message: format!("created {resource_type}/{} version 1", record.id),
    }
    .into_response()
}
