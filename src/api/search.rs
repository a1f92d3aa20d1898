//! `search` (http://hl7.org/fhir/R4/http.html#search): `GET /{type}?…`, `POST /{type}/_search`
//! (form body), and the system level `GET /?_type=…`, `POST /_search`.
//!
//! The answer is a `searchset` Bundle: matches (`search.mode = match`), included resources
//! (`include`), and, when parameters were ignored, an OperationOutcome entry (`outcome`) naming
//! them; with `Prefer: handling=strict` an ignored parameter is a 400 instead. The `self` link
//! shows only the parameters that were applied; `next` carries a sealed cursor.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Map, Value};

use super::{
    check_resource_type, negotiate, read_body, value_response, App, AppState, Caller, QueryParams,
};
use crate::error::{ApiError, ApiResult, Issue, IssueCode};
use crate::fhir::bundle::instant;
use crate::search::engine::{Found, Page, Search};
use crate::search::query::{self, ParsedQuery, SummaryMode};

/// Parameters that never appear in links.
const LINK_EXCLUDED: &[&str] = &["_cursor", "_format", "_pretty"];

/// The tag marking a resource shown in part (`_elements`, `_summary`).
const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// `GET /{type}?…`.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn search_type(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path(resource_type): Path<String>,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_resource_type(&resource_type)?;
    respond(&app, &principal, Some(resource_type), query.0, &headers).await
}

/// `POST /{type}/_search` with `application/x-www-form-urlencoded` parameters.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn search_type_post(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path(resource_type): Path<String>,
    query: QueryParams,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    check_resource_type(&resource_type)?;
    let pairs = form_parameters(&app, query, &headers, body).await?;
    respond(&app, &principal, Some(resource_type), pairs, &headers).await
}

/// `GET /?_type=…&…` (system level).
#[tracing::instrument(skip_all)]
pub async fn search_system(
    State(app): State<AppState>,
    Extension(principal): Caller,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    respond(&app, &principal, None, query.0, &headers).await
}

/// `POST /_search` (system level, form body).
#[tracing::instrument(skip_all)]
pub async fn search_system_post(
    State(app): State<AppState>,
    Extension(principal): Caller,
    query: QueryParams,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let pairs = form_parameters(&app, query, &headers, body).await?;
    respond(&app, &principal, None, pairs, &headers).await
}

/// The URL's parameters followed by the form body's.
async fn form_parameters(
    app: &App,
    query: QueryParams,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<Vec<(String, String)>> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if !content_type
        .to_ascii_lowercase()
        .starts_with("application/x-www-form-urlencoded")
    {
        return Err(ApiError::UnsupportedMediaType(
            "POST _search takes application/x-www-form-urlencoded parameters".into(),
        ));
    }
    let bytes = read_body(headers, body, app.settings.max_body_bytes).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::invalid(IssueCode::Processing, "the form body is not UTF-8"))?;
    // The audit record keeps a keyed hash of the parameters, as it does for a GET's query.
    let text_for_audit = text.to_string();
    super::audit::note(move |context| {
        context.query = Some(match context.query.take() {
            Some(url_query) => format!("{url_query}&{text_for_audit}"),
            None => text_for_audit,
        })
    });
    let mut pairs = query.0;
    pairs.extend(QueryParams::parse(text).0);
    Ok(pairs)
}

/// Whether the client asked for strict handling of unknown parameters.
fn strict(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split([',', ';']))
        .any(|part| part.trim().eq_ignore_ascii_case("handling=strict"))
}

/// The searchset of `GET /{resource_type}?…` for a transaction's GET entry (first page).
///
/// # Errors
/// As a search.
pub async fn searchset_of(
    app: &App,
    principal: &std::sync::Arc<crate::authz::principal::Principal>,
    resource_type: &str,
    pairs: Vec<(String, String)>,
) -> ApiResult<Value> {
    let parsed = query::parse(Some(resource_type), &pairs, &app.search.registry)
        .map_err(|error| ApiError::invalid(IssueCode::Invalid, error.to_string()))?;
    let types = vec![resource_type.to_string()];
    let count = parsed
        .control
        .count
        .unwrap_or(app.settings.page_size)
        .min(app.settings.max_page_size);
    let search = Search::start(app, principal, &types).await?;
    let page = search.page(&parsed, count).await?;
    let path = format!("{}/{resource_type}", app.base_url);
    searchset(app, &path, &pairs, &parsed, page)
}

async fn respond(
    app: &App,
    principal: &std::sync::Arc<crate::authz::principal::Principal>,
    resource_type: Option<String>,
    pairs: Vec<(String, String)>,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let format = negotiate(&QueryParams(pairs.clone()), headers)?;
    let parsed = query::parse(resource_type.as_deref(), &pairs, &app.search.registry)
        .map_err(|error| ApiError::invalid(IssueCode::Invalid, error.to_string()))?;
    if strict(headers) && !parsed.ignored.is_empty() {
        let issues = parsed
            .ignored
            .iter()
            .map(|ignored| {
                Issue::new(
                    IssueCode::NotSupported,
                    format!("parameter {}: {}", ignored.name, ignored.reason),
                )
            })
            .collect();
        return Err(ApiError::Invalid(issues));
    }
    let types = match (&resource_type, &parsed.control.types) {
        (Some(resource_type), _) => vec![resource_type.clone()],
        (None, Some(types)) => {
            for name in types {
                check_resource_type(name)?;
            }
            types.clone()
        }
        (None, None) => {
            return Err(ApiError::invalid(
                IssueCode::Processing,
                "a system-level search needs _type (the resource types to search)",
            ))
        }
    };
    let summary_count = matches!(parsed.control.summary, Some(SummaryMode::Count));
    let count = if summary_count {
        0
    } else {
        parsed
            .control
            .count
            .unwrap_or(app.settings.page_size)
            .min(app.settings.max_page_size)
    };
    let search = Search::start(app, principal, &types).await?;
    let page = search.page(&parsed, count).await?;
    let path = match &resource_type {
        Some(resource_type) => format!("{}/{resource_type}", app.base_url),
        None => app.base_url.clone(),
    };
    let bundle = searchset(app, &path, &pairs, &parsed, page)?;
    value_response(StatusCode::OK, &bundle, format)
}

/// The `searchset` Bundle of a page that no search query shaped (`Patient/$everything`):
/// `pairs` are the parameters applied, repeated in the links.
///
/// # Errors
/// As [`searchset`].
pub(super) fn searchset_page(
    app: &App,
    path: &str,
    pairs: &[(String, String)],
    page: Page,
) -> ApiResult<Value> {
    searchset(app, path, pairs, &ParsedQuery::default(), page)
}

/// The `searchset` Bundle of a page.
fn searchset(
    app: &App,
    path: &str,
    pairs: &[(String, String)],
    parsed: &ParsedQuery,
    page: Page,
) -> ApiResult<Value> {
    let ignored: Vec<&str> = parsed
        .ignored
        .iter()
        .map(|ignored| ignored.name.as_str())
        .collect();
    let applied: Vec<(String, String)> = pairs
        .iter()
        .filter(|(name, _)| {
            !LINK_EXCLUDED.contains(&name.as_str()) && !ignored.contains(&name.as_str())
        })
        .cloned()
        .collect();
    let link = |extra: Option<&str>| {
        let mut serializer = form_urlencoded::Serializer::new(String::new());
        for (name, value) in &applied {
            serializer.append_pair(name, value);
        }
        if let Some(cursor) = extra {
            serializer.append_pair("_cursor", cursor);
        }
        let query = serializer.finish();
        if query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{query}")
        }
    };
    let mut links = vec![json!({ "relation": "self", "url": link(None) })];
    if let Some(next) = &page.next {
        links.push(json!({ "relation": "next", "url": link(Some(next)) }));
    }
    let mut entries = Vec::with_capacity(page.matches.len() + page.included.len() + 1);
    for found in page.matches {
        entries.push(entry(app, found, "match", parsed));
    }
    for found in page.included {
        entries.push(entry(app, found, "include", parsed));
    }
    if !parsed.ignored.is_empty() {
        let issues: Vec<Value> = parsed
            .ignored
            .iter()
            .map(|ignored| {
                json!({
                    "severity": "warning",
                    "code": "not-supported",
                    "diagnostics": format!("parameter {} was ignored: {}", ignored.name, ignored.reason)
                })
            })
            .collect();
        entries.push(json!({
            "resource": { "resourceType": "OperationOutcome", "issue": issues },
            "search": { "mode": "outcome" }
        }));
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": { "lastUpdated": instant(chrono::Utc::now()) },
        "type": "searchset",
        "link": links,
        "entry": entries,
    });
    if let Some(total) = page.total {
        bundle["total"] = json!(total);
    }
    Ok(bundle)
}

fn entry(app: &App, found: Found, mode: &str, parsed: &ParsedQuery) -> Value {
    let full_url = format!(
        "{}/{}/{}",
        app.base_url, found.record.resource_type, found.record.id
    );
    let resource = shape(app, found.resource, parsed);
    json!({ "fullUrl": full_url, "resource": resource, "search": { "mode": mode } })
}

/// Applies `_summary` and `_elements`: a resource shown in part carries the SUBSETTED tag.
fn shape(app: &App, resource: Value, parsed: &ParsedQuery) -> Value {
    let Value::Object(mut object) = resource else {
        return resource;
    };
    let resource_type = object
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let subsetted = match (&parsed.control.elements, &parsed.control.summary) {
        (Some(elements), _) => {
            let keep = |name: &str| {
                matches!(name, "resourceType" | "id" | "meta")
                    || elements.iter().any(|element| element == name)
            };
            object.retain(|name, _| keep(name));
            true
        }
        (None, Some(SummaryMode::Data)) => object.remove("text").is_some(),
        // The summary elements of the type (top level; a kept element keeps its children).
        (None, Some(SummaryMode::True)) => {
            let registry = &app.search.registry;
            let before = object.len();
            object.retain(|name, _| {
                matches!(name.as_str(), "resourceType" | "id" | "meta")
                    || registry.in_summary(&resource_type, name)
            });
            object.len() != before
        }
        (None, Some(SummaryMode::Text)) => {
            object
                .retain(|name, _| matches!(name.as_str(), "resourceType" | "id" | "meta" | "text"));
            true
        }
        _ => false,
    };
    if subsetted {
        tag_subsetted(&mut object);
    }
    Value::Object(object)
}

fn tag_subsetted(object: &mut Map<String, Value>) {
    let meta = object
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(meta) = meta {
        let tags = meta
            .entry("tag")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(tags) = tags {
            tags.push(json!({ "system": SUBSETTED_SYSTEM, "code": "SUBSETTED" }));
        }
    }
}
