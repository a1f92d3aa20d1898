//! Consent in the access decision: each patient's active directives, loaded once per request,
//! and which of the actors they name designate the caller.
//!
//! Which Consents are current is never cached beyond a request: a [`RequestConsents`] belongs
//! to one `Permit`, which belongs to one request, so a withdrawal or a new Consent takes effect
//! on the next request on every node. Across requests a node keeps only what cannot go stale:
//! the compilation of an immutable stored version, and a patient's assembled directives keyed by
//! the exact list of current versions they came from (reused only when the list read for this
//! request is the same).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::{relative_reference, Directive};
use crate::authz::principal::Principal;
use crate::crypto::vault::Vault;
use crate::error::{ApiError, ApiResult};
use crate::store::{
    CandidateFilter, CandidateQuery, CompartmentConsents, Scope, Store, VersionRecord,
};

/// The directives and actor look-ups of one request.
#[derive(Default)]
pub struct RequestConsents {
    directives: Mutex<HashMap<String, Arc<Vec<Directive>>>>,
    designates: Mutex<HashMap<String, bool>>,
}

/// How many PractitionerRoles of one practitioner are read to find their organizations.
const MAX_ROLES_PER_PRACTITIONER: usize = 200;

/// Loads directives and resolves actors.
pub struct ConsentSource {
    store: Arc<dyn Store>,
    vault: Arc<Vault>,
    /// Compiled directives by `(tenant, compartment, id, version)`. A stored version never
    /// changes, and which versions are current is read afresh on every request, so this cache
    /// can never make a withdrawn or replaced Consent count: it only saves decrypting and
    /// compiling again. The compartment is part of the key because erasure is the one thing
    /// that lets an `(id, version)` be written again, and a re-created patient gets a new
    /// compartment (a new random pseudonym).
    compiled: moka::sync::Cache<(String, String, String, i64), Option<Directive>>,
    /// A compartment's compiled directives, by `(tenant, compartment)`, with the exact list of
    /// current versions they were compiled from. Used only when the list just read from the
    /// database is the same, so it saves rebuilding, never a read of what is current.
    assembled: moka::sync::Cache<(String, String), Assembled>,
}

/// The directives of one compartment and the `(id, version)` list they come from.
#[derive(Clone)]
struct Assembled {
    versions: Arc<Vec<(String, i64)>>,
    directives: Arc<Vec<Directive>>,
}

/// The `(id, version)` pairs of `before` that `now` no longer lists.
fn superseded<'a>(
    before: &'a [(String, i64)],
    now: &'a [(String, i64)],
) -> impl Iterator<Item = &'a (String, i64)> {
    before.iter().filter(move |pair| !now.contains(pair))
}

/// How many compiled Consent versions a node keeps.
const COMPILED_CACHE_ENTRIES: u64 = 100_000;

/// How many compartments' assembled directives a node keeps.
const ASSEMBLED_CACHE_ENTRIES: u64 = 50_000;

impl ConsentSource {
    pub fn new(store: Arc<dyn Store>, vault: Arc<Vault>) -> ConsentSource {
        ConsentSource {
            store,
            vault,
            compiled: moka::sync::Cache::new(COMPILED_CACHE_ENTRIES),
            assembled: moka::sync::Cache::new(ASSEMBLED_CACHE_ENTRIES),
        }
    }

    /// The active directives of the patient behind `compartment`.
    ///
    /// # Errors
    /// 503 when the database or the key provider is down; 500 when a Consent does not decrypt.
    pub async fn directives(
        &self,
        cache: &RequestConsents,
        scope: &Scope,
        compartment: &str,
    ) -> ApiResult<Arc<Vec<Directive>>> {
        if let Some(found) = lock(&cache.directives).get(compartment) {
            return Ok(found.clone());
        }
        self.prefetch(cache, scope, &[compartment.to_string()])
            .await?;
        Ok(lock(&cache.directives)
            .get(compartment)
            .cloned()
            .unwrap_or_default())
    }

    /// Loads the directives of several compartments with one query (a page of search results).
    ///
    /// # Errors
    /// As [`ConsentSource::directives`].
    pub async fn prefetch(
        &self,
        cache: &RequestConsents,
        scope: &Scope,
        compartments: &[String],
    ) -> ApiResult<()> {
        let missing: Vec<String> = {
            let known = lock(&cache.directives);
            let mut missing: Vec<String> = compartments
                .iter()
                .filter(|compartment| !known.contains_key(*compartment))
                .cloned()
                .collect();
            missing.sort();
            missing.dedup();
            missing
        };
        if missing.is_empty() {
            return Ok(());
        }
        let mut loaded: HashMap<String, Arc<Vec<Directive>>> = missing
            .iter()
            .map(|compartment| (compartment.clone(), Arc::default()))
            .collect();
        for current in self.store.current_consent_versions(scope, &missing).await? {
            let directives = self.assemble(scope, &current).await?;
            loaded.insert(current.compartment, directives);
        }
        let mut known = lock(&cache.directives);
        known.extend(loaded);
        Ok(())
    }

    /// The directives of these current versions: those assembled for the same list before, or
    /// compiled (from cache, else from the stored version) and assembled now.
    async fn assemble(
        &self,
        scope: &Scope,
        current: &CompartmentConsents,
    ) -> ApiResult<Arc<Vec<Directive>>> {
        let key = (scope.tenant().to_string(), current.compartment.clone());
        if let Some(known) = self.assembled.get(&key) {
            if *known.versions == current.versions {
                return Ok(known.directives);
            }
            // A version that stopped being current (replaced, withdrawn, deleted) is never
            // asked for again: without this its compiled directive stayed until the cache was
            // full, one entry per Consent change (the soak's RSS grew by them).
            for (id, version) in superseded(&known.versions, &current.versions) {
                self.compiled.invalidate(&(
                    scope.tenant().to_string(),
                    current.compartment.clone(),
                    id.clone(),
                    *version,
                ));
            }
        }
        let mut directives = Vec::with_capacity(current.versions.len());
        for (id, version) in &current.versions {
            if let Some(directive) = self
                .compile(scope, &current.compartment, id, *version)
                .await?
            {
                directives.push(directive);
            }
        }
        let directives = Arc::new(directives);
        self.assembled.insert(
            key,
            Assembled {
                versions: Arc::new(current.versions.clone()),
                directives: directives.clone(),
            },
        );
        Ok(directives)
    }

    async fn compile(
        &self,
        scope: &Scope,
        compartment: &str,
        id: &str,
        version: i64,
    ) -> ApiResult<Option<Directive>> {
        let key = (
            scope.tenant().to_string(),
            compartment.to_string(),
            id.to_string(),
            version,
        );
        if let Some(known) = self.compiled.get(&key) {
            return Ok(known);
        }
        let directive = self.compile_now(scope, id, version).await?;
        self.compiled.insert(key, directive.clone());
        Ok(directive)
    }

    async fn compile_now(
        &self,
        scope: &Scope,
        id: &str,
        version: i64,
    ) -> ApiResult<Option<Directive>> {
        // Listed as current a moment ago, so gone only if the patient was erased in between.
        // Fail closed (and cache nothing): this request is refused, the next one sees the
        // erasure.
        let Some(record) = self
            .store
            .read_version(scope, "Consent", id, version)
            .await?
        else {
            return Err(ApiError::Unavailable(
                "a Consent of the patient changed while it was being read; retry".into(),
            ));
        };
        let Some(body) = self.vault.open(scope, &record).await? else {
            return Ok(None);
        };
        let consent: Value = serde_json::from_slice(&body)
            .map_err(|_| ApiError::Internal("a stored Consent is not JSON".into()))?;
        Ok(Directive::compile(&record.id, record.version, &consent))
    }

    /// The references among those `directives` name that designate the caller.
    ///
    /// # Errors
    /// 503 when a look-up cannot read the store.
    pub async fn caller_references(
        &self,
        cache: &RequestConsents,
        scope: &Scope,
        principal: &Principal,
        directives: &[Directive],
    ) -> ApiResult<HashSet<String>> {
        let mut caller = HashSet::new();
        for directive in directives {
            for reference in directive.actor_references() {
                if caller.contains(reference) {
                    continue;
                }
                let known = lock(&cache.designates).get(reference).copied();
                let designates = match known {
                    Some(known) => known,
                    None => {
                        let found = self.designates(scope, principal, reference).await?;
                        lock(&cache.designates).insert(reference.to_string(), found);
                        found
                    }
                };
                if designates {
                    caller.insert(reference.to_string());
                }
            }
        }
        Ok(caller)
    }

    /// Whether `reference` (`Type/id`) designates the caller: the caller's own `fhirUser`, a
    /// PractitionerRole of theirs, an Organization one of those roles is for, an active CareTeam
    /// or Group they are a current member of.
    async fn designates(
        &self,
        scope: &Scope,
        principal: &Principal,
        reference: &str,
    ) -> ApiResult<bool> {
        let Some(user) = principal.fhir_user.as_ref() else {
            // A caller known by client id only (a backend system) is named by no actor.
            return Ok(false);
        };
        let me = format!("{}/{}", user.resource_type, user.id);
        if reference == me {
            return Ok(true);
        }
        let Some((resource_type, id)) = reference.split_once('/') else {
            return Ok(false);
        };
        match resource_type {
            "PractitionerRole" => Ok(self
                .read(scope, resource_type, id)
                .await?
                .is_some_and(|role| role_of(&role, &me))),
            "Organization" if user.resource_type == "Practitioner" => {
                let roles = self.roles_of(scope, &me).await?;
                Ok(roles
                    .iter()
                    .any(|role| points_at(&role["organization"], reference)))
            }
            "CareTeam" => Ok(self
                .read(scope, resource_type, id)
                .await?
                .is_some_and(|team| {
                    team["status"] == "active"
                        && array(&team["participant"]).any(|participant| {
                            points_at(&participant["member"], &me)
                                && crate::authz::decision::period_includes_now(
                                    &participant["period"],
                                )
                        })
                })),
            "Group" => Ok(self
                .read(scope, resource_type, id)
                .await?
                .is_some_and(|group| {
                    group["active"] != false
                        && array(&group["member"]).any(|member| {
                            member["inactive"] != true && points_at(&member["entity"], &me)
                        })
                })),
            _ => Ok(false),
        }
    }

    /// The active PractitionerRoles of a practitioner, found through the search index.
    async fn roles_of(&self, scope: &Scope, practitioner: &str) -> ApiResult<Vec<Value>> {
        let query = CandidateQuery {
            resource_types: vec!["PractitionerRole".into()],
            filters: vec![CandidateFilter::Terms {
                param: "practitioner".into(),
                terms: vec![format!("r:{practitioner}")],
            }],
            after: None,
            limit: MAX_ROLES_PER_PRACTITIONER,
        };
        let ids: Vec<String> = self
            .store
            .search_candidates(scope, &query)
            .await?
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        let mut roles = Vec::new();
        for record in self
            .store
            .read_current_many(scope, "PractitionerRole", &ids)
            .await?
        {
            if let Some(role) = self.open(scope, &record).await? {
                if role_of(&role, practitioner) {
                    roles.push(role);
                }
            }
        }
        Ok(roles)
    }

    async fn read(&self, scope: &Scope, resource_type: &str, id: &str) -> ApiResult<Option<Value>> {
        match self.store.read_current(scope, resource_type, id).await? {
            Some(record) => self.open(scope, &record).await,
            None => Ok(None),
        }
    }

    async fn open(&self, scope: &Scope, record: &VersionRecord) -> ApiResult<Option<Value>> {
        if record.deleted {
            return Ok(None);
        }
        let Some(body) = self.vault.open(scope, record).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(&body).ok())
    }
}

/// An active PractitionerRole of `practitioner`.
fn role_of(role: &Value, practitioner: &str) -> bool {
    role["active"] != false
        && points_at(&role["practitioner"], practitioner)
        && crate::authz::decision::period_includes_now(&role["period"])
}

/// Whether a Reference element points at `target` (`Type/id`, relative or absolute).
fn points_at(element: &Value, target: &str) -> bool {
    element["reference"]
        .as_str()
        .and_then(relative_reference)
        .is_some_and(|reference| reference == target)
}

fn array(value: &Value) -> impl Iterator<Item = &Value> {
    value.as_array().into_iter().flatten()
}

/// A poisoned lock only means another task panicked mid-update of a cache; its content is
/// still a valid cache.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::superseded;

    fn versions(pairs: &[(&str, i64)]) -> Vec<(String, i64)> {
        pairs
            .iter()
            .map(|(id, v)| ((*id).to_string(), *v))
            .collect()
    }

    #[test]
    fn superseded_lists_the_versions_no_longer_current() {
        let before = versions(&[("a", 1), ("b", 3), ("c", 1)]);
        let now = versions(&[("a", 1), ("b", 4)]);
        let gone: Vec<_> = superseded(&before, &now).cloned().collect();
        assert_eq!(gone, versions(&[("b", 3), ("c", 1)]));
        assert_eq!(superseded(&now, &now).count(), 0);
        assert_eq!(superseded(&[], &now).count(), 0);
    }
}
