//! Executing a parsed search: narrow with the index, decrypt and re-check every candidate under
//! the access decision, sort, page, include.
//!
//! Order and paging: without `_sort`, results come in (type, id) order and the index is read in
//! chunks only until the page is full, so a first page costs what it shows. With `_sort`, or
//! `_total=accurate`, every candidate is evaluated. The next-page cursor is the position of the
//! last entry shown (its sort keys, type and id), sealed with a key derived from the tenant's
//! data key, so a link never carries a name or date in clear and stays correct while data
//! changes: a page starts after the last entry the previous page showed, whatever was added
//! or removed before it.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use serde_json::{json, Value};

use super::index::{clip, narrowest_term_within, prefix_term, year_of, Blinder, PREFIX_LENGTHS};
use super::matcher;
use super::query::{
    Criterion, Include, Modifier, ParsedQuery, Prefix, QueryValue, TokenSystem, TotalMode,
};
use super::registry::ParamDef;
use super::values::{self, normalize_string, SearchType, SearchValue};
use crate::api::App;
use crate::authz::decision::{Interaction, Permit};
use crate::authz::principal::Principal;
use crate::error::{ApiError, ApiResult, IssueCode};
use crate::store::{CandidateFilter, CandidateQuery, EachKey, RangeBounds, Scope, VersionRecord};

/// Candidates read from the index per step.
const CHUNK: usize = 200;
/// The smallest step after the first (which is the size of the page wanted).
const MIN_CHUNK: usize = 16;
/// Most candidates one search may decrypt and re-check; beyond it the search is refused as too
/// broad (400) rather than answered slowly or partially.
pub const MAX_EVALUATED: usize = 50_000;
/// Most resources a chained parameter or `_has` is resolved to as a list; beyond it, the
/// criterion is checked per candidate instead.
pub const MAX_CHAIN_MATCHES: usize = 1_000;
/// How many inner matches one per-candidate check is worth (an index look-up, a decryption):
/// a chain or `_has` alone is checked per candidate when the searched type has at most 1/this
/// as many resources as the inner search has index candidates.
const PER_CANDIDATE_COST: usize = 4;
/// The same beside other criteria. Then both ways decrypt the candidates those criteria
/// leave (the list way only those among the inner matches), and the inner search runs only
/// for the candidates that passed them: the per-candidate way costs about one decryption per
/// candidate, plus an inner search for the few that pass.
const PER_FILTERED_CANDIDATE_COST: usize = 2;
/// How far the outer candidates of a chain or `_has` are counted: far enough that a list of
/// inner matches (at most [`MAX_EVALUATED`] decryptions) is never judged dearer than checking
/// this many outer candidates one by one.
const MAX_OUTER_COUNT: usize = MAX_EVALUATED / PER_CANDIDATE_COST;
/// The outer count's first limit (see [`Search::per_candidate_is_cheaper`]).
const FIRST_COUNT_LIMIT: usize = 64;
/// Most candidates whose chain or `_has` is checked in one batch (see
/// [`Search::passes_deferred_each`]).
const MAX_DEFERRED_BATCH: usize = 64;
/// Most resources `_include`/`_revinclude` add to one page.
pub const MAX_INCLUDED: usize = 1_000;
/// Rounds of `:iterate`.
const MAX_ITERATE_ROUNDS: usize = 3;
/// Years a blinded date range may enumerate before the index gives up narrowing on it.
const MAX_QUERY_YEARS: i32 = 300;
/// The HKDF purpose of the paging cursor key.
const CURSOR_KEY_PURPOSE: &str = "custodian/search-cursor/v1";

/// A resource that matched (or was included): its current version, decrypted, and its JSON.
#[derive(Debug, Clone)]
pub struct Found {
    pub record: VersionRecord,
    pub resource: Value,
}

/// One page of results.
#[derive(Debug, Default)]
pub struct Page {
    pub matches: Vec<Found>,
    pub included: Vec<Found>,
    /// The number of matches, when known (every candidate was evaluated) and wanted.
    pub total: Option<usize>,
    /// The sealed cursor of the next page, if there is one.
    pub next: Option<String>,
}

/// What to evaluate: resolved from the parsed criteria.
enum Check {
    /// A parameter's own criterion, re-checked with the matcher.
    Plain {
        definition: Arc<ParamDef>,
        criterion: Criterion,
    },
    /// A reference parameter must point at one of these resources (chains).
    RefersTo {
        definition: Arc<ParamDef>,
        targets: HashSet<(String, String)>,
    },
    /// The resource must be one of these (`_has`).
    OneOf(HashSet<(String, String)>),
    /// A chain with too many targets to list: a reference of the candidate must point at a
    /// resource of `target_types` that matches `inner` (checked per candidate).
    ChainEach {
        definition: Arc<ParamDef>,
        target_types: Vec<String>,
        inner: Criterion,
    },
    /// `_has` with too many sources to list: some `source_type` resource whose
    /// `reference_code` points at the candidate matches `inner` (checked per candidate).
    HasEach {
        source_type: String,
        reference_code: String,
        inner: Criterion,
    },
}

impl Check {
    /// Whether the check runs a search per candidate.
    fn is_deferred(&self) -> bool {
        matches!(self, Check::ChainEach { .. } | Check::HasEach { .. })
    }
}

/// What the index holds first for one key of [`Search::first_candidates`].
enum FirstCandidate {
    /// No candidate: nothing can match.
    None,
    /// The first candidate, decrypted, to be re-checked.
    Opened(Box<Found>),
    /// A first candidate the caller may not see (or gone since): look further.
    Unseen,
}

/// Where a page starts: after this position.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Cursor {
    keys: Vec<SortKey>,
    resource_type: String,
    id: String,
}

/// A comparable sort value.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
enum SortKey {
    Missing,
    Number(f64),
    Text(String),
}

impl SortKey {
    fn compare(&self, other: &SortKey) -> Ordering {
        match (self, other) {
            (SortKey::Number(a), SortKey::Number(b)) => a.partial_cmp(b).unwrap_or(Ordering::Equal),
            (SortKey::Text(a), SortKey::Text(b)) => a.cmp(b),
            // Resources without a value sort last either way.
            (SortKey::Missing, SortKey::Missing) => Ordering::Equal,
            (SortKey::Missing, _) => Ordering::Greater,
            (_, SortKey::Missing) => Ordering::Less,
            (SortKey::Number(_), SortKey::Text(_)) => Ordering::Less,
            (SortKey::Text(_), SortKey::Number(_)) => Ordering::Greater,
        }
    }
}

/// A search over `resource_types` (one for a type-level search; several for `_type` or the
/// system level) for `principal`.
pub struct Search<'a> {
    app: &'a App,
    principal: &'a Arc<Principal>,
    /// The permit of each type the caller may search; types it may not are left out.
    permits: HashMap<String, Permit>,
    blinder: Arc<Blinder>,
    scope: Scope,
}

impl<'a> Search<'a> {
    /// Decides the search for each type (403 when the caller may search none of them).
    ///
    /// # Errors
    /// 403 as above; 503 when the index key cannot be fetched.
    pub async fn start(
        app: &'a App,
        principal: &'a Arc<Principal>,
        resource_types: &[String],
    ) -> ApiResult<Search<'a>> {
        let mut permits = HashMap::new();
        let mut refusal = None;
        for resource_type in resource_types {
            match app
                .decide(principal, Interaction::Search, Some(resource_type))
                .await
            {
                Ok(permit) => {
                    permits.insert(resource_type.clone(), permit);
                }
                Err(error @ ApiError::Forbidden(_)) => refusal = Some(error),
                Err(other) => return Err(other),
            }
        }
        let Some(scope) = permits.values().next().map(|permit| permit.scope().clone()) else {
            return Err(
                refusal.unwrap_or_else(|| ApiError::Forbidden("the caller may not search".into()))
            );
        };
        let blinder = app.search.blinder(&scope).await?;
        Ok(Search {
            app,
            principal,
            permits,
            blinder,
            scope,
        })
    }

    /// A search of the permit's resource type under that permit (conditional interactions,
    /// which decided their own interaction already).
    ///
    /// # Errors
    /// 503 when the index key cannot be fetched.
    pub async fn with_permit(app: &'a App, permit: &'a Permit) -> ApiResult<Search<'a>> {
        let resource_type = permit.resource_type().ok_or_else(|| {
            ApiError::Internal("a conditional interaction without a resource type".into())
        })?;
        let scope = permit.scope().clone();
        let blinder = app.search.blinder(&scope).await?;
        Ok(Search {
            app,
            principal: permit.principal_arc(),
            permits: HashMap::from([(resource_type.to_string(), permit.clone())]),
            blinder,
            scope,
        })
    }

    /// The types being searched (those the caller may search), in order.
    pub fn types(&self) -> Vec<String> {
        let mut types: Vec<String> = self.permits.keys().cloned().collect();
        types.sort();
        types
    }

    /// One page of `query`, of at most `count` matches, starting after `cursor`.
    ///
    /// # Errors
    /// 400 for an invalid cursor or a search too broad to evaluate; 503 when the database or
    /// the key provider is down.
    pub async fn page(&self, query: &ParsedQuery, count: usize) -> ApiResult<Page> {
        let cursor = match &query.control.cursor {
            Some(text) => Some(self.open_cursor(text).await?),
            None => None,
        };
        let types = self.types();
        let checks = self.resolve(&types, &query.criteria).await?;
        let sorting = !query.control.sort.is_empty();
        let want_total = !matches!(query.control.total, Some(TotalMode::None));
        let must_count = matches!(query.control.total, Some(TotalMode::Accurate));
        let exhaustive = sorting || must_count || count == 0;
        // Without sorting, the index order is the result order: start after the cursor.
        let after = match (&cursor, sorting) {
            (Some(cursor), false) => Some((cursor.resource_type.clone(), cursor.id.clone())),
            _ => None,
        };
        let limit = if exhaustive { usize::MAX } else { count + 1 };
        let (mut found, complete) = self.evaluate(&types, &checks, after, limit).await?;
        let mut keyed: Vec<(Vec<SortKey>, Found)> = found
            .drain(..)
            .map(|found| (self.sort_keys(&query.control.sort, &found), found))
            .collect();
        if sorting {
            keyed.sort_by(|a, b| compare_positions(&a.0, &a.1, &b.0, &b.1, &query.control.sort));
            if let Some(cursor) = &cursor {
                keyed.retain(|(keys, found)| {
                    compare_positions(
                        keys,
                        found,
                        &cursor.keys,
                        &cursor_found(cursor),
                        &query.control.sort,
                    ) == Ordering::Greater
                });
            }
        }
        // The total counts every match, not only those after the cursor.
        let total = if complete && want_total && cursor.is_none() {
            Some(keyed.len())
        } else {
            None
        };
        let has_more = keyed.len() > count;
        keyed.truncate(count);
        let next = match (has_more, keyed.last()) {
            (true, Some((keys, last))) => Some(
                self.seal_cursor(&Cursor {
                    keys: keys.clone(),
                    resource_type: last.record.resource_type.clone(),
                    id: last.record.id.clone(),
                })
                .await?,
            ),
            _ => None,
        };
        let matches: Vec<Found> = keyed.into_iter().map(|(_, found)| found).collect();
        let included = self
            .includes(
                &matches,
                &query.control.includes,
                &query.control.revincludes,
            )
            .await?;
        Ok(Page {
            matches,
            included,
            total,
            next,
        })
    }

    /// Every match (for conditional interactions and inner searches), up to `limit`.
    ///
    /// # Errors
    /// As [`Search::page`].
    pub async fn all(&self, criteria: &[Criterion], limit: usize) -> ApiResult<Vec<Found>> {
        let types = self.types();
        let checks = self.resolve(&types, criteria).await?;
        let (found, _) = self.evaluate(&types, &checks, None, limit).await?;
        Ok(found)
    }

    /// Turns chains and `_has` into sets of resources, and looks up each plain parameter.
    ///
    /// A chain or `_has` is either resolved first into the list of resources it allows (its
    /// inner search decrypts and re-checks each of them), or checked per candidate that the
    /// other criteria leave (one small inner search each). Which one is cheaper depends on the
    /// two sizes, so both are estimated from the index alone before anything is decrypted:
    /// per candidate when the other criteria (or, without any, the searched type itself) leave
    /// far fewer candidates than the inner search has, or when the list proves longer than
    /// [`MAX_CHAIN_MATCHES`]. Both ways give the same, exact, result.
    async fn resolve(&self, types: &[String], criteria: &[Criterion]) -> ApiResult<Vec<Check>> {
        let mut checks = Vec::with_capacity(criteria.len());
        let outer_filters = self.plain_filters(criteria)?;
        for criterion in criteria {
            match criterion {
                Criterion::Plain { .. } => checks.push(self.plain_check(criterion)?),
                Criterion::Chain {
                    resource_type,
                    code,
                    target_types,
                    inner,
                } => {
                    let definition = self.definition(resource_type, code)?;
                    let inner_search =
                        Box::pin(Search::start(self.app, self.principal, target_types)).await?;
                    if self
                        .per_candidate_is_cheaper(types, &outer_filters, &inner_search, inner)
                        .await?
                    {
                        checks.push(Check::ChainEach {
                            definition,
                            target_types: target_types.clone(),
                            inner: inner.as_ref().clone(),
                        });
                        continue;
                    }
                    let targets = Box::pin(
                        inner_search
                            .all(std::slice::from_ref(inner.as_ref()), MAX_CHAIN_MATCHES + 1),
                    )
                    .await?;
                    if targets.len() > MAX_CHAIN_MATCHES {
                        // Too many targets to list: check each candidate's own references.
                        checks.push(Check::ChainEach {
                            definition,
                            target_types: target_types.clone(),
                            inner: inner.as_ref().clone(),
                        });
                        continue;
                    }
                    checks.push(Check::RefersTo {
                        definition,
                        targets: targets
                            .into_iter()
                            .map(|found| (found.record.resource_type, found.record.id))
                            .collect(),
                    });
                }
                Criterion::Has {
                    source_type,
                    reference_code,
                    inner,
                    ..
                } => {
                    let reference = self.definition(source_type, reference_code)?;
                    let inner_search = Box::pin(Search::start(
                        self.app,
                        self.principal,
                        std::slice::from_ref(source_type),
                    ))
                    .await?;
                    if self
                        .per_candidate_is_cheaper(types, &outer_filters, &inner_search, inner)
                        .await?
                    {
                        checks.push(Check::HasEach {
                            source_type: source_type.clone(),
                            reference_code: reference_code.clone(),
                            inner: inner.as_ref().clone(),
                        });
                        continue;
                    }
                    let sources = Box::pin(
                        inner_search
                            .all(std::slice::from_ref(inner.as_ref()), MAX_CHAIN_MATCHES + 1),
                    )
                    .await?;
                    if sources.len() > MAX_CHAIN_MATCHES {
                        // Too many sources to list: ask, per candidate, whether one of them
                        // refers to it (the candidates the other criteria leave are few).
                        checks.push(Check::HasEach {
                            source_type: source_type.clone(),
                            reference_code: reference_code.clone(),
                            inner: inner.as_ref().clone(),
                        });
                        continue;
                    }
                    let mut referenced = HashSet::new();
                    for source in &sources {
                        referenced.extend(
                            typed_references(&reference, &source.resource)
                                .filter(|(target, _)| types.contains(target)),
                        );
                    }
                    checks.push(Check::OneOf(referenced));
                }
            }
        }
        Ok(checks)
    }

    /// The index filters of the plain criteria among `criteria` (chains and `_has` left out).
    fn plain_filters(&self, criteria: &[Criterion]) -> ApiResult<Vec<CandidateFilter>> {
        let mut plain = Vec::new();
        for criterion in criteria {
            if matches!(criterion, Criterion::Plain { .. }) {
                plain.push(self.plain_check(criterion)?);
            }
        }
        Ok(self.filters(&plain))
    }

    /// Whether a chain or `_has` whose inner criterion `inner` is searched by `inner_search`
    /// is cheaper checked per candidate of `types` narrowed by `outer_filters` than resolved
    /// into a list first (see [`Search::resolve`]): whether the inner search has more than
    /// [`PER_CANDIDATE_COST`] (or, beside other criteria, [`PER_FILTERED_CANDIDATE_COST`]) times
    /// as many index candidates as the outer one. Only a plain inner criterion is estimated; a
    /// nested chain keeps the list unless it proves too long.
    ///
    /// Both sides are counted in rounds of doubling limits, so that the rows read stay within
    /// a small multiple of the smaller side. Without criteria of its own the outer side is
    /// every resource of the type: `Observation?subject:Patient.name=…` counted every
    /// Observation up to [`MAX_OUTER_COUNT`] before it looked at the 125 Patients the name
    /// allows (12,500 index rows and heap visits per query, most of what PostgreSQL did under
    /// the search benchmark's mix).
    async fn per_candidate_is_cheaper(
        &self,
        types: &[String],
        outer_filters: &[CandidateFilter],
        inner_search: &Search<'_>,
        inner: &Criterion,
    ) -> ApiResult<bool> {
        if !matches!(inner, Criterion::Plain { .. }) {
            return Ok(false);
        }
        let inner_types = inner_search.types();
        let inner_filters = inner_search.plain_filters(std::slice::from_ref(inner))?;
        let cost = if outer_filters.is_empty() {
            PER_CANDIDATE_COST
        } else {
            PER_FILTERED_CANDIDATE_COST
        };
        let mut limit = FIRST_COUNT_LIMIT;
        loop {
            let outer_count = self
                .count_candidates(types, outer_filters.to_vec(), limit + 1)
                .await?;
            // Counted in full (or far enough that no list could be dearer), or only known to
            // exceed `limit`: then a list is cheaper if the inner side has at most `cost` times
            // that, whatever the outer count turns out to be.
            let outer_known = outer_count <= limit || limit >= MAX_OUTER_COUNT;
            let worth_it = if outer_known { outer_count } else { limit } * cost;
            let inner_count = inner_search
                .count_candidates(&inner_types, inner_filters.clone(), worth_it + 1)
                .await?;
            if outer_known || inner_count <= worth_it {
                return Ok(inner_count > worth_it);
            }
            limit = (limit * 2).min(MAX_OUTER_COUNT);
        }
    }

    /// How many index candidates `filters` leave among `types`, counted up to `limit`.
    async fn count_candidates(
        &self,
        types: &[String],
        filters: Vec<CandidateFilter>,
        limit: usize,
    ) -> ApiResult<usize> {
        Ok(self
            .app
            .store
            .count_candidates(
                &self.scope,
                &CandidateQuery {
                    resource_types: types.to_vec(),
                    filters,
                    after: None,
                    limit,
                },
            )
            .await?)
    }

    fn definition(&self, resource_type: &str, code: &str) -> ApiResult<Arc<ParamDef>> {
        self.app
            .search
            .registry
            .get(resource_type, code)
            .cloned()
            .ok_or_else(|| {
                ApiError::invalid(
                    IssueCode::Processing,
                    format!("unknown search parameter {code}"),
                )
            })
    }

    /// Reads candidates in index order and keeps those the caller may see that pass every
    /// check, until `limit` matches or the end. Returns the matches and whether the candidates
    /// ran out (so the matches are all there are).
    async fn evaluate(
        &self,
        types: &[String],
        checks: &[Check],
        mut after: Option<(String, String)>,
        limit: usize,
    ) -> ApiResult<(Vec<Found>, bool)> {
        let filters = self.filters(checks);
        let has_deferred = checks.iter().any(Check::is_deferred);
        // A first page decrypts about what it shows, not a whole chunk: an existence check
        // (`_has` or a chain per candidate, limit 1) reads one candidate, not sixteen.
        let mut chunk = limit.clamp(1, CHUNK);
        let mut matches = Vec::new();
        let mut evaluated = 0usize;
        loop {
            let candidates = self
                .app
                .store
                .search_candidates(
                    &self.scope,
                    &CandidateQuery {
                        resource_types: types.to_vec(),
                        filters: filters.clone(),
                        after: after.clone(),
                        limit: chunk,
                    },
                )
                .await?;
            let Some(last) = candidates.last().cloned() else {
                return Ok((matches, true));
            };
            evaluated += candidates.len();
            if evaluated > MAX_EVALUATED {
                return Err(ApiError::invalid(
                    IssueCode::Processing,
                    format!(
                    "the search would examine more than {MAX_EVALUATED} resources; add criteria"
                ),
                ));
            }
            let exhausted = candidates.len() < chunk;
            // Later steps read larger chunks, up to full ones: the first one was sized for a
            // page that the re-check or the access decision thinned out.
            chunk = (chunk * 8).clamp(MIN_CHUNK, CHUNK);
            let mut passed = self
                .open_all(candidates)
                .await?
                .into_iter()
                .filter(|found| checks.iter().all(|check| passes(check, found)));
            loop {
                // The per-candidate checks run for a batch at a time, sized to what the page
                // still needs, so that a full page has not paid for candidates it leaves out.
                let batch_size = if has_deferred {
                    limit
                        .saturating_sub(matches.len())
                        .clamp(1, MAX_DEFERRED_BATCH)
                } else {
                    usize::MAX
                };
                let batch: Vec<Found> = passed.by_ref().take(batch_size).collect();
                if batch.is_empty() {
                    break;
                }
                let mut kept = vec![true; batch.len()];
                for check in checks.iter().filter(|check| check.is_deferred()) {
                    let pending: Vec<usize> = (0..batch.len()).filter(|&at| kept[at]).collect();
                    if pending.is_empty() {
                        break;
                    }
                    let pending_found: Vec<&Found> = pending.iter().map(|&at| &batch[at]).collect();
                    let verdicts =
                        Box::pin(self.passes_deferred_each(check, &pending_found)).await?;
                    for (at, verdict) in pending.into_iter().zip(verdicts) {
                        kept[at] = verdict;
                    }
                }
                for (found, kept) in batch.into_iter().zip(kept) {
                    if kept {
                        matches.push(found);
                        if matches.len() >= limit {
                            return Ok((matches, false));
                        }
                    }
                }
            }
            if exhausted {
                return Ok((matches, true));
            }
            after = Some(last);
        }
    }

    /// A per-candidate check (a broad chain or `_has`) for several candidates at once, in
    /// three statements instead of three per candidate: the first index candidate of each
    /// candidate's inner search in one query, all of them read and decrypted together, each
    /// re-checked. A candidate whose first inner candidate does not pass (a term shared by a
    /// hash collision, a resource the caller may not see) is checked on its own as before, so
    /// the verdicts are exact. Verdicts are in the order of `found`.
    async fn passes_deferred_each(&self, check: &Check, found: &[&Found]) -> ApiResult<Vec<bool>> {
        let verdicts = match check {
            Check::HasEach {
                source_type,
                reference_code,
                inner,
            } if matches!(inner, Criterion::Plain { .. }) => {
                self.has_each(source_type, reference_code, inner, found)
                    .await?
            }
            Check::ChainEach {
                definition,
                target_types,
                inner,
            } if matches!(inner, Criterion::Plain { .. }) => {
                self.chain_each(definition, target_types, inner, found)
                    .await?
            }
            _ => vec![None; found.len()],
        };
        let mut exact = Vec::with_capacity(found.len());
        for (found, verdict) in found.iter().zip(verdicts) {
            exact.push(match verdict {
                Some(verdict) => verdict,
                None => Box::pin(self.passes_deferred(check, found)).await?,
            });
        }
        Ok(exact)
    }

    /// `_has` for several candidates (see [`Search::passes_deferred_each`]): `Some(verdict)`
    /// where the first inner candidate settles it, `None` where it must be checked alone.
    async fn has_each(
        &self,
        source_type: &str,
        reference_code: &str,
        inner: &Criterion,
        found: &[&Found],
    ) -> ApiResult<Vec<Option<bool>>> {
        let search = Search::start(self.app, self.principal, &[source_type.to_string()]).await?;
        let reference = search.definition(source_type, reference_code)?;
        let inner_check = search.plain_check(inner)?;
        let mut keys = Vec::with_capacity(found.len());
        let mut refers = Vec::with_capacity(found.len());
        for candidate in found {
            let criterion = refers_to(source_type, reference_code, candidate);
            match search.filter_of(&reference, &criterion) {
                Some(CandidateFilter::Terms { terms, .. }) if terms.len() == 1 => {
                    keys.push(terms[0].clone());
                }
                _ => return Ok(vec![None; found.len()]),
            }
            refers.push(Check::Plain {
                definition: reference.clone(),
                criterion,
            });
        }
        let firsts = search
            .first_candidates(
                source_type,
                &inner_check,
                &EachKey::Term {
                    param: reference.code.clone(),
                },
                &keys,
            )
            .await?;
        Ok(firsts
            .iter()
            .zip(&refers)
            .map(|(first, refers)| match first {
                FirstCandidate::None => Some(false),
                FirstCandidate::Opened(source)
                    if passes(refers, source) && passes(&inner_check, source) =>
                {
                    Some(true)
                }
                FirstCandidate::Opened(_) | FirstCandidate::Unseen => None,
            })
            .collect())
    }

    /// A chain for several candidates (see [`Search::passes_deferred_each`]).
    async fn chain_each(
        &self,
        definition: &ParamDef,
        target_types: &[String],
        inner: &Criterion,
        found: &[&Found],
    ) -> ApiResult<Vec<Option<bool>>> {
        // Each candidate's references to a target type, grouped by that type.
        let mut wanted: HashMap<String, Vec<(usize, String)>> = HashMap::new();
        for (at, candidate) in found.iter().enumerate() {
            for (target, id) in typed_references(definition, &candidate.resource) {
                if target_types.contains(&target) {
                    wanted.entry(target).or_default().push((at, id));
                }
            }
        }
        // Without any reference to a target type a candidate fails; with one that passes it
        // passes; otherwise an unsettled reference leaves it to be checked alone.
        let mut verdicts = vec![Some(false); found.len()];
        let mut target_types: Vec<&String> = wanted.keys().collect();
        target_types.sort();
        for target in target_types {
            let references = &wanted[target];
            let search =
                Search::start(self.app, self.principal, std::slice::from_ref(target)).await?;
            let inner_check = search.plain_check(inner)?;
            let ids: Vec<String> = references.iter().map(|(_, id)| id.clone()).collect();
            let firsts = search
                .first_candidates(target, &inner_check, &EachKey::Id, &ids)
                .await?;
            for ((at, _), first) in references.iter().zip(firsts) {
                let settled = match first {
                    FirstCandidate::None => Some(false),
                    FirstCandidate::Opened(target) if passes(&inner_check, &target) => Some(true),
                    FirstCandidate::Opened(_) | FirstCandidate::Unseen => None,
                };
                verdicts[*at] = match (verdicts[*at], settled) {
                    (Some(true), _) | (_, Some(true)) => Some(true),
                    (None, _) | (_, None) => None,
                    (Some(false), Some(false)) => Some(false),
                };
            }
        }
        Ok(verdicts)
    }

    /// The plain check of an inner criterion of this search's type.
    fn plain_check(&self, criterion: &Criterion) -> ApiResult<Check> {
        let Criterion::Plain {
            resource_type,
            code,
            ..
        } = criterion
        else {
            return Err(ApiError::Internal(
                "a per-candidate check without a plain inner criterion".into(),
            ));
        };
        Ok(Check::Plain {
            definition: self.definition(resource_type, code)?,
            criterion: criterion.clone(),
        })
    }

    /// For each key, the first candidate of `resource_type` with that key (as `each` says)
    /// that the index lets through `check`, read and decrypted.
    async fn first_candidates(
        &self,
        resource_type: &str,
        check: &Check,
        each: &EachKey,
        keys: &[String],
    ) -> ApiResult<Vec<FirstCandidate>> {
        let query = CandidateQuery {
            resource_types: vec![resource_type.to_string()],
            filters: self.filters(std::slice::from_ref(check)),
            after: None,
            limit: 1,
        };
        let firsts = self
            .app
            .store
            .first_candidate_each(&self.scope, &query, each, keys)
            .await?;
        let mut distinct: Vec<String> = firsts.iter().flatten().cloned().collect();
        distinct.sort();
        distinct.dedup();
        let opened: HashMap<String, Found> = self
            .open_all(
                distinct
                    .into_iter()
                    .map(|id| (resource_type.to_string(), id))
                    .collect(),
            )
            .await?
            .into_iter()
            .map(|found| (found.record.id.clone(), found))
            .collect();
        Ok(firsts
            .into_iter()
            .map(|first| match first {
                None => FirstCandidate::None,
                Some(id) => match opened.get(&id) {
                    Some(found) => FirstCandidate::Opened(Box::new(found.clone())),
                    None => FirstCandidate::Unseen,
                },
            })
            .collect())
    }

    /// A per-candidate check (a broad chain or `_has`): one small inner search.
    async fn passes_deferred(&self, check: &Check, found: &Found) -> ApiResult<bool> {
        match check {
            Check::ChainEach {
                definition,
                target_types,
                inner,
            } => {
                for (target, id) in typed_references(definition, &found.resource) {
                    if !target_types.contains(&target) {
                        continue;
                    }
                    let search =
                        Search::start(self.app, self.principal, std::slice::from_ref(&target))
                            .await?;
                    let by_id = Criterion::Plain {
                        resource_type: target.clone(),
                        code: "_id".into(),
                        search_type: SearchType::Token,
                        modifier: None,
                        values: vec![QueryValue::Token {
                            system: TokenSystem::Any,
                            code: Some(id),
                        }],
                    };
                    if !search.all(&[by_id, inner.clone()], 1).await?.is_empty() {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Check::HasEach {
                source_type,
                reference_code,
                inner,
            } => {
                let search =
                    Search::start(self.app, self.principal, std::slice::from_ref(source_type))
                        .await?;
                let refers = refers_to(source_type, reference_code, found);
                Ok(!search.all(&[refers, inner.clone()], 1).await?.is_empty())
            }
            _ => Ok(true),
        }
    }

    /// Reads and decrypts these resources (in the given order), keeping those visible.
    async fn open_all(&self, wanted: Vec<(String, String)>) -> ApiResult<Vec<Found>> {
        let mut by_type: HashMap<String, Vec<String>> = HashMap::new();
        for (resource_type, id) in &wanted {
            by_type
                .entry(resource_type.clone())
                .or_default()
                .push(id.clone());
        }
        let mut opened: HashMap<(String, String), Found> = HashMap::new();
        for (resource_type, ids) in by_type {
            let Some(permit) = self.permits.get(&resource_type) else {
                continue;
            };
            let records = self
                .app
                .store
                .read_current_many(&self.scope, &resource_type, &ids)
                .await?;
            // One query for the Consents of every patient on this page, not one per resource.
            let compartments: Vec<String> = records
                .iter()
                .filter_map(|record| record.compartment.clone())
                .collect();
            self.app
                .decider
                .prefetch_consents(permit, &compartments)
                .await?;
            for record in records {
                if record.deleted {
                    continue;
                }
                let Some(record) = self.app.open_visible(permit, record).await? else {
                    continue;
                };
                let Some(body) = record.body.as_deref() else {
                    continue;
                };
                let resource: Value = serde_json::from_slice(body)
                    .map_err(|_| ApiError::Internal("a stored body is not JSON".into()))?;
                opened.insert(
                    (record.resource_type.clone(), record.id.clone()),
                    Found { record, resource },
                );
            }
        }
        Ok(wanted
            .into_iter()
            .filter_map(|key| opened.remove(&key))
            .collect())
    }

    /// The index filters of the checks (those the index can narrow on).
    fn filters(&self, checks: &[Check]) -> Vec<CandidateFilter> {
        let mut ranked = Vec::new();
        for check in checks {
            match check {
                Check::Plain {
                    definition,
                    criterion,
                } => {
                    if let Some(filter) = self.filter_of(definition, criterion) {
                        ranked.push((expected_breadth(Some(definition), &filter), filter));
                    }
                }
                Check::RefersTo {
                    definition,
                    targets,
                } => {
                    let filter = CandidateFilter::Terms {
                        param: definition.code.clone(),
                        terms: targets
                            .iter()
                            .map(|(target, id)| clip(format!("r:{target}/{id}")))
                            .collect(),
                    };
                    ranked.push((expected_breadth(Some(definition), &filter), filter));
                }
                Check::OneOf(resources) => {
                    let filter =
                        CandidateFilter::Ids(resources.iter().map(|(_, id)| id.clone()).collect());
                    ranked.push((expected_breadth(None, &filter), filter));
                }
                // Per-candidate checks narrow nothing in the index.
                Check::ChainEach { .. } | Check::HasEach { .. } => {}
            }
        }
        // The store drives the query from the first filter (see CandidateQuery::filters).
        ranked.sort_by_key(|(breadth, _)| *breadth);
        ranked.into_iter().map(|(_, filter)| filter).collect()
    }

    /// The filter of one plain criterion, or `None` when the index cannot narrow it (the
    /// re-check alone decides): `:not`, `:contains`, `:text`, `:identifier`, `:above`,
    /// composites, `ne` and `ap`.
    fn filter_of(&self, definition: &ParamDef, criterion: &Criterion) -> Option<CandidateFilter> {
        let Criterion::Plain {
            modifier, values, ..
        } = criterion
        else {
            return None;
        };
        let param = definition.code.clone();
        if definition.code == "_id" {
            if modifier.is_some() {
                return None;
            }
            let ids = values
                .iter()
                .map(|value| match value {
                    QueryValue::Token {
                        code: Some(code), ..
                    } => Some(code.clone()),
                    QueryValue::String(text) => Some(text.clone()),
                    _ => None,
                })
                .collect::<Option<Vec<String>>>()?;
            return Some(CandidateFilter::Ids(ids));
        }
        match modifier {
            Some(Modifier::Missing) => {
                return match values.first() {
                    Some(QueryValue::Boolean(true)) if values.len() == 1 => {
                        Some(CandidateFilter::Missing { param })
                    }
                    Some(QueryValue::Boolean(false)) if values.len() == 1 => {
                        Some(CandidateFilter::Present { param })
                    }
                    _ => None,
                };
            }
            None | Some(Modifier::Exact) | Some(Modifier::Below) | Some(Modifier::Type(_)) => {}
            _ => return None,
        }
        let blind = |term: String| clip(self.blinder.term(definition, term));
        match definition.search_type {
            SearchType::Token => {
                let mut terms = Vec::new();
                for value in values {
                    let QueryValue::Token { system, code } = value else {
                        return None;
                    };
                    let term = match (system, code) {
                        (TokenSystem::Any, Some(code)) => format!("c:{code}"),
                        (TokenSystem::NoSystem, Some(code)) => format!("n:{code}"),
                        (TokenSystem::Is(system), Some(code)) => format!("s:{system}|{code}"),
                        (TokenSystem::Is(system), None) => format!("y:{system}"),
                        _ => return None,
                    };
                    terms.push(blind(term));
                }
                Some(CandidateFilter::Terms { param, terms })
            }
            SearchType::String => {
                let mut terms = Vec::new();
                let mut prefixes = Vec::new();
                for value in values {
                    let QueryValue::String(text) = value else {
                        return None;
                    };
                    let normalized = normalize_string(text);
                    let exact = matches!(modifier, Some(Modifier::Exact));
                    if definition.identifying {
                        if exact {
                            terms.push(blind(format!("e:{normalized}")));
                            continue;
                        }
                        let length = normalized.chars().count();
                        let prefix = PREFIX_LENGTHS
                            .iter()
                            .rev()
                            .find(|&&prefix| prefix <= length)?;
                        terms.push(blind(prefix_term(&normalized, *prefix)));
                    } else if exact {
                        terms.push(clip(format!("e:{normalized}")));
                    } else {
                        prefixes.push(clip(format!("e:{normalized}")));
                    }
                }
                match (terms.is_empty(), prefixes.is_empty()) {
                    (false, true) => Some(CandidateFilter::Terms { param, terms }),
                    (true, false) => Some(CandidateFilter::TermPrefixes { param, prefixes }),
                    // Mixed alternatives (never produced: one modifier per criterion).
                    _ => None,
                }
            }
            SearchType::Reference => {
                let mut terms = Vec::new();
                for value in values {
                    let QueryValue::Reference {
                        resource_type,
                        id,
                        url,
                        ..
                    } = value
                    else {
                        return None;
                    };
                    let target = match modifier {
                        Some(Modifier::Type(target)) => Some(target),
                        _ => resource_type.as_ref(),
                    };
                    match (url, target, id) {
                        (_, Some(target), Some(id)) => terms.push(clip(format!("r:{target}/{id}"))),
                        (_, None, Some(id)) => terms.push(clip(format!("i:{id}"))),
                        (Some(url), _, None) => terms.push(clip(format!("u:{url}"))),
                        (None, _, None) => return None,
                    }
                    if let (Some(url), Some(_)) = (url, resource_type) {
                        terms.push(clip(format!("u:{url}")));
                    }
                }
                Some(CandidateFilter::Terms { param, terms })
            }
            SearchType::Uri => {
                let mut terms = Vec::new();
                let mut prefixes = Vec::new();
                for value in values {
                    let QueryValue::Uri(uri) = value else {
                        return None;
                    };
                    if matches!(modifier, Some(Modifier::Below)) {
                        prefixes.push(clip(format!("u:{uri}")));
                    } else {
                        terms.push(clip(format!("u:{uri}")));
                    }
                }
                if prefixes.is_empty() {
                    Some(CandidateFilter::Terms { param, terms })
                } else if terms.is_empty() {
                    Some(CandidateFilter::TermPrefixes { param, prefixes })
                } else {
                    None
                }
            }
            SearchType::Date => {
                if definition.identifying {
                    let mut terms = Vec::new();
                    for value in values {
                        let QueryValue::Date { prefix, low, high } = value else {
                            return None;
                        };
                        // `eq` matches only values inside the query's range: within one day
                        // or month, they all carry that day's or month's term.
                        if let (Prefix::Eq, Some(term)) =
                            (prefix, narrowest_term_within(*low, *high))
                        {
                            terms.push(blind(term));
                            continue;
                        }
                        for year in query_years(*prefix, *low, *high)? {
                            terms.push(blind(format!("y:{year}")));
                        }
                        terms.push(blind("y:wide".to_string()));
                    }
                    Some(CandidateFilter::Terms { param, terms })
                } else {
                    let any_of = values
                        .iter()
                        .map(|value| match value {
                            QueryValue::Date { prefix, low, high } => {
                                range_bounds(*prefix, *low, *high)
                            }
                            _ => None,
                        })
                        .collect::<Option<Vec<_>>>()?;
                    Some(CandidateFilter::Dates { param, any_of })
                }
            }
            SearchType::Number | SearchType::Quantity => {
                let any_of = values
                    .iter()
                    .map(|value| match value {
                        QueryValue::Number {
                            prefix,
                            value,
                            low,
                            high,
                        }
                        | QueryValue::Quantity {
                            prefix,
                            value,
                            low,
                            high,
                            ..
                        } => number_bounds(*prefix, *value, *low, *high),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()?;
                Some(CandidateFilter::Numbers { param, any_of })
            }
            SearchType::Composite | SearchType::Special => None,
        }
    }

    fn sort_keys(&self, sort: &[(String, bool)], found: &Found) -> Vec<SortKey> {
        sort.iter()
            .map(|(code, descending)| self.sort_key(code, *descending, found))
            .collect()
    }

    fn sort_key(&self, code: &str, descending: bool, found: &Found) -> SortKey {
        if code == "_id" {
            return SortKey::Text(found.record.id.clone());
        }
        if code == "_lastUpdated" {
            return SortKey::Number(found.record.last_updated.timestamp_micros() as f64);
        }
        let Some(definition) = self
            .app
            .search
            .registry
            .get(&found.record.resource_type, code)
        else {
            return SortKey::Missing;
        };
        let keys = values::extract(
            &definition.expression,
            definition.search_type,
            &found.resource,
        )
        .into_iter()
        .filter_map(|value| match value {
            SearchValue::String(text) => Some(SortKey::Text(normalize_string(&text))),
            SearchValue::Token { code, text, .. } => code.or(text).map(SortKey::Text),
            SearchValue::Reference { reference, .. } => reference.map(SortKey::Text),
            SearchValue::Uri(uri) => Some(SortKey::Text(uri)),
            SearchValue::Date { low, high } => {
                Some(SortKey::Number(if descending { high } else { low } as f64))
            }
            SearchValue::Quantity { value, .. } | SearchValue::Number { value, .. } => {
                Some(SortKey::Number(value))
            }
        });
        // Ascending sorts on a resource's smallest value, descending on its largest.
        let chosen = if descending {
            keys.max_by(SortKey::compare)
        } else {
            keys.min_by(SortKey::compare)
        };
        chosen.unwrap_or(SortKey::Missing)
    }

    /// `_include` and `_revinclude` (with `:iterate`) for the page's matches; only resources
    /// the caller may see, each once, none already among the matches.
    async fn includes(
        &self,
        matches: &[Found],
        includes: &[Include],
        revincludes: &[Include],
    ) -> ApiResult<Vec<Found>> {
        if includes.is_empty() && revincludes.is_empty() {
            return Ok(Vec::new());
        }
        let mut seen: HashSet<(String, String)> = matches
            .iter()
            .map(|found| (found.record.resource_type.clone(), found.record.id.clone()))
            .collect();
        let mut included: Vec<Found> = Vec::new();
        let mut frontier: Vec<Found> = matches.to_vec();
        for round in 0..MAX_ITERATE_ROUNDS {
            let mut wanted: Vec<(String, String)> = Vec::new();
            for include in includes
                .iter()
                .filter(|include| round == 0 || include.iterate)
            {
                for found in &frontier {
                    if found.record.resource_type != include.source_type {
                        continue;
                    }
                    for definition in self.reference_params(&include.source_type, &include.code) {
                        wanted.extend(typed_references(&definition, &found.resource).filter(
                            |(target, _)| {
                                include
                                    .target_type
                                    .as_ref()
                                    .is_none_or(|wanted_type| wanted_type == target)
                            },
                        ));
                    }
                }
            }
            for include in revincludes
                .iter()
                .filter(|include| round == 0 || include.iterate)
            {
                let terms: Vec<String> = frontier
                    .iter()
                    .map(|found| {
                        clip(format!(
                            "r:{}/{}",
                            found.record.resource_type, found.record.id
                        ))
                    })
                    .collect();
                if terms.is_empty() {
                    continue;
                }
                let referencing = self
                    .app
                    .store
                    .search_candidates(
                        &self.scope,
                        &CandidateQuery {
                            resource_types: vec![include.source_type.clone()],
                            filters: vec![CandidateFilter::Terms {
                                param: include.code.clone(),
                                terms,
                            }],
                            after: None,
                            limit: MAX_INCLUDED,
                        },
                    )
                    .await?;
                wanted.extend(referencing);
            }
            wanted.retain(|key| seen.insert(key.clone()));
            if wanted.is_empty() {
                break;
            }
            let permitted = self.permitted_for_includes(&wanted).await?;
            let opened = permitted.open_all(wanted).await?;
            included.extend(opened.iter().cloned());
            if included.len() > MAX_INCLUDED {
                included.truncate(MAX_INCLUDED);
                break;
            }
            frontier = opened;
        }
        Ok(included)
    }

    /// A search whose permits cover the types of included resources.
    async fn permitted_for_includes(&self, wanted: &[(String, String)]) -> ApiResult<Search<'a>> {
        let mut types: Vec<String> = wanted.iter().map(|(kind, _)| kind.clone()).collect();
        types.sort();
        types.dedup();
        let mut permits = HashMap::new();
        for resource_type in types {
            // Includes follow the read permission of their own type; a type the caller may not
            // read is silently left out (an include never widens what a caller sees).
            if let Ok(permit) = self
                .app
                .decide(self.principal, Interaction::Read, Some(&resource_type))
                .await
            {
                permits.insert(resource_type, permit);
            }
        }
        Ok(Search {
            app: self.app,
            principal: self.principal,
            permits,
            blinder: self.blinder.clone(),
            scope: self.scope.clone(),
        })
    }

    /// The reference parameters `code` names on `resource_type` (`*`: all of them).
    fn reference_params(&self, resource_type: &str, code: &str) -> Vec<Arc<ParamDef>> {
        let registry = &self.app.search.registry;
        if code == "*" {
            return registry
                .all_of(resource_type)
                .filter(|definition| definition.search_type == SearchType::Reference)
                .cloned()
                .collect();
        }
        registry
            .get(resource_type, code)
            .filter(|definition| definition.search_type == SearchType::Reference)
            .cloned()
            .into_iter()
            .collect()
    }

    async fn seal_cursor(&self, cursor: &Cursor) -> ApiResult<String> {
        seal_position(self.app, &self.scope, cursor).await
    }

    async fn open_cursor(&self, text: &str) -> ApiResult<Cursor> {
        open_position(self.app, &self.scope, text).await
    }

    /// Reads and decrypts these resources (in the given order), keeping those the caller may
    /// see (`Patient/$everything` adds the shared resources its page refers to this way).
    ///
    /// # Errors
    /// 503 when the database or the key provider is down.
    pub async fn visible_resources(&self, wanted: Vec<(String, String)>) -> ApiResult<Vec<Found>> {
        self.open_all(wanted).await
    }
}

async fn cursor_cipher(app: &App, scope: &Scope) -> ApiResult<Aes256Gcm> {
    let key = app.vault.derived_key(scope, CURSOR_KEY_PURPOSE).await?;
    Aes256Gcm::new_from_slice(key.as_slice())
        .map_err(|_| ApiError::Internal("cursor key length".into()))
}

/// Seals a paging position (a `_cursor` value) under a key derived from the tenant's data key,
/// so that a link never carries sort values (names, dates) in clear.
///
/// # Errors
/// 500 when the position cannot be serialized or sealed; 503 when the key cannot be fetched.
pub async fn seal_position<T: serde::Serialize>(
    app: &App,
    scope: &Scope,
    position: &T,
) -> ApiResult<String> {
    let cipher = cursor_cipher(app, scope).await?;
    let plaintext = serde_json::to_vec(position)
        .map_err(|error| ApiError::Internal(format!("cursor: {error}")))?;
    let mut nonce = [0u8; 12];
    aws_lc_rs::rand::fill(&mut nonce)
        .map_err(|_| ApiError::Internal("no randomness for the cursor".into()))?;
    let sealed = cipher
        .encrypt(Nonce::from_slice(&nonce), plaintext.as_slice())
        .map_err(|_| ApiError::Internal("cannot seal the cursor".into()))?;
    let mut bytes = nonce.to_vec();
    bytes.extend_from_slice(&sealed);
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Opens a position sealed by [`seal_position`].
///
/// # Errors
/// 400 when the text is not a position this server sealed; 503 when the key cannot be fetched.
pub async fn open_position<T: serde::de::DeserializeOwned>(
    app: &App,
    scope: &Scope,
    text: &str,
) -> ApiResult<T> {
    let invalid = || ApiError::invalid(IssueCode::Processing, "the _cursor parameter is not valid");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| invalid())?;
    if bytes.len() < 12 {
        return Err(invalid());
    }
    let cipher = cursor_cipher(app, scope).await?;
    let (nonce, sealed) = bytes.split_at(12);
    let plaintext = cipher
        .decrypt(Nonce::from_slice(nonce), sealed)
        .map_err(|_| invalid())?;
    serde_json::from_slice(&plaintext).map_err(|_| invalid())
}

/// A stand-in for the entry a cursor points at (its type and id are all that compare).
fn cursor_found(cursor: &Cursor) -> Found {
    Found {
        record: VersionRecord {
            sequence: 0,
            resource_type: cursor.resource_type.clone(),
            id: cursor.id.clone(),
            version: 0,
            method: crate::store::WriteMethod::Put,
            last_updated: chrono::DateTime::<chrono::Utc>::MIN_UTC,
            deleted: false,
            compartment: None,
            key_id: None,
            body: None,
        },
        resource: Value::Null,
    }
}

/// The order of two results: by sort keys (each ascending or descending), then type and id.
fn compare_positions(
    keys_a: &[SortKey],
    a: &Found,
    keys_b: &[SortKey],
    b: &Found,
    sort: &[(String, bool)],
) -> Ordering {
    for ((key_a, key_b), (_, descending)) in keys_a.iter().zip(keys_b).zip(sort) {
        let order = match (key_a, key_b, descending) {
            // Missing values stay last in both directions.
            (SortKey::Missing, _, _) | (_, SortKey::Missing, _) => key_a.compare(key_b),
            (_, _, true) => key_b.compare(key_a),
            (_, _, false) => key_a.compare(key_b),
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    (&a.record.resource_type, &a.record.id).cmp(&(&b.record.resource_type, &b.record.id))
}

/// The criterion "`reference_code` of a `source_type` refers to `found`" (`_has`).
fn refers_to(source_type: &str, reference_code: &str, found: &Found) -> Criterion {
    Criterion::Plain {
        resource_type: source_type.to_string(),
        code: reference_code.to_string(),
        search_type: SearchType::Reference,
        modifier: None,
        values: vec![QueryValue::Reference {
            resource_type: Some(found.record.resource_type.clone()),
            id: Some(found.record.id.clone()),
            version: None,
            url: None,
        }],
    }
}

/// The `(type, id)` of each reference of `resource` that the reference parameter `definition`
/// reaches and that names both (not a bare id or a URL).
fn typed_references(
    definition: &ParamDef,
    resource: &Value,
) -> impl Iterator<Item = (String, String)> {
    values::extract(&definition.expression, SearchType::Reference, resource)
        .into_iter()
        .filter_map(|value| match value {
            SearchValue::Reference {
                resource_type: Some(target),
                id: Some(id),
                ..
            } => Some((target, id)),
            _ => None,
        })
}

/// Whether a resource passes one check.
fn passes(check: &Check, found: &Found) -> bool {
    match check {
        Check::Plain {
            definition,
            criterion,
        } => {
            if definition.search_type == SearchType::Composite {
                return composite_passes(definition, criterion, &found.resource);
            }
            let found_values = values::extract(
                &definition.expression,
                definition.search_type,
                &found.resource,
            );
            matcher::matches(criterion, &found_values)
        }
        Check::RefersTo {
            definition,
            targets,
        } => typed_references(definition, &found.resource).any(|key| targets.contains(&key)),
        Check::OneOf(resources) => {
            resources.contains(&(found.record.resource_type.clone(), found.record.id.clone()))
        }
        // Checked afterwards, asynchronously (see Search::passes_deferred).
        Check::ChainEach { .. } | Check::HasEach { .. } => true,
    }
}

/// A composite criterion: some node of the parameter satisfies every component at once.
pub(crate) fn composite_passes(
    definition: &ParamDef,
    criterion: &Criterion,
    resource: &Value,
) -> bool {
    let Criterion::Plain { values, .. } = criterion else {
        return false;
    };
    let component_types: Vec<SearchType> = definition
        .components
        .iter()
        .map(|component| component.search_type)
        .collect();
    let nodes = definition.expression.evaluate(resource);
    values.iter().any(|value| {
        let QueryValue::Composite(parts) = value else {
            return false;
        };
        nodes.iter().any(|node| {
            let node_components: Vec<Vec<SearchValue>> = definition
                .components
                .iter()
                .map(|component| {
                    component
                        .expression
                        .evaluate_from(resource, std::slice::from_ref(node))
                        .iter()
                        .flat_map(|inner| values::node_values(inner, component.search_type))
                        .collect()
                })
                .collect();
            matcher::composite_matches(parts, &component_types, &node_components)
        })
    })
}

/// How broad a filter is expected to be, narrowest first: the store drives a candidate query
/// from its first filter and probes the others per candidate, so the narrowest should lead.
/// A guess from the filter's shape, not a count (counting would cost a query per filter):
/// an id list; a reference to given resources or a person's blinded name or identifier
/// (a handful of rows each); a code or status (shared by many resources); a prefix; a range
/// of dates or numbers (blinded dates are year terms, as broad as ranges); then presence and
/// absence.
fn expected_breadth(definition: Option<&ParamDef>, filter: &CandidateFilter) -> u8 {
    match filter {
        CandidateFilter::Ids(_) => 0,
        CandidateFilter::Terms { .. } => {
            match definition.map(|definition| definition.search_type) {
                Some(SearchType::Date) => 4,
                Some(SearchType::Reference) => 1,
                _ if definition.is_some_and(|definition| definition.identifying) => 1,
                _ => 2,
            }
        }
        CandidateFilter::TermPrefixes { .. } => 3,
        CandidateFilter::Dates { .. } | CandidateFilter::Numbers { .. } => 4,
        CandidateFilter::Present { .. } => 5,
        CandidateFilter::Missing { .. } => 6,
    }
}

/// The blinded years a date criterion can match, or `None` when too many to enumerate.
fn query_years(prefix: Prefix, low: i64, high: i64) -> Option<Vec<i32>> {
    const EARLIEST: i32 = 1800;
    const LATEST: i32 = 2200;
    let first = year_of(low)?;
    let last = year_of(high.saturating_sub(1))?;
    let (from, to) = match prefix {
        Prefix::Eq => (first, last),
        Prefix::Gt | Prefix::Ge | Prefix::Sa => (first, LATEST),
        Prefix::Lt | Prefix::Le | Prefix::Eb => (EARLIEST, last),
        Prefix::Ne | Prefix::Ap => return None,
    };
    if to < from || to - from > MAX_QUERY_YEARS {
        return None;
    }
    Some((from..=to).collect())
}

/// Index bounds for a date criterion (a superset of the exact test, see the matcher).
fn range_bounds(prefix: Prefix, low: i64, high: i64) -> Option<RangeBounds<i64>> {
    let mut bounds = RangeBounds::default();
    match prefix {
        Prefix::Eq => {
            bounds.low_at_least = Some(low);
            bounds.high_at_most = Some(high);
        }
        Prefix::Gt => bounds.high_above = Some(high),
        Prefix::Lt => bounds.low_below = Some(low),
        Prefix::Ge => bounds.high_above = Some(low),
        Prefix::Le => bounds.low_below = Some(high),
        Prefix::Sa => bounds.low_at_least = Some(high),
        Prefix::Eb => bounds.high_at_most = Some(low),
        Prefix::Ne | Prefix::Ap => return None,
    }
    Some(bounds)
}

/// Index bounds for a number or quantity criterion: the stored precision range must allow the
/// exact test to pass (a superset).
fn number_bounds(prefix: Prefix, value: f64, low: f64, high: f64) -> Option<RangeBounds<f64>> {
    let mut bounds = RangeBounds::default();
    match prefix {
        Prefix::Eq => {
            bounds.low_below = Some(high);
            bounds.high_above = Some(low);
        }
        Prefix::Gt | Prefix::Ge | Prefix::Sa => bounds.high_above = Some(value.min(low)),
        Prefix::Lt | Prefix::Le | Prefix::Eb => bounds.low_below = Some(value.max(high)),
        Prefix::Ne | Prefix::Ap => return None,
    }
    Some(bounds)
}

/// The `search` element of a Bundle entry.
pub fn entry_search(mode: &str) -> Value {
    json!({ "mode": mode })
}
