//! `transaction` and `batch` (http://hl7.org/fhir/R4/http.html#transaction): `POST /` with a
//! Bundle of type `transaction` or `batch`.
//!
//! A transaction is all or nothing: its entries are processed in the specification's order
//! (DELETE, POST, PUT, then GET/HEAD), `urn:uuid:`/`urn:oid:` and other `fullUrl`s are resolved
//! to the ids the server assigns and every `reference` in every entry (nested elements,
//! extensions, contained resources) is rewritten, conditional creates (`ifNoneExist`),
//! conditional updates and deletes, and conditional references (`Patient?identifier=…`) are
//! resolved (412 when they match more than one), then every write — data, index rows and one
//! audit record per entry — commits in one database transaction. Any failing entry fails the
//! whole with an OperationOutcome naming the entry (its index and method, never its content).
//! Each entry is authorized on its own, through the same code paths as the single
//! interactions. A batch processes each entry independently and reports each one's status.
//!
//! Limits: `max_bundle_bytes` and `max_bundle_entries` (413 beyond).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Map, Value};

use super::{
    audit, conditional, negotiate, read_body, value_response, write, App, AppState, Caller,
    QueryParams,
};
use crate::authz::decision::Interaction;
use crate::authz::principal::Principal;
use crate::error::{ApiError, ApiResult, IssueCode};
use crate::fhir::bundle::{etag, instant};
use crate::store::{StoreError, VersionRecord, WriteMethod};

/// How often a transaction that lost a race is run again.
const TRANSACTION_ATTEMPTS: u64 = 5;

/// The HTTP verbs a Bundle entry may carry, in transaction processing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verb {
    Delete,
    Post,
    Put,
    Get,
    Head,
}

/// One entry of the request Bundle, as understood.
#[derive(Debug, Clone)]
struct Entry {
    index: usize,
    full_url: Option<String>,
    verb: Verb,
    resource_type: String,
    /// `Type/id` target (PUT, DELETE, GET).
    id: Option<String>,
    /// `Type?criteria` (conditional PUT/DELETE, search GET).
    criteria: Option<String>,
    if_match: Option<i64>,
    if_none_exist: Option<String>,
    resource: Option<Map<String, Value>>,
}

/// What an entry did, for the response Bundle.
#[derive(Debug)]
enum Outcome {
    Written {
        record: VersionRecord,
        created: bool,
    },
    Deleted(Option<VersionRecord>),
    Existing(VersionRecord),
    Read(Value),
    Failed(ApiError),
}

/// `POST /` with a transaction or batch Bundle.
#[tracing::instrument(skip_all)]
pub async fn bundle(
    State(app): State<AppState>,
    Extension(principal): Caller,
    query: QueryParams,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let format = negotiate(&query, &headers)?;
    let input_format = crate::fhir::format::request_format(&headers)?;
    let bytes = read_body(&headers, body, app.settings.max_bundle_bytes).await?;
    let bundle = match crate::fhir::parse::parse_resource(&bytes, input_format, &app.validator) {
        Ok(bundle) => bundle,
        // In a batch an invalid entry fails alone: its entries are validated one by one.
        Err(error) => match batch_bundle(&bytes, input_format) {
            Some(bundle) => bundle,
            None => return Err(error),
        },
    };
    let response = process(&app, &principal, &bundle).await?;
    value_response(StatusCode::OK, &response, format)
}

/// A JSON batch Bundle read without validating its entries (each is validated on its own).
fn batch_bundle(bytes: &[u8], format: crate::fhir::format::Format) -> Option<Map<String, Value>> {
    if format != crate::fhir::format::Format::Json {
        return None;
    }
    let bundle: Map<String, Value> = serde_json::from_slice(bytes).ok()?;
    let is_batch = bundle.get("resourceType").and_then(Value::as_str) == Some("Bundle")
        && bundle.get("type").and_then(Value::as_str) == Some("batch");
    is_batch.then_some(bundle)
}

/// Processes a parsed transaction or batch Bundle and returns the response Bundle (the CLI's
/// import uses this too).
///
/// # Errors
/// 400 for a Bundle that is not a transaction or batch or an entry that is malformed; 413
/// beyond the entry limit; for a transaction, the first failing entry's error.
pub async fn process(
    app: &App,
    principal: &Arc<Principal>,
    bundle: &Map<String, Value>,
) -> ApiResult<Value> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(ApiError::invalid(
            IssueCode::Invalid,
            "POST / takes a Bundle of type transaction or batch",
        ));
    }
    let kind = bundle
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let empty = Vec::new();
    let raw_entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    if raw_entries.len() > app.settings.max_bundle_entries {
        return Err(ApiError::PayloadTooLarge(format!(
            "the Bundle has {} entries; at most {} are accepted",
            raw_entries.len(),
            app.settings.max_bundle_entries
        )));
    }
    match kind {
        "transaction" => {
            audit::note(|context| context.interaction = "transaction");
            let entries = raw_entries
                .iter()
                .enumerate()
                .map(|(index, raw)| parse_entry(&app.base_url, index, raw))
                .collect::<ApiResult<Vec<_>>>()?;
            // A transaction that lost a race (a resource or a conditional-create claim taken by
            // a concurrent one) left nothing behind: run it again, its searches now see the
            // winner's resources.
            let mut attempt = 0;
            loop {
                attempt += 1;
                match transaction(app, principal, entries.clone()).await {
                    Err(ApiError::Conflict(_)) if attempt < TRANSACTION_ATTEMPTS => {
                        tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
                    }
                    other => break other,
                }
            }
        }
        "batch" => {
            audit::note(|context| context.interaction = "batch");
            batch(app, principal, raw_entries).await
        }
        _ => Err(ApiError::invalid(
            IssueCode::Invalid,
            "POST / takes a Bundle of type transaction or batch",
        )),
    }
}

/// Reads `entry.request` (and the resource) of one entry; `base_url` is this server's public
/// URL (an absolute request URL under it is taken as relative).
fn parse_entry(base_url: &str, index: usize, raw: &Value) -> ApiResult<Entry> {
    let bad =
        |message: &str| ApiError::invalid(IssueCode::Invalid, format!("entry {index}: {message}"));
    let request = raw
        .get("request")
        .ok_or_else(|| bad("entry.request is required"))?;
    let verb = match request.get("method").and_then(Value::as_str) {
        Some("DELETE") => Verb::Delete,
        Some("POST") => Verb::Post,
        Some("PUT") => Verb::Put,
        Some("GET") => Verb::Get,
        Some("HEAD") => Verb::Head,
        Some("PATCH") => return Err(bad("PATCH entries are not supported in Bundles")),
        _ => return Err(bad("entry.request.method is missing or unknown")),
    };
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("entry.request.url is required"))?;
    // An absolute URL on this server is its relative part.
    let url = url
        .strip_prefix(base_url)
        .map(|rest| rest.trim_start_matches('/'))
        .unwrap_or(url);
    let (path, criteria) = match url.split_once('?') {
        Some((path, criteria)) => (path, Some(criteria.to_string())),
        None => (url, None),
    };
    let mut segments = path.split('/');
    let resource_type = segments.next().unwrap_or_default().to_string();
    let id = segments.next().map(str::to_string);
    if segments.next().is_some() {
        return Err(bad(
            "entry.request.url must be Type, Type/id or Type?criteria",
        ));
    }
    if !crate::fhir::capability::is_served(&resource_type) {
        return Err(bad("entry.request.url names an unknown resource type"));
    }
    if id.as_deref().is_some_and(|id| id.starts_with('$')) {
        return Err(bad("operations are not supported in Bundle entries"));
    }
    if let Some(id) = &id {
        if !crate::fhir::is_valid_id(id) {
            return Err(bad("entry.request.url has an invalid id"));
        }
    }
    let resource = match raw.get("resource") {
        Some(Value::Object(resource)) => Some(resource.clone()),
        _ => None,
    };
    if matches!(verb, Verb::Post | Verb::Put) {
        let Some(resource) = &resource else {
            return Err(bad("a POST or PUT entry needs a resource"));
        };
        if resource.get("resourceType").and_then(Value::as_str) != Some(resource_type.as_str()) {
            return Err(bad("the resource's type differs from entry.request.url"));
        }
    }
    match (verb, &id, &criteria) {
        (Verb::Post, Some(_), _) => return Err(bad("POST goes to Type, not Type/id")),
        (Verb::Put | Verb::Delete, None, None) => {
            return Err(bad("PUT and DELETE need Type/id or Type?criteria"))
        }
        _ => {}
    }
    let if_match = match request.get("ifMatch").and_then(Value::as_str) {
        Some(text) => Some(parse_etag(text).ok_or_else(|| bad("ifMatch is not an ETag"))?),
        None => None,
    };
    Ok(Entry {
        index,
        full_url: raw
            .get("fullUrl")
            .and_then(Value::as_str)
            .map(str::to_string),
        verb,
        resource_type,
        id,
        criteria,
        if_match,
        if_none_exist: request
            .get("ifNoneExist")
            .and_then(Value::as_str)
            .map(|text| text.trim_start_matches('?').to_string()),
        resource,
    })
}

/// Records that a write `entry` will change `Type/id`: a second entry changing the same
/// resource fails the transaction, and the entry's `fullUrl` now resolves to `Type/id`.
/// Reads (GET, HEAD) resolve nothing.
fn register_target(
    entry: &Entry,
    id: &str,
    touched: &mut HashSet<(String, String)>,
    references: &mut HashMap<String, String>,
) -> ApiResult<()> {
    if entry.verb >= Verb::Get {
        return Ok(());
    }
    if !touched.insert((entry.resource_type.clone(), id.to_string())) {
        return Err(entry_error(
            entry,
            ApiError::invalid(
                IssueCode::Invalid,
                "another entry of this transaction changes the same resource",
            ),
        ));
    }
    if let Some(full_url) = &entry.full_url {
        // bdl-7: a fullUrl names one entry. Two write entries with the same one would leave
        // every reference to it pointing at whichever registered last.
        let target = format!("{}/{id}", entry.resource_type);
        if references.insert(full_url.clone(), target).is_some() {
            return Err(entry_error(
                entry,
                ApiError::invalid(
                    IssueCode::Invalid,
                    "another entry of this transaction has the same fullUrl (bdl-7)",
                ),
            ));
        }
    }
    Ok(())
}

/// The entry with its resource checked like a single interaction's body.
fn validated(app: &App, mut entry: Entry) -> ApiResult<Entry> {
    if let Some(resource) = entry.resource.take() {
        let bytes = serde_json::to_vec(&resource)
            .map_err(|error| ApiError::Internal(format!("cannot serialize: {error}")))?;
        entry.resource = Some(crate::fhir::parse::parse_resource(
            &bytes,
            crate::fhir::format::Format::Json,
            &app.validator,
        )?);
    }
    Ok(entry)
}

/// `W/"3"` or `3` → 3.
fn parse_etag(text: &str) -> Option<i64> {
    text.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .ok()
}

/// The error of one entry, naming it (its index and verb) without its content.
fn entry_error(entry: &Entry, error: ApiError) -> ApiError {
    let label = format!(
        "entry {} ({:?} {})",
        entry.index, entry.verb, entry.resource_type
    );
    match error {
        ApiError::Invalid(mut issues) => {
            for issue in &mut issues {
                issue.message = format!("{label}: {}", issue.message);
            }
            ApiError::Invalid(issues)
        }
        ApiError::Forbidden(message) => ApiError::Forbidden(format!("{label}: {message}")),
        ApiError::NotFound(message) => ApiError::NotFound(format!("{label}: {message}")),
        ApiError::Conflict(message) => ApiError::Conflict(format!("{label}: {message}")),
        ApiError::Gone(message) => ApiError::Gone(format!("{label}: {message}")),
        ApiError::PreconditionFailed(message) => {
            ApiError::PreconditionFailed(format!("{label}: {message}"))
        }
        ApiError::MultipleMatches(message) => {
            ApiError::MultipleMatches(format!("{label}: {message}"))
        }
        ApiError::Unprocessable(message) => ApiError::Unprocessable(format!("{label}: {message}")),
        other => other,
    }
}

/// Matches of conditional criteria on `resource_type`, under the caller's search permission.
async fn find(
    app: &App,
    principal: &Arc<Principal>,
    resource_type: &str,
    criteria: &str,
) -> ApiResult<Vec<VersionRecord>> {
    let permit = app
        .decide(principal, Interaction::Search, Some(resource_type))
        .await?;
    conditional::find(app, &permit, resource_type, &QueryParams::parse(criteria)).await
}

async fn transaction(
    app: &App,
    principal: &Arc<Principal>,
    entries: Vec<Entry>,
) -> ApiResult<Value> {
    // Resolve ids first (reads only): what each POST/PUT/DELETE will touch, and the fullUrl →
    // `Type/id` map for reference rewriting.
    let mut targets: Vec<Option<String>> = vec![None; entries.len()];
    let mut existing: HashMap<usize, VersionRecord> = HashMap::new();
    let mut references: HashMap<String, String> = HashMap::new();
    let mut touched: HashSet<(String, String)> = HashSet::new();
    for entry in &entries {
        let target = match entry.verb {
            Verb::Post => match &entry.if_none_exist {
                Some(criteria) => {
                    let mut matches = find(app, principal, &entry.resource_type, criteria)
                        .await
                        .map_err(|error| entry_error(entry, error))?;
                    match matches.len() {
                        0 => Some(uuid::Uuid::new_v4().to_string()),
                        1 => {
                            let found = matches.remove(0);
                            let id = found.id.clone();
                            existing.insert(entry.index, found);
                            Some(id)
                        }
                        _ => {
                            return Err(entry_error(
                                entry,
                                ApiError::MultipleMatches(
                                    "ifNoneExist matches several resources".into(),
                                ),
                            ))
                        }
                    }
                }
                None => Some(uuid::Uuid::new_v4().to_string()),
            },
            Verb::Put | Verb::Delete => match (&entry.id, &entry.criteria) {
                (Some(id), _) => Some(id.clone()),
                (None, Some(criteria)) => {
                    let matches = find(app, principal, &entry.resource_type, criteria)
                        .await
                        .map_err(|error| entry_error(entry, error))?;
                    match (matches.as_slice(), entry.verb) {
                        ([], Verb::Delete) => None,
                        ([], _) => Some(
                            entry
                                .resource
                                .as_ref()
                                .and_then(|resource| resource.get("id"))
                                .and_then(Value::as_str)
                                .map(str::to_string)
                                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                        ),
                        ([only], _) => Some(only.id.clone()),
                        _ => {
                            return Err(entry_error(
                                entry,
                                ApiError::MultipleMatches(
                                    "the criteria match several resources".into(),
                                ),
                            ))
                        }
                    }
                }
                (None, None) => None,
            },
            Verb::Get | Verb::Head => None,
        };
        if let Some(id) = &target {
            register_target(entry, id, &mut touched, &mut references)?;
        }
        targets[entry.index] = target;
    }

    // Rewrite references, resolving conditional ones.
    let mut prepared = entries;
    for entry in &mut prepared {
        if let Some(mut resource) = entry.resource.take() {
            let mut conditional_references = Vec::new();
            collect_conditional_references(&resource, &references, &mut conditional_references);
            for reference in conditional_references {
                let (resource_type, criteria) = reference.split_once('?').unwrap_or_default();
                if !crate::fhir::capability::is_served(resource_type) {
                    continue;
                }
                let matches = find(app, principal, resource_type, criteria)
                    .await
                    .map_err(|error| entry_error(entry, error))?;
                match matches.as_slice() {
                    [only] => {
                        references
                            .insert(reference.clone(), format!("{resource_type}/{}", only.id));
                    }
                    [] => {
                        return Err(entry_error(
                            entry,
                            ApiError::NotFound("a conditional reference matches nothing".into()),
                        ))
                    }
                    _ => {
                        return Err(entry_error(
                            entry,
                            ApiError::MultipleMatches(
                                "a conditional reference matches several resources".into(),
                            ),
                        ))
                    }
                }
            }
            rewrite_references(&mut resource, &references);
            entry.resource = Some(resource);
        }
    }

    // The writes, in processing order, collected into one database transaction.
    let mut order: Vec<&Entry> = prepared.iter().collect();
    order.sort_by_key(|entry| (entry.verb, entry.index));
    let scope = crate::store::Scope::system(&app.settings.tenant);
    let updated: Vec<(String, String)> = order
        .iter()
        .filter(|entry| entry.verb == Verb::Put && !existing.contains_key(&entry.index))
        .filter_map(|entry| Some((entry.resource_type.clone(), targets[entry.index].clone()?)))
        .collect();
    let (results, writes) = write::collecting(async {
        write::prefetch_current(app, &scope, updated).await?;
        let mut outcomes: HashMap<usize, Outcome> = HashMap::new();
        for entry in order.iter().filter(|entry| entry.verb < Verb::Get) {
            let outcome = match existing.get(&entry.index) {
                Some(found) => Outcome::Existing(found.clone()),
                None => {
                    let target = targets[entry.index].as_deref();
                    let written = match (entry.verb, &entry.if_none_exist) {
                        // A conditional create holds the claim of its criteria (see create.rs).
                        (Verb::Post, Some(criteria)) => {
                            let claim = write::claim_key(
                                app,
                                &crate::store::Scope::system(&app.settings.tenant),
                                &entry.resource_type,
                                &QueryParams::parse(criteria).0,
                            )
                            .await?;
                            write::claiming(claim, perform_write(app, principal, entry, target))
                                .await
                        }
                        _ => perform_write(app, principal, entry, target).await,
                    };
                    written.map_err(|error| entry_error(entry, error))?
                }
            };
            outcomes.insert(entry.index, outcome);
        }
        Ok::<_, ApiError>(outcomes)
    })
    .await;
    // The bundle's own audit record comes after the entries' ones.
    audit::note(|context| {
        context.appended = false;
        context.interaction = "transaction";
        context.resource_type = None;
        context.resource_id = None;
        context.version = None;
        context.patient = None;
    });
    let mut outcomes = results?;
    // A transaction that only writes commits its own record with its data: were it appended
    // after the commit (by the middleware) and that failed, the client would get a 503 for a
    // transaction that was written. With GET entries the record follows their reads (it lists
    // their consent decisions) and the middleware appends it before the answer leaves.
    let reads = order.iter().any(|entry| entry.verb >= Verb::Get);
    let own_record: Vec<_> = audit::current()
        .filter(|context| !reads && !writes.is_empty() && !context.internal)
        .map(|context| app.audit_entry(&context, "transaction", 200))
        .into_iter()
        .collect();
    let committed_own_record = !own_record.is_empty();
    // Every collected write was decided by a permit of this server's tenant (`scope`).
    if !writes.is_empty() {
        match app.store.write_many(&scope, writes, own_record).await {
            Ok(_) => {
                if committed_own_record {
                    audit::note(|context| context.appended = true);
                }
            }
            Err(StoreError::VersionConflict) => return Err(ApiError::Conflict(
                "a resource of the transaction changed concurrently; nothing was written, retry"
                    .into(),
            )),
            Err(other) => return Err(other.into()),
        }
    }
    // Reads see the committed transaction.
    for entry in order.iter().filter(|entry| entry.verb >= Verb::Get) {
        let outcome = match perform_read(app, principal, entry).await {
            Ok(value) => Outcome::Read(value),
            Err(error) => Outcome::Failed(error),
        };
        outcomes.insert(entry.index, outcome);
    }
    let response_entries: Vec<Value> = (0..prepared.len())
        .map(|index| response_entry(app, outcomes.remove(&index)))
        .collect();
    Ok(json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "transaction-response",
        "meta": { "lastUpdated": instant(chrono::Utc::now()) },
        "entry": response_entries,
    }))
}

async fn batch(app: &App, principal: &Arc<Principal>, raw_entries: &[Value]) -> ApiResult<Value> {
    let mut response_entries = Vec::with_capacity(raw_entries.len());
    for (index, raw) in raw_entries.iter().enumerate() {
        let entry = parse_entry(&app.base_url, index, raw).and_then(|entry| validated(app, entry));
        let outcome = match entry {
            Ok(entry) => batch_entry(app, principal, &entry).await,
            Err(error) => Outcome::Failed(error),
        };
        response_entries.push(response_entry(app, Some(outcome)));
    }
    audit::note(|context| {
        context.appended = false;
        context.interaction = "batch";
        context.resource_type = None;
        context.resource_id = None;
        context.version = None;
        context.patient = None;
    });
    Ok(json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "batch-response",
        "meta": { "lastUpdated": instant(chrono::Utc::now()) },
        "entry": response_entries,
    }))
}

/// One batch entry, on its own: its own commit, its own outcome.
async fn batch_entry(app: &App, principal: &Arc<Principal>, entry: &Entry) -> Outcome {
    if entry.verb >= Verb::Get {
        return match perform_read(app, principal, entry).await {
            Ok(value) => Outcome::Read(value),
            Err(error) => Outcome::Failed(error),
        };
    }
    let target = match (entry.verb, &entry.id, &entry.criteria, &entry.if_none_exist) {
        (Verb::Post, _, _, Some(criteria)) => {
            match find(app, principal, &entry.resource_type, criteria).await {
                Ok(mut matches) if matches.len() == 1 => {
                    return Outcome::Existing(matches.remove(0))
                }
                Ok(matches) if matches.len() > 1 => {
                    return Outcome::Failed(ApiError::MultipleMatches(
                        "ifNoneExist matches several resources".into(),
                    ))
                }
                Ok(_) => Some(uuid::Uuid::new_v4().to_string()),
                Err(error) => return Outcome::Failed(error),
            }
        }
        (Verb::Post, _, _, None) => Some(uuid::Uuid::new_v4().to_string()),
        (_, Some(id), _, _) => Some(id.clone()),
        (_, None, Some(criteria), _) => {
            match find(app, principal, &entry.resource_type, criteria).await {
                Ok(matches) => match matches.as_slice() {
                    [] if entry.verb == Verb::Delete => None,
                    [] => Some(uuid::Uuid::new_v4().to_string()),
                    [only] => Some(only.id.clone()),
                    _ => {
                        return Outcome::Failed(ApiError::MultipleMatches(
                            "the criteria match several resources".into(),
                        ))
                    }
                },
                Err(error) => return Outcome::Failed(error),
            }
        }
        _ => None,
    };
    audit::note(|context| context.appended = false);
    match perform_write(app, principal, entry, target.as_deref()).await {
        Ok(outcome) => outcome,
        Err(error) => Outcome::Failed(error),
    }
}

/// A POST, PUT or DELETE entry through the single interactions' code paths (authorization,
/// validation, encryption, index, audit).
async fn perform_write(
    app: &App,
    principal: &Arc<Principal>,
    entry: &Entry,
    target: Option<&str>,
) -> ApiResult<Outcome> {
    let interaction_code = match entry.verb {
        Verb::Post => "create",
        Verb::Put => "update",
        _ => "delete",
    };
    audit::note(|context| context.interaction = interaction_code);
    match entry.verb {
        Verb::Delete => {
            let Some(id) = target else {
                return Ok(Outcome::Deleted(None));
            };
            let permit = app
                .decide(principal, Interaction::Delete, Some(&entry.resource_type))
                .await?;
            // Deleting what does not exist changes nothing: 204, as for a repeated delete.
            match write::delete_version(app, &permit, &entry.resource_type, id, entry.if_match)
                .await
            {
                Ok(deleted) => Ok(Outcome::Deleted(deleted)),
                Err(ApiError::NotFound(_)) if entry.if_match.is_none() => {
                    Ok(Outcome::Deleted(None))
                }
                Err(other) => Err(other),
            }
        }
        Verb::Post => {
            // The target of a POST entry is an id this server just assigned (a conditional
            // create that matched was answered without a write).
            let id = target.ok_or_else(|| ApiError::Internal("no target id".into()))?;
            let resource = entry.resource.clone().unwrap_or_default();
            let permit = app
                .decide(principal, Interaction::Create, Some(&entry.resource_type))
                .await?;
            let record = write::create_as(app, &permit, &entry.resource_type, id, resource).await?;
            Ok(Outcome::Written {
                record,
                created: true,
            })
        }
        Verb::Put => {
            let id = target.ok_or_else(|| ApiError::Internal("no target id".into()))?;
            let mut resource = entry.resource.clone().unwrap_or_default();
            resource.insert("id".into(), Value::String(id.to_string()));
            let permit = app
                .decide(principal, Interaction::Update, Some(&entry.resource_type))
                .await?;
            let written = write::put_version(
                app,
                &permit,
                &entry.resource_type,
                id,
                resource,
                entry.if_match,
                WriteMethod::Put,
            )
            .await?;
            Ok(Outcome::Written {
                record: written.record,
                created: written.created,
            })
        }
        Verb::Get | Verb::Head => Err(ApiError::Internal("a read is not a write".into())),
    }
}

/// A GET/HEAD entry: a read (`Type/id`) or a search (`Type?criteria`).
async fn perform_read(app: &App, principal: &Arc<Principal>, entry: &Entry) -> ApiResult<Value> {
    match &entry.id {
        Some(id) => {
            let permit = app
                .decide(principal, Interaction::Read, Some(&entry.resource_type))
                .await?;
            let not_found = || ApiError::resource_not_found(&entry.resource_type, id);
            let record = app
                .store
                .read_current(permit.scope(), &entry.resource_type, id)
                .await?
                .ok_or_else(not_found)?;
            let record = app
                .open_visible(&permit, record)
                .await?
                .ok_or_else(not_found)?;
            if record.deleted {
                return Err(ApiError::Gone(format!(
                    "{}/{id} was deleted",
                    entry.resource_type
                )));
            }
            let body = record.body.as_deref().unwrap_or_default();
            serde_json::from_slice(body)
                .map_err(|_| ApiError::Internal("a stored body is not JSON".into()))
        }
        None => {
            let pairs = QueryParams::parse(entry.criteria.as_deref().unwrap_or_default()).0;
            super::search::searchset_of(app, principal, &entry.resource_type, pairs).await
        }
    }
}

/// The response entry of one outcome.
fn response_entry(app: &App, outcome: Option<Outcome>) -> Value {
    let version_response = |record: &VersionRecord, status: &str, with_body: bool| {
        let mut entry = json!({
            "response": {
                "status": status,
                "location": format!("{}/{}/_history/{}", record.resource_type, record.id, record.version),
                "etag": etag(record.version),
                "lastModified": instant(record.last_updated),
            }
        });
        entry["fullUrl"] = json!(format!(
            "{}/{}/{}",
            app.base_url, record.resource_type, record.id
        ));
        if with_body {
            if let Some(resource) = record
                .body
                .as_deref()
                .and_then(|body| serde_json::from_slice::<Value>(body).ok())
            {
                entry["resource"] = resource;
            }
        }
        entry
    };
    match outcome {
        Some(Outcome::Written { record, created }) => version_response(
            &record,
            if created { "201 Created" } else { "200 OK" },
            true,
        ),
        Some(Outcome::Existing(record)) => version_response(&record, "200 OK", true),
        Some(Outcome::Deleted(Some(record))) => json!({
            "response": { "status": "204 No Content", "etag": etag(record.version) }
        }),
        Some(Outcome::Deleted(None)) => json!({ "response": { "status": "204 No Content" } }),
        Some(Outcome::Read(resource)) => {
            json!({ "resource": resource, "response": { "status": "200 OK" } })
        }
        Some(Outcome::Failed(error)) => {
            let status = error.status();
            json!({
                "response": {
                    "status": format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or_default()),
                    "outcome": error.operation_outcome(),
                }
            })
        }
        None => json!({ "response": { "status": "500 Internal Server Error" } }),
    }
}

/// Collects the references that are conditional (`Type?criteria`) and not yet resolved.
pub(crate) fn collect_conditional_references(
    resource: &Map<String, Value>,
    resolved: &HashMap<String, String>,
    found: &mut Vec<String>,
) {
    for (key, value) in resource {
        match value {
            // `Type?criteria`: the part before `?` is a bare type name (a system URI in the
            // criteria may well contain `:` and `/`), unlike `urn:`/`http:` references.
            Value::String(text)
                if key == "reference"
                    && text
                        .split_once('?')
                        .is_some_and(|(head, _)| fhir_codec::is_resource_type(head))
                    && !resolved.contains_key(text) =>
            {
                found.push(text.clone());
            }
            Value::Object(child) => collect_conditional_references(child, resolved, found),
            Value::Array(items) => {
                for item in items {
                    if let Value::Object(child) = item {
                        collect_conditional_references(child, resolved, found);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Rewrites every `reference` (at any depth: nested elements, extensions, contained resources)
/// that names another entry's `fullUrl` or a resolved conditional reference.
pub(crate) fn rewrite_references(
    resource: &mut Map<String, Value>,
    resolved: &HashMap<String, String>,
) {
    for (key, value) in resource.iter_mut() {
        match value {
            Value::String(text) if key == "reference" => {
                if let Some(target) = resolved.get(text.as_str()) {
                    *text = target.clone();
                }
            }
            Value::Object(child) => rewrite_references(child, resolved),
            Value::Array(items) => {
                for item in items {
                    if let Value::Object(child) = item {
                        rewrite_references(child, resolved);
                    }
                }
            }
            _ => {}
        }
    }
}

/// An entry's resource before and after reference rewriting (`None`: the entry has none).
pub(crate) type RewrittenResource = (Option<Map<String, Value>>, Option<Map<String, Value>>);

/// What [`resolve_offline`] made of a transaction Bundle.
#[derive(Debug, Default)]
pub(crate) struct OfflineResolution {
    /// `fullUrl` or conditional reference → the `Type/id` it resolved to.
    pub references: HashMap<String, String>,
    /// Each write entry's `fullUrl` with the `Type/id` that entry writes, in entry order.
    pub full_urls: Vec<(String, String)>,
    /// Each entry's resource before and after rewriting, in entry order.
    pub resources: Vec<RewrittenResource>,
}

/// A transaction's reference resolution without a database: the entries are read, their
/// targets registered and their references rewritten by the same functions as in
/// [`transaction`], but every conditional search (`ifNoneExist`, conditional PUT and DELETE)
/// matches nothing and every conditional reference resolves to `Type/conditional-<n>`.
/// New ids are `new-<entry index>`, so the result is deterministic. Fuzzing drives it.
///
/// # Errors
/// As a transaction, for a malformed entry or two entries changing the same resource.
pub(crate) fn resolve_offline(
    base_url: &str,
    bundle: &Map<String, Value>,
) -> ApiResult<OfflineResolution> {
    let empty = Vec::new();
    let raw_entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let entries = raw_entries
        .iter()
        .enumerate()
        .map(|(index, raw)| parse_entry(base_url, index, raw))
        .collect::<ApiResult<Vec<_>>>()?;
    let mut resolution = OfflineResolution::default();
    let mut touched = HashSet::new();
    for entry in &entries {
        let fresh = || format!("new-{}", entry.index);
        let target = match (entry.verb, &entry.id, &entry.criteria) {
            (Verb::Post, _, _) => Some(fresh()),
            (Verb::Put | Verb::Delete, Some(id), _) => Some(id.clone()),
            (Verb::Put, None, Some(_)) => Some(
                entry
                    .resource
                    .as_ref()
                    .and_then(|resource| resource.get("id"))
                    .and_then(Value::as_str)
                    .map_or_else(fresh, str::to_string),
            ),
            _ => None,
        };
        if let Some(id) = &target {
            register_target(entry, id, &mut touched, &mut resolution.references)?;
            if let Some(full_url) = &entry.full_url {
                resolution
                    .full_urls
                    .push((full_url.clone(), format!("{}/{id}", entry.resource_type)));
            }
        }
    }
    for entry in &entries {
        let rewritten = entry.resource.clone().map(|mut resource| {
            let mut conditional_references = Vec::new();
            collect_conditional_references(
                &resource,
                &resolution.references,
                &mut conditional_references,
            );
            for reference in conditional_references {
                let (resource_type, _) = reference.split_once('?').unwrap_or_default();
                if crate::fhir::capability::is_served(resource_type) {
                    let target = format!(
                        "{resource_type}/conditional-{}",
                        resolution.references.len()
                    );
                    resolution.references.insert(reference, target);
                }
            }
            rewrite_references(&mut resource, &resolution.references);
            resource
        });
        resolution
            .resources
            .push((entry.resource.clone(), rewritten));
    }
    Ok(resolution)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_rewritten_at_any_depth() {
        let resolved = HashMap::from([
            ("urn:uuid:1".to_string(), "Patient/a".to_string()),
            (
                "Organization?identifier=x|1".to_string(),
                "Organization/o".to_string(),
            ),
        ]);
        let Value::Object(mut resource) = json!({
            "resourceType": "Observation",
            "subject": {"reference": "urn:uuid:1"},
            "performer": [{"reference": "Organization?identifier=x|1"}, {"reference": "Practitioner/p"}],
            "extension": [{"url": "u", "valueReference": {"reference": "urn:uuid:1"}}],
            "contained": [{"resourceType": "Provenance", "target": [{"reference": "urn:uuid:1"}]}],
            "note": [{"text": "urn:uuid:1"}]
        }) else {
            unreachable!()
        };
        rewrite_references(&mut resource, &resolved);
        let text = Value::Object(resource).to_string();
        assert_eq!(text.matches("Patient/a").count(), 3);
        assert!(text.contains("Organization/o") && text.contains("Practitioner/p"));
        assert!(
            text.contains(r#""text":"urn:uuid:1""#),
            "only references are rewritten"
        );
    }

    #[test]
    fn conditional_references_are_found_once_resolved_ones_skipped() {
        let Value::Object(resource) = json!({
            "a": {"reference": "Patient?identifier=http://example.org/ids|1"},
            "c": {"reference": "http://example.org/fhir/Patient?x=1"},
            "b": [{"reference": "urn:uuid:2"}, {"reference": "Organization?name=x"}]
        }) else {
            unreachable!()
        };
        let resolved = HashMap::from([(
            "Organization?name=x".to_string(),
            "Organization/o".to_string(),
        )]);
        let mut found = Vec::new();
        collect_conditional_references(&resource, &resolved, &mut found);
        assert_eq!(found, ["Patient?identifier=http://example.org/ids|1"]);
    }

    #[test]
    fn etags_parse_weak_and_bare() {
        assert_eq!(parse_etag("W/\"3\""), Some(3));
        assert_eq!(parse_etag("4"), Some(4));
        assert_eq!(parse_etag("W/\"x\""), None);
    }
}
