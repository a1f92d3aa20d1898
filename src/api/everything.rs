//! `GET /Patient/{id}/$everything` (http://hl7.org/fhir/R4/patient-operation-everything.html):
//! the patient and every current resource of their compartment, as a `searchset` Bundle, paged.
//!
//! Parameters: `start`, `end` (care dates: a resource is left out when its clinical date lies
//! wholly outside `[start, end]`; the date is the first of the type's `date`, `onset-date`,
//! `authoredon`, `created`, `period` search parameters that has a value, and resources without
//! one are kept), `_since` (current version written at or after), `_type` (comma-separated
//! types), `_count` (page size, default `page_size`, at most `max_page_size`) and `_cursor`
//! (the sealed position of the `next` link). `_format` as everywhere.
//!
//! Every resource passes [`App::open_visible`] under a `read` permit of its type (the access
//! decision and, with its issue, consent): what the caller may not see is left out, and types
//! the caller may never read are skipped. The Patient itself must be visible, else 404 (410
//! when deleted). Matches come in (type, id) order; a page also carries, as `include` entries,
//! the shared resources outside every compartment that its matches reference (Practitioner,
//! Organization, Location, Medication…), when the caller may see them — one read per type and
//! page, repeated on each page that refers to them. `total` is given when the whole compartment
//! fits on the first page.
//!
//! Statuses: 200 · 400 for a malformed date, `_count` or `_cursor` · 403 when the caller may not
//! read Patients · 404 unknown or outside the caller's reach · 410 deleted.

use std::collections::{BTreeSet, HashMap};

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::Value;

use super::{audit, check_resource_type, negotiate, value_response, App, AppState, QueryParams};
use crate::authz::decision::{Interaction, Permit};
use crate::authz::principal::Principal;
use crate::error::{ApiError, ApiResult, IssueCode};
use crate::search::engine::{open_position, seal_position, Found, Page, Search, MAX_INCLUDED};
use crate::search::values::{self, parse_date_range, SearchType, SearchValue};
use crate::store::CompartmentQuery;

/// The parameters this operation applies; others are ignored (and reported like search's).
const PARAMETERS: &[&str] = &[
    "start", "end", "_since", "_type", "_count", "_cursor", "_format",
];

/// Search parameters naming a resource's clinical date, in order of preference.
const CARE_DATE_PARAMETERS: &[&str] = &["date", "onset-date", "authoredon", "created", "period"];

/// Rows read from the compartment per step.
const CHUNK: usize = 200;

/// Where a page starts: after this resource.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Position {
    resource_type: String,
    id: String,
}

/// The operation's parsed parameters.
struct Request {
    /// `[low, high)` in microseconds: the care-date window.
    window: Option<(i64, i64)>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    types: Vec<String>,
    count: usize,
    cursor: Option<String>,
}

fn parse(app: &App, query: &QueryParams) -> ApiResult<Request> {
    let bad = |name: &str| {
        ApiError::invalid(
            IssueCode::Value,
            format!("the {name} parameter is not valid"),
        )
    };
    let start = match query.first("start") {
        Some(text) => Some(parse_date_range(text).ok_or_else(|| bad("start"))?.0),
        None => None,
    };
    let end = match query.first("end") {
        Some(text) => Some(parse_date_range(text).ok_or_else(|| bad("end"))?.1),
        None => None,
    };
    let window = (start.is_some() || end.is_some())
        .then(|| (start.unwrap_or(i64::MIN), end.unwrap_or(i64::MAX)));
    let since = match query.first("_since") {
        Some(text) => Some(super::parse_instant(text).ok_or_else(|| bad("_since"))?),
        None => None,
    };
    let mut types = Vec::new();
    for value in query.0.iter().filter(|(name, _)| name == "_type") {
        for name in value
            .1
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
        {
            check_resource_type(name)?;
            types.push(name.to_string());
        }
    }
    types.sort();
    types.dedup();
    let count = match query.first("_count") {
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|count| *count > 0)
            .ok_or_else(|| bad("_count"))?,
        None => app.settings.page_size,
    }
    .min(app.settings.max_page_size);
    Ok(Request {
        window,
        since,
        types,
        count,
        cursor: query.first("_cursor").map(str::to_string),
    })
}

/// `GET /Patient/{id}/$everything`.
#[tracing::instrument(skip_all)]
pub async fn everything(
    app: AppState,
    principal: std::sync::Arc<Principal>,
    id: String,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    audit::note(|context| context.interaction = "everything");
    let format = negotiate(&query, &headers)?;
    let request = parse(&app, &query)?;
    let patient_permit = app
        .decide(&principal, Interaction::Read, Some("Patient"))
        .await?;
    let not_found = || ApiError::resource_not_found("Patient", &id);
    if !crate::fhir::is_valid_id(&id) {
        return Err(not_found());
    }
    let scope = patient_permit.scope().clone();
    let patient = app
        .store
        .read_current(&scope, "Patient", &id)
        .await?
        .ok_or_else(not_found)?;
    let patient = app
        .open_visible(&patient_permit, patient)
        .await?
        .ok_or_else(not_found)?;
    if patient.deleted {
        return Err(ApiError::Gone(format!("Patient/{id} was deleted")));
    }
    let compartment = patient
        .compartment
        .clone()
        .ok_or_else(|| ApiError::Internal("a Patient row without its compartment".into()))?;
    let after: Option<Position> = match &request.cursor {
        Some(text) => Some(open_position(&app, &scope, text).await?),
        None => None,
    };
    let first_page = after.is_none();
    let mut permits = Permits::new(&app, &principal);
    let mut matches: Vec<Found> = Vec::new();
    let mut position = after.map(|position| (position.resource_type, position.id));
    let mut exhausted = false;
    while matches.len() <= request.count {
        let rows = app
            .store
            .compartment_page(
                &scope,
                &CompartmentQuery {
                    compartment: compartment.clone(),
                    resource_types: request.types.clone(),
                    since: request.since,
                    after: position.clone(),
                    limit: CHUNK,
                },
            )
            .await?;
        let Some(last) = rows.last() else {
            exhausted = true;
            break;
        };
        position = Some((last.resource_type.clone(), last.id.clone()));
        let short = rows.len() < CHUNK;
        for row in rows {
            let Some(permit) = permits.of(&row.resource_type).await? else {
                continue;
            };
            let Some(record) = app.open_visible(permit, row).await? else {
                continue;
            };
            let Some(body) = record.body.as_deref() else {
                continue;
            };
            let resource: Value = serde_json::from_slice(body)
                .map_err(|_| ApiError::Internal("a stored body is not JSON".into()))?;
            if let Some(window) = request.window {
                if !in_care_window(&app, &record.resource_type, &resource, window) {
                    continue;
                }
            }
            matches.push(Found { record, resource });
            if matches.len() > request.count {
                break;
            }
        }
        if short && matches.len() <= request.count {
            exhausted = true;
            break;
        }
    }
    let has_more = matches.len() > request.count;
    matches.truncate(request.count);
    let next = match (has_more, matches.last()) {
        (true, Some(last)) => Some(
            seal_position(
                &app,
                &scope,
                &Position {
                    resource_type: last.record.resource_type.clone(),
                    id: last.record.id.clone(),
                },
            )
            .await?,
        ),
        _ => None,
    };
    let included = shared_references(&app, &principal, &matches).await?;
    let total = (first_page && exhausted && !has_more).then_some(matches.len());
    // The patient as the audit record's subject (open_visible noted the first resource opened).
    audit::note(|context| {
        context.resource_type = Some("Patient".into());
        context.resource_id = Some(id.clone());
        context.patient = Some(compartment.clone());
    });
    let applied: Vec<(String, String)> = query
        .0
        .iter()
        .filter(|(name, _)| PARAMETERS.contains(&name.as_str()))
        .cloned()
        .collect();
    let path = format!("{}/Patient/{id}/$everything", app.base_url);
    let page = Page {
        matches,
        included,
        total,
        next,
    };
    let bundle = super::search::searchset_page(&app, &path, &applied, page)?;
    value_response(StatusCode::OK, &bundle, format)
}

/// The `read` permit of each type, decided once per request; `None` for types the caller may
/// never read (left out, not an error).
struct Permits<'a> {
    app: &'a App,
    principal: &'a std::sync::Arc<Principal>,
    decided: HashMap<String, Option<Permit>>,
}

impl<'a> Permits<'a> {
    fn new(app: &'a App, principal: &'a std::sync::Arc<Principal>) -> Self {
        Permits {
            app,
            principal,
            decided: HashMap::new(),
        }
    }

    async fn of(&mut self, resource_type: &str) -> ApiResult<Option<&Permit>> {
        if !self.decided.contains_key(resource_type) {
            let permit = match self
                .app
                .decide(self.principal, Interaction::Read, Some(resource_type))
                .await
            {
                Ok(permit) => Some(permit),
                Err(ApiError::Forbidden(_)) => None,
                Err(other) => return Err(other),
            };
            self.decided.insert(resource_type.to_string(), permit);
        }
        Ok(self.decided.get(resource_type).and_then(Option::as_ref))
    }
}

/// Whether a resource's care date overlaps the window (`[low, high)`); resources without one
/// are kept, since nothing places them outside it.
fn in_care_window(app: &App, resource_type: &str, resource: &Value, window: (i64, i64)) -> bool {
    for code in CARE_DATE_PARAMETERS {
        let Some(definition) = app.search.registry.get(resource_type, code) else {
            continue;
        };
        if definition.search_type != SearchType::Date {
            continue;
        }
        let dates: Vec<(i64, i64)> =
            values::extract(&definition.expression, SearchType::Date, resource)
                .into_iter()
                .filter_map(|value| match value {
                    SearchValue::Date { low, high } => Some((low, high)),
                    _ => None,
                })
                .collect();
        if dates.is_empty() {
            continue;
        }
        return dates
            .iter()
            .any(|(low, high)| *low < window.1 && *high > window.0);
    }
    true
}

/// The shared resources (outside every patient compartment) that the page's matches refer to,
/// that the caller may see.
async fn shared_references(
    app: &App,
    principal: &std::sync::Arc<Principal>,
    matches: &[Found],
) -> ApiResult<Vec<Found>> {
    let mut wanted: BTreeSet<(String, String)> = BTreeSet::new();
    for found in matches {
        collect_references(app, &found.resource, &mut wanted);
    }
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let types: Vec<String> = wanted
        .iter()
        .map(|(resource_type, _)| resource_type.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let search = match Search::start(app, principal, &types).await {
        Ok(search) => search,
        // The caller may see none of these types: nothing to add.
        Err(ApiError::Forbidden(_)) => return Ok(Vec::new()),
        Err(other) => return Err(other),
    };
    search
        .visible_resources(wanted.into_iter().take(MAX_INCLUDED).collect())
        .await
}

/// Literal references (`Type/id`, or this server's absolute URL) to resource types outside
/// every patient compartment.
fn collect_references(app: &App, value: &Value, found: &mut BTreeSet<(String, String)>) {
    match value {
        Value::Object(object) => {
            if let Some(Value::String(reference)) = object.get("reference") {
                let local = reference
                    .strip_prefix(&format!("{}/", app.base_url))
                    .unwrap_or(reference);
                if let Some((resource_type, id)) = local.split_once('/') {
                    let shared = crate::fhir::capability::is_served(resource_type)
                        && !app.compartment.is_compartment_type(resource_type)
                        && resource_type != "Patient";
                    if shared && crate::fhir::is_valid_id(id) {
                        found.insert((resource_type.to_string(), id.to_string()));
                    }
                }
            }
            for child in object.values() {
                collect_references(app, child, found);
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_references(app, item, found);
            }
        }
        _ => {}
    }
}
