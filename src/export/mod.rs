//! FHIR Bulk Data Access v2 `$export` (https://hl7.org/fhir/uv/bulkdata/export.html): the job
//! model and the background worker. The HTTP side (kick-off, status, download, cancel) is
//! `api::export`.
//!
//! # How a job runs
//! - **Persisted.** The kick-off stores a job row (`migrations/*/0008_export.sql`) and answers
//!   202 at once. The row holds the requester's claims and the request, sealed under the tenant's
//!   data key, and a hash of the requester's issuer and subject (never the token).
//! - **As the requester.** The worker rebuilds the requester's [`Principal`] from the stored
//!   claims and decides every resource type through [`crate::api::App::decide`] and every
//!   resource through [`crate::api::App::open_visible`], exactly as a search by that caller would:
//!   access policy and patient consent apply. Break-the-glass never carries over into a job.
//!   Permits are made again for every batch, so a Consent withdrawn mid-job applies to the rest.
//! - **Leased.** One worker per node takes a job with a conditional update (a lease); every batch
//!   it writes renews the lease in the same transaction, or is refused when the lease is gone
//!   (cancelled, or taken over). A job whose node stopped is taken again when its lease runs out
//!   and restarts from scratch (its partial output is deleted); after `max_attempts` starts it
//!   fails cleanly instead.
//! - **Bounded.** The worker reads, checks and seals `batch_size` resources at a time and yields
//!   between batches; one job at a time per node.
//! - **Sealed output.** Each batch's NDJSON lines are grouped by type and patient compartment and
//!   sealed under that compartment's data key (the tenant's key outside compartments), bound to
//!   the job and chunk number: erasing a patient (destroying their key) makes their lines in
//!   every export unreadable too.
//! - **Expiring.** A finished job and its output are deleted `retention_secs` after it ended; the
//!   worker sweeps expired jobs, and polling an expired job answers 404 even before the sweep.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::App;
use crate::authz::decision::{Interaction, Permit};
use crate::authz::principal::Principal;
use crate::error::{ApiError, ApiResult};
use crate::store::{AuditQuery, ExportChunk, ExportJobRow, ExportLease, Scope, VersionRecord};

/// The type name chunks and job specs are sealed under: not a FHIR type, so a sealed export
/// chunk can never be opened as a resource version or the other way round.
const SEALED_TYPE: &str = "$export";

/// The most disclosure records a data subject's export lists.
const MAX_DISCLOSURES: usize = 100_000;

/// Which resources an export covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    /// `/$export`: every resource the requester may see.
    System,
    /// `/Patient/$export`: the compartments of every patient the requester may see (a data
    /// subject: their own, with the record of who accessed it).
    Patient,
    /// `/Group/{id}/$export`: the compartments of the group's member patients (resolved at
    /// kick-off, when the requester's right to read the Group is checked).
    Group { patients: Vec<String> },
}

/// What was asked for at kick-off.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportSpec {
    /// The requester's claims (no token, no break-the-glass declaration).
    pub requester: Principal,
    /// The kick-off URL (the manifest's `request`).
    pub request_url: String,
    pub level: Level,
    /// `_type`: only these types (all when empty).
    pub types: Vec<String>,
    /// `_since`: only resources updated after this, microseconds since the epoch.
    pub since_us: Option<i64>,
}

/// Who may see a job: a SHA-256 of the tenant, the issuer and the subject of the token. The same
/// caller with a fresh token matches; anybody else does not.
pub fn requester_of(tenant: &str, principal: &Principal) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for part in [
        tenant,
        principal.issuer.as_str(),
        principal.subject.as_str(),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A sealed value of an export as the vault sees a stored row, so that sealing and opening go
/// through the vault's one code path (keys, cache, integrity alarm).
fn sealed_row(
    id: String,
    number: i64,
    compartment: Option<String>,
    key_id: String,
    body: Vec<u8>,
) -> VersionRecord {
    VersionRecord {
        sequence: 0,
        resource_type: SEALED_TYPE.into(),
        id,
        version: number,
        method: crate::store::WriteMethod::Post,
        last_updated: chrono::Utc::now(),
        deleted: false,
        body: Some(body),
        compartment,
        key_id: Some(key_id),
    }
}

/// Seals a job's spec under the tenant's data key: `(key id, ciphertext)`.
///
/// # Errors
/// 503 when the key provider or the database is unavailable; 500 on a serialization bug.
pub async fn seal_spec(
    app: &App,
    scope: &Scope,
    job_id: &str,
    spec: &ExportSpec,
) -> ApiResult<(String, Vec<u8>)> {
    let json = serde_json::to_vec(spec)
        .map_err(|error| ApiError::Internal(format!("export spec: {error}")))?;
    let sealed = app
        .vault
        .seal(scope, None, SEALED_TYPE, job_id, 0, &json)
        .await?;
    Ok((sealed.key_id, sealed.ciphertext))
}

/// Opens a job's spec.
///
/// # Errors
/// 500 when it does not authenticate or parse; 503 when its key cannot be fetched.
pub async fn open_spec(app: &App, scope: &Scope, job: &ExportJobRow) -> ApiResult<ExportSpec> {
    let row = sealed_row(
        job.job_id.clone(),
        0,
        None,
        job.spec_key_id.clone(),
        job.spec.clone(),
    );
    let json = app
        .vault
        .open(scope, &row)
        .await?
        .ok_or_else(|| ApiError::Internal("an export spec has no body".into()))?;
    serde_json::from_slice(&json)
        .map_err(|_| ApiError::Internal("an export spec is not JSON".into()))
}

/// Opens one output chunk of a job: NDJSON lines, each ending in a newline.
///
/// # Errors
/// 500 when it does not authenticate (or its patient was erased); 503 when its key cannot be
/// fetched.
pub async fn open_chunk(
    app: &App,
    scope: &Scope,
    job_id: &str,
    chunk: &ExportChunk,
) -> ApiResult<Vec<u8>> {
    let row = sealed_row(
        chunk_id(job_id, chunk.chunk_no),
        chunk.chunk_no,
        chunk.compartment.clone(),
        chunk.key_id.clone(),
        chunk.body.clone(),
    );
    app.vault
        .open(scope, &row)
        .await?
        .ok_or_else(|| ApiError::Internal("an export chunk has no body".into()))
}

fn chunk_id(job_id: &str, chunk_no: i64) -> String {
    format!("{job_id}/{chunk_no}")
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Starts this node's export worker; it stops when `stop` turns true (shutdown), leaving a
/// running job to its lease.
pub fn start_worker(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let settings = app.settings.export.clone();
    let owner = uuid::Uuid::new_v4().to_string();
    tokio::spawn(async move {
        let idle = Duration::from_millis(settings.poll_ms.max(10));
        loop {
            if *stop.borrow() {
                break;
            }
            if let Err(error) = app.store.sweep_export_jobs(now_us()).await {
                tracing::warn!(error = %error, "export sweep failed");
            }
            let lease = ExportLease {
                tenant: app.settings.tenant.clone(),
                job_id: String::new(),
                owner: owner.clone(),
                until_us: now_us() + lease_micros(&app),
            };
            let claimed = if settings.worker {
                app.store.claim_export_job(&lease, now_us()).await
            } else {
                Ok(None)
            };
            match claimed {
                Ok(Some(job)) => {
                    let lease = ExportLease {
                        job_id: job.job_id.clone(),
                        ..lease
                    };
                    run_job(&app, job, lease, &stop).await;
                    continue;
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(error = %error, "export worker cannot claim a job"),
            }
            tokio::select! {
                () = tokio::time::sleep(idle) => {}
                _ = stop.changed() => {}
            }
        }
    });
}

fn lease_micros(app: &App) -> i64 {
    i64::try_from(app.settings.export.lease_secs.max(1)).unwrap_or(30) * 1_000_000
}

fn retention_micros(app: &App) -> i64 {
    i64::try_from(app.settings.export.retention_secs).unwrap_or(i64::MAX / 4) * 1_000_000
}

/// Why a job stopped before its end.
enum Stop {
    /// Cancelled, taken over, or this node is shutting down: nothing more to do here.
    LeaseLost,
    /// A failure; 503-class ones leave the job to be retried when its lease runs out.
    Failed(ApiError),
}

impl From<ApiError> for Stop {
    fn from(error: ApiError) -> Self {
        Stop::Failed(error)
    }
}

async fn run_job(
    app: &Arc<App>,
    job: ExportJobRow,
    lease: ExportLease,
    stop: &tokio::sync::watch::Receiver<bool>,
) {
    let scope = app.decider.system_scope();
    if job.attempts > app.settings.export.max_attempts {
        finish(
            app,
            &lease,
            "failed",
            Some("the export was interrupted too often"),
        )
        .await;
        return;
    }
    let outcome = match open_spec(app, &scope, &job).await {
        Ok(spec) => {
            let mut run = JobRun {
                app,
                principal: Arc::new(spec.requester.clone()),
                spec,
                lease,
                stop,
                next_chunk: 0,
                pending: BTreeMap::new(),
                pending_lines: 0,
            };
            let result = run.run().await;
            (result, run.lease)
        }
        Err(error) => (Err(Stop::Failed(error)), lease),
    };
    match outcome {
        (Ok(()), lease) => finish(app, &lease, "completed", None).await,
        (Err(Stop::LeaseLost), _) => {}
        (Err(Stop::Failed(ApiError::Unavailable(detail))), _) => {
            // Left running: when the lease runs out, a worker takes the job again.
            tracing::warn!(detail = %detail, "export job paused: a dependency is unavailable");
        }
        (Err(Stop::Failed(error)), lease) => {
            tracing::error!(error = %error, "export job failed");
            finish(
                app,
                &lease,
                "failed",
                Some("the export failed on the server"),
            )
            .await;
        }
    }
}

async fn finish(app: &App, lease: &ExportLease, status: &str, error: Option<&str>) {
    let expires_us = now_us().saturating_add(retention_micros(app));
    if let Err(error) = app
        .store
        .finish_export_job(lease, status, error, expires_us)
        .await
    {
        tracing::warn!(error = %error, "cannot record the end of an export job");
    }
}

/// One run of one job.
struct JobRun<'a> {
    app: &'a Arc<App>,
    principal: Arc<Principal>,
    spec: ExportSpec,
    lease: ExportLease,
    stop: &'a tokio::sync::watch::Receiver<bool>,
    next_chunk: i64,
    /// Lines not yet sealed, by (type, compartment).
    pending: BTreeMap<(String, Option<String>), Vec<u8>>,
    pending_lines: usize,
}

impl JobRun<'_> {
    async fn run(&mut self) -> Result<(), Stop> {
        match self.spec.level.clone() {
            Level::System => self.export_system().await?,
            Level::Patient => {
                let patients = match self.principal.own_patient() {
                    // A data subject (or a caller launched for one patient) exports one
                    // compartment.
                    Some(own) => vec![own.to_string()],
                    None => self.all_patients().await?,
                };
                self.export_patients(&patients).await?;
            }
            Level::Group { patients } => self.export_patients(&patients).await?,
        }
        self.flush().await
    }

    fn wants(&self, resource_type: &str) -> bool {
        self.spec.types.is_empty() || self.spec.types.iter().any(|wanted| wanted == resource_type)
    }

    fn recent_enough(&self, record: &VersionRecord) -> bool {
        self.spec
            .since_us
            .is_none_or(|since| record.last_updated.timestamp_micros() > since)
    }

    /// The requester's permit to search `resource_type`, or `None` when they may not.
    async fn permit(&self, resource_type: &str) -> Result<Option<Permit>, Stop> {
        match self
            .app
            .decide(&self.principal, Interaction::Search, Some(resource_type))
            .await
        {
            Ok(permit) => Ok(Some(permit)),
            Err(ApiError::Forbidden(_)) => Ok(None),
            Err(error) => Err(Stop::Failed(error)),
        }
    }

    async fn export_system(&mut self) -> Result<(), Stop> {
        let types: Vec<String> = if self.spec.types.is_empty() {
            crate::fhir::capability::served_resource_types()
                .map(str::to_string)
                .collect()
        } else {
            self.spec.types.clone()
        };
        let batch = self.app.settings.export.batch_size.max(1);
        for resource_type in types {
            let mut after: Option<String> = None;
            loop {
                // A fresh permit per batch: its consent reads are this batch's.
                let Some(permit) = self.permit(&resource_type).await? else {
                    break;
                };
                let page = self
                    .app
                    .store
                    .current_of_type(permit.scope(), &resource_type, after.as_deref(), batch)
                    .await
                    .map_err(ApiError::from)?;
                let Some(last) = page.last() else {
                    break;
                };
                after = Some(last.id.clone());
                let full = page.len() == batch;
                for record in page {
                    self.add_visible(&permit, record).await?;
                }
                self.flush_if_due(batch).await?;
                if !full {
                    break;
                }
            }
        }
        Ok(())
    }

    async fn all_patients(&self) -> Result<Vec<String>, Stop> {
        let scope = self.app.decider.system_scope();
        let mut patients = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .app
                .store
                .current_of_type(&scope, "Patient", after.as_deref(), 1000)
                .await
                .map_err(ApiError::from)?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some(last.id.clone());
            let full = page.len() == 1000;
            patients.extend(page.into_iter().map(|record| record.id));
            if !full {
                break;
            }
        }
        Ok(patients)
    }

    async fn export_patients(&mut self, patients: &[String]) -> Result<(), Stop> {
        let batch = self.app.settings.export.batch_size.max(1);
        let mut permits: BTreeMap<String, Option<Permit>> = BTreeMap::new();
        for patient in patients {
            let scope = self.app.decider.system_scope();
            let compartment = self
                .app
                .store
                .compartment_pseudonym(&scope, patient)
                .await
                .map_err(ApiError::from)?;
            let records = self
                .app
                .store
                .current_in_compartment(&scope, &compartment)
                .await
                .map_err(ApiError::from)?;
            for record in records {
                if !self.wants(&record.resource_type) {
                    continue;
                }
                if !permits.contains_key(&record.resource_type) {
                    let permit = self.permit(&record.resource_type).await?;
                    permits.insert(record.resource_type.clone(), permit);
                }
                if let Some(Some(permit)) = permits.get(&record.resource_type) {
                    let permit = permit.clone();
                    self.add_visible(&permit, record).await?;
                }
            }
            if self.principal.own_patient() == Some(patient.as_str())
                && matches!(self.spec.level, Level::Patient)
                && self.wants("AuditEvent")
            {
                self.add_disclosures(&compartment).await?;
            }
            let lease_half_gone = now_us() > self.lease.until_us - lease_micros(self.app) / 2;
            if self.pending_lines >= batch || lease_half_gone {
                self.flush().await?;
                tokio::task::yield_now().await;
                // New permits for the next batch: consent read afresh.
                permits.clear();
            }
        }
        Ok(())
    }

    /// The record of who accessed the data subject's compartment (the disclosure report), as
    /// AuditEvent lines sealed under the subject's own key.
    async fn add_disclosures(&mut self, compartment: &str) -> Result<(), Stop> {
        let scope = self.app.decider.system_scope();
        let query = AuditQuery {
            patient: Some(compartment.to_string()),
            exclude_interaction: Some("login".into()),
            limit: MAX_DISCLOSURES,
            ..AuditQuery::default()
        };
        let records = self
            .app
            .store
            .search_audit(&scope, &query)
            .await
            .map_err(ApiError::from)?;
        for stored in &records {
            let Some(event) = self.app.audit_event_of(stored) else {
                continue;
            };
            let line = serde_json::to_vec(&event)
                .map_err(|error| ApiError::Internal(format!("AuditEvent: {error}")))?;
            self.push_line("AuditEvent", Some(compartment.to_string()), &line);
        }
        Ok(())
    }

    async fn add_visible(&mut self, permit: &Permit, record: VersionRecord) -> Result<(), Stop> {
        if !self.recent_enough(&record) {
            return Ok(());
        }
        if let Some(record) = self.app.open_visible(permit, record).await? {
            if let Some(body) = &record.body {
                let key = (record.resource_type.clone(), record.compartment.clone());
                let line = self.pending.entry(key).or_default();
                line.extend_from_slice(body);
                line.push(b'\n');
                self.pending_lines += 1;
            }
        }
        Ok(())
    }

    fn push_line(&mut self, resource_type: &str, compartment: Option<String>, line: &[u8]) {
        let lines = self
            .pending
            .entry((resource_type.to_string(), compartment))
            .or_default();
        lines.extend_from_slice(line);
        lines.push(b'\n');
        self.pending_lines += 1;
    }

    async fn flush_if_due(&mut self, batch: usize) -> Result<(), Stop> {
        // A batch that found little to export still renews the lease before half of it is gone.
        let lease_half_gone = now_us() > self.lease.until_us - lease_micros(self.app) / 2;
        if self.pending_lines >= batch || lease_half_gone {
            self.flush().await?;
        }
        // Between batches, the API's requests go first.
        tokio::task::yield_now().await;
        Ok(())
    }

    /// Seals the pending lines (one chunk per type and compartment) and stores them, renewing
    /// the lease; stops when the lease is gone or the node is shutting down.
    async fn flush(&mut self) -> Result<(), Stop> {
        if *self.stop.borrow() {
            return Err(Stop::LeaseLost);
        }
        let scope = self.app.decider.system_scope();
        let mut chunks = Vec::with_capacity(self.pending.len());
        for ((resource_type, compartment), lines) in std::mem::take(&mut self.pending) {
            let line_count = lines.iter().filter(|&&byte| byte == b'\n').count();
            let chunk_no = self.next_chunk;
            self.next_chunk += 1;
            let sealed = self
                .app
                .vault
                .seal(
                    &scope,
                    compartment.as_deref(),
                    SEALED_TYPE,
                    &chunk_id(&self.lease.job_id, chunk_no),
                    chunk_no,
                    &lines,
                )
                .await
                .map_err(ApiError::from)?;
            chunks.push(ExportChunk {
                chunk_no,
                resource_type,
                compartment,
                key_id: sealed.key_id,
                line_count: i64::try_from(line_count).unwrap_or(i64::MAX),
                body: sealed.ciphertext,
            });
        }
        self.pending_lines = 0;
        self.lease.until_us = now_us() + lease_micros(self.app);
        let held = self
            .app
            .store
            .append_export_chunks(&self.lease, &chunks)
            .await
            .map_err(ApiError::from)?;
        if held {
            Ok(())
        } else {
            Err(Stop::LeaseLost)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::principal::Emergency;
    use crate::authz::scopes::Scopes;

    fn principal(issuer: &str, subject: &str) -> Principal {
        Principal {
            subject: subject.into(),
            client_id: None,
            issuer: issuer.into(),
            fhir_user: None,
            roles: vec!["ehr-system".into()],
            scopes: Scopes::parse("system/*.rs").0,
            patient: None,
            tenant: None,
            purpose_of_use: None,
            expires_at: 0,
            emergency: Some(Emergency {
                session_id: "s".into(),
                expires_us: i64::MAX,
            }),
        }
    }

    #[test]
    fn the_requester_is_tenant_issuer_and_subject() {
        let owner = requester_of("t", &principal("https://idp", "alice"));
        assert_eq!(owner, requester_of("t", &principal("https://idp", "alice")));
        assert_ne!(owner, requester_of("t", &principal("https://idp", "bob")));
        assert_ne!(
            owner,
            requester_of("t", &principal("https://other", "alice"))
        );
        assert_ne!(owner, requester_of("u", &principal("https://idp", "alice")));
        // Length-prefixed: moving a character across the boundary changes the hash.
        assert_ne!(
            requester_of("t", &principal("https://idp/", "x")),
            requester_of("t", &principal("https://idp", "/x"))
        );
    }

    #[test]
    fn a_stored_requester_keeps_its_claims_but_never_an_emergency() {
        let spec = ExportSpec {
            requester: principal("https://idp", "alice"),
            request_url: "http://x/$export".into(),
            level: Level::Group {
                patients: vec!["p1".into()],
            },
            types: vec!["Observation".into()],
            since_us: Some(5),
        };
        let stored: ExportSpec =
            serde_json::from_slice(&serde_json::to_vec(&spec).unwrap()).unwrap();
        assert_eq!(stored.requester.subject, "alice");
        assert_eq!(stored.requester.scopes, spec.requester.scopes);
        assert!(stored.requester.emergency.is_none());
        assert_eq!(stored.level, spec.level);
    }
}
