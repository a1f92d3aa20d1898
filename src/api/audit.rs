//! Auditing every request, and the compliance endpoints over the audit log.
//!
//! The middleware wraps every route (authentication included, so refused tokens are recorded
//! too). Handlers fill an [`AuditContext`] with what they learn (caller, resource, compartment);
//! after the handler answers, the middleware appends one record and only then lets the response
//! go. Writes already appended their record in the data's own transaction and say so in the
//! context. If the append fails, the client gets 503 and none of the data.
//!
//! Endpoints (compliance-officer and admin, per policy):
//! - `GET /AuditEvent/{sequence}` and `GET /AuditEvent?patient=&agent=&date=&type=&subtype=&outcome=&entity=`
//!   (FHIR AuditEvents built from the records); writes answer 405.
//! - `GET /Patient/{id}/$disclosures?start=&end=[&_format=report]`: who accessed the patient's
//!   record, when, how and why (HIPAA 164.528), as a Bundle or a plain JSON report.
//! - `GET /_audit/proof?sequence=N[&size=M]`, `GET /_audit/consistency?from=A&to=B`,
//!   `GET /_audit/checkpoints?since=…`: inclusion and consistency proofs, signed checkpoints.

use std::sync::{Arc, Mutex};

use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::{negotiate, value_response, AppState, Caller, QueryParams};
use crate::authz::decision::{Interaction, Permit};
use crate::authz::principal::Principal;
use crate::error::{ApiError, ApiResult, Issue, IssueCode};
use crate::store::{AuditQuery, StoredAudit};

/// What a request contributes to its audit record. The middleware opens it for the request's
/// task; the authentication layer and the handlers fill it in through [`note`].
#[derive(Debug, Default, Clone)]
pub struct AuditContext {
    pub principal: Option<Arc<Principal>>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub version: Option<i64>,
    /// The compartment pseudonym of the (first) resource touched.
    pub patient: Option<String>,
    pub network_address: Option<String>,
    pub request_id: String,
    pub query: Option<String>,
    /// The interaction, from the route.
    pub interaction: &'static str,
    /// Set when the record was appended in the write's own transaction.
    pub appended: bool,
    /// Set by work that runs handlers as a part of a larger unit it audits on its own
    /// (`custodian import`'s chunks of single resources): a transaction Bundle run within it
    /// commits no record of its own, only its entries' ones.
    pub internal: bool,
    /// The Consents that decided accesses of this request, each once.
    pub consent_decisions: Vec<crate::audit::event::ConsentDecision>,
    /// How many consent denies an emergency declaration overrode.
    pub emergency_overrides: u32,
}

/// Records a consent decision in the current request's audit context: which Consent decided
/// (`None`: the configured default), how, and whether break-the-glass overrode a deny.
/// Permits by the default are the common case and carry no information: they are not listed.
pub fn note_consent(decided_by: Option<&str>, verdict: crate::consent::Verdict, overridden: bool) {
    if decided_by.is_none() && verdict == crate::consent::Verdict::Permit {
        return;
    }
    note(|context| {
        let consent = decided_by.unwrap_or("default").to_string();
        let known = context
            .consent_decisions
            .iter()
            .any(|decision| decision.consent == consent && decision.decision == verdict);
        // Bounded: a search over many patients names each deciding Consent once, and a
        // pathological request cannot grow its audit record without limit.
        if !known && context.consent_decisions.len() < MAX_CONSENT_NOTES {
            context
                .consent_decisions
                .push(crate::audit::event::ConsentDecision {
                    consent,
                    decision: verdict,
                });
        }
        if overridden {
            context.emergency_overrides = context.emergency_overrides.saturating_add(1);
        }
    });
}

/// Most distinct consent decisions one audit record lists.
const MAX_CONSENT_NOTES: usize = 100;

tokio::task_local! {
    static CURRENT: Arc<Mutex<AuditContext>>;
}

/// Adds to the current request's audit context (no-op outside a request).
pub fn note(change: impl FnOnce(&mut AuditContext)) {
    let _ = CURRENT.try_with(|context| {
        if let Ok(mut context) = context.lock() {
            change(&mut context);
        }
    });
}

/// A copy of the current request's audit context.
pub fn current() -> Option<AuditContext> {
    CURRENT
        .try_with(|context| context.lock().ok().map(|context| context.clone()))
        .ok()
        .flatten()
}

/// Runs `work` inside `context`, as the middleware runs a request, and returns what the work
/// noted in it. Work that is not an HTTP request (`custodian import`) goes through the same
/// handlers this way, and their writes commit their audit records as a request's do.
pub async fn within<T>(
    context: AuditContext,
    work: impl std::future::Future<Output = T>,
) -> (T, AuditContext) {
    let shared = Arc::new(Mutex::new(context));
    let output = CURRENT.scope(shared.clone(), work).await;
    let context = shared
        .lock()
        .map(|context| context.clone())
        .unwrap_or_default();
    (output, context)
}

/// The interaction a request performs, from its method and route.
pub fn interaction_of(method: &Method, route: &str) -> &'static str {
    let segments = route.trim_start_matches('/').split('/').count();
    match (method.as_str(), route) {
        (_, "/metadata") => "capabilities",
        ("GET", "/") | ("POST", "/_search") => "search-system",
        ("POST", "/") => "transaction",
        ("POST", route) if route.starts_with("/_audit/") => "operation",
        // Bulk Data kick-off, status, download and cancel.
        (_, route) if route.contains("$export") || route.starts_with("/_export/") => "operation",
        ("POST", route) if route.ends_with("/_search") => "search-type",
        ("GET", "/_history") => "history-system",
        ("GET", route) if route.ends_with("/_history/{version}") => "vread",
        ("GET", route) if route.ends_with("/{id}/_history") => "history-instance",
        ("GET", route) if route.ends_with("/_history") => "history-type",
        ("GET", route) if route.contains('$') => "operation",
        (_, route) if route.ends_with("/{operation}") => "operation",
        ("GET", _) if segments == 1 => "search-type",
        ("GET", _) => "read",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => "operation",
    }
}

/// The resource type and id a request addresses, read from its path by the route template
/// (`/{resource_type}/{id}/…`, or a fixed type such as `/AuditEvent/{id}`).
fn path_resource(route: &str, path: &str) -> (Option<String>, Option<String>) {
    let mut resource_type = None;
    let mut id = None;
    for (template, value) in route.split('/').zip(path.split('/')).skip(1) {
        match template {
            "{resource_type}" => resource_type = Some(value.to_string()),
            "{id}" => id = Some(value.to_string()),
            fixed
                if resource_type.is_none()
                    && fixed.starts_with(|c: char| c.is_ascii_uppercase()) =>
            {
                resource_type = Some(fixed.to_string());
            }
            _ => {}
        }
    }
    // Only well-formed values: the record must never carry arbitrary client text.
    let resource_type = resource_type.filter(|name| fhir_codec::is_resource_type(name));
    let id = id.filter(|id| crate::fhir::is_valid_id(id));
    (resource_type, id)
}

/// Middleware: records the request after the handler answered, before the answer leaves.
pub async fn record(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_default();
    // Liveness and readiness probes carry no data and would flood the log.
    if route == "/health" || route == "/ready" {
        return next.run(request).await;
    }
    let (resource_type, resource_id) = path_resource(&route, request.uri().path());
    let context = AuditContext {
        interaction: interaction_of(request.method(), &route),
        resource_type,
        resource_id,
        query: request.uri().query().map(str::to_string),
        network_address: request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip().to_string()),
        request_id: request
            .headers()
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        ..AuditContext::default()
    };
    let shared = Arc::new(Mutex::new(context));
    let response = CURRENT.scope(shared.clone(), next.run(request)).await;

    let status = response.status();
    let context = shared
        .lock()
        .map(|context| context.clone())
        .unwrap_or_default();
    if context.appended {
        return response;
    }
    let interaction = if status == StatusCode::UNAUTHORIZED {
        "login"
    } else {
        context.interaction
    };
    let entry = app.audit_entry(&context, interaction, status.as_u16());
    match app.audit.append(entry).await {
        Ok(_) => response,
        Err(error) => {
            tracing::error!(%error, "audit append failed: the response is withheld");
            ApiError::Unavailable("the audit log is unavailable".into()).into_response()
        }
    }
}

/// `GET /AuditEvent/{sequence}`: one audit record as a FHIR AuditEvent.
pub async fn read_event(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path(id): Path<String>,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let format = negotiate(&query, &headers)?;
    let permit = compliance_permit(&app, &principal, Interaction::Read).await?;
    let not_found = || ApiError::resource_not_found("AuditEvent", &id);
    let sequence: i64 = id.parse().map_err(|_| not_found())?;
    let stored = app
        .store
        .audit_records(sequence, 1)
        .await?
        .into_iter()
        .find(|stored| stored.sequence == sequence)
        .ok_or_else(not_found)?;
    let event = app.audit_event_of(&stored).ok_or_else(not_found)?;
    if event_tenant(&stored) != Some(permit.scope().tenant().to_string()) {
        return Err(not_found());
    }
    value_response(StatusCode::OK, &event, format)
}

/// `GET /AuditEvent?…`: compliance search over the audit log, newest first.
pub async fn search_events(
    State(app): State<AppState>,
    Extension(principal): Caller,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let format = negotiate(&query, &headers)?;
    let permit = compliance_permit(&app, &principal, Interaction::Search).await?;
    let audit_query = audit_query(&app, &permit, &query).await?;
    let records = app.store.search_audit(permit.scope(), &audit_query).await?;
    let entries: Vec<Value> = records
        .iter()
        .filter_map(|stored| app.audit_event_of(stored))
        .map(|event| {
            json!({
                "fullUrl": format!("{}/AuditEvent/{}", app.base_url, event["id"].as_str().unwrap_or_default()),
                "resource": event,
                "search": { "mode": "match" }
            })
        })
        .collect();
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": entries.len(),
        "link": [{ "relation": "self", "url": format!("{}/AuditEvent", app.base_url) }],
        "entry": entries,
    });
    value_response(StatusCode::OK, &bundle, format)
}

/// `GET /_audit/disclosures?patient=Patient/ID[&start=…][&end=…][&_format=report]`: who
/// accessed one patient's record, when, how and why (HIPAA 164.528): a Bundle of AuditEvents,
/// or with `_format=report` a plain JSON list.
pub async fn disclosures(
    State(app): State<AppState>,
    Extension(principal): Caller,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let permit = compliance_permit(&app, &principal, Interaction::Search).await?;
    if query.first("patient").is_none() {
        return Err(ApiError::invalid(
            IssueCode::Required,
            "patient is required",
        ));
    }
    let mut renamed = QueryParams(
        query
            .0
            .iter()
            .filter(|(name, _)| name != "_format")
            .map(|(name, value)| match name.as_str() {
                "start" => ("date".to_string(), format!("ge{value}")),
                "end" => ("date".to_string(), format!("le{value}")),
                _ => (name.clone(), value.clone()),
            })
            .collect(),
    );
    renamed.0.push(("_count".into(), "1000".into()));
    let audit_query = audit_query(&app, &permit, &renamed).await?;
    let records = app.store.search_audit(permit.scope(), &audit_query).await?;
    let events: Vec<Value> = records
        .iter()
        .filter_map(|stored| app.audit_event_of(stored))
        .collect();
    if query.first("_format") == Some("report") {
        let report: Vec<Value> = records
            .iter()
            .filter_map(|stored| serde_json::from_slice::<Value>(&stored.record).ok())
            .map(|record| {
                json!({
                    "when": record["recorded"],
                    "who": { "subject": record["agent_subject"], "fhirUser": record["agent_fhir_user"],
                             "client": record["agent_client_id"], "roles": record["agent_roles"] },
                    "what": { "interaction": record["interaction"], "resourceType": record["resource_type"],
                              "id": record["resource_id"], "outcome": record["outcome"] },
                    "why": record["purpose_of_use"],
                })
            })
            .collect();
        let mut response = Json(json!({ "disclosures": report })).into_response();
        *response.status_mut() = StatusCode::OK;
        return Ok(response);
    }
    let format = negotiate(&QueryParams::default(), &headers)?;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "collection",
        "entry": events.into_iter().map(|event| json!({ "resource": event })).collect::<Vec<_>>(),
    });
    value_response(StatusCode::OK, &bundle, format)
}

/// `GET /_audit/proof?sequence=N[&size=M]`: inclusion proof.
pub async fn proof(
    State(app): State<AppState>,
    Extension(principal): Caller,
    query: QueryParams,
) -> ApiResult<Json<Value>> {
    compliance_permit(&app, &principal, Interaction::Read).await?;
    let number = |name: &str| -> ApiResult<Option<i64>> {
        query
            .first(name)
            .map(|value| {
                value.parse().map_err(|_| {
                    ApiError::invalid(IssueCode::Value, format!("{name} must be an integer"))
                })
            })
            .transpose()
    };
    let sequence = number("sequence")?
        .ok_or_else(|| ApiError::invalid(IssueCode::Required, "sequence is required"))?;
    crate::audit::log::inclusion(&*app.store, sequence, number("size")?)
        .await
        .map(Json)
        .map_err(ApiError::NotFound)
}

/// `GET /_audit/consistency?from=A&to=B`: consistency proof.
pub async fn consistency(
    State(app): State<AppState>,
    Extension(principal): Caller,
    query: QueryParams,
) -> ApiResult<Json<Value>> {
    compliance_permit(&app, &principal, Interaction::Read).await?;
    let number = |name: &str| -> ApiResult<i64> {
        query
            .first(name)
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| {
                ApiError::invalid(IssueCode::Value, format!("{name} must be an integer"))
            })
    };
    crate::audit::log::consistency(&*app.store, number("from")?, number("to")?)
        .await
        .map(Json)
        .map_err(ApiError::NotFound)
}

/// The permit of a compliance request (compliance-officer and admin, per policy), once every
/// committed record has its place in the log, so that answers include all requests so far.
pub(super) async fn compliance_permit(
    app: &super::App,
    principal: &Arc<Principal>,
    interaction: Interaction,
) -> ApiResult<Permit> {
    let permit = app
        .decide(principal, interaction, Some("AuditEvent"))
        .await?;
    crate::audit::log::sequence_all(&*app.store).await?;
    Ok(permit)
}

fn event_tenant(stored: &StoredAudit) -> Option<String> {
    serde_json::from_slice::<Value>(&stored.record)
        .ok()?
        .get("tenant")?
        .as_str()
        .map(str::to_string)
}

/// Reads the compliance search parameters: patient, agent, date (ge/gt/le/lt), subtype,
/// outcome (0, 4, 8), entity (Type/id), _count. Unknown parameters are refused, never ignored
/// (ignoring one would widen the result).
async fn audit_query(
    app: &super::App,
    permit: &Permit,
    query: &QueryParams,
) -> ApiResult<AuditQuery> {
    let mut audit_query = AuditQuery {
        limit: app.settings.page_size.max(1),
        ..AuditQuery::default()
    };
    let invalid = |name: &str| {
        ApiError::Invalid(vec![Issue::new(
            IssueCode::Value,
            format!("{name} has an invalid value"),
        )
        .at(name)])
    };
    for (name, value) in &query.0 {
        match name.as_str() {
            "patient" => {
                let id = crate::fhir::compartment::patient_id_of_reference(value)
                    .or_else(|| crate::fhir::is_valid_id(value).then(|| value.clone()))
                    .ok_or_else(|| invalid("patient"))?;
                audit_query.patient = Some(app.store.compartment_pseudonym(permit.scope(), &id).await?);
            }
            "agent" => audit_query.agent = Some(value.clone()),
            "subtype" => audit_query.interaction = Some(value.rsplit('|').next().unwrap_or_default().to_string()),
            // type: `rest` (every FHIR interaction) or DICOM 110114 (authentication failures).
            "type" => match value.rsplit('|').next().unwrap_or_default() {
                "110114" => audit_query.interaction = Some("login".into()),
                "rest" => audit_query.exclude_interaction = Some("login".into()),
                _ => return Err(invalid("type")),
            },
            "outcome" => {
                let (from, to) = match value.as_str() {
                    "0" => (0, 400),
                    "4" => (400, 500),
                    "8" => (500, 1000),
                    _ => return Err(invalid("outcome")),
                };
                audit_query.outcome_from = Some(from);
                audit_query.outcome_to = Some(to);
            }
            "entity" => {
                let (resource_type, id) = value.split_once('/').ok_or_else(|| invalid("entity"))?;
                audit_query.resource_type = Some(resource_type.to_string());
                audit_query.resource_id = Some(id.to_string());
            }
            "date" => {
                let (prefix, date) = value.split_at(value.len().min(2));
                let (prefix, date) = if prefix.chars().all(|c| c.is_ascii_lowercase()) {
                    (prefix, date)
                } else {
                    ("eq", value.as_str())
                };
                let time = super::parse_instant(date).ok_or_else(|| invalid("date"))?.timestamp_micros();
                match prefix {
                    "ge" | "gt" => audit_query.from_us = Some(time),
                    "le" | "lt" => audit_query.to_us = Some(time),
                    _ => return Err(invalid("date")),
                }
            }
            "_count" => {
                audit_query.limit = value
                    .parse::<usize>()
                    .map_err(|_| invalid("_count"))?
                    .clamp(1, app.settings.max_page_size.max(1000));
            }
            "_format" | "_pretty" => {}
            _ => {
                return Err(ApiError::Invalid(vec![Issue::new(
                    IssueCode::NotSupported,
                    "AuditEvent search supports patient, agent, date, type, subtype, outcome, entity and _count",
                )]))
            }
        }
    }
    Ok(audit_query)
}
