//! FHIR Bulk Data Access v2 `$export` over HTTP
//! (https://hl7.org/fhir/uv/bulkdata/export.html); the jobs themselves run in `crate::export`.
//!
//! - Kick-off `GET|POST /$export`, `/Patient/$export`, `/Group/{id}/$export` with
//!   `Prefer: respond-async`: 202 + `Content-Location: {base}/_export/{job}`; 400 without
//!   `respond-async`, for an unknown `_type`, a bad `_since` or an `_outputFormat` other than
//!   NDJSON; 403 when the caller may never search a type asked for; 404 for a Group the caller
//!   cannot read.
//! - Status `GET /_export/{job}`: 202 with `X-Progress` and `Retry-After` while queued or
//!   running; 200 with the manifest when complete; 500 with an OperationOutcome when failed.
//! - Cancel `DELETE /_export/{job}`: 202; the job and its output are deleted.
//! - Output `GET /_export/{job}/file/{n}`: the NDJSON of the manifest's n-th output.
//!
//! Every job belongs to its requester (the token's issuer and subject): to anyone else, a job
//! and its files answer 404, as if they did not exist.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::{json, Value};

use super::{insert_header, read_body, value_response, AppState, Caller, QueryParams};
use crate::authz::decision::Interaction;
use crate::authz::principal::Principal;
use crate::error::{ApiError, ApiResult, IssueCode};
use crate::export::{ExportSpec, Level};
use crate::fhir::format::Format;
use crate::store::{ExportJobRow, Scope};

const NDJSON: &str = "application/fhir+ndjson";

/// The spellings of NDJSON the spec asks servers to accept in `_outputFormat`.
const OUTPUT_FORMATS: [&str; 3] = [NDJSON, "application/ndjson", "ndjson"];

/// Output chunks read from the database per query while a file is served.
const CHUNKS_PER_READ: usize = 64;

/// `GET|POST /$export`.
pub async fn export_system(
    State(app): State<AppState>,
    Extension(principal): Caller,
    query: QueryParams,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    kick_off(
        &app,
        &principal,
        query,
        &headers,
        body,
        Level::System,
        "$export",
    )
    .await
}

/// `GET|POST /Patient/$export`.
pub async fn export_patient(
    State(app): State<AppState>,
    Extension(principal): Caller,
    query: QueryParams,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    if let Some(own) = principal.own_patient() {
        // A data subject's export: the audit record names their compartment, so that it
        // appears in their own disclosure report.
        let compartment = app
            .store
            .compartment_pseudonym(&app.decider.system_scope(), own)
            .await?;
        super::audit::note(|context| context.patient = Some(compartment));
    }
    kick_off(
        &app,
        &principal,
        query,
        &headers,
        body,
        Level::Patient,
        "Patient/$export",
    )
    .await
}

/// `GET|POST /Group/{id}/$export`: the compartments of the Group's member patients.
pub async fn export_group(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path(id): Path<String>,
    query: QueryParams,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let not_found = || ApiError::NotFound("Group not found".into());
    if !crate::fhir::is_valid_id(&id) {
        return Err(not_found());
    }
    let permit = app
        .decide(&principal, Interaction::Read, Some("Group"))
        .await?;
    let record = app
        .store
        .read_current(permit.scope(), "Group", &id)
        .await?
        .filter(|record| !record.deleted)
        .ok_or_else(not_found)?;
    let record = app
        .open_visible(&permit, record)
        .await?
        .ok_or_else(not_found)?;
    let group: Value = serde_json::from_slice(record.body.as_deref().unwrap_or_default())
        .map_err(|_| ApiError::Internal("a stored Group is not JSON".into()))?;
    let patients: Vec<String> = group["member"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|member| member["entity"]["reference"].as_str())
        .filter_map(crate::fhir::compartment::patient_id_of_reference)
        .collect();
    let path = format!("Group/{id}/$export");
    kick_off(
        &app,
        &principal,
        query,
        &headers,
        body,
        Level::Group { patients },
        &path,
    )
    .await
}

/// The kick-off parameters, from the query string and (POST) a Parameters body.
async fn parameters(
    app: &crate::api::App,
    query: QueryParams,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<QueryParams> {
    let mut parameters = query;
    let bytes = read_body(headers, body, app.settings.max_body_bytes).await?;
    if bytes.is_empty() {
        return Ok(parameters);
    }
    let resource: Value = serde_json::from_slice(&bytes).map_err(|_| {
        ApiError::invalid(IssueCode::Invalid, "the body must be a Parameters resource")
    })?;
    if resource["resourceType"] != "Parameters" {
        return Err(ApiError::invalid(
            IssueCode::Invalid,
            "the body must be a Parameters resource",
        ));
    }
    for parameter in resource["parameter"].as_array().into_iter().flatten() {
        let name = parameter["name"].as_str().unwrap_or_default();
        let value = ["valueString", "valueInstant", "valueCode", "valueDateTime"]
            .iter()
            .find_map(|key| parameter[*key].as_str());
        match value {
            Some(value) => parameters.0.push((name.to_string(), value.to_string())),
            None => {
                return Err(ApiError::invalid(
                    IssueCode::Value,
                    "a parameter has no supported value",
                ))
            }
        }
    }
    Ok(parameters)
}

fn prefers(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split([',', ';']))
        .any(|part| part.trim() == token)
}

async fn kick_off(
    app: &AppState,
    principal: &std::sync::Arc<Principal>,
    query: QueryParams,
    headers: &HeaderMap,
    body: Body,
    level: Level,
    path: &str,
) -> ApiResult<Response> {
    if !prefers(headers, "respond-async") {
        return Err(ApiError::invalid(
            IssueCode::Required,
            "$export needs the header Prefer: respond-async",
        ));
    }
    if let Some(accept) = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
    {
        let acceptable = accept.split(',').any(|media| {
            let media = media.split(';').next().unwrap_or_default().trim();
            matches!(
                media,
                "application/fhir+json" | "application/json" | "*/*" | "application/*"
            )
        });
        if !acceptable {
            return Err(ApiError::invalid(
                IssueCode::Value,
                "$export answers in application/fhir+json",
            ));
        }
    }
    let parameters = parameters(app, query, headers, body).await?;
    let strict = prefers(headers, "handling=strict");
    let mut types: Vec<String> = Vec::new();
    let mut since_us = None;
    for (name, value) in &parameters.0 {
        match name.as_str() {
            "_outputFormat" if !OUTPUT_FORMATS.contains(&value.as_str()) => {
                return Err(ApiError::invalid(
                    IssueCode::Value,
                    "_outputFormat must be application/fhir+ndjson",
                ));
            }
            "_outputFormat" => {}
            "_type" => {
                for resource_type in value.split(',').map(str::trim) {
                    let known = crate::fhir::capability::is_served(resource_type)
                        || resource_type == "AuditEvent";
                    if !known {
                        return Err(ApiError::invalid(
                            IssueCode::Value,
                            "_type names a resource type this server does not export",
                        ));
                    }
                    if !types.iter().any(|seen| seen == resource_type) {
                        types.push(resource_type.to_string());
                    }
                }
            }
            "_since" => {
                let since = super::parse_instant(value).ok_or_else(|| {
                    ApiError::invalid(IssueCode::Value, "_since must be a FHIR instant")
                })?;
                since_us = Some(since.timestamp_micros());
            }
            // Unsupported parameters are ignored unless the client asks for strict handling.
            _ if strict => {
                return Err(ApiError::invalid(
                    IssueCode::NotSupported,
                    "a kick-off parameter is not supported",
                ))
            }
            _ => {}
        }
    }
    authorize_types(app, principal, &types).await?;
    let scope = app.decider.system_scope();
    let job_id = uuid::Uuid::new_v4().to_string();
    let now = chrono::Utc::now().timestamp_micros();
    let request_url = match parameters.0.is_empty() {
        true => format!("{}/{path}", app.base_url),
        false => format!(
            "{}/{path}?{}",
            app.base_url,
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(parameters.0.iter())
                .finish()
        ),
    };
    let spec = ExportSpec {
        requester: Principal {
            // Break-the-glass is per request and time-boxed: it never carries into a job.
            emergency: None,
            ..Principal::clone(principal)
        },
        request_url,
        level,
        types,
        since_us,
    };
    let (spec_key_id, sealed) = crate::export::seal_spec(app, &scope, &job_id, &spec).await?;
    let retention = i64::try_from(app.settings.export.retention_secs).unwrap_or(i64::MAX / 4);
    app.store
        .insert_export_job(&ExportJobRow {
            tenant: scope.tenant().to_string(),
            job_id: job_id.clone(),
            status: "queued".into(),
            requester: crate::export::requester_of(scope.tenant(), principal),
            spec: sealed,
            spec_key_id,
            transaction_us: now,
            expires_us: now.saturating_add(retention.saturating_mul(1_000_000)),
            lease_owner: None,
            lease_until_us: None,
            attempts: 0,
            exported: 0,
            error: None,
        })
        .await?;
    let mut response = StatusCode::ACCEPTED.into_response();
    insert_header(
        response.headers_mut(),
        header::CONTENT_LOCATION,
        &format!("{}/_export/{job_id}", app.base_url),
    );
    Ok(response)
}

/// Fails closed before a job is queued: every type asked for must be searchable by the caller;
/// with no `_type`, at least one type must be.
async fn authorize_types(
    app: &AppState,
    principal: &std::sync::Arc<Principal>,
    types: &[String],
) -> ApiResult<()> {
    for resource_type in types.iter().filter(|name| *name != "AuditEvent") {
        app.decide(principal, Interaction::Search, Some(resource_type))
            .await?;
    }
    if types.is_empty() {
        for resource_type in crate::fhir::capability::served_resource_types() {
            if app
                .decide(principal, Interaction::Search, Some(resource_type))
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        return Err(ApiError::Forbidden(
            "the token's scopes and roles allow no resource type to be exported".into(),
        ));
    }
    Ok(())
}

/// The caller's job, live: anything else (another caller's, expired, unknown) is 404.
async fn own_job(
    app: &AppState,
    principal: &Principal,
    job_id: &str,
) -> ApiResult<(Scope, ExportJobRow)> {
    let not_found = || ApiError::NotFound("no such export job".into());
    let scope = app.decider.system_scope();
    let job = app
        .store
        .export_job(scope.tenant(), job_id)
        .await?
        .ok_or_else(not_found)?;
    let requester = crate::export::requester_of(scope.tenant(), principal);
    let expired = job.expires_us < chrono::Utc::now().timestamp_micros();
    if job.requester != requester || expired {
        return Err(not_found());
    }
    Ok((scope, job))
}

/// `GET /_export/{job}`: progress, or the manifest.
pub async fn status(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path(job_id): Path<String>,
) -> ApiResult<Response> {
    let (scope, job) = own_job(&app, &principal, &job_id).await?;
    match job.status.as_str() {
        "completed" => {
            let spec = crate::export::open_spec(&app, &scope, &job).await?;
            let outputs = app.store.export_outputs(scope.tenant(), &job_id).await?;
            let output: Vec<Value> = outputs
                .iter()
                .enumerate()
                .map(|(index, (resource_type, count))| {
                    json!({
                        "type": resource_type,
                        "url": format!("{}/_export/{job_id}/file/{}", app.base_url, index + 1),
                        "count": count,
                    })
                })
                .collect();
            let transaction_time = chrono::DateTime::from_timestamp_micros(job.transaction_us)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let manifest = json!({
                "transactionTime": transaction_time,
                "request": spec.request_url,
                "requiresAccessToken": true,
                "output": output,
                "error": [],
            });
            let mut response = value_response(StatusCode::OK, &manifest, Format::Json)?;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            insert_header(
                response.headers_mut(),
                header::EXPIRES,
                &super::http_date(
                    chrono::DateTime::from_timestamp_micros(job.expires_us).unwrap_or_default(),
                ),
            );
            Ok(response)
        }
        // The reason is one of the worker's fixed messages (never PHI, never a driver error),
        // so it may be shown, unlike an ApiError::Internal's detail.
        "failed" => value_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({
                "resourceType": "OperationOutcome",
                "issue": [crate::error::outcome_issue(
                    "error",
                    "exception",
                    job.error.as_deref().unwrap_or("the export failed on the server"),
                    None,
                )],
            }),
            Format::Json,
        ),
        _ => {
            let mut response = StatusCode::ACCEPTED.into_response();
            let progress = format!("{}: {} resources exported", job.status, job.exported);
            insert_header(
                response.headers_mut(),
                header::HeaderName::from_static("x-progress"),
                &progress,
            );
            insert_header(response.headers_mut(), header::RETRY_AFTER, "1");
            Ok(response)
        }
    }
}

/// `DELETE /_export/{job}`: cancels the job and deletes its output.
pub async fn cancel(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path(job_id): Path<String>,
) -> ApiResult<Response> {
    let (scope, _) = own_job(&app, &principal, &job_id).await?;
    if !app.store.delete_export_job(scope.tenant(), &job_id).await? {
        return Err(ApiError::NotFound("no such export job".into()));
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

/// `GET /_export/{job}/file/{n}`: the n-th output of the manifest, as NDJSON.
pub async fn file(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path((job_id, number)): Path<(String, usize)>,
) -> ApiResult<Response> {
    let not_found = || ApiError::NotFound("no such export file".into());
    let (scope, job) = own_job(&app, &principal, &job_id).await?;
    if job.status != "completed" {
        return Err(not_found());
    }
    let outputs = app.store.export_outputs(scope.tenant(), &job_id).await?;
    let (resource_type, _) = number
        .checked_sub(1)
        .and_then(|index| outputs.get(index))
        .ok_or_else(not_found)?;
    let mut ndjson = Vec::new();
    let mut after = -1;
    loop {
        let chunks = app
            .store
            .export_chunks(
                scope.tenant(),
                &job_id,
                resource_type,
                after,
                CHUNKS_PER_READ,
            )
            .await?;
        let Some(last) = chunks.last() else {
            break;
        };
        after = last.chunk_no;
        for chunk in &chunks {
            ndjson.extend(crate::export::open_chunk(&app, &scope, &job_id, chunk).await?);
        }
        if chunks.len() < CHUNKS_PER_READ {
            break;
        }
    }
    let mut response = (StatusCode::OK, ndjson).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    Ok(response)
}
