//! Storage of resource versions behind one trait, with one SQL implementation that serves both
//! SQLite (the embedded default) and PostgreSQL; the shared integration suite runs on both.
//!
//! The store keeps bytes it does not interpret: the API layer builds each version's body (meta
//! included) before it is written, so that the body can be sealed by the envelope encryption
//! before it reaches the database. Every row carries what later layers need without reading the
//! body: tenant, type, id, version, last-updated time, deleted flag, the patient compartment
//! (a random pseudonym, never a name or a patient id of the client's choosing) and the id of the
//! data key that sealed the body.
//!
//! Concurrency is optimistic: a write states the version it expects to replace, and the
//! conditional update of the head row decides, atomically on both backends, which of two racing
//! writers wins. The loser gets [`StoreError::VersionConflict`].

mod sql;

pub use sql::{HeldConnection, SqlStore, AUDIT_IDLE_CHECK};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

/// The tenant a store call serves. Every store method takes it first, and outside this crate
/// the only way to get one is an authorization `Permit` (`authz::decision`): storage cannot be
/// reached without a decision.
#[derive(Debug, Clone)]
pub struct Scope {
    tenant: String,
}

impl Scope {
    /// A scope for the server's own work (the decision point, CLI commands). Crate-internal so
    /// that request handlers cannot make one without a permit.
    pub(crate) fn system(tenant: &str) -> Scope {
        Scope {
            tenant: tenant.to_string(),
        }
    }

    /// The tenant whose rows may be touched.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The head moved since the caller read it: another writer won.
    #[error("version conflict")]
    VersionConflict,
    /// The database cannot be reached or timed out; the client may retry (503).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a bug or a broken invariant (500).
    #[error("database error: {0}")]
    Internal(String),
}

/// `Result` with [`StoreError`] as the default error.
pub type StoreResult<T, E = StoreError> = Result<T, E>;

/// What a write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// No resource of this type and id has ever existed.
    Absent,
    /// The current version is this one (deleted or not).
    Version(i64),
}

/// The HTTP verb recorded with a version, for history `request.method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMethod {
    Post,
    Put,
    Delete,
}

impl WriteMethod {
    /// As stored and as written in a history Bundle.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteMethod::Post => "POST",
            WriteMethod::Put => "PUT",
            WriteMethod::Delete => "DELETE",
        }
    }

    fn parse(text: &str) -> StoreResult<Self> {
        match text {
            "POST" => Ok(WriteMethod::Post),
            "PUT" => Ok(WriteMethod::Put),
            "DELETE" => Ok(WriteMethod::Delete),
            other => Err(StoreError::Internal(format!(
                "unknown method {other:?} in row"
            ))),
        }
    }
}

/// One new version to store.
#[derive(Debug, Clone)]
pub struct VersionWrite {
    pub resource_type: String,
    pub id: String,
    /// The version this write creates (`expected + 1`, or 1).
    pub version: i64,
    pub expected: Expected,
    pub method: WriteMethod,
    pub last_updated: DateTime<Utc>,
    /// The resource as stored; `None` for a deletion.
    pub body: Option<Vec<u8>>,
    /// The pseudonym of the patient compartment holding this resource, if any
    /// ([`Store::compartment_pseudonym`]).
    pub compartment: Option<String>,
    /// The data key that sealed `body`; `None` only for a deletion (no body).
    pub key_id: Option<String>,
    /// The request's audit record, appended in the same transaction as the data.
    pub audit: Option<AuditEntry>,
    /// The claim of a conditional create (a keyed hash of its type and criteria), taken in the
    /// same transaction; a live claim by another writer fails the write with
    /// [`StoreError::VersionConflict`].
    pub claim: Option<String>,
    /// The search index rows of this version; they replace the resource's previous rows in the
    /// same transaction (a deletion has none, so its rows go).
    pub index: IndexRows,
}

/// How long a conditional-create claim blocks another create with the same criteria (see
/// `migrations/*/0005_conditional_claims.sql`).
pub const CLAIM_LIFETIME_MICROS: i64 = 60_000_000;

/// The search index rows of one resource version (see `migrations/*/0004_search.sql`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IndexRows {
    /// `(parameter, term)`: tokens, references, uris, strings and blinded values.
    pub terms: Vec<(String, String)>,
    /// `(parameter, low, high)`: a date range in microseconds since the epoch.
    pub dates: Vec<(String, i64, i64)>,
    /// `(parameter, low, high)`: the precision range of a number or quantity.
    pub numbers: Vec<(String, f64, f64)>,
}

/// The index rows rebuilt from one stored version (see [`Store::replace_index`]).
#[derive(Debug, Clone)]
pub struct RebuiltIndex {
    pub resource_type: String,
    pub id: String,
    /// The version the rows were computed from.
    pub version: i64,
    pub index: IndexRows,
}

/// Bounds on a stored range `[low, high)`; every bound given must hold.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RangeBounds<T> {
    pub low_at_least: Option<T>,
    pub low_below: Option<T>,
    pub high_above: Option<T>,
    pub high_at_most: Option<T>,
}

/// One narrowing condition of a candidate query. Each is a superset of what it stands for:
/// the engine re-checks every candidate on the decrypted resource.
#[derive(Debug, Clone, PartialEq)]
pub enum CandidateFilter {
    /// The resource id is one of these.
    Ids(Vec<String>),
    /// The parameter has one of these terms.
    Terms { param: String, terms: Vec<String> },
    /// The parameter has a term starting with one of these (plaintext strings and uris).
    TermPrefixes {
        param: String,
        prefixes: Vec<String>,
    },
    /// The parameter has a date range within one of these bounds.
    Dates {
        param: String,
        any_of: Vec<RangeBounds<i64>>,
    },
    /// The parameter has a number range within one of these bounds.
    Numbers {
        param: String,
        any_of: Vec<RangeBounds<f64>>,
    },
    /// The parameter has no value at all (`:missing=true`): no row of it in any index table.
    Missing { param: String },
    /// The parameter has a value (`:missing=false`): a row of it in some index table.
    Present { param: String },
}

/// What the keys of [`Store::first_candidate_each`] are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EachKey {
    /// A term of this parameter (in `search_terms`).
    Term { param: String },
    /// The resource id.
    Id,
}

/// Candidates of a search: current, not deleted resources of the given types (all types when
/// empty) that pass every filter, in (type, id) order, after a keyset position.
#[derive(Debug, Clone, Default)]
pub struct CandidateQuery {
    pub resource_types: Vec<String>,
    /// Narrowest expected first: the first filter drives the query (its index rows lead to the
    /// heads), the others are probed per candidate; an id list pins the heads down by itself.
    pub filters: Vec<CandidateFilter>,
    pub after: Option<(String, String)>,
    pub limit: usize,
}

/// A data key as stored: wrapped by a KEK, never in clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDataKey {
    pub key_id: String,
    pub tenant: String,
    /// The compartment pseudonym; `None` for the tenant's key.
    pub compartment: Option<String>,
    pub kek_id: String,
    pub wrapped: Vec<u8>,
}

/// The current Consent versions of one patient compartment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompartmentConsents {
    pub compartment: String,
    /// `(resource id, version)`, sorted.
    pub versions: Vec<(String, i64)>,
}

/// One stored version, as read back.
#[derive(Debug, Clone)]
pub struct VersionRecord {
    /// Global write order; history paging keys on it.
    pub sequence: i64,
    pub resource_type: String,
    pub id: String,
    pub version: i64,
    pub method: WriteMethod,
    pub last_updated: DateTime<Utc>,
    pub deleted: bool,
    pub body: Option<Vec<u8>>,
    /// The patient compartment pseudonym (not the patient's id).
    pub compartment: Option<String>,
    pub key_id: Option<String>,
}

/// One audit record to append. `record` is the canonical JSON of the audit record (no PHI);
/// the other fields are copies of some of its values, kept as columns for the compliance
/// queries.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub tenant: String,
    pub recorded_us: i64,
    pub interaction: String,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub outcome: i64,
    /// The agent's token subject.
    pub agent: Option<String>,
    /// The patient compartment pseudonym.
    pub patient: Option<String>,
    pub record: Vec<u8>,
}

/// A stored audit record.
#[derive(Debug, Clone)]
pub struct StoredAudit {
    pub sequence: i64,
    pub record: Vec<u8>,
    pub leaf_hash: Vec<u8>,
}

/// A signed checkpoint of the audit Merkle tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub tree_size: i64,
    pub root_hash: Vec<u8>,
    pub signed_us: i64,
    pub key_id: String,
    pub signature: Vec<u8>,
}

/// A break-the-glass session: the time box an access token's first emergency override opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakGlassSession {
    pub tenant: String,
    pub session_id: String,
    /// SHA-256 (hex) of the access token: the session belongs to one token, never stored.
    pub token_hash: String,
    pub subject: String,
    pub fhir_user: Option<String>,
    /// The caller's roles, comma-separated.
    pub roles: String,
    pub opened_us: i64,
    pub expires_us: i64,
    /// The stated reason, sealed (it may name a patient).
    pub reason: Vec<u8>,
}

/// A compliance review of a break-the-glass session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakGlassReview {
    pub tenant: String,
    pub session_id: String,
    pub reviewed_us: i64,
    pub reviewer: String,
    /// `justified`, `unjustified` or `needs-follow-up`.
    pub status: String,
    /// The reviewer's note, sealed.
    pub note: Option<Vec<u8>>,
}

/// Filters of the compliance queries over the audit log (all optional, ANDed).
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub patient: Option<String>,
    pub agent: Option<String>,
    pub interaction: Option<String>,
    /// Leave out records of this interaction.
    pub exclude_interaction: Option<String>,
    /// HTTP status range `[outcome_from, outcome_to)`.
    pub outcome_from: Option<i64>,
    pub outcome_to: Option<i64>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub from_us: Option<i64>,
    pub to_us: Option<i64>,
    pub limit: usize,
}

/// Which versions a history request covers.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// Limit to one type (type history) …
    pub resource_type: Option<String>,
    /// … and one id (instance history).
    pub id: Option<String>,
    /// Only versions written at or after this time (`_since`).
    pub since: Option<DateTime<Utc>>,
    /// Only versions written at or before this time (`_at` style upper bound).
    pub until: Option<DateTime<Utc>>,
    /// Only versions in this patient compartment (a patient-confined caller).
    pub compartment: Option<String>,
    /// Paging cursor: only versions with a sequence number below this one.
    pub before_sequence: Option<i64>,
    /// Page size.
    pub limit: usize,
}

/// One page of a patient compartment's current resources (`Patient/$everything`).
#[derive(Debug, Clone, Default)]
pub struct CompartmentQuery {
    /// The compartment pseudonym.
    pub compartment: String,
    /// Only these types (all when empty).
    pub resource_types: Vec<String>,
    /// Only resources whose current version was written at or after this time (`_since`).
    pub since: Option<DateTime<Utc>>,
    /// Keyset position: only resources after this `(type, id)`.
    pub after: Option<(String, String)>,
    pub limit: usize,
}

/// The tombstone of an erased patient compartment: no PHI, only the pseudonym, the ids of the
/// destroyed data keys, how many resources went, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// Position in the `erasures` table (nodes poll for rows after the last one they saw).
    pub erasure_id: i64,
    pub tenant: String,
    pub pseudonym: String,
    pub key_ids: Vec<String>,
    pub resources_erased: i64,
    pub erased_us: i64,
}

/// A legal hold on a patient compartment: erasure is refused while it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegalHold {
    pub pseudonym: String,
    /// An opaque docket or case number (never a name).
    pub case_reference: String,
    pub placed_us: i64,
}

/// What [`Store::erase_compartment`] is asked to do.
#[derive(Debug, Clone)]
pub struct ErasureRequest {
    pub pseudonym: String,
    pub erased_at: DateTime<Utc>,
    /// Refuse (and change nothing) while a legal hold stands. Off only when re-applying an
    /// erasure that already happened (the erasure ledger after a restore).
    pub respect_holds: bool,
    /// The audit record, appended in the erasure's own transaction when anything was erased.
    pub audit: Option<AuditEntry>,
}

/// What an erasure did.
#[derive(Debug, Clone)]
pub enum ErasureOutcome {
    /// Done: the tombstone, and whether this call changed anything (a repeated erasure of an
    /// already erased compartment changes nothing and appends no audit record).
    Erased { tombstone: Tombstone, changed: bool },
    /// Refused: a legal hold stands; nothing was changed.
    Held(LegalHold),
}

/// A Bulk Data export job as stored (see `migrations/*/0008_export.sql`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportJobRow {
    pub tenant: String,
    pub job_id: String,
    /// `queued`, `running`, `completed` or `failed`.
    pub status: String,
    /// SHA-256 (hex) of the requester's issuer and subject.
    pub requester: String,
    /// The kick-off (requester's claims and request), sealed under the tenant's data key.
    pub spec: Vec<u8>,
    pub spec_key_id: String,
    pub transaction_us: i64,
    pub expires_us: i64,
    pub lease_owner: Option<String>,
    pub lease_until_us: Option<i64>,
    /// How many times a worker took the job.
    pub attempts: i64,
    /// Resources written so far.
    pub exported: i64,
    /// Why a failed job failed (a fixed message, never PHI).
    pub error: Option<String>,
}

/// A sealed piece of an export's output: NDJSON lines of one type and one compartment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportChunk {
    pub chunk_no: i64,
    pub resource_type: String,
    pub compartment: Option<String>,
    pub key_id: String,
    pub line_count: i64,
    pub body: Vec<u8>,
}

/// The lease a worker holds on a running job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportLease {
    pub tenant: String,
    pub job_id: String,
    pub owner: String,
    /// Until when the lease runs when renewed now.
    pub until_us: i64,
}

/// The storage operations the API needs. One implementation per SQL dialect family; see
/// [`SqlStore`].
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend_name(&self) -> &'static str;

    /// Checks that the database answers (readiness).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it does not.
    async fn ping(&self) -> StoreResult<()>;

    /// Refreshes the planner's statistics of the resource and search-index tables after a bulk
    /// load, so that the first searches after it get index plans instead of waiting for the
    /// database's own background analysis (PostgreSQL's autovacuum runs about once a minute).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn refresh_statistics(&self) -> StoreResult<()>;

    /// The current version of a resource (which may be a deletion), if it ever existed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn read_current(
        &self,
        scope: &Scope,
        resource_type: &str,
        id: &str,
    ) -> StoreResult<Option<VersionRecord>>;

    /// One specific version of a resource.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn read_version(
        &self,
        scope: &Scope,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> StoreResult<Option<VersionRecord>>;

    /// Writes a new version if the head is still as `write.expected` says, atomically.
    ///
    /// # Errors
    /// [`StoreError::VersionConflict`] when another writer got there first.
    async fn write(&self, scope: &Scope, write: VersionWrite) -> StoreResult<VersionRecord>;

    /// Several version writes and extra audit records (after the writes' own) in one
    /// transaction: all or nothing (transaction bundles). A lost race on any head fails the
    /// whole with [`StoreError::VersionConflict`].
    ///
    /// # Errors
    /// As [`Store::write`].
    async fn write_many(
        &self,
        scope: &Scope,
        writes: Vec<VersionWrite>,
        audit: Vec<AuditEntry>,
    ) -> StoreResult<()>;

    /// Versions newest first, one page.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn history(&self, scope: &Scope, query: &HistoryQuery)
        -> StoreResult<Vec<VersionRecord>>;

    /// Appends audit records in one transaction (no lock: appends from many requests and
    /// processes overlap); returns their record ids. They join the ordered log at the next
    /// [`Store::sequence_pending`].
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`]; then nothing was appended.
    async fn append_audit(&self, entries: &[AuditEntry]) -> StoreResult<Vec<i64>>;

    /// Appends like [`Store::append_audit`], on the connection `held` keeps between calls: a
    /// group-commit writer's own, out of the pool, so that a group costs one round trip
    /// instead of three (sqlx pings a pooled connection when it is acquired and when it is
    /// released). A held connection idle for a second is pinged first; one whose append failed
    /// is dropped, and the next call opens another. The caller must not abandon the call
    /// midway (a writer task runs it to the end). On SQLite the records go to the read-audit
    /// journal beside the database (ids there are journal ids), and the sequencer copies them
    /// into the log before placing them.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`]; then nothing was appended.
    async fn append_audit_held(
        &self,
        held: &mut HeldConnection,
        entries: &[AuditEntry],
    ) -> StoreResult<Vec<i64>>;

    /// Gives committed records not yet in the log the next dense sequence numbers (at most
    /// `limit`), with their leaf hashes; one sequencer at a time across all processes. Returns
    /// how many were placed. It looks at the records above the highest record id placed, and
    /// at the `lookback` ids below it: a transaction still open while later records were
    /// placed commits with a lower id than theirs. With `lookback` 0 it only looks ahead, and
    /// finds nothing new without a write. On SQLite only a pass with a look back (a sweep: the
    /// sequencer's once a second, and [`crate::audit::log::sequence_all`]) first copies the
    /// read-audit journal's records into the log's table.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn sequence_pending(&self, limit: i64, lookback: i64) -> StoreResult<i64>;

    /// How many audit records the ordered log holds.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn audit_size(&self) -> StoreResult<i64>;

    /// Leaf hashes of records `from..from + limit` in sequence order.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn audit_leaves(&self, from: i64, limit: i64) -> StoreResult<Vec<[u8; 32]>>;

    /// Records from sequence `from` on, in sequence order, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn audit_records(&self, from: i64, limit: i64) -> StoreResult<Vec<StoredAudit>>;

    /// Records matching a compliance query, newest first.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn search_audit(
        &self,
        scope: &Scope,
        query: &AuditQuery,
    ) -> StoreResult<Vec<StoredAudit>>;

    /// Stores a checkpoint unless one of that size exists.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn insert_checkpoint(&self, checkpoint: &Checkpoint) -> StoreResult<()>;

    /// The newest checkpoint.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn latest_checkpoint(&self) -> StoreResult<Option<Checkpoint>>;

    /// Checkpoints signed at or after `since_us`, by tree size.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn checkpoints_since(&self, since_us: i64) -> StoreResult<Vec<Checkpoint>>;

    /// The current, not deleted versions of every resource in a patient compartment.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn current_in_compartment(
        &self,
        scope: &Scope,
        compartment: &str,
    ) -> StoreResult<Vec<VersionRecord>>;

    /// The pseudonym of a patient's compartment, created on first use. Pseudonyms are random
    /// UUIDs: the database never links a compartment to a name, and erasure can keep the
    /// pseudonym in the audit while destroying the data.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn compartment_pseudonym(&self, scope: &Scope, patient_id: &str) -> StoreResult<String>;

    /// The data key of a compartment (`None`: the tenant's key), if one was made.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn find_data_key(
        &self,
        scope: &Scope,
        compartment: Option<&str>,
    ) -> StoreResult<Option<StoredDataKey>>;

    /// A data key by its id.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn data_key_by_id(
        &self,
        scope: &Scope,
        key_id: &str,
    ) -> StoreResult<Option<StoredDataKey>>;

    /// Stores a new data key unless the compartment already has one; returns whether it did
    /// (a concurrent request may have won).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn insert_data_key(&self, key: &StoredDataKey) -> StoreResult<bool>;

    /// Every data key of every tenant (rotation, status).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn all_data_keys(&self) -> StoreResult<Vec<StoredDataKey>>;

    /// Replaces a data key's wrapping if it is still wrapped under `old_kek_id`; returns whether
    /// it was.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn rewrap_data_key(
        &self,
        key_id: &str,
        old_kek_id: &str,
        new_kek_id: &str,
        wrapped: &[u8],
    ) -> StoreResult<bool>;

    /// The current, not deleted versions of every resource of a type, in id order, one page
    /// after `after_id`. Used by conditional interactions until the search index exists.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn current_of_type(
        &self,
        scope: &Scope,
        resource_type: &str,
        after_id: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<VersionRecord>>;

    /// Which Consent versions are current (not deleted) in each of these patient compartments:
    /// the consent check asks on every request that touches a compartment, so this is one
    /// indexed query returning one row per compartment, without the bodies (those are read,
    /// with [`Store::read_version`], only for versions not compiled yet).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn current_consent_versions(
        &self,
        scope: &Scope,
        compartments: &[String],
    ) -> StoreResult<Vec<CompartmentConsents>>;

    /// Opens `session` unless the same token already opened one; returns the session in force
    /// for the token (the new one or the earlier one, whose time box is not extended).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn open_break_glass(&self, session: &BreakGlassSession)
        -> StoreResult<BreakGlassSession>;

    /// The break-the-glass sessions opened at or after `since_us`, newest first.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn break_glass_sessions(
        &self,
        tenant: &str,
        since_us: i64,
        limit: usize,
    ) -> StoreResult<Vec<BreakGlassSession>>;

    /// One break-the-glass session by id.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn break_glass_session(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> StoreResult<Option<BreakGlassSession>>;

    /// Records a review; `false` when the session does not exist.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn add_break_glass_review(&self, review: &BreakGlassReview) -> StoreResult<bool>;

    /// Every review of these sessions, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn break_glass_reviews(
        &self,
        tenant: &str,
        session_ids: &[String],
    ) -> StoreResult<Vec<BreakGlassReview>>;

    /// The `(type, id)` of the resources that may match a search (see [`CandidateQuery`]).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn search_candidates(
        &self,
        scope: &Scope,
        query: &CandidateQuery,
    ) -> StoreResult<Vec<(String, String)>>;

    /// For each of `keys`, the first resource (in id order) that [`Store::search_candidates`]
    /// would list for `query` with one more filter: the key as `each` says. One statement
    /// instead of one per key: a chain or `_has` checked per candidate asks this for a whole
    /// page of candidates at once. `query.resource_types` must name exactly one type; its
    /// `after` and `limit` are not used. The answer is aligned with `keys`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn first_candidate_each(
        &self,
        scope: &Scope,
        query: &CandidateQuery,
        each: &EachKey,
        keys: &[String],
    ) -> StoreResult<Vec<Option<String>>>;

    /// How many resources [`Store::search_candidates`] would list for `query`, counted up to
    /// `query.limit` only and in no order, so the database may stop early: a cheap size
    /// estimate for choosing how to evaluate a search.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn count_candidates(&self, scope: &Scope, query: &CandidateQuery) -> StoreResult<usize>;

    /// The resource types the tenant has a resource of (current or deleted), in name order.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn resource_types(&self, scope: &Scope) -> StoreResult<Vec<String>>;

    /// The format the tenant's search index was written in (see
    /// `migrations/*/0010_search_index_format.sql`); `None` when none was recorded.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn index_format(&self, scope: &Scope) -> StoreResult<Option<i64>>;

    /// Records the format the tenant's search index is now written in.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn set_index_format(&self, scope: &Scope, format: i64) -> StoreResult<()>;

    /// Replaces the index rows of these resources in one transaction, each only while its
    /// head is still at the given version (the head row is locked first, as a write does): a
    /// resource written since then already has the rows of its new version. Returns how many
    /// were replaced.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn replace_index(&self, scope: &Scope, rebuilt: Vec<RebuiltIndex>) -> StoreResult<usize>;

    /// The current versions of these resources of one type (deleted ones included, unknown ids
    /// left out), in no particular order.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn read_current_many(
        &self,
        scope: &Scope,
        resource_type: &str,
        ids: &[String],
    ) -> StoreResult<Vec<VersionRecord>>;

    /// The pseudonym of a patient's compartment if one exists (never creates one).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn find_pseudonym(&self, scope: &Scope, patient_id: &str) -> StoreResult<Option<String>>;

    /// One page of the current, not deleted resources of a compartment, in (type, id) order.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn compartment_page(
        &self,
        scope: &Scope,
        query: &CompartmentQuery,
    ) -> StoreResult<Vec<VersionRecord>>;

    /// Erases a patient compartment in one transaction: its data key rows (crypto-shredding),
    /// every version, head and index row of the resources whose current version lies in it,
    /// every other version sealed in it, and the patient id → pseudonym mapping; then writes
    /// the tombstone and the audit record. Idempotent.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`]; then nothing was changed.
    async fn erase_compartment(
        &self,
        scope: &Scope,
        request: &ErasureRequest,
    ) -> StoreResult<ErasureOutcome>;

    /// Tombstones after `after_id` (every tenant), oldest first.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn erasures_after(&self, after_id: i64) -> StoreResult<Vec<Tombstone>>;

    /// The legal hold on a compartment, if one stands.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn legal_hold(&self, scope: &Scope, pseudonym: &str) -> StoreResult<Option<LegalHold>>;

    /// Places a legal hold (replacing the case reference of one that stands).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn place_hold(&self, scope: &Scope, hold: &LegalHold) -> StoreResult<()>;

    /// Releases a legal hold; returns whether one stood.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn release_hold(&self, scope: &Scope, pseudonym: &str) -> StoreResult<bool>;

    /// Every legal hold of the tenant.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn legal_holds(&self, scope: &Scope) -> StoreResult<Vec<LegalHold>>;

    /// Stores a new export job (queued).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn insert_export_job(&self, job: &ExportJobRow) -> StoreResult<()>;

    /// One export job, if it exists.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn export_job(&self, tenant: &str, job_id: &str) -> StoreResult<Option<ExportJobRow>>;

    /// Takes the oldest queued job, or a running one whose lease ran out before `now_us` (its
    /// node stopped), for `lease`; the partial output of a taken-over job is deleted (it restarts
    /// from scratch). A conditional update decides between nodes racing for one job.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn claim_export_job(
        &self,
        lease: &ExportLease,
        now_us: i64,
    ) -> StoreResult<Option<ExportJobRow>>;

    /// Appends output chunks and renews the lease, in one transaction, if the lease is still
    /// held (the job was not cancelled or taken over); returns whether it was.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn append_export_chunks(
        &self,
        lease: &ExportLease,
        chunks: &[ExportChunk],
    ) -> StoreResult<bool>;

    /// Ends a running job held under `lease` as `completed` or `failed` (with a fixed reason),
    /// expiring at `expires_us`; returns whether the lease was still held.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn finish_export_job(
        &self,
        lease: &ExportLease,
        status: &str,
        error: Option<&str>,
        expires_us: i64,
    ) -> StoreResult<bool>;

    /// `(resource type, lines)` of a job's output, by type name.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn export_outputs(&self, tenant: &str, job_id: &str) -> StoreResult<Vec<(String, i64)>>;

    /// A job's chunks of one type, in order, from `after_chunk` on, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn export_chunks(
        &self,
        tenant: &str,
        job_id: &str,
        resource_type: &str,
        after_chunk: i64,
        limit: usize,
    ) -> StoreResult<Vec<ExportChunk>>;

    /// Deletes a job and its output (cancel); returns whether it existed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn delete_export_job(&self, tenant: &str, job_id: &str) -> StoreResult<bool>;

    /// Deletes every job (and its output) that expired before `now_us`; returns how many.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    async fn sweep_export_jobs(&self, now_us: i64) -> StoreResult<u64>;
}
