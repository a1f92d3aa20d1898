//! Auditing every request, and the compliance endpoints over the audit log.
//!
//! The middleware wraps every route (authentication included, so refused tokens are recorded
//! too). Handlers fill an [`AuditContext`] with what they learn (caller, resource, compartment);
//! after the handler answers, the middleware appends one record and only then lets the response
//! go. Writes already appended their record in the data's own transaction and say so in the
//! context. If the append fails, the client gets 503 and none of the data.
//!
//! Endpoints (compliance-officer and admin, per policy):
//! - `GET /AuditEvent/{sequence}` and `GET /AuditEvent?patient=&agent=&date=&subtype=&outcome=&entity=`
//!   (FHIR AuditEvents built from the records); writes answer 405.
//! - `GET /Patient/{id}/$disclosures?start=&end=[&_format=report]`: who accessed the patient's
//!   record, when, how and why (HIPAA 164.528), as a Bundle or a plain JSON report.
//! - `GET /_audit/proof?sequence=N[&size=M]`, `GET /_audit/consistency?from=A&to=B`,
//!   `GET /_audit/checkpoints?since=…`: inclusion and consistency proofs, signed checkpoints.

use std::sync::{Arc, Mutex};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::authz::principal::Principal;
use crate::error::ApiError;

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
}

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

/// The interaction a request performs, from its method and route.
pub fn interaction_of(method: &Method, route: &str) -> &'static str {
    let segments = route.trim_start_matches('/').split('/').count();
    match (method.as_str(), route) {
        (_, "/metadata") => "capabilities",
        ("GET", "/_history") => "history-system",
        ("GET", route) if route.ends_with("/_history/{version}") => "vread",
        ("GET", route) if route.ends_with("/{id}/_history") => "history-instance",
        ("GET", route) if route.ends_with("/_history") => "history-type",
        ("GET", route) if route.contains('$') => "operation",
        ("GET", _) if segments == 1 => "search-type",
        ("GET", _) => "read",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => "operation",
    }
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
    let context = AuditContext {
        interaction: interaction_of(request.method(), &route),
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
