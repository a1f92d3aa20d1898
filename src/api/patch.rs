//! `patch` (http://hl7.org/fhir/R4/http.html#patch): `PATCH /{type}/{id}` with an RFC 6902 JSON
//! Patch (`Content-Type: application/json-patch+json`), applied to the current version and
//! written as the next one through the same path as `update` (validation, encryption, search
//! index, audit in one transaction). 200 with the new version, `ETag` and `Last-Modified`;
//! `Prefer: return=…` as for update.
//!
//! Statuses: 400 a malformed patch document · 404 unknown or outside the caller's reach ·
//! 410 deleted · 412 stale `If-Match` · 413 body (or patched resource) too large · 415 any other
//! patch format · 422 an operation fails (a `test` that does not match, a path that does not
//! exist), the patch changes `resourceType` or `id`, or the result is not a valid resource.
//!
//! FHIRPath Patch (a `Parameters` body) and XML Patch are not supported (415 says which format
//! is). Error messages name the failing operation by its index and never quote a value from the
//! patch or the resource: either may be PHI.
//!
//! The stored version is recorded with method `PUT` (what history shows as the version's
//! request): what is kept is the full resulting representation, exactly as an update of it
//! would have stored it.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use json_patch::{PatchError, PatchOperation};
use serde_json::{Map, Value};

use super::{
    check_resource_type, if_match_version, negotiate, read_body, return_preference, write, App,
    AppState, Caller, QueryParams, VersionResponse,
};
use crate::authz::decision::{Interaction, Permit};
use crate::error::{ApiError, ApiResult, Issue, IssueCode};
use crate::fhir::format::Format;
use crate::store::{VersionRecord, WriteMethod};

/// The media type of an RFC 6902 JSON Patch document.
pub const JSON_PATCH: &str = "application/json-patch+json";

/// How often a patch without `If-Match` is re-applied to a newer version after another writer
/// committed between its read and its write. Each retry re-reads, so the patch always applies to
/// the version it replaces; losing this many races in a row means heavy contention (409).
const MAX_PATCH_ATTEMPTS: usize = 8;

/// `PATCH /{type}/{id}`.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn patch(
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
    check_patch_content_type(&headers)?;
    let bytes = read_body(&headers, body, app.settings.max_body_bytes).await?;
    let operations = parse_json_patch(&bytes)?;
    if !crate::fhir::is_valid_id(&id) {
        return Err(ApiError::resource_not_found(&resource_type, &id));
    }
    let if_match = if_match_version(&headers)?;
    for _ in 0..MAX_PATCH_ATTEMPTS {
        let current = current_version(&app, &permit, (&resource_type, &id), if_match).await?;
        let patched = apply_to(&app, &current, &resource_type, &id, &operations)?;
        // The version the patch was applied to must still be current when it is written;
        // otherwise the write would silently drop the other writer's change.
        let written = write::put_version(
            &app,
            &permit,
            &resource_type,
            &id,
            patched,
            Some(current.version),
            WriteMethod::Put,
        )
        .await;
        let written = match (written, if_match) {
            (Err(ApiError::PreconditionFailed(_)), None) => continue,
            (written, _) => written?,
        };
        tracing::info!(version = written.record.version, "patched");
        return VersionResponse {
            app: &app,
            record: &written.record,
            status: StatusCode::OK,
            format,
            preference: return_preference(&headers),
            outcome_message: format!(
                "{resource_type}/{id} is now at version {}",
                written.record.version
            ),
        }
        .into_response();
    }
    Err(ApiError::Conflict(
        "the resource is being changed concurrently; retry".into(),
    ))
}

/// Accepts `application/json-patch+json` only (parameters such as `charset` ignored).
fn check_patch_content_type(headers: &HeaderMap) -> ApiResult<()> {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
    match essence.as_deref() {
        Some(JSON_PATCH) => Ok(()),
        Some("application/fhir+json" | "application/json" | "application/fhir+xml") => {
            Err(ApiError::UnsupportedMediaType(format!(
                "this server accepts JSON Patch ({JSON_PATCH}) only; FHIRPath Patch (a Parameters \
                 resource) and XML Patch are not supported"
            )))
        }
        _ => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type must be {JSON_PATCH} (JSON Patch, RFC 6902)"
        ))),
    }
}

/// Parses a JSON Patch document: a JSON array of operations. 400 when it is not one; each
/// malformed operation is named by its index (serde's own messages may quote the input).
fn parse_json_patch(bytes: &[u8]) -> ApiResult<Vec<PatchOperation>> {
    // serde_json's syntax errors describe the grammar, never the input's values.
    let document: Value = serde_json::from_slice(bytes).map_err(|error| {
        ApiError::invalid(
            IssueCode::Structure,
            format!("the JSON Patch document is not valid JSON: {error}"),
        )
    })?;
    let Value::Array(operations) = document else {
        return Err(ApiError::invalid(
            IssueCode::Structure,
            "a JSON Patch document must be a JSON array of operations",
        ));
    };
    let mut parsed = Vec::with_capacity(operations.len());
    let mut issues = Vec::new();
    for (index, operation) in operations.into_iter().enumerate() {
        match serde_json::from_value::<PatchOperation>(operation) {
            Ok(operation) => parsed.push(operation),
            Err(_) => issues.push(Issue::new(
                IssueCode::Structure,
                format!(
                    "JSON Patch operation {index} is malformed: it needs an op of add, remove, \
                     replace, move, copy or test, a path that is a JSON Pointer, and the from or \
                     value that op requires"
                ),
            )),
        }
    }
    if issues.is_empty() {
        Ok(parsed)
    } else {
        Err(ApiError::Invalid(issues))
    }
}

/// The current version, decrypted, when the caller may see it (404 otherwise, like a missing
/// one), not deleted (410), and the one `If-Match` names (412).
async fn current_version(
    app: &App,
    permit: &Permit,
    (resource_type, id): (&str, &str),
    if_match: Option<i64>,
) -> ApiResult<VersionRecord> {
    let not_found = || ApiError::resource_not_found(resource_type, id);
    let current = app
        .store
        .read_current(permit.scope(), resource_type, id)
        .await?
        .ok_or_else(not_found)?;
    let current = app
        .open_visible(permit, current)
        .await?
        .ok_or_else(not_found)?;
    if current.deleted {
        return Err(ApiError::Gone(format!("{resource_type}/{id} was deleted")));
    }
    if let Some(expected) = if_match {
        if current.version != expected {
            return Err(ApiError::PreconditionFailed(format!(
                "If-Match names version {expected}, which is not the current version"
            )));
        }
    }
    Ok(current)
}

/// Applies the patch to the current version and checks the result as strictly as a PUT body
/// (but a failure is 422: the request was well-formed, its result is not).
fn apply_to(
    app: &App,
    current: &VersionRecord,
    resource_type: &str,
    id: &str,
    operations: &[PatchOperation],
) -> ApiResult<Map<String, Value>> {
    let stored = current
        .body
        .as_deref()
        .ok_or_else(|| ApiError::Internal("a current version has no body".into()))?;
    let mut document: Value = serde_json::from_slice(stored)
        .map_err(|_| ApiError::Internal("a stored body is not JSON".into()))?;
    apply_operations(&mut document, operations, app.settings.max_body_bytes)?;
    let Value::Object(patched) = &document else {
        return Err(ApiError::Unprocessable(
            "the patch replaces the resource with something that is not a JSON object".into(),
        ));
    };
    if patched.get("resourceType").and_then(Value::as_str) != Some(resource_type) {
        return Err(ApiError::Unprocessable(
            "a patch may not change or remove resourceType".into(),
        ));
    }
    if patched.get("id").and_then(Value::as_str) != Some(id) {
        return Err(ApiError::Unprocessable(
            "a patch may not change or remove id".into(),
        ));
    }
    let bytes = serde_json::to_vec(&document)
        .map_err(|error| ApiError::Internal(format!("cannot serialize: {error}")))?;
    if bytes.len() > app.settings.max_body_bytes {
        // Otherwise a patch would store what a PUT may not.
        return Err(ApiError::PayloadTooLarge(format!(
            "the patched resource exceeds {} bytes",
            app.settings.max_body_bytes
        )));
    }
    crate::fhir::parse::parse_resource(&bytes, Format::Json, &app.validator).map_err(invalid_result)
}

/// Applies the operations in order. `copy` is the one operation whose result can outgrow the
/// request (each can double the document), so the bytes it copies are counted and bounded by
/// `limit` before it runs.
fn apply_operations(
    document: &mut Value,
    operations: &[PatchOperation],
    limit: usize,
) -> ApiResult<()> {
    let mut copied_bytes = 0usize;
    for (index, operation) in operations.iter().enumerate() {
        if let PatchOperation::Copy(copy) = operation {
            if let Some(source) = document.pointer(copy.from.as_str()) {
                copied_bytes += serde_json::to_vec(source).map_or(0, |bytes| bytes.len());
                if copied_bytes > limit {
                    return Err(ApiError::PayloadTooLarge(format!(
                        "JSON Patch operation {index} (copy) makes the resource exceed {limit} \
                         bytes"
                    )));
                }
            }
        }
        // The document is a copy that is dropped on failure, so the undo log of
        // `json_patch::patch` is not needed.
        json_patch::patch_unsafe(document, std::slice::from_ref(operation))
            .map_err(|error| failed_operation(index, operation, &error))?;
    }
    Ok(())
}

/// A 422 naming the operation by index and op, and what went wrong in words of the library's
/// fixed vocabulary (never the path's or the value's content).
fn failed_operation(index: usize, operation: &PatchOperation, error: &PatchError) -> ApiError {
    let op = match operation {
        PatchOperation::Add(_) => "add",
        PatchOperation::Remove(_) => "remove",
        PatchOperation::Replace(_) => "replace",
        PatchOperation::Move(_) => "move",
        PatchOperation::Copy(_) => "copy",
        PatchOperation::Test(_) => "test",
    };
    ApiError::Unprocessable(format!(
        "JSON Patch operation {index} ({op}) failed: {}",
        error.kind
    ))
}

/// The patched resource failed the checks a PUT body gets: the same issues (element paths and
/// messages that never quote values), as a 422.
fn invalid_result(error: ApiError) -> ApiError {
    match error {
        ApiError::Invalid(issues) => {
            let details: Vec<String> = issues
                .iter()
                .map(|issue| match &issue.location {
                    Some(location) => format!("{location}: {}", issue.message),
                    None => issue.message.clone(),
                })
                .collect();
            ApiError::Unprocessable(format!(
                "the patched resource is not valid: {}",
                details.join("; ")
            ))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn operations(document: Value) -> Vec<PatchOperation> {
        parse_json_patch(document.to_string().as_bytes()).expect("a valid patch")
    }

    #[test]
    fn malformed_documents_are_400_without_quoting_values() {
        for document in [
            json!({"op": "add"}),
            json!([{"op": "frobnicate", "path": "/secret-name", "value": "Jane"}]),
            json!([{"op": "add", "path": "no-slash-Jane", "value": 1}]),
            json!([{"op": "replace", "path": "/name"}]),
        ] {
            let error = parse_json_patch(document.to_string().as_bytes()).unwrap_err();
            assert_eq!(error.status(), StatusCode::BAD_REQUEST, "{document}");
            let text = error.operation_outcome().to_string();
            assert!(!text.contains("Jane"), "{text}");
            assert!(!text.contains("secret"), "{text}");
        }
        let error = parse_json_patch(b"[{]").unwrap_err();
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_failing_operation_is_422_and_named_by_index() {
        let mut document = json!({"resourceType": "Patient", "gender": "female"});
        let patch = operations(json!([
            {"op": "replace", "path": "/gender", "value": "male"},
            {"op": "test", "path": "/gender", "value": "Jane-Doe-secret"}
        ]));
        let error = apply_operations(&mut document, &patch, 1 << 20).unwrap_err();
        assert_eq!(error.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let text = error.operation_outcome().to_string();
        assert!(text.contains("operation 1 (test)"), "{text}");
        assert!(!text.contains("Jane"), "{text}");
        let missing = operations(json!([{"op": "remove", "path": "/birthDate"}]));
        let error = apply_operations(&mut document, &missing, 1 << 20).unwrap_err();
        assert!(error
            .operation_outcome()
            .to_string()
            .contains("operation 0 (remove)"));
    }

    #[test]
    fn copies_cannot_blow_the_document_up() {
        let mut document = json!({"resourceType": "Basic", "a": ["x".repeat(100)]});
        let doubling: Vec<Value> = (0..40)
            .map(|_| json!({"op": "copy", "from": "/a", "path": "/a/-"}))
            .collect();
        // Each copy appends the whole array to itself: without the bound this would need 2^40
        // strings.
        let doubling = operations(Value::Array(doubling));
        let error = apply_operations(&mut document, &doubling, 64 * 1024).unwrap_err();
        assert_eq!(error.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
