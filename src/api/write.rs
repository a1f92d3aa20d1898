//! The write path shared by create, update and delete: stamp the server's `id` and `meta`, find
//! the patient compartment, and commit the version with optimistic concurrency.

use std::collections::HashMap;

use chrono::Utc;
use serde_json::{Map, Value};

use crate::api::App;
use crate::authz::decision::{Interaction, Permit, ResourceFacts};
use crate::crypto::vault::CompartmentKey;
use crate::error::{ApiError, ApiResult};
use crate::fhir::bundle::instant;
use crate::store::{
    Expected, IndexRows, Scope, StoreError, VersionRecord, VersionWrite, WriteMethod,
};

/// How often an update without `If-Match` re-reads the head after losing a race before it gives
/// up with 409. Losing more than a few times in a row means heavy contention on one resource.
const MAX_WRITE_ATTEMPTS: usize = 8;

/// A committed write.
pub struct Written {
    pub record: VersionRecord,
    /// True when no version of the resource existed before (201), false for an update (200).
    pub created: bool,
}

/// The resource as stored: `resourceType`, then the server's `id` and `meta` (client `meta`
/// elements other than `versionId` and `lastUpdated` kept), then the rest in the client's order.
pub fn stamp(
    mut resource: Map<String, Value>,
    id: &str,
    version: i64,
    last_updated: chrono::DateTime<Utc>,
) -> Value {
    let mut stamped = Map::with_capacity(resource.len() + 2);
    let resource_type = resource.shift_remove("resourceType").unwrap_or(Value::Null);
    stamped.insert("resourceType".into(), resource_type);
    stamped.insert("id".into(), Value::String(id.to_string()));
    resource.shift_remove("id");
    let mut meta = Map::new();
    meta.insert("versionId".into(), Value::String(version.to_string()));
    meta.insert("lastUpdated".into(), Value::String(instant(last_updated)));
    if let Some(Value::Object(client_meta)) = resource.shift_remove("meta") {
        for (key, value) in client_meta {
            if key != "versionId" && key != "lastUpdated" {
                meta.insert(key, value);
            }
        }
    }
    stamped.insert("meta".into(), Value::Object(meta));
    stamped.extend(resource);
    Value::Object(stamped)
}

fn serialize(resource: &Value) -> ApiResult<Vec<u8>> {
    serde_json::to_vec(resource)
        .map_err(|error| ApiError::Internal(format!("cannot serialize: {error}")))
}

/// Writes `resource` as the next version of `resource_type/id` (create when it never existed).
/// With `if_match`, the current version must be that one, else 412. The caller must be allowed
/// to see the current version (else 404), to write the new content (else 403), and, when the
/// write creates the resource, to create it.
///
/// # Errors
/// 403/404 as above, 412 on a stale `If-Match`, 409 after repeated lost races, 503 when the
/// database or the key provider is down.
#[allow(clippy::too_many_arguments)]
pub async fn put_version(
    app: &App,
    permit: &Permit,
    resource_type: &str,
    id: &str,
    resource: Map<String, Value>,
    if_match: Option<i64>,
    method: WriteMethod,
) -> ApiResult<Written> {
    let scope = permit.scope();
    let resource = Value::Object(resource);
    let compartment = compartment_of(app, scope, resource_type, id, &resource).await?;
    check_writable(
        app,
        permit,
        (resource_type, id),
        compartment.as_deref(),
        &resource,
    )
    .await?;
    for _ in 0..MAX_WRITE_ATTEMPTS {
        let current = match prefetched(scope, resource_type, id) {
            Some(current) => current,
            None => app.store.read_current(scope, resource_type, id).await?,
        };
        match &current {
            Some(current) => {
                if app.open_visible(permit, current.clone()).await?.is_none() {
                    return Err(ApiError::resource_not_found(resource_type, id));
                }
            }
            None => {
                let create = app
                    .decide(
                        permit.principal_arc(),
                        Interaction::Create,
                        Some(resource_type),
                    )
                    .await?;
                check_writable(
                    app,
                    &create,
                    (resource_type, id),
                    compartment.as_deref(),
                    &resource,
                )
                .await?;
            }
        }
        let (expected, version) = expectation(current.as_ref(), if_match)?;
        let last_updated = Utc::now();
        let fields = resource.as_object().cloned().unwrap_or_default();
        let stamped = stamp(fields, id, version, last_updated);
        let body = serialize(&stamped)?;
        let target = Target {
            resource_type,
            id,
            version,
            expected,
            method,
            last_updated,
        };
        let status = if current.is_none() { 201 } else { 200 };
        let mut write =
            sealed_write(app, scope, target, compartment.clone(), &stamped, &body).await?;
        write.audit = write_audit(app, &write, status);
        if let Some(mut record) = commit(app, scope, write, if_match).await? {
            mark_audited(&record);
            // The response shows what was written, without decrypting it again.
            record.body = Some(body);
            return Ok(Written {
                record,
                created: current.is_none(),
            });
        }
    }
    Err(ApiError::Conflict(
        "the resource is being changed concurrently; retry".into(),
    ))
}

/// Records a deletion as the next version. Returns `None` when the resource is already deleted
/// (nothing is written: deleting twice changes nothing).
///
/// # Errors
/// 404 when the resource never existed or is outside the caller's reach, 412 on a stale
/// `If-Match`, 503 when the database is down.
pub async fn delete_version(
    app: &App,
    permit: &Permit,
    resource_type: &str,
    id: &str,
    if_match: Option<i64>,
) -> ApiResult<Option<VersionRecord>> {
    let scope = permit.scope();
    for _ in 0..MAX_WRITE_ATTEMPTS {
        let not_found = || ApiError::resource_not_found(resource_type, id);
        let current = app
            .store
            .read_current(scope, resource_type, id)
            .await?
            .ok_or_else(not_found)?;
        let current = app
            .open_visible(permit, current)
            .await?
            .ok_or_else(not_found)?;
        if let Some(expected) = if_match {
            if current.version != expected {
                return Err(stale_version(expected));
            }
        }
        if current.deleted {
            return Ok(None);
        }
        let write = VersionWrite {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version: current.version + 1,
            expected: Expected::Version(current.version),
            method: WriteMethod::Delete,
            last_updated: Utc::now(),
            body: None,
            // A deletion stays in the compartment of what it deletes.
            compartment: current.compartment.clone(),
            key_id: None,
            audit: None,
            claim: None,
            index: IndexRows::default(),
        };
        let write = VersionWrite {
            audit: write_audit(app, &write, 204),
            ..write
        };
        if let Some(record) = commit(app, scope, write, if_match).await? {
            mark_audited(&record);
            return Ok(Some(record));
        }
    }
    Err(ApiError::Conflict(
        "the resource is being changed concurrently; retry".into(),
    ))
}

/// Creates a new resource with a server-assigned id.
///
/// # Errors
/// 403 when the content is outside what the caller may create; 503 when the database or the
/// key provider is down.
pub async fn create_new(
    app: &App,
    permit: &Permit,
    resource_type: &str,
    resource: Map<String, Value>,
) -> ApiResult<VersionRecord> {
    let id = uuid::Uuid::new_v4().to_string();
    create_as(app, permit, resource_type, &id, resource).await
}

/// Creates `resource_type/id`, an id the server just assigned (a random UUID, as
/// [`create_new`] and a transaction's POST entries make): no current version is read, and the
/// head insert still refuses an id that exists (409).
///
/// # Errors
/// As [`create_new`].
pub async fn create_as(
    app: &App,
    permit: &Permit,
    resource_type: &str,
    id: &str,
    resource: Map<String, Value>,
) -> ApiResult<VersionRecord> {
    let scope = permit.scope();
    let last_updated = Utc::now();
    let resource = Value::Object(resource);
    let compartment = compartment_of(app, scope, resource_type, id, &resource).await?;
    check_writable(
        app,
        permit,
        (resource_type, id),
        compartment.as_deref(),
        &resource,
    )
    .await?;
    let Value::Object(fields) = resource else {
        unreachable!("wrapped as an object above")
    };
    let stamped = stamp(fields, id, 1, last_updated);
    let body = serialize(&stamped)?;
    let target = Target {
        resource_type,
        id,
        version: 1,
        expected: Expected::Absent,
        method: WriteMethod::Post,
        last_updated,
    };
    let mut write = sealed_write(app, scope, target, compartment, &stamped, &body).await?;
    write.audit = write_audit(app, &write, 201);
    let Some(mut record) = commit(app, scope, write, None).await? else {
        return Err(ApiError::Conflict(
            "a resource with the assigned id exists; retry".into(),
        ));
    };
    mark_audited(&record);
    record.body = Some(body);
    Ok(record)
}

/// The new content must lie within the permit (compartment, labels, policy), else 403: the
/// caller knows what they sent, so refusing reveals nothing.
async fn check_writable(
    app: &App,
    permit: &Permit,
    (resource_type, id): (&str, &str),
    compartment: Option<&str>,
    resource: &Value,
) -> ApiResult<()> {
    if resource_type == "Consent" {
        // A directive that decides access must say exactly what it means (422 otherwise).
        let problems = crate::consent::validate(resource);
        if !problems.is_empty() {
            return Err(ApiError::Unprocessable(problems.join("; ")));
        }
    }
    let facts = ResourceFacts {
        resource_type,
        id: Some(id),
        compartment,
        resource: Some(resource),
    };
    if app.decider.writable(permit, &facts).await? {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "the caller may not write this resource".into(),
        ))
    }
}

/// Which version a write creates.
struct Target<'a> {
    resource_type: &'a str,
    id: &'a str,
    version: i64,
    expected: Expected,
    method: WriteMethod,
    last_updated: chrono::DateTime<Utc>,
}

/// The pseudonym of the patient compartment `resource` belongs to, if any. Inside a
/// transaction bundle each patient's pseudonym is looked up once.
async fn compartment_of(
    app: &App,
    scope: &Scope,
    resource_type: &str,
    id: &str,
    resource: &Value,
) -> ApiResult<Option<String>> {
    let Some(patient_id) = app.compartment.patient_of(resource_type, id, resource) else {
        return Ok(None);
    };
    let memo_key = (scope.tenant().to_string(), patient_id);
    let remembered = COLLECTED
        .try_with(|collected| collected.borrow().pseudonyms.get(&memo_key).cloned())
        .ok()
        .flatten();
    if let Some(pseudonym) = remembered {
        return Ok(Some(pseudonym));
    }
    let pseudonym = app.store.compartment_pseudonym(scope, &memo_key.1).await?;
    let _outside_a_bundle = COLLECTED.try_with(|collected| {
        collected
            .borrow_mut()
            .pseudonyms
            .insert(memo_key, pseudonym.clone())
    });
    Ok(Some(pseudonym))
}

/// The data key of `compartment`; inside a transaction bundle looked up once per compartment
/// (the bundle's commit locks every key it used, so an erasure in between fails the bundle).
async fn compartment_key(
    app: &App,
    scope: &Scope,
    compartment: Option<&str>,
) -> ApiResult<CompartmentKey> {
    let memo_key = (scope.tenant().to_string(), compartment.map(str::to_string));
    let remembered = COLLECTED
        .try_with(|collected| collected.borrow().keys.get(&memo_key).cloned())
        .ok()
        .flatten();
    if let Some(key) = remembered {
        return Ok(key);
    }
    let key = app.vault.compartment_key(scope, compartment).await?;
    let _outside_a_bundle =
        COLLECTED.try_with(|collected| collected.borrow_mut().keys.insert(memo_key, key.clone()));
    Ok(key)
}

/// A version write whose body is sealed under its compartment's data key.
async fn sealed_write(
    app: &App,
    scope: &Scope,
    target: Target<'_>,
    compartment: Option<String>,
    resource: &Value,
    body: &[u8],
) -> ApiResult<VersionWrite> {
    // The index is computed before sealing: it needs the plaintext, and only its blinded or
    // non-identifying terms reach the database.
    let index = app
        .search
        .index_rows(scope, target.resource_type, resource)
        .await?;
    let key = compartment_key(app, scope, compartment.as_deref()).await?;
    let sealed = app
        .vault
        .seal_with(
            &key,
            scope,
            compartment.as_deref(),
            target.resource_type,
            target.id,
            target.version,
            body,
        )
        .await?;
    Ok(VersionWrite {
        resource_type: target.resource_type.to_string(),
        id: target.id.to_string(),
        version: target.version,
        expected: target.expected,
        method: target.method,
        last_updated: target.last_updated,
        body: Some(sealed.ciphertext),
        compartment,
        key_id: Some(sealed.key_id),
        audit: None,
        claim: CLAIM.try_with(Clone::clone).ok().flatten(),
        index,
    })
}

/// The audit record of this write, committed in its transaction (outside a request — a CLI
/// import — the caller audits on its own).
fn write_audit(app: &App, write: &VersionWrite, status: u16) -> Option<crate::store::AuditEntry> {
    let mut context = super::audit::current()?;
    context.resource_type = Some(write.resource_type.clone());
    context.resource_id = Some(write.id.clone());
    context.version = Some(write.version);
    context.patient = write.compartment.clone();
    let interaction = context.interaction;
    Some(app.audit_entry(&context, interaction, status))
}

/// Tells the audit middleware that this request's record is already committed.
fn mark_audited(record: &VersionRecord) {
    super::audit::note(|context| {
        context.appended = true;
        context.resource_type = Some(record.resource_type.clone());
        context.resource_id = Some(record.id.clone());
        context.version = Some(record.version);
        context.patient = record.compartment.clone();
    });
}

/// What a transaction bundle being processed in this task has gathered.
#[derive(Default)]
struct Collected {
    /// Its writes, committed together at the end.
    writes: Vec<VersionWrite>,
    /// (tenant, patient id) → compartment pseudonym.
    pseudonyms: HashMap<(String, String), String>,
    /// (tenant, type, id) → the current version read ahead for an update entry (`None`: the
    /// resource does not exist); taken by the entry's write.
    current: HashMap<(String, String, String), Option<VersionRecord>>,
    /// (tenant, compartment) → data key.
    keys: HashMap<(String, Option<String>), CompartmentKey>,
}

/// Reads the current versions of `targets` (type, id) ahead of a transaction bundle's writes:
/// one statement per type instead of one per entry. Each write takes its own, once; a write
/// that has to try again reads afresh.
///
/// # Errors
/// 503 when the database is down.
pub async fn prefetch_current(
    app: &App,
    scope: &Scope,
    targets: Vec<(String, String)>,
) -> ApiResult<()> {
    let mut by_type: HashMap<String, Vec<String>> = HashMap::new();
    for (resource_type, id) in targets {
        by_type.entry(resource_type).or_default().push(id);
    }
    for (resource_type, ids) in by_type {
        let mut found: HashMap<String, VersionRecord> = app
            .store
            .read_current_many(scope, &resource_type, &ids)
            .await?
            .into_iter()
            .map(|record| (record.id.clone(), record))
            .collect();
        COLLECTED.with(|collected| {
            let mut collected = collected.borrow_mut();
            for id in ids {
                let current = found.remove(&id);
                let key = (scope.tenant().to_string(), resource_type.clone(), id);
                collected.current.insert(key, current);
            }
        });
    }
    Ok(())
}

/// The current version of `resource_type/id` read ahead by [`prefetch_current`], if it was
/// (taken: only the first attempt of a write uses it).
fn prefetched(scope: &Scope, resource_type: &str, id: &str) -> Option<Option<VersionRecord>> {
    let key = (
        scope.tenant().to_string(),
        resource_type.to_string(),
        id.to_string(),
    );
    COLLECTED
        .try_with(|collected| collected.borrow_mut().current.remove(&key))
        .ok()
        .flatten()
}

tokio::task_local! {
    /// The transaction bundle being processed in this task.
    static COLLECTED: std::cell::RefCell<Collected>;
    /// The conditional-create claim of the write being made in this task.
    static CLAIM: Option<String>;
}

/// Runs `work` (one create) holding the claim of its conditional criteria, so that of two
/// concurrent conditional creates with the same criteria only one commits.
pub async fn claiming<T>(claim: String, work: impl std::future::Future<Output = T>) -> T {
    CLAIM.scope(Some(claim), work).await
}

/// The claim key of a conditional create: a keyed hash of the type and the criteria in a
/// canonical order (no PHI reaches the database).
///
/// # Errors
/// 503 when the tenant's index key cannot be fetched.
pub async fn claim_key(
    app: &App,
    scope: &Scope,
    resource_type: &str,
    criteria: &[(String, String)],
) -> ApiResult<String> {
    let mut pairs: Vec<String> = criteria
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "_format" | "_pretty"))
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    pairs.sort();
    let blinder = app.search.blinder(scope).await?;
    Ok(blinder.blind(
        "_conditional-create",
        &format!("{resource_type}?{}", pairs.join("&")),
    ))
}

/// Runs `work` with every write it makes collected instead of committed, and returns them: a
/// transaction bundle commits them together with [`crate::store::Store::write_many`].
pub async fn collecting<T>(work: impl std::future::Future<Output = T>) -> (T, Vec<VersionWrite>) {
    COLLECTED
        .scope(std::cell::RefCell::new(Collected::default()), async {
            let output = work.await;
            let writes =
                COLLECTED.with(|collected| std::mem::take(&mut collected.borrow_mut().writes));
            (output, writes)
        })
        .await
}

/// The record a write will have once committed (its sequence is not known yet).
fn provisional_record(write: &VersionWrite) -> VersionRecord {
    VersionRecord {
        sequence: 0,
        resource_type: write.resource_type.clone(),
        id: write.id.clone(),
        version: write.version,
        method: write.method,
        last_updated: write.last_updated,
        deleted: write.body.is_none(),
        compartment: write.compartment.clone(),
        key_id: write.key_id.clone(),
        body: write.body.clone(),
    }
}

/// Commits one attempt. `Ok(None)` means another writer won the race and the caller should
/// re-read and retry; with `If-Match` there is no retry: the named version is gone (412).
async fn commit(
    app: &App,
    scope: &Scope,
    write: VersionWrite,
    if_match: Option<i64>,
) -> ApiResult<Option<VersionRecord>> {
    // Inside a transaction bundle the write joins the bundle's one database transaction.
    if COLLECTED.try_with(|_| ()).is_ok() {
        let record = provisional_record(&write);
        COLLECTED.with(|collected| collected.borrow_mut().writes.push(write));
        return Ok(Some(record));
    }
    match (app.store.write(scope, write).await, if_match) {
        (Ok(record), _) => Ok(Some(record)),
        (Err(StoreError::VersionConflict), Some(expected)) => Err(stale_version(expected)),
        (Err(StoreError::VersionConflict), None) => Ok(None),
        (Err(other), _) => Err(other.into()),
    }
}

fn expectation(
    current: Option<&VersionRecord>,
    if_match: Option<i64>,
) -> ApiResult<(Expected, i64)> {
    match (current, if_match) {
        (Some(current), Some(expected)) if current.version != expected => {
            Err(stale_version(expected))
        }
        (None, Some(expected)) => Err(stale_version(expected)),
        (Some(current), _) => Ok((Expected::Version(current.version), current.version + 1)),
        (None, None) => Ok((Expected::Absent, 1)),
    }
}

fn stale_version(expected: i64) -> ApiError {
    ApiError::PreconditionFailed(format!(
        "If-Match names version {expected}, which is not the current version"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stamp_sets_server_fields_first_and_keeps_client_meta() {
        let Value::Object(resource) = json!({
            "name": [{"family": "Doe"}],
            "resourceType": "Patient",
            "id": "client-chosen",
            "meta": {"versionId": "99", "tag": [{"code": "t"}]}
        }) else {
            unreachable!()
        };
        let time = chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let stamped = stamp(resource, "server-id", 3, time);
        let keys: Vec<&String> = stamped.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["resourceType", "id", "meta", "name"]);
        assert_eq!(stamped["id"], "server-id");
        assert_eq!(stamped["meta"]["versionId"], "3");
        assert_eq!(
            stamped["meta"]["lastUpdated"],
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(stamped["meta"]["tag"][0]["code"], "t");
    }
}
