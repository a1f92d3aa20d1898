//! Strict parsing of a request body into a checked resource: well-formed UTF-8 JSON or XML,
//! nesting bounded, the primitive formats and required bindings fhirbolt accepts unchecked, then
//! structure per fhirbolt's R4 model (no unknown elements, right types and choices). Every
//! failure is a 400 whose issues say where.

use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult, Issue, IssueCode};
use crate::fhir::format::Format;
use crate::fhir::validate::Validator;

/// Parses and checks a request body; returns the resource as a JSON object.
///
/// # Errors
/// [`ApiError::Invalid`] with one issue per problem found.
pub fn parse_resource(
    bytes: &[u8],
    format: Format,
    validator: &Validator,
) -> ApiResult<Map<String, Value>> {
    let json_bytes;
    let json: &[u8] = match format {
        Format::Json => bytes,
        Format::Xml => {
            json_bytes = fhir_codec::xml_to_json(bytes).map_err(|error| {
                ApiError::invalid(
                    IssueCode::Structure,
                    format!("invalid FHIR XML: {}", error.message),
                )
            })?;
            &json_bytes
        }
    };
    if std::str::from_utf8(json).is_err() {
        return Err(ApiError::invalid(
            IssueCode::Invalid,
            "the request body is not valid UTF-8",
        ));
    }
    // serde_json bounds nesting (128 levels) itself, so a 10,000-deep document fails here with
    // an error instead of exhausting the stack. Its syntax errors describe the grammar, never
    // the input's values.
    let value: Value = serde_json::from_slice(json).map_err(|error| {
        let issue = Issue::new(IssueCode::Structure, format!("malformed JSON: {error}"));
        let location = fhir_codec::json_path_at(json, error.line(), error.column());
        ApiError::Invalid(vec![match location {
            Some(location) => issue.at(location),
            None => issue,
        }])
    })?;
    match value.as_object().map(|object| object.get("resourceType")) {
        None => {
            return Err(ApiError::invalid(
                IssueCode::Structure,
                "a resource must be a JSON object",
            ))
        }
        Some(Some(Value::String(name))) if fhir_codec::is_resource_type(name) => {}
        Some(Some(Value::String(_))) => {
            return Err(ApiError::Invalid(vec![Issue::new(
                IssueCode::Value,
                "resourceType is not an R4 resource type",
            )
            .at("resourceType")]))
        }
        Some(_) => {
            return Err(ApiError::Invalid(vec![Issue::new(
                IssueCode::Required,
                "resourceType is required",
            )
            .at("resourceType")]))
        }
    }
    // FHIR JSON never has an empty array (an absent element is left out); fhirbolt panics on
    // one (found by fuzzing `resource_json`: `"meta": {"security": []}` answered 500).
    if let Some(path) = empty_array_path(&value, resource_type_of(&value)) {
        return Err(ApiError::Invalid(vec![Issue::new(
            IssueCode::Structure,
            "an array must not be empty (leave the element out instead)",
        )
        .at(path)]));
    }
    // The validator runs before fhirbolt: it knows each element's type and says exactly where a
    // value is wrong, which fhirbolt (it buffers the resource before typing it) cannot.
    let issues: Vec<Issue> = validator
        .validate(&value)
        .into_iter()
        .map(|problem| Issue::new(IssueCode::Value, problem.message).at(problem.path))
        .collect();
    if !issues.is_empty() {
        return Err(ApiError::Invalid(issues));
    }
    if format == Format::Json {
        // XML went through the same check when it was converted.
        fhir_codec::check_json(json).map_err(|error| {
            let issue = Issue::new(IssueCode::Structure, error.message);
            ApiError::Invalid(vec![match error.location {
                Some(location) => issue.at(location),
                None => issue,
            }])
        })?;
    }
    match value {
        Value::Object(object) => Ok(object),
        _ => unreachable!("checked to be an object above"),
    }
}

fn resource_type_of(value: &Value) -> String {
    value
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The path (`Type.element.element`) of the first empty array in `value`, if any.
fn empty_array_path(value: &Value, path: String) -> Option<String> {
    match value {
        Value::Array(items) if items.is_empty() => Some(path),
        Value::Array(items) => items
            .iter()
            .find_map(|item| empty_array_path(item, path.clone())),
        Value::Object(members) => members.iter().find_map(|(name, member)| {
            let path = if member.get("resourceType").is_some() {
                resource_type_of(member)
            } else {
                format!("{path}.{name}")
            };
            empty_array_path(member, path)
        }),
        _ => None,
    }
}
