//! The one mapping from errors to HTTP answers: every failure leaves the server as a FHIR
//! OperationOutcome with the status and issue code below, whether it ends a request or (later) a
//! Bundle entry.
//!
//! | error                  | HTTP status | FHIR issue code    |
//! |------------------------|-------------|--------------------|
//! | `Invalid`              | 400         | invalid/structure/required/value (as given) |
//! | `Unauthorized`         | 401         | login              |
//! | `Forbidden`            | 403         | forbidden          |
//! | `NotFound`             | 404         | not-found          |
//! | `MethodNotAllowed`     | 405         | not-supported      |
//! | `NotAcceptable`        | 406         | not-supported      |
//! | `Conflict`             | 409         | conflict           |
//! | `Gone`                 | 410         | deleted            |
//! | `PreconditionFailed`   | 412         | conflict           |
//! | `MultipleMatches`      | 412         | multiple-matches   |
//! | `PayloadTooLarge`      | 413         | too-costly         |
//! | `UnsupportedMediaType` | 415         | not-supported      |
//! | `Unprocessable`        | 422         | processing         |
//! | `TooManyRequests`      | 429         | throttled          |
//! | `Internal`             | 500         | exception          |
//! | `Unavailable`          | 503         | transient          |
//!
//! 5xx bodies never name SQL, drivers or keys: the full error chain goes to the log (which itself
//! never holds PHI) and the client gets the request id to quote.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// FHIR `IssueType` codes used by this server (http://hl7.org/fhir/R4/valueset-issue-type.html).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    Invalid,
    Structure,
    Required,
    Value,
    Processing,
    NotSupported,
    Informational,
}

impl IssueCode {
    /// The code as written in an OperationOutcome.
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Invalid => "invalid",
            IssueCode::Structure => "structure",
            IssueCode::Required => "required",
            IssueCode::Value => "value",
            IssueCode::Processing => "processing",
            IssueCode::NotSupported => "not-supported",
            IssueCode::Informational => "informational",
        }
    }
}

/// One issue of a client error: what is wrong, where (a FHIRPath expression), and its code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub code: IssueCode,
    pub message: String,
    pub location: Option<String>,
}

impl Issue {
    /// An issue of the given code without a location.
    pub fn new(code: IssueCode, message: impl Into<String>) -> Self {
        Issue {
            code,
            message: message.into(),
            location: None,
        }
    }

    /// The same issue, located at a FHIRPath expression.
    pub fn at(mut self, location: impl Into<String>) -> Self {
        self.location = Some(location.into());
        self
    }
}

/// Everything a request can fail with. Each variant documents its status; see the module table.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed; one issue per problem found.
    #[error("invalid request")]
    Invalid(Vec<Issue>),
    /// 401: no valid credentials.
    #[error("authentication required")]
    Unauthorized,
    /// 403: the caller may not perform this interaction.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// 404: no such resource (or the caller may not know it exists), type or endpoint.
    #[error("not found: {0}")]
    NotFound(String),
    /// 405: the endpoint exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 406: none of the formats the client accepts can be produced.
    #[error("not acceptable: {0}")]
    NotAcceptable(String),
    /// 409: the request conflicts with the current state.
    #[error("conflict: {0}")]
    Conflict(String),
    /// 410: the resource existed and was deleted.
    #[error("gone: {0}")]
    Gone(String),
    /// 412: `If-Match` names a version that is no longer current.
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    /// 412: a conditional interaction matched more than one resource.
    #[error("multiple matches: {0}")]
    MultipleMatches(String),
    /// 413: the body exceeds the configured limit.
    #[error("payload too large: {0}")]
    PayloadTooLarge(String),
    /// 415: the body's content type is not a FHIR format this server reads.
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed but violates a rule of this server or the specification.
    #[error("unprocessable: {0}")]
    Unprocessable(String),
    /// 429: the caller exceeded its rate.
    #[error("too many requests")]
    TooManyRequests,
    /// 500: a bug or broken invariant; the cause is logged, never returned.
    #[error("internal error: {0}")]
    Internal(String),
    /// 503: a dependency (database, KMS) is unavailable; the client may retry.
    #[error("service unavailable: {0}")]
    Unavailable(String),
}

/// `Result` with [`ApiError`] as the default error.
pub type ApiResult<T, E = ApiError> = Result<T, E>;

impl ApiError {
    /// A 400 with one issue.
    pub fn invalid(code: IssueCode, message: impl Into<String>) -> Self {
        ApiError::Invalid(vec![Issue::new(code, message)])
    }

    /// A 404 for a resource, worded like one that never existed.
    pub fn resource_not_found(resource_type: &str, id: &str) -> Self {
        ApiError::NotFound(format!("{resource_type}/{id} is not known"))
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::PreconditionFailed(_) | ApiError::MultipleMatches(_) => {
                StatusCode::PRECONDITION_FAILED
            }
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The OperationOutcome describing this error to the client.
    pub fn operation_outcome(&self) -> Value {
        let issues = match self {
            ApiError::Invalid(issues) => issues
                .iter()
                .map(|issue| {
                    outcome_issue(
                        "error",
                        issue.code.as_str(),
                        &issue.message,
                        issue.location.as_deref(),
                    )
                })
                .collect(),
            other => vec![outcome_issue(
                "error",
                other.issue_code(),
                &other.client_message(),
                None,
            )],
        };
        json!({ "resourceType": "OperationOutcome", "issue": issues })
    }

    fn issue_code(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "invalid",
            ApiError::Unauthorized => "login",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::MethodNotAllowed
            | ApiError::NotAcceptable(_)
            | ApiError::UnsupportedMediaType(_) => "not-supported",
            ApiError::Conflict(_) | ApiError::PreconditionFailed(_) => "conflict",
            ApiError::Gone(_) => "deleted",
            ApiError::MultipleMatches(_) => "multiple-matches",
            ApiError::PayloadTooLarge(_) => "too-costly",
            ApiError::Unprocessable(_) => "processing",
            ApiError::TooManyRequests => "throttled",
            ApiError::Internal(_) => "exception",
            ApiError::Unavailable(_) => "transient",
        }
    }

    /// What the client is told. Server-side causes stay in the log.
    fn client_message(&self) -> String {
        match self {
            ApiError::Internal(_) => {
                "internal server error; quote the X-Request-Id header when reporting it".into()
            }
            ApiError::Unavailable(_) => {
                "service temporarily unavailable; retry after the Retry-After delay".into()
            }
            ApiError::Unauthorized => "a valid bearer token is required".into(),
            ApiError::MethodNotAllowed => "this method is not supported on this endpoint".into(),
            ApiError::TooManyRequests => "too many requests".into(),
            ApiError::Invalid(_) => "invalid request".into(),
            ApiError::Forbidden(message)
            | ApiError::NotFound(message)
            | ApiError::NotAcceptable(message)
            | ApiError::Conflict(message)
            | ApiError::Gone(message)
            | ApiError::PreconditionFailed(message)
            | ApiError::MultipleMatches(message)
            | ApiError::PayloadTooLarge(message)
            | ApiError::UnsupportedMediaType(message)
            | ApiError::Unprocessable(message) => message.clone(),
        }
    }
}

/// One `OperationOutcome.issue`.
pub fn outcome_issue(severity: &str, code: &str, message: &str, location: Option<&str>) -> Value {
    let mut issue = json!({ "severity": severity, "code": code, "diagnostics": message });
    if let Some(location) = location {
        issue["expression"] = json!([location]);
    }
    issue
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            // The detail may name the failing component; it is for operators only.
            tracing::error!(status = status.as_u16(), error = %self, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), "client error");
        }
        let body = serde_json::to_vec(&self.operation_outcome()).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::fhir::format::FHIR_JSON_UTF8),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match error {
            StoreError::Unavailable(detail) => ApiError::Unavailable(detail),
            StoreError::VersionConflict => {
                ApiError::Conflict("the resource was changed concurrently; retry".into())
            }
            StoreError::Internal(detail) => ApiError::Internal(detail),
        }
    }
}

impl From<crate::crypto::vault::VaultError> for ApiError {
    fn from(error: crate::crypto::vault::VaultError) -> Self {
        use crate::crypto::vault::VaultError;
        use crate::crypto::CryptoError;
        match error {
            VaultError::Store(store) => store.into(),
            VaultError::Crypto(CryptoError::Unavailable(detail)) => ApiError::Unavailable(detail),
            VaultError::Crypto(CryptoError::Integrity(detail)) => {
                ApiError::Internal(format!("integrity failure: {detail}"))
            }
            VaultError::Crypto(CryptoError::Internal(detail)) => ApiError::Internal(detail),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_lists_each_issue_with_its_location() {
        let error = ApiError::Invalid(vec![
            Issue::new(IssueCode::Value, "not a valid FHIR date").at("Patient.birthDate"),
            Issue::new(IssueCode::Structure, "unknown element"),
        ]);
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        let outcome = error.operation_outcome();
        assert_eq!(outcome["issue"][0]["code"], "value");
        assert_eq!(outcome["issue"][0]["expression"][0], "Patient.birthDate");
        assert_eq!(outcome["issue"][1]["code"], "structure");
        assert!(outcome["issue"][1].get("expression").is_none());
    }

    #[test]
    fn server_errors_hide_their_cause() {
        let error = ApiError::Internal("relation resource_versions does not exist".into());
        let text = error.operation_outcome().to_string();
        assert!(!text.contains("resource_versions"));
        assert_eq!(error.operation_outcome()["issue"][0]["code"], "exception");
        let unavailable = ApiError::Unavailable("pool timed out".into());
        assert!(!unavailable.operation_outcome().to_string().contains("pool"));
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn each_status_matches_the_table() {
        let cases = [
            (ApiError::Gone("x".into()), 410, "deleted"),
            (
                ApiError::MultipleMatches("x".into()),
                412,
                "multiple-matches",
            ),
            (ApiError::PreconditionFailed("x".into()), 412, "conflict"),
            (ApiError::PayloadTooLarge("x".into()), 413, "too-costly"),
            (
                ApiError::UnsupportedMediaType("x".into()),
                415,
                "not-supported",
            ),
            (ApiError::Unprocessable("x".into()), 422, "processing"),
            (ApiError::TooManyRequests, 429, "throttled"),
        ];
        for (error, status, code) in cases {
            assert_eq!(error.status().as_u16(), status);
            assert_eq!(error.operation_outcome()["issue"][0]["code"], code);
        }
    }
}
