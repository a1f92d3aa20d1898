//! Rebuilding the search index from the stored resources.
//!
//! The index rows of a resource depend on how this build indexes ([`INDEX_FORMAT`]): when that
//! changes, a query built for the new rows would silently miss every resource still indexed
//! under the old ones — a narrowed result that looks complete. So before a node serves (and
//! before `custodian import` writes), [`bring_up_to_date`] compares the format recorded for the
//! tenant with this build's and, when they differ, decrypts every current resource, computes
//! its rows anew and replaces them, then records the new format. `custodian reindex` forces
//! the same rebuild.
//!
//! Safe beside writers on the same database: each resource's rows are replaced only while its
//! head is still at the version they were computed from (see [`Store::replace_index`]); a
//! newer version was indexed by its own write. A rebuild interrupted part-way leaves the old
//! format recorded, so the next start rebuilds again.

use std::time::{Duration, Instant};

use super::index::{self, INDEX_FORMAT};
use crate::api::AppState;
use crate::store::{RebuiltIndex, Scope, Store, VersionRecord};

/// Resources read, decrypted and re-indexed per round trip (and per transaction).
const PAGE: usize = 256;

/// How often (in resources) a rebuild logs its progress.
const PROGRESS_EVERY: usize = 50_000;

/// What a rebuild did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    /// Resources whose rows were replaced.
    pub resources: usize,
    /// Resource types walked.
    pub types: usize,
    pub elapsed: Duration,
}

/// Rebuilds the tenant's index when it was written in another format than this build's (or
/// when no format was recorded); `None` when it is current.
///
/// # Errors
/// A message for the operator when the database holds a newer format (a newer Custodian wrote
/// it: this build would answer its searches wrongly) or the rebuild fails; the node must not
/// serve searches then.
pub async fn bring_up_to_date(app: &AppState) -> Result<Option<RebuildReport>, String> {
    let scope = Scope::system(&app.settings.tenant);
    let recorded = app
        .store
        .index_format(&scope)
        .await
        .map_err(|error| format!("cannot read the search index format: {error}"))?;
    match recorded {
        Some(format) if format == INDEX_FORMAT => Ok(None),
        Some(format) if format > INDEX_FORMAT => Err(format!(
            "the search index is in format {format}, written by a newer Custodian; this build \
             writes format {INDEX_FORMAT} and would answer searches wrongly"
        )),
        _ => {
            tracing::info!(
                from = ?recorded,
                to = INDEX_FORMAT,
                "rebuilding the search index (recorded in another format than this build's)"
            );
            let report = rebuild(app, &scope).await?;
            tracing::info!(
                resources = report.resources,
                types = report.types,
                seconds = report.elapsed.as_secs_f64(),
                "search index rebuilt"
            );
            Ok(Some(report))
        }
    }
}

/// Marks the tenant's index as needing a rebuild at the next start (`custodian reindex`).
///
/// # Errors
/// When the database cannot be written.
pub async fn mark_stale(store: &dyn Store, tenant: &str) -> Result<(), String> {
    store
        .set_index_format(&Scope::system(tenant), 0)
        .await
        .map_err(|error| format!("cannot mark the search index for rebuilding: {error}"))
}

/// Replaces the index rows of every current resource of the tenant, then records this build's
/// format.
async fn rebuild(app: &AppState, scope: &Scope) -> Result<RebuildReport, String> {
    let started = Instant::now();
    let failed = |error: crate::store::StoreError| format!("search index rebuild failed: {error}");
    let types = app.store.resource_types(scope).await.map_err(failed)?;
    let mut resources = 0;
    for resource_type in &types {
        let mut after: Option<String> = None;
        loop {
            let page = app
                .store
                .current_of_type(scope, resource_type, after.as_deref(), PAGE)
                .await
                .map_err(failed)?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some(last.id.clone());
            let complete = page.len() < PAGE;
            let rebuilt = index_page(app, scope, page).await?;
            let before = resources;
            resources += app
                .store
                .replace_index(scope, rebuilt)
                .await
                .map_err(failed)?;
            if before / PROGRESS_EVERY != resources / PROGRESS_EVERY {
                tracing::info!(
                    resources,
                    seconds = started.elapsed().as_secs_f64(),
                    "search index rebuild in progress"
                );
            }
            if complete {
                break;
            }
        }
    }
    app.store
        .set_index_format(scope, INDEX_FORMAT)
        .await
        .map_err(failed)?;
    Ok(RebuildReport {
        resources,
        types: types.len(),
        elapsed: started.elapsed(),
    })
}

/// Decrypts a page of current versions and computes their rows, the parsing and indexing on
/// the blocking pool (it is most of the work, and the runtime goes on serving meanwhile).
async fn index_page(
    app: &AppState,
    scope: &Scope,
    page: Vec<VersionRecord>,
) -> Result<Vec<RebuiltIndex>, String> {
    let mut opened = Vec::with_capacity(page.len());
    for record in page {
        // Fail closed: a body that does not open (altered, or its key unavailable) stops the
        // rebuild rather than leaving its resource unfindable.
        let body = app
            .vault
            .open(scope, &record)
            .await
            .map_err(|error| {
                format!(
                    "search index rebuild failed: {}/{} does not open: {error}",
                    record.resource_type, record.id
                )
            })?
            .ok_or_else(|| {
                "search index rebuild failed: a current version has no body".to_string()
            })?;
        opened.push((record.resource_type, record.id, record.version, body));
    }
    let blinder = app
        .search
        .blinder(scope)
        .await
        .map_err(|error| format!("search index rebuild failed: {error}"))?;
    let app = app.clone();
    tokio::task::spawn_blocking(move || {
        opened
            .into_iter()
            .map(|(resource_type, id, version, body)| {
                let resource: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
                    format!("search index rebuild failed: {resource_type}/{id} is not JSON")
                })?;
                let index =
                    index::index_rows(&app.search.registry, &blinder, &resource_type, &resource);
                Ok(RebuiltIndex {
                    resource_type,
                    id,
                    version,
                    index,
                })
            })
            .collect()
    })
    .await
    .map_err(|_| "search index rebuild failed: the indexing task failed".to_string())?
}
