//! The FHIR RESTful API (http://hl7.org/fhir/R4/http.html): the router, the shared state, and
//! the pieces every interaction uses (request reading, content negotiation, response headers).
//! One file per interaction.

pub mod audit;
mod auth;
mod break_glass;
pub mod bundle;
mod capabilities;
mod conditional;
mod create;
mod delete;
mod erase;
mod everything;
mod export;
mod health;
mod history;

pub use history::parse_instant;
mod operation;
mod patch;
pub mod rate_limit;
mod read;
mod search;
mod update;
mod vread;
pub(crate) mod write;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::audit::event::AuditRecord;
use crate::authz::decision::{Interaction, Permit, ResourceFacts};
use crate::authz::principal::Principal;
use crate::config::Settings;
use crate::error::{ApiError, ApiResult};
use crate::fhir::bundle::etag;
use crate::fhir::compartment::PatientCompartment;
use crate::fhir::format::{response_format, Format};
use crate::fhir::validate::Validator;
use crate::store::{AuditEntry, Store, VersionRecord};
use audit::AuditContext;

/// Everything a request handler needs, shared by all requests.
pub struct App {
    /// The settings the server started with.
    pub settings: Settings,
    /// Resource storage (SQLite or PostgreSQL).
    pub store: Arc<dyn Store>,
    /// Primitive-format and required-binding checks.
    pub validator: Validator,
    /// Which patient a resource belongs to.
    pub compartment: PatientCompartment,
    /// Public base URL, without a trailing slash.
    pub base_url: String,
    /// The CapabilityStatement, built once.
    pub capability_statement: serde_json::Value,
    /// Envelope encryption of every body.
    pub vault: Arc<crate::crypto::vault::Vault>,
    /// Bearer-token validation.
    pub tokens: crate::authz::token::TokenValidator,
    /// The access decision.
    pub decider: crate::authz::decision::Decider,
    /// The audit log's append side.
    pub audit: crate::audit::log::AuditLog,
    /// The audit catalog (interaction → AuditEvent codes).
    pub audit_catalog: crate::audit::event::Catalog,
    /// The key of the keyed hash of query strings in audit records.
    pub audit_query_key: zeroize::Zeroizing<Vec<u8>>,
    /// Search parameters and the index's blinding.
    pub search: crate::search::Search,
    /// The erasure ledger outside the database (see [`crate::erasure`]).
    pub erasure_ledger: crate::erasure::Ledger,
    /// Per-client request budgets.
    pub rate_limits: rate_limit::RateLimits,
}

/// The axum state: one `App` behind an `Arc`.
pub type AppState = Arc<App>;

impl App {
    /// A stored version with its body decrypted (JSON), if the permit covers it; `None` when
    /// the resource is outside the caller's reach (answered like a missing one).
    ///
    /// # Errors
    /// 500 (integrity alarm) when the body does not authenticate; 503 when its key cannot be
    /// fetched.
    pub async fn open_visible(
        &self,
        permit: &Permit,
        mut record: VersionRecord,
    ) -> ApiResult<Option<VersionRecord>> {
        record.body = self.vault.open(permit.scope(), &record).await?;
        // Parsing the body costs more than the rest of a read; the decision needs it only for
        // granular scopes, care-team rules, security labels and content-bound Consents.
        let needs_content = self
            .decider
            .needs_content(permit, &record.resource_type, record.compartment.as_deref())
            .await?
            || record
                .body
                .as_deref()
                .is_some_and(|body| body.windows(10).any(|window| window == b"\"security\""));
        let resource: Option<serde_json::Value> =
            match record.body.as_deref().filter(|_| needs_content) {
                Some(body) => Some(
                    serde_json::from_slice(body)
                        .map_err(|_| ApiError::Internal("a stored body is not JSON".into()))?,
                ),
                None => None,
            };
        let facts = ResourceFacts {
            resource_type: &record.resource_type,
            id: Some(&record.id),
            compartment: record.compartment.as_deref(),
            resource: resource.as_ref(),
        };
        let visible = self.decider.visible(permit, &facts).await?;
        if visible {
            // The audit record names the (first) resource served and its compartment.
            audit::note(|context| {
                if context.resource_id.is_none() {
                    context.resource_type = Some(record.resource_type.clone());
                    context.resource_id = Some(record.id.clone());
                }
                if context.version.is_none() {
                    context.version = Some(record.version);
                }
                if context.patient.is_none() {
                    context.patient = record.compartment.clone();
                }
            });
        }
        Ok(visible.then_some(record))
    }

    /// The audit entry of the current request, from what its context gathered.
    pub fn audit_entry(
        &self,
        context: &AuditContext,
        interaction: &str,
        status: u16,
    ) -> AuditEntry {
        let principal = context.principal.as_deref();
        let record = AuditRecord {
            sequence: 0,
            recorded: chrono::Utc::now(),
            interaction: interaction.to_string(),
            resource_type: context.resource_type.clone(),
            resource_id: context.resource_id.clone(),
            version: context.version,
            outcome: status,
            agent_subject: principal.map(|principal| principal.subject.clone()),
            agent_client_id: principal.and_then(|principal| principal.client_id.clone()),
            agent_fhir_user: principal.and_then(|principal| {
                principal
                    .fhir_user
                    .as_ref()
                    .map(|user| format!("{}/{}", user.resource_type, user.id))
            }),
            agent_roles: principal
                .map(|principal| principal.roles.clone())
                .unwrap_or_default(),
            purpose_of_use: principal.and_then(|principal| principal.purpose_of_use.clone()),
            network_address: context.network_address.clone(),
            patient_pseudonym: context.patient.clone(),
            request_id: context.request_id.clone(),
            query_hash: context
                .query
                .as_deref()
                .map(|query| self.audit_query_hash(query)),
            tenant: self.settings.tenant.clone(),
            consent_decisions: context.consent_decisions.clone(),
            emergency_session: principal
                .and_then(|principal| principal.emergency.as_ref())
                .map(|emergency| emergency.session_id.clone()),
            emergency_overrides: context.emergency_overrides,
        };
        let mut value = serde_json::to_value(&record).unwrap_or_default();
        // The position is the row's sequence number, assigned when the record is appended.
        if let Some(object) = value.as_object_mut() {
            object.remove("sequence");
        }
        AuditEntry {
            tenant: record.tenant.clone(),
            recorded_us: record.recorded.timestamp_micros(),
            interaction: record.interaction.clone(),
            resource_type: record.resource_type.clone(),
            resource_id: record.resource_id.clone(),
            outcome: i64::from(status),
            agent: record.agent_subject.clone(),
            patient: record.patient_pseudonym.clone(),
            record: serde_json::to_vec(&value).unwrap_or_default(),
        }
    }

    /// The FHIR AuditEvent of a stored record.
    pub fn audit_event_of(&self, stored: &crate::store::StoredAudit) -> Option<serde_json::Value> {
        let mut record: serde_json::Value = serde_json::from_slice(&stored.record).ok()?;
        record["sequence"] = serde_json::json!(stored.sequence);
        let record: AuditRecord = serde_json::from_value(record).ok()?;
        Some(crate::audit::event::audit_event(
            &record,
            &self.audit_catalog,
            &self.base_url,
        ))
    }

    /// HMAC-SHA256 of a query string under the audit query key: equal queries can be matched
    /// in the log, but the text (which may hold names or identifiers) is not recoverable.
    pub fn audit_query_hash(&self, query: &str) -> String {
        let key = aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            self.audit_query_key.as_slice(),
        );
        let tag = aws_lc_rs::hmac::sign(&key, query.as_bytes());
        tag.as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// Decides a request (403 when never allowed).
    ///
    /// # Errors
    /// 403 when the caller's scopes or roles never allow the interaction on this type.
    pub async fn decide(
        &self,
        principal: &Arc<Principal>,
        interaction: Interaction,
        resource_type: Option<&str>,
    ) -> ApiResult<Permit> {
        self.decider
            .decide(principal, interaction, resource_type)
            .await
    }
}

/// The authenticated caller of a request (set by the authentication middleware).
pub type Caller = axum::Extension<Arc<Principal>>;

/// The HTTP router with every FHIR endpoint and the cross-cutting layers.
pub fn router(app: AppState) -> Router {
    let timeout = Duration::from_secs(app.settings.request_timeout_secs.max(1));
    Router::new()
        .route("/metadata", get(capabilities::capabilities))
        .route(
            "/.well-known/smart-configuration",
            get(auth::smart_configuration),
        )
        .route("/health", get(health::live))
        .route("/ready", get(health::ready))
        .route("/", get(search::search_system).post(bundle::bundle))
        .route("/_search", axum::routing::post(search::search_system_post))
        .route("/_history", get(history::history_system))
        .route("/AuditEvent", get(audit::search_events))
        .route("/AuditEvent/{id}", get(audit::read_event))
        .route("/_audit/disclosures", get(audit::disclosures))
        .route(
            "/$export",
            get(export::export_system).post(export::export_system),
        )
        .route(
            "/Patient/$export",
            get(export::export_patient).post(export::export_patient),
        )
        .route(
            "/Group/{id}/$export",
            get(export::export_group).post(export::export_group),
        )
        .route("/_export/{job}", get(export::status).delete(export::cancel))
        .route("/_export/{job}/file/{number}", get(export::file))
        .route("/_audit/proof", get(audit::proof))
        .route("/_audit/consistency", get(audit::consistency))
        .route("/_audit/break-glass", get(break_glass::list))
        .route(
            "/_audit/break-glass/{session}/review",
            axum::routing::post(break_glass::review),
        )
        .route(
            "/{resource_type}",
            get(search::search_type)
                .post(create::create)
                .put(update::conditional_update)
                .delete(delete::conditional_delete),
        )
        .route("/{resource_type}/_history", get(history::history_type))
        .route(
            "/{resource_type}/_search",
            axum::routing::post(search::search_type_post),
        )
        .route(
            "/{resource_type}/{id}",
            get(read::read)
                .put(update::update)
                .patch(patch::patch)
                .delete(delete::delete),
        )
        .route(
            "/{resource_type}/{id}/_history",
            get(history::history_instance),
        )
        .route(
            "/{resource_type}/{id}/_history/{version}",
            get(vread::vread),
        )
        .route(
            "/{resource_type}/{id}/{operation}",
            get(operation::instance_get).post(operation::instance_post),
        )
        .route(
            "/OperationDefinition/{id}",
            get(operation::operation_definition),
        )
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            auth::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            audit::record,
        ))
        .layer(axum::middleware::from_fn(move |request, next| {
            deadline(timeout, request, next)
        }))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::Internal("handler panicked".into()).into_response()
        }))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(request_span))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(app)
}

/// The span of a request: method, route template and request id. Never the query string or the
/// concrete path, which may carry identifiers.
fn request_span(request: &Request) -> tracing::Span {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    tracing::info_span!("request", method = %request.method(), route, request_id)
}

/// Abandons a request that takes longer than the configured timeout, answering 503.
async fn deadline(timeout: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable("request timed out".into()).into_response(),
    }
}

/// The query string as ordered name/value pairs (names may repeat).
#[derive(Debug, Default, Clone)]
pub struct QueryParams(pub Vec<(String, String)>);

impl QueryParams {
    /// The first value of a parameter.
    pub fn first(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Parses a query string (`a=1&b=2`).
    pub fn parse(query: &str) -> Self {
        QueryParams(
            form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect(),
        )
    }
}

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(QueryParams::parse(parts.uri.query().unwrap_or_default()))
    }
}

/// Checks that `resource_type` is served here.
///
/// # Errors
/// 404 for an unknown (or not served) resource type.
pub fn check_resource_type(resource_type: &str) -> ApiResult<()> {
    if crate::fhir::capability::is_served(resource_type) {
        Ok(())
    } else {
        Err(ApiError::NotFound(
            "unknown or unsupported resource type".to_string(),
        ))
    }
}

/// Reads a request body up to `limit` bytes; a declared or actual larger body is 413, and is
/// refused before it is read whole.
///
/// # Errors
/// 413 when too large, 400 when the body cannot be read.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> ApiResult<Bytes> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let too_large = || ApiError::PayloadTooLarge(format!("the request body exceeds {limit} bytes"));
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        let length_limit = std::error::Error::source(&error)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if length_limit {
            too_large()
        } else {
            ApiError::invalid(
                crate::error::IssueCode::Invalid,
                "the request body could not be read",
            )
        }
    })
}

/// Reads, parses and checks the resource in a request body, whose `resourceType` must be the
/// type in the URL.
///
/// # Errors
/// 415 for a wrong content type, 413 when too large, 400 when invalid.
pub async fn read_resource(
    app: &App,
    headers: &HeaderMap,
    body: Body,
    resource_type: &str,
) -> ApiResult<serde_json::Map<String, serde_json::Value>> {
    let input_format = crate::fhir::format::request_format(headers)?;
    let bytes = read_body(headers, body, app.settings.max_body_bytes).await?;
    let resource = crate::fhir::parse::parse_resource(&bytes, input_format, &app.validator)?;
    if resource
        .get("resourceType")
        .and_then(|value| value.as_str())
        != Some(resource_type)
    {
        return Err(ApiError::Invalid(vec![crate::error::Issue::new(
            crate::error::IssueCode::Invalid,
            format!("resourceType must be {resource_type} at this URL"),
        )
        .at("resourceType")]));
    }
    Ok(resource)
}

/// What the client asked for with `Prefer: return=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnPreference {
    Minimal,
    Representation,
    OperationOutcome,
}

/// Reads `Prefer: return=…` (default: the representation).
pub fn return_preference(headers: &HeaderMap) -> ReturnPreference {
    let prefer = headers
        .get_all("prefer")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split([',', ';']))
        .map(str::trim)
        .find_map(|token| token.strip_prefix("return="));
    match prefer.map(|value| value.trim_matches('"')) {
        Some("minimal") => ReturnPreference::Minimal,
        Some("OperationOutcome") => ReturnPreference::OperationOutcome,
        _ => ReturnPreference::Representation,
    }
}

/// Parses `If-Match: W/"3"` (or `"3"`, or `3`) into a version number.
///
/// # Errors
/// 400 when the header is present but is not a version ETag.
pub fn if_match_version(headers: &HeaderMap) -> ApiResult<Option<i64>> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    text.parse::<i64>().map(Some).map_err(|_| {
        ApiError::invalid(
            crate::error::IssueCode::Value,
            "If-Match must be a version ETag such as W/\"1\"",
        )
    })
}

/// Serializes a stored JSON body in the requested format.
///
/// # Errors
/// 500 when a stored body cannot be converted (a broken invariant).
pub fn encode_body(json: &[u8], format: Format) -> ApiResult<Vec<u8>> {
    match format {
        Format::Json => Ok(json.to_vec()),
        Format::Xml => fhir_codec::json_to_xml(json).map_err(|error| {
            ApiError::Internal(format!("stored resource not convertible: {error}"))
        }),
    }
}

/// Serializes a server-built JSON value (Bundle, OperationOutcome) in the requested format.
///
/// # Errors
/// 500 when the value is not a valid resource (a bug).
pub fn encode_value(value: &serde_json::Value, format: Format) -> ApiResult<Vec<u8>> {
    let json = serde_json::to_vec(value)
        .map_err(|error| ApiError::Internal(format!("cannot serialize: {error}")))?;
    encode_body(&json, format)
}

/// A response carrying a resource version: `ETag`, `Last-Modified`, and (for 201) `Location`.
pub struct VersionResponse<'a> {
    pub app: &'a App,
    pub record: &'a VersionRecord,
    pub status: StatusCode,
    pub format: Format,
    pub preference: ReturnPreference,
    /// An informational message for `Prefer: return=OperationOutcome`.
    pub outcome_message: String,
}

impl<'a> VersionResponse<'a> {
    /// 200 with the version's representation (read, vread).
    pub fn representation(app: &'a App, record: &'a VersionRecord, format: Format) -> Self {
        VersionResponse {
            app,
            record,
            status: StatusCode::OK,
            format,
            preference: ReturnPreference::Representation,
            outcome_message: String::new(),
        }
    }

    /// Builds the HTTP response.
    ///
    /// # Errors
    /// 500 when the stored body cannot be encoded.
    pub fn into_response(self) -> ApiResult<Response> {
        let record = self.record;
        let body = match (self.preference, &record.body) {
            (ReturnPreference::Minimal, _) | (_, None) => Vec::new(),
            (ReturnPreference::OperationOutcome, _) => encode_value(
                &serde_json::json!({
                    "resourceType": "OperationOutcome",
                    "issue": [crate::error::outcome_issue(
                        "information", "informational", &self.outcome_message, None)]
                }),
                self.format,
            )?,
            (ReturnPreference::Representation, Some(json)) => encode_body(json, self.format)?,
        };
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        if !response_body_is_empty(self.preference, record) {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(self.format.content_type()),
            );
        }
        insert_header(headers, header::ETAG, &etag(record.version));
        insert_header(
            headers,
            header::LAST_MODIFIED,
            &http_date(record.last_updated),
        );
        if self.status == StatusCode::CREATED {
            let location = format!(
                "{}/{}/{}/_history/{}",
                self.app.base_url, record.resource_type, record.id, record.version
            );
            insert_header(headers, header::LOCATION, &location);
        }
        Ok(response)
    }
}

fn response_body_is_empty(preference: ReturnPreference, record: &VersionRecord) -> bool {
    preference == ReturnPreference::Minimal
        || (preference == ReturnPreference::Representation && record.body.is_none())
}

/// Inserts a header whose value this server built (always valid ASCII).
pub fn insert_header(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// An HTTP date (`Last-Modified`).
pub fn http_date(time: DateTime<Utc>) -> String {
    time.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// The response format of a request: `_format`, else `Accept`.
///
/// # Errors
/// 406 when nothing acceptable can be produced.
pub fn negotiate(query: &QueryParams, headers: &HeaderMap) -> ApiResult<Format> {
    response_format(query.first("_format"), headers)
}

/// A JSON/XML response of a server-built resource with a status.
///
/// # Errors
/// 500 when the value cannot be encoded.
pub fn value_response(
    status: StatusCode,
    value: &serde_json::Value,
    format: Format,
) -> ApiResult<Response> {
    let body = encode_value(value, format)?;
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    Ok(response)
}
