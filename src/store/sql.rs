//! [`Store`] on SQL through sqlx's `Any` driver: one implementation, one set of statements, for
//! SQLite and PostgreSQL.
//!
//! Why one implementation: the two backends must behave identically, and the statements here are
//! plain SQL both dialects share (`$n` placeholders, which SQLite also reads positionally,
//! `ON CONFLICT … DO NOTHING`, `RETURNING`). What differs lives in the two migration folders
//! (column types, identity columns; later triggers and roles). Flags are stored as integers so
//! that one row decoder reads both.

mod export;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::{
    AuditEntry, AuditQuery, BreakGlassReview, BreakGlassSession, CandidateFilter, CandidateQuery,
    Checkpoint, CompartmentConsents, CompartmentQuery, EachKey, ErasureOutcome, ErasureRequest,
    Expected, ExportChunk, ExportJobRow, ExportLease, HistoryQuery, IndexRows, LegalHold,
    RangeBounds, RebuiltIndex, Scope, Store, StoreError, StoreResult, StoredAudit, StoredDataKey,
    Tombstone, VersionRecord, VersionWrite, WriteMethod,
};

mod erasure;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The SQL dialect behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A connection pool to SQLite or PostgreSQL.
#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    /// SQLite's writer turn in this process (see [`SqlStore::begin`]).
    writer_turn: Arc<tokio::sync::Mutex<()>>,
    /// SQLite: where reads' audit records are committed first (see [`ReadAuditJournal`]);
    /// `None` on PostgreSQL and for an in-memory database.
    read_journal: Option<ReadAuditJournal>,
    /// The statements every new connection runs first (also those made outside the pool).
    session_setup: Arc<[String]>,
}

/// On SQLite, reads' audit records are group-committed to a database file of their own beside
/// the main one (`<database>-read-audit`), and the sequencer copies them into `audit_records`
/// in batches before placing them in the log. A read's record is durable when its journal
/// commit returns, as before. What changes: a journal commit writes a page or two (one table,
/// no index) instead of about 24 (the by-patient index takes a random page per record), it
/// does not queue behind the writes for the main database's one writer, and it does not make
/// every other connection drop its page cache of the main database (SQLite's WAL mode does so
/// after each commit by another connection). Measured in benches/README.md.
///
/// Copying is exactly once across processes and restarts: the copied records, the journal's
/// progress (`audit_journal_progress`, keyed by the journal's random identity, so a journal
/// file created anew starts from zero) and the records' places in the log commit in one
/// transaction of the main database, under its writer lock; the group-commit writer later
/// deletes copied rows from the journal in its own transactions, and ids are never reused
/// (`AUTOINCREMENT`).
///
/// The copy runs once a second, on the sequencer's sweeps (a pass with a look back, see
/// [`Store::sequence_pending`]), not at each of its ten ticks a second: a batch of a second's
/// reads writes each page it touches once (the table's last pages, the by-time and by-agent
/// indexes' ends, the by-patient leaf of each patient read) where ten batches wrote most of
/// them ten times, and the readers drop their page caches once a second instead of ten times.
/// Under the read benchmark, with the larger cache below, that took the copier's CPU per read
/// from about 40 to about 20 µs (benches/README.md). Writes' records, committed to
/// `audit_records` with their data, are still placed at every tick. The copier's page cache
/// holds a whole batch's pages ([`COPIER_CACHE`]), so that the copy does not read back pages it
/// evicted itself.
///
/// The copy is one `INSERT … SELECT` inside SQLite, on a connection of the sequencer's own
/// that has the journal attached: the records never travel to this process and back (through
/// sqlx, every row is a hand-off between threads and every value a bound parameter). That
/// connection begins its transactions `DEFERRED`: `BEGIN IMMEDIATE` would also take the
/// attached journal's write lock, from under the group-commit writer.
#[derive(Clone)]
struct ReadAuditJournal {
    pool: AnyPool,
    /// The journal's file, as `ATTACH` names it.
    file: Arc<str>,
    /// The sequencer's connection to the main database with the journal attached; made on
    /// first use, and again after a failed copy.
    copier: Arc<tokio::sync::Mutex<Option<sqlx::AnyConnection>>>,
    identity: Arc<str>,
    /// The highest journal id this process knows to be copied. The group-commit writer deletes
    /// up to it in its own next transaction: a delete from another connection would take the
    /// journal's write lock from under the writer, which then sleeps in SQLite's busy handler.
    copied_through: Arc<std::sync::atomic::AtomicI64>,
}

/// Journal rows one copy moves at most.
const JOURNAL_COPY_BATCH: i64 = 10_000;

/// The copier connection's page cache (SQLite's `cache_size`, negative: KiB): 64 MiB. A copy of
/// a second's reads touches a few thousand pages; with SQLite's default of 2 MiB the copy read
/// back from the files most of the pages it had just changed (`perf` counted 10,000 `pread`s a
/// second).
const COPIER_CACHE: &str = "PRAGMA cache_size = -65536";

/// Copied rows the writer lets accumulate in the journal before it deletes them.
const JOURNAL_DELETE_EVERY: i64 = 1_000;

/// The file of the read-audit journal beside a SQLite database URL's file; `None` for an
/// in-memory database.
fn read_journal_file(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, parameters) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || parameters.contains("mode=memory") {
        return None;
    }
    Some(format!("{path}-read-audit"))
}

impl ReadAuditJournal {
    /// Opens (creating when missing) the journal in `file`.
    async fn open(file: &str) -> StoreResult<ReadAuditJournal> {
        let pool = AnyPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&format!("sqlite://{file}?mode=rwc"))
            .await
            .map_err(classify)?;
        for statement in [
            "PRAGMA journal_mode = WAL",
            "CREATE TABLE IF NOT EXISTS audit_journal (\
                 journal_id    INTEGER PRIMARY KEY AUTOINCREMENT, \
                 tenant        TEXT    NOT NULL, \
                 recorded_us   INTEGER NOT NULL, \
                 interaction   TEXT    NOT NULL, \
                 resource_type TEXT, \
                 resource_id   TEXT, \
                 outcome       INTEGER NOT NULL, \
                 agent         TEXT, \
                 patient       TEXT, \
                 record        BLOB    NOT NULL)",
            "CREATE TABLE IF NOT EXISTS journal_identity (\
                 id       INTEGER PRIMARY KEY CHECK (id = 1), \
                 identity TEXT    NOT NULL)",
        ] {
            sqlx::query(statement)
                .execute(&pool)
                .await
                .map_err(classify)?;
        }
        sqlx::query("INSERT OR IGNORE INTO journal_identity (id, identity) VALUES (1, $1)")
            .bind(uuid::Uuid::new_v4().to_string())
            .execute(&pool)
            .await
            .map_err(classify)?;
        let identity: String = sqlx::query("SELECT identity FROM journal_identity WHERE id = 1")
            .fetch_one(&pool)
            .await
            .map_err(classify)?
            .try_get(0)
            .map_err(internal)?;
        Ok(ReadAuditJournal {
            pool,
            file: file.into(),
            copier: Arc::default(),
            identity: identity.into(),
            copied_through: Arc::default(),
        })
    }
}

/// PostgreSQL's per-session limit on one statement, in milliseconds (0: none).
fn statement_timeout_statement(milliseconds: u128) -> String {
    format!("SET statement_timeout = {milliseconds}")
}

/// Longest wait for SQLite's writer turn before a write is answered as unavailable (503).
const WRITER_TURN_TIMEOUT: Duration = Duration::from_secs(20);

/// A held connection idle this long is pinged before its next use. Busy, it is not: a pooled
/// connection costs a ping on every acquire and another on every release (sqlx), and for a
/// group-commit writer those are two of its three round trips.
const HELD_CONNECTION_CHECK_AFTER: Duration = Duration::from_secs(1);

/// A connection one audit group-commit writer keeps for its appends, out of the pool (see
/// [`Store::append_audit_held`]). Empty at first; filled on first use, and emptied after a
/// failed append.
pub struct HeldConnection {
    connection: Option<sqlx::AnyConnection>,
    last_used: Instant,
    /// SQLite: the highest journal id this writer has deleted from the read-audit journal.
    journal_deleted_through: i64,
}

impl Default for HeldConnection {
    fn default() -> Self {
        HeldConnection {
            connection: None,
            last_used: Instant::now(),
            journal_deleted_through: 0,
        }
    }
}

const VERSION_COLUMNS: &str =
    "v.sequence, v.resource_type, v.resource_id, v.version_id, v.method, \
     v.last_updated_us, v.deleted, v.compartment, v.key_id, v.body";

impl SqlStore {
    /// Connects to `database_url` (`sqlite://…` or `postgres://…`). For SQLite the file and its
    /// directory are created when missing and the journal is switched to WAL, so that readers
    /// never wait for the writer. On PostgreSQL every connection gets `statement_timeout`
    /// (when given): a request abandoned at its timeout drops its connection, but the server
    /// would otherwise go on running its statement, or waiting for a lock, indefinitely.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached or created.
    pub async fn connect(
        database_url: &SecretString,
        max_connections: u32,
        statement_timeout: Option<Duration>,
    ) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let url = database_url.expose_secret();
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::Internal(
                "database_url must start with sqlite: or postgres:".into(),
            ));
        };
        if backend == Backend::Sqlite {
            create_sqlite_parent_dir(url)?;
        }
        let session_setup: Arc<[String]> = match (backend, statement_timeout) {
            (Backend::Sqlite, _) => [
                // Erasure: deleted rows are overwritten with zeros in the file instead of
                // lingering on free pages until reused.
                "PRAGMA secure_delete = ON",
                // A statement that changes many rows inside a transaction (a batch of audit
                // records, a resource's index rows) first saves every page it changes to a
                // statement journal, so that it alone can be undone. Past 64 KiB SQLite spills
                // that journal to a temporary file: two write calls per page, which were the
                // largest share of all writes under the read benchmark (perf). In memory, the
                // journal lives only as long as its statement.
                "PRAGMA temp_store = MEMORY",
            ]
            .map(String::from)
            .into(),
            (Backend::Postgres, Some(limit)) => {
                [statement_timeout_statement(limit.as_millis())].into()
            }
            (Backend::Postgres, None) => [].into(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .after_connect({
                let session_setup = session_setup.clone();
                move |connection, _| {
                    let session_setup = session_setup.clone();
                    Box::pin(async move { set_up_session(connection, &session_setup).await })
                }
            })
            .connect(url)
            .await
            .map_err(classify)?;
        if backend == Backend::Sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .map_err(classify)?;
        }
        let read_journal = match backend {
            Backend::Sqlite => match read_journal_file(url) {
                Some(journal_file) => Some(ReadAuditJournal::open(&journal_file).await?),
                None => None,
            },
            Backend::Postgres => None,
        };
        Ok(SqlStore {
            pool,
            backend,
            writer_turn: Arc::new(tokio::sync::Mutex::new(())),
            read_journal,
            session_setup,
        })
    }

    /// Applies the backend's pending migrations. On PostgreSQL they run on a connection of
    /// their own without the statement limit (an index built over a large table may take
    /// minutes), which is closed afterwards instead of going back to the pool.
    ///
    /// # Errors
    /// [`StoreError::Internal`] when a migration fails or the database holds migrations this
    /// build does not know.
    pub async fn migrate(&self) -> StoreResult<()> {
        let migration_failed = |error: sqlx::migrate::MigrateError| {
            StoreError::Internal(format!("migration failed: {error}"))
        };
        match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS
                .run(&self.pool)
                .await
                .map_err(migration_failed),
            Backend::Postgres => {
                let mut connection = self.pool.acquire().await.map_err(classify)?.detach();
                sqlx::query(&statement_timeout_statement(0))
                    .execute(&mut connection)
                    .await
                    .map_err(classify)?;
                let applied = POSTGRES_MIGRATIONS
                    .run(&mut connection)
                    .await
                    .map_err(migration_failed);
                let _ = sqlx::Connection::close(connection).await;
                applied
            }
        }
    }

    /// Settings of the PostgreSQL server that break a promise or slow Custodian down, each as a
    /// warning to log at startup (none on SQLite, whose settings Custodian makes itself).
    /// With `fsync`, `synchronous_commit` or `full_page_writes` off, a write (and its audit
    /// record) can be acknowledged and then lost in a crash; with `autovacuum` off the planner's
    /// statistics go stale as tables grow, or never exist on a fresh database, and plans are
    /// chosen blind (searches seconds instead of milliseconds, see the README).
    ///
    /// # Errors
    /// When the settings cannot be read.
    pub async fn server_setting_warnings(&self) -> StoreResult<Vec<String>> {
        if self.backend != Backend::Postgres {
            return Ok(Vec::new());
        }
        const EXPECTED: [(&str, &str, &str); 4] = [
            ("fsync", "on", "acknowledged writes and audit records can be lost in a crash"),
            ("synchronous_commit", "on", "acknowledged writes and audit records can be lost in a crash"),
            ("full_page_writes", "on", "a crash can leave torn pages behind"),
            ("autovacuum", "on", "the planner's statistics go stale as tables grow, and reads and searches slow down; run ANALYZE after bulk loads at least"),
        ];
        let mut warnings = Vec::new();
        for (name, expected, consequence) in EXPECTED {
            let value: String = sqlx::query(&format!("SHOW {name}"))
                .fetch_one(&self.pool)
                .await
                .map_err(classify)?
                .try_get(0)
                .map_err(internal)?;
            // `synchronous_commit` waits for the local flush at every level but `off`.
            let durable_enough =
                value == expected || (name == "synchronous_commit" && value != "off");
            if !durable_enough {
                warnings.push(format!(
                    "PostgreSQL has {name} = {value} (expected {expected}): {consequence}"
                ));
            }
        }
        Ok(warnings)
    }

    /// Closes every connection (graceful shutdown).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// This process's turn to write to SQLite (see [`SqlStore::begin`]); `None` on PostgreSQL,
    /// which has no single writer. Also taken by the autocommit writes a burst of new patients
    /// makes (compartments, data keys), which would otherwise poll against the queue.
    async fn sqlite_writer_turn(&self) -> StoreResult<Option<tokio::sync::OwnedMutexGuard<()>>> {
        match self.backend {
            Backend::Sqlite => {
                tokio::time::timeout(WRITER_TURN_TIMEOUT, self.writer_turn.clone().lock_owned())
                    .await
                    .map(Some)
                    .map_err(|_| {
                        StoreError::Unavailable("timed out waiting to write to SQLite".into())
                    })
            }
            Backend::Postgres => Ok(None),
        }
    }

    /// Begins a write transaction. On SQLite it first takes this process's writer turn, held
    /// (the guard) until the transaction ends: SQLite has one writer at a time, and writers that
    /// wait on its busy timeout poll for the lock in no order, so under a burst of large
    /// transactions one could starve past the timeout (503) while others got through. The
    /// turn queues them first come, first served; the busy timeout remains for other processes
    /// and for the short autocommit writes.
    async fn begin(
        &self,
    ) -> StoreResult<(
        sqlx::Transaction<'static, sqlx::Any>,
        Option<tokio::sync::OwnedMutexGuard<()>>,
    )> {
        let turn = self.sqlite_writer_turn().await?;
        let transaction = self
            .pool
            .begin_with(begin_statement(self.backend))
            .await
            .map_err(classify)?;
        Ok((transaction, turn))
    }

    async fn write_now(&self, scope: &Scope, write: VersionWrite) -> StoreResult<VersionRecord> {
        let (mut transaction, _turn) = self.begin().await?;
        if let Some(key_id) = write.key_id.as_deref() {
            self.lock_data_keys(&mut transaction, scope.tenant(), &[key_id])
                .await?;
        }
        let record = write_in(&mut transaction, scope, write).await?;
        transaction.commit().await.map_err(classify)?;
        Ok(record)
    }

    async fn replace_index_now(
        &self,
        scope: &Scope,
        rebuilt: Vec<RebuiltIndex>,
    ) -> StoreResult<usize> {
        // Grouped by type, at most 256 resources per statement (SQLite binds at most 32,766
        // values).
        let mut by_type: BTreeMap<String, Vec<Vec<RebuiltIndex>>> = BTreeMap::new();
        for entry in rebuilt {
            let groups = by_type.entry(entry.resource_type.clone()).or_default();
            match groups.last_mut() {
                Some(group) if group.len() < 256 => group.push(entry),
                _ => groups.push(vec![entry]),
            }
        }
        let by_type = by_type.into_iter().flat_map(|(resource_type, groups)| {
            groups
                .into_iter()
                .map(move |group| (resource_type.clone(), group))
        });
        let (mut transaction, _turn) = self.begin().await?;
        let mut index = IndexInserts::default();
        for (resource_type, entries) in by_type {
            // Lock the heads as a write does (heads first, then index rows, so the two never
            // wait on each other in opposite orders). A head that moved on belongs to a newer
            // version, whose write replaced the rows itself: it is left alone.
            let pairs: Vec<String> = (0..entries.len())
                .map(|at| {
                    format!(
                        "(resource_id = ${} AND version_id = ${})",
                        3 + 2 * at,
                        4 + 2 * at
                    )
                })
                .collect();
            let statement = format!(
                "UPDATE resource_heads SET version_id = version_id \
                 WHERE tenant = $1 AND resource_type = $2 AND deleted = 0 AND ({}) \
                 RETURNING resource_id",
                pairs.join(" OR ")
            );
            let mut lock = sqlx::query(&statement)
                .bind(scope.tenant())
                .bind(&resource_type);
            for entry in &entries {
                lock = lock.bind(&entry.id).bind(entry.version);
            }
            let locked: HashSet<String> = lock
                .fetch_all(&mut *transaction)
                .await
                .map_err(classify)?
                .iter()
                .map(|row| row.try_get::<String, _>(0).map_err(internal))
                .collect::<StoreResult<_>>()?;
            if locked.is_empty() {
                continue;
            }
            let placeholders: Vec<String> =
                (0..locked.len()).map(|at| format!("${}", 3 + at)).collect();
            for table in INDEX_TABLES {
                let statement = format!(
                    "DELETE FROM {table} WHERE tenant = $1 AND resource_type = $2 \
                     AND resource_id IN ({})",
                    placeholders.join(", ")
                );
                let mut delete = sqlx::query(&statement)
                    .bind(scope.tenant())
                    .bind(&resource_type);
                for id in &locked {
                    delete = delete.bind(id);
                }
                delete.execute(&mut *transaction).await.map_err(classify)?;
            }
            for entry in entries
                .into_iter()
                .filter(|entry| locked.contains(&entry.id))
            {
                index.add(scope, (&resource_type, &entry.id), entry.index);
            }
        }
        let replaced = index.resources;
        index.insert_in(&mut transaction).await?;
        transaction.commit().await.map_err(classify)?;
        Ok(replaced)
    }

    async fn write_many_now(
        &self,
        scope: &Scope,
        writes: Vec<VersionWrite>,
        audit: Vec<AuditEntry>,
    ) -> StoreResult<()> {
        let (mut transaction, _turn) = self.begin().await?;
        let key_ids: Vec<&str> = writes
            .iter()
            .filter_map(|write| write.key_id.as_deref())
            .collect();
        self.lock_data_keys(&mut transaction, scope.tenant(), &key_ids)
            .await?;
        // The entries' audit records, then the bundle's own, in one multi-row insert.
        let mut all_audit = Vec::with_capacity(writes.len() + audit.len());
        write_all_in(&mut transaction, scope, writes, &mut all_audit).await?;
        all_audit.extend(audit);
        if !all_audit.is_empty() {
            append_audit_in(&mut transaction, &all_audit)
                .await
                .map_err(|error| {
                    StoreError::Unavailable(format!("audit append failed: {error}"))
                })?;
        }
        transaction.commit().await.map_err(classify)?;
        Ok(())
    }

    async fn append_audit_now(&self, entries: &[AuditEntry]) -> StoreResult<Vec<i64>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let _turn = self.sqlite_writer_turn().await?;
        let mut connection = self.pool.acquire().await.map_err(classify)?;
        append_audit_on(&mut connection, self.backend, AuditTable::Records, entries).await
    }

    /// The connection `held` keeps, checked with a ping when it has been idle for
    /// [`HELD_CONNECTION_CHECK_AFTER`] (a database restart or a terminated backend leaves it
    /// dead), else a new one taken out of the pool.
    async fn held_connection<'held>(
        &self,
        held: &'held mut HeldConnection,
    ) -> StoreResult<&'held mut sqlx::AnyConnection> {
        let dead = match held.connection.as_mut() {
            Some(connection) => {
                held.last_used.elapsed() >= HELD_CONNECTION_CHECK_AFTER
                    && sqlx::Connection::ping(connection).await.is_err()
            }
            None => false,
        };
        if dead {
            held.connection = None;
        }
        let connection = match held.connection.take() {
            Some(connection) => connection,
            None => {
                let pool = self
                    .read_journal
                    .as_ref()
                    .map_or(&self.pool, |journal| &journal.pool);
                pool.acquire().await.map_err(classify)?.detach()
            }
        };
        Ok(held.connection.insert(connection))
    }

    async fn sequence_pending_now(&self, limit: i64, lookback: i64) -> StoreResult<i64> {
        if let Some(journal) = &self.read_journal {
            return self.copy_and_place(journal, limit, lookback).await;
        }
        if lookback == 0 && !self.records_await_placing().await? {
            return Ok(0);
        }
        let (mut transaction, _turn) = self.begin().await?;
        let next = lock_audit_counter(&mut transaction).await?;
        let count = place_pending_in(&mut transaction, self.backend, next, limit, lookback).await?;
        if count > 0 {
            transaction.commit().await.map_err(classify)?;
        }
        Ok(count)
    }

    /// Whether committed records wait for their place in the log: what an idle tick of the
    /// sequencer asks, answered without a write transaction (which on SQLite would wait for
    /// the writer's turn).
    async fn records_await_placing(&self) -> StoreResult<bool> {
        let new_records: i64 = sqlx::query(AUDIT_IDLE_CHECK)
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?
            .try_get(0)
            .map_err(internal)?;
        Ok(new_records > 0)
    }
}

impl SqlStore {
    /// Copies the read-audit journal's new records into `audit_records` and places every
    /// pending record in the log, in one transaction (exactly once, see [`ReadAuditJournal`]);
    /// the group-commit writer deletes copied records from the journal later.
    async fn copy_and_place(
        &self,
        journal: &ReadAuditJournal,
        limit: i64,
        lookback: i64,
    ) -> StoreResult<i64> {
        // Only a sweep copies (see [`ReadAuditJournal`]); the other ticks place writes' records
        // (a copy through journal id 0 copies nothing).
        let journal_last: i64 = if lookback == 0 {
            if !self.records_await_placing().await? {
                return Ok(0);
            }
            0
        } else {
            sqlx::query("SELECT COALESCE(MAX(journal_id), 0) FROM audit_journal")
                .fetch_one(&journal.pool)
                .await
                .map_err(classify)?
                .try_get(0)
                .map_err(internal)?
        };
        let mut copier = journal.copier.lock().await;
        let _turn = self.sqlite_writer_turn().await?;
        let mut connection = match copier.take() {
            Some(connection) => connection,
            None => self.connect_copier(journal).await?,
        };
        let (count, copied_through) =
            copy_and_place_on(&mut connection, journal, journal_last, limit, lookback).await?;
        // Kept only after a copy that succeeded: a failed one may have broken the connection.
        *copier = Some(connection);
        // Copied now or earlier: the writer deletes them (see `copied_through`).
        journal
            .copied_through
            .fetch_max(copied_through, std::sync::atomic::Ordering::Relaxed);
        Ok(count)
    }

    /// A connection to the main database, set up as the pool's are, with the read-audit
    /// journal attached as `read_journal`.
    async fn connect_copier(&self, journal: &ReadAuditJournal) -> StoreResult<sqlx::AnyConnection> {
        let mut connection = sqlx::ConnectOptions::connect(&*self.pool.connect_options())
            .await
            .map_err(classify)?;
        set_up_session(&mut connection, &self.session_setup)
            .await
            .map_err(classify)?;
        sqlx::query("ATTACH DATABASE $1 AS read_journal")
            .bind(journal.file.as_ref())
            .execute(&mut connection)
            .await
            .map_err(classify)?;
        sqlx::query(COPIER_CACHE)
            .execute(&mut connection)
            .await
            .map_err(classify)?;
        Ok(connection)
    }
}

/// Runs a new connection's session setup statements (see [`SqlStore::connect`]).
async fn set_up_session(
    connection: &mut sqlx::AnyConnection,
    statements: &[String],
) -> Result<(), sqlx::Error> {
    for statement in statements {
        sqlx::query(statement).execute(&mut *connection).await?;
    }
    Ok(())
}

/// The copy and the placement of [`SqlStore::copy_and_place`], on the copier's connection:
/// journal records the main database has not recorded as copied, up to `journal_last` and at
/// most [`JOURNAL_COPY_BATCH`], go into `audit_records` in journal order, the progress moves
/// past them, and pending records take their places, all committed together. Returns how many
/// records were placed and how far the journal is copied now.
async fn copy_and_place_on(
    connection: &mut sqlx::AnyConnection,
    journal: &ReadAuditJournal,
    journal_last: i64,
    limit: i64,
    lookback: i64,
) -> StoreResult<(i64, i64)> {
    // DEFERRED (see [`ReadAuditJournal`]); the first statement writes, so the main database's
    // write lock is taken at once, as `BEGIN IMMEDIATE` would.
    let mut transaction = sqlx::Connection::begin_with(connection, "BEGIN DEFERRED")
        .await
        .map_err(classify)?;
    let next = lock_audit_counter(&mut transaction).await?;
    let progress: i64 = sqlx::query(
        "SELECT COALESCE((SELECT copied_through FROM audit_journal_progress \
                          WHERE journal = $1), 0)",
    )
    .bind(journal.identity.as_ref())
    .fetch_one(&mut *transaction)
    .await
    .map_err(classify)?
    .try_get(0)
    .map_err(internal)?;
    // A batch beyond the main database's progress, not beyond what this process knows: a
    // process that just started knows nothing yet, and would otherwise step through every
    // journal id ever used before it reached the new records.
    let copy_through = journal_last.min(progress + JOURNAL_COPY_BATCH);
    let copies = copy_through > progress;
    if copies {
        sqlx::query(&format!(
            "INSERT INTO audit_records ({AUDIT_COLUMNS}) SELECT {AUDIT_COLUMNS} \
             FROM read_journal.audit_journal WHERE journal_id > $1 AND journal_id <= $2 \
             ORDER BY journal_id"
        ))
        .bind(progress)
        .bind(copy_through)
        .execute(&mut *transaction)
        .await
        .map_err(classify)?;
        sqlx::query(
            "INSERT INTO audit_journal_progress (journal, copied_through) VALUES ($1, $2) \
             ON CONFLICT (journal) DO UPDATE SET copied_through = excluded.copied_through",
        )
        .bind(journal.identity.as_ref())
        .bind(copy_through)
        .execute(&mut *transaction)
        .await
        .map_err(classify)?;
    }
    let count = place_pending_in(&mut transaction, Backend::Sqlite, next, limit, lookback).await?;
    if copies || count > 0 {
        transaction.commit().await.map_err(classify)?;
    } else {
        transaction.rollback().await.map_err(classify)?;
    }
    Ok((count, copy_through.max(progress)))
}

/// Takes the audit counter row's lock, which makes one sequencer at a time across all
/// processes, and returns the next sequence number.
async fn lock_audit_counter(transaction: &mut sqlx::AnyConnection) -> StoreResult<i64> {
    sqlx::query(
        "UPDATE audit_counter SET next_sequence = next_sequence WHERE id = 1 RETURNING next_sequence",
    )
    .fetch_one(&mut *transaction)
    .await
    .map_err(classify)?
    .try_get("next_sequence")
    .map_err(internal)
}

/// Gives pending records their places from `next` on, inside `transaction`, which holds the
/// counter row's lock ([`lock_audit_counter`]) and which its caller commits when this returns
/// more than zero.
async fn place_pending_in(
    transaction: &mut sqlx::AnyConnection,
    backend: Backend,
    next: i64,
    limit: i64,
    lookback: i64,
) -> StoreResult<i64> {
    let highest_placed: i64 = sqlx::query("SELECT COALESCE(MAX(record_id), 0) FROM audit_log")
        .fetch_one(&mut *transaction)
        .await
        .map_err(classify)?
        .try_get(0)
        .map_err(internal)?;
    // Committed records without a place yet, oldest first: those above the highest placed
    // one, and those among the `lookback` ids below it (a transaction that was still open
    // when later records were placed commits with a lower id). Both sides of the anti-join
    // are bounded by the same floor: unbounded, PostgreSQL hashed the whole log on every
    // run (tens of ms at 70,000 records, ten times a second). Not a prepared statement, so
    // that each run is planned for its floor.
    let floor = highest_placed - lookback.max(0);
    let count = match backend {
        Backend::Postgres => place_pending_in_database(transaction, limit, floor, next).await?,
        Backend::Sqlite => place_pending_here(transaction, limit, floor, next).await?,
    };
    if count > 0 {
        sqlx::query("UPDATE audit_counter SET next_sequence = $1 WHERE id = 1")
            .bind(next + count)
            .execute(&mut *transaction)
            .await
            .map_err(classify)?;
    }
    Ok(count)
}

/// Deletes the journal's records up to `copied_through` (copied into the log) and appends
/// `entries` to the journal, in one transaction of the group-commit writer's connection.
async fn delete_copied_and_append(
    connection: &mut sqlx::AnyConnection,
    copied_through: i64,
    entries: &[AuditEntry],
) -> StoreResult<Vec<i64>> {
    let mut transaction =
        sqlx::Connection::begin_with(connection, begin_statement(Backend::Sqlite))
            .await
            .map_err(classify)?;
    sqlx::query("DELETE FROM audit_journal WHERE journal_id <= $1")
        .bind(copied_through)
        .execute(&mut *transaction)
        .await
        .map_err(classify)?;
    let ids = append_audit_rows_in(&mut transaction, AuditTable::ReadJournal, entries).await?;
    transaction.commit().await.map_err(classify)?;
    Ok(ids)
}

/// The records without a place above `floor`, oldest first (at most `limit`): a bounded
/// anti-join, see [`SqlStore::sequence_pending_now`].
const PENDING_RECORDS: &str = "SELECT r.record_id, r.record FROM audit_records r \
     WHERE r.record_id > $2 \
       AND NOT EXISTS (SELECT 1 FROM audit_log l \
                       WHERE l.record_id = r.record_id AND l.record_id > $2) \
     ORDER BY r.record_id LIMIT $1";

/// Places pending records from `next` on, hashing them here: the records travel to this
/// process and their leaves back (SQLite, which has no SHA-256 of its own).
async fn place_pending_here(
    transaction: &mut sqlx::AnyConnection,
    limit: i64,
    floor: i64,
    next: i64,
) -> StoreResult<i64> {
    let pending = sqlx::query(PENDING_RECORDS)
        .bind(limit)
        .bind(floor)
        .persistent(false)
        .fetch_all(&mut *transaction)
        .await
        .map_err(classify)?;
    const ROWS_PER_STATEMENT: usize = 300;
    for (chunk_index, chunk) in pending.chunks(ROWS_PER_STATEMENT).enumerate() {
        let statement = format!(
            "INSERT INTO audit_log (sequence, record_id, leaf_hash) VALUES {}",
            values_placeholders(backend_of(transaction), chunk.len(), 3)
        );
        let mut query = sqlx::query(&statement);
        for (offset, row) in chunk.iter().enumerate() {
            let sequence = next + (chunk_index * ROWS_PER_STATEMENT + offset) as i64;
            let record_id: i64 = row.try_get("record_id").map_err(internal)?;
            let record: Vec<u8> = row.try_get("record").map_err(internal)?;
            let leaf = crate::audit::log::record_leaf(sequence, &record);
            query = query.bind(sequence).bind(record_id).bind(leaf.to_vec());
        }
        query.execute(&mut *transaction).await.map_err(classify)?;
    }
    Ok(pending.len() as i64)
}

/// Places pending records from `next` on in one statement that PostgreSQL runs by itself,
/// computing each leaf as [`crate::audit::log::record_leaf`] does: SHA-256 of 0x00, the
/// sequence number (8 bytes, big-endian: `int8send`) and the record. The records never leave
/// the database, so placing one costs a row read and a row written, not a round trip of its
/// bytes through TLS and the driver both ways.
async fn place_pending_in_database(
    transaction: &mut sqlx::AnyConnection,
    limit: i64,
    floor: i64,
    next: i64,
) -> StoreResult<i64> {
    let statement = format!(
        "WITH pending AS ({PENDING_RECORDS}), \
              numbered AS (SELECT record_id, record, \
                                  $3 + row_number() OVER (ORDER BY record_id) - 1 AS sequence \
                           FROM pending) \
         INSERT INTO audit_log (sequence, record_id, leaf_hash) \
         SELECT sequence, record_id, sha256('\\x00'::bytea || int8send(sequence) || record) \
         FROM numbered"
    );
    let placed = sqlx::query(&statement)
        .bind(limit)
        .bind(floor)
        .bind(next)
        .persistent(false)
        .execute(&mut *transaction)
        .await
        .map_err(classify)?;
    i64::try_from(placed.rows_affected())
        .map_err(|_| StoreError::Internal("placed more records than an i64 counts".into()))
}

/// Whether the audit log has records without a place yet above the highest placed one (1 or
/// 0): the sequencer's tick, ten times a second on every node. It compares the two highest
/// ids, one index probe each. Asked as "a record above the highest placed one", PostgreSQL
/// planned a sequential scan (the bound is a subquery, unknown when planning) that read every
/// placed record on each tick: 11 ms at 150,000 records, a tenth of a core under the search
/// benchmark, and growing with the log.
pub const AUDIT_IDLE_CHECK: &str =
    "SELECT CASE WHEN COALESCE((SELECT MAX(record_id) FROM audit_records), 0) \
                    > COALESCE((SELECT MAX(record_id) FROM audit_log), 0) \
            THEN 1 ELSE 0 END";

/// Runs a transaction's work in its own task, so that a caller that goes away (a client that
/// disconnects mid-request) cannot cancel it halfway: a transaction future dropped between its
/// statements leaves the pooled connection inside a transaction, and every later `BEGIN` on that
/// connection fails. Detached, the work always ends in a commit or a rollback.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = StoreResult<T>> + Send + 'static,
) -> StoreResult<T> {
    tokio::spawn(work)
        .await
        .map_err(|error| StoreError::Internal(format!("database task failed: {error}")))?
}

fn create_sqlite_parent_dir(url: &str) -> StoreResult<()> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:")
        .split('?')
        .next()
        .unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    if let Some(parent) = std::path::Path::new(path).parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|error| {
                StoreError::Unavailable(format!("cannot create the data directory: {error}"))
            })?;
        }
    }
    Ok(())
}

/// Sorts sqlx errors into "retry later" (503) and "bug" (500).
fn classify(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(error.to_string()),
        sqlx::Error::Database(database_error) => {
            let code = database_error.code().unwrap_or_default();
            // SQLite busy/locked; PostgreSQL connection, admin-shutdown and resource classes.
            let transient = matches!(code.as_ref(), "5" | "6" | "517")
                || code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53");
            if database_error.is_unique_violation() {
                StoreError::VersionConflict
            } else if transient {
                StoreError::Unavailable(error.to_string())
            } else {
                StoreError::Internal(error.to_string())
            }
        }
        _ => StoreError::Internal(error.to_string()),
    }
}

const DATA_KEY_COLUMNS: &str = "key_id, tenant, compartment, kek_id, wrapped";

fn decode_data_key(row: &AnyRow) -> StoreResult<StoredDataKey> {
    let get_error = |error: sqlx::Error| StoreError::Internal(format!("bad data key row: {error}"));
    Ok(StoredDataKey {
        key_id: row.try_get("key_id").map_err(get_error)?,
        tenant: row.try_get("tenant").map_err(get_error)?,
        compartment: row.try_get("compartment").map_err(get_error)?,
        kek_id: row.try_get("kek_id").map_err(get_error)?,
        wrapped: row.try_get("wrapped").map_err(get_error)?,
    })
}

/// A column that does not decode: a schema mismatch, reported without the row's values.
fn internal(error: sqlx::Error) -> StoreError {
    StoreError::Internal(format!("bad row: {error}"))
}

fn micros(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros()
}

fn from_micros(value: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(value)
        .ok_or_else(|| StoreError::Internal(format!("timestamp {value} out of range")))
}

fn decode(row: &AnyRow) -> StoreResult<VersionRecord> {
    let get_error = |error: sqlx::Error| StoreError::Internal(format!("bad row: {error}"));
    let method: String = row.try_get("method").map_err(get_error)?;
    Ok(VersionRecord {
        sequence: row.try_get("sequence").map_err(get_error)?,
        resource_type: row.try_get("resource_type").map_err(get_error)?,
        id: row.try_get("resource_id").map_err(get_error)?,
        version: row.try_get("version_id").map_err(get_error)?,
        method: WriteMethod::parse(&method)?,
        last_updated: from_micros(row.try_get("last_updated_us").map_err(get_error)?)?,
        deleted: row.try_get::<i64, _>("deleted").map_err(get_error)? != 0,
        compartment: row.try_get("compartment").map_err(get_error)?,
        key_id: row.try_get("key_id").map_err(get_error)?,
        body: row.try_get("body").map_err(get_error)?,
    })
}

#[async_trait]
impl Store for SqlStore {
    fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(classify)
    }

    async fn refresh_statistics(&self) -> StoreResult<()> {
        // Both backends accept ANALYZE with a table; on PostgreSQL a fresh table's estimates
        // (one row) otherwise lead to nested-loop plans that scan every index entry of a type.
        for table in [
            "resource_heads",
            "search_terms",
            "search_dates",
            "search_numbers",
        ] {
            sqlx::query(&format!("ANALYZE {table}"))
                .execute(&self.pool)
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    async fn read_current(
        &self,
        scope: &Scope,
        resource_type: &str,
        id: &str,
    ) -> StoreResult<Option<VersionRecord>> {
        let statement = format!(
            "SELECT {VERSION_COLUMNS} FROM resource_heads h \
             JOIN resource_versions v ON v.tenant = h.tenant AND v.resource_type = h.resource_type \
              AND v.resource_id = h.resource_id AND v.version_id = h.version_id \
             WHERE h.tenant = $1 AND h.resource_type = $2 AND h.resource_id = $3"
        );
        let row = sqlx::query(&statement)
            .bind(scope.tenant())
            .bind(resource_type)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        row.as_ref().map(decode).transpose()
    }

    async fn read_version(
        &self,
        scope: &Scope,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> StoreResult<Option<VersionRecord>> {
        let statement = format!(
            "SELECT {VERSION_COLUMNS} FROM resource_versions v \
             WHERE v.tenant = $1 AND v.resource_type = $2 AND v.resource_id = $3 AND v.version_id = $4"
        );
        let row = sqlx::query(&statement)
            .bind(scope.tenant())
            .bind(resource_type)
            .bind(id)
            .bind(version)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        row.as_ref().map(decode).transpose()
    }

    async fn write(&self, scope: &Scope, write: VersionWrite) -> StoreResult<VersionRecord> {
        let (store, scope) = (self.clone(), scope.clone());
        detached(async move { store.write_now(&scope, write).await }).await
    }

    async fn history(
        &self,
        scope: &Scope,
        query: &HistoryQuery,
    ) -> StoreResult<Vec<VersionRecord>> {
        let mut conditions = vec!["v.tenant = $1".to_string()];
        let mut next_placeholder = 2;
        let mut placeholder = |condition: &str| {
            let text = condition.replace('?', &format!("${next_placeholder}"));
            next_placeholder += 1;
            text
        };
        if query.resource_type.is_some() {
            conditions.push(placeholder("v.resource_type = ?"));
        }
        if query.id.is_some() {
            conditions.push(placeholder("v.resource_id = ?"));
        }
        if query.since.is_some() {
            conditions.push(placeholder("v.last_updated_us >= ?"));
        }
        if query.until.is_some() {
            conditions.push(placeholder("v.last_updated_us <= ?"));
        }
        if query.compartment.is_some() {
            conditions.push(placeholder("v.compartment = ?"));
        }
        if query.before_sequence.is_some() {
            conditions.push(placeholder("v.sequence < ?"));
        }
        let limit = placeholder("?");
        let statement = format!(
            "SELECT {VERSION_COLUMNS} FROM resource_versions v WHERE {} \
             ORDER BY v.sequence DESC LIMIT {limit}",
            conditions.join(" AND ")
        );
        let mut sql = sqlx::query(&statement).bind(scope.tenant());
        if let Some(resource_type) = &query.resource_type {
            sql = sql.bind(resource_type);
        }
        if let Some(id) = &query.id {
            sql = sql.bind(id);
        }
        if let Some(since) = query.since {
            sql = sql.bind(micros(since));
        }
        if let Some(until) = query.until {
            sql = sql.bind(micros(until));
        }
        if let Some(compartment) = &query.compartment {
            sql = sql.bind(compartment);
        }
        if let Some(before) = query.before_sequence {
            sql = sql.bind(before);
        }
        let rows = sql
            .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.iter().map(decode).collect()
    }

    async fn write_many(
        &self,
        scope: &Scope,
        writes: Vec<VersionWrite>,
        audit: Vec<AuditEntry>,
    ) -> StoreResult<()> {
        let (store, scope) = (self.clone(), scope.clone());
        detached(async move { store.write_many_now(&scope, writes, audit).await }).await
    }

    async fn append_audit(&self, entries: &[AuditEntry]) -> StoreResult<Vec<i64>> {
        let (store, entries) = (self.clone(), entries.to_vec());
        detached(async move { store.append_audit_now(&entries).await }).await
    }

    async fn append_audit_held(
        &self,
        held: &mut HeldConnection,
        entries: &[AuditEntry],
    ) -> StoreResult<Vec<i64>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // The journal has a writer lock of its own: no turn at the main database's.
        let (table, _turn) = match self.read_journal {
            Some(_) => (AuditTable::ReadJournal, None),
            None => (AuditTable::Records, self.sqlite_writer_turn().await?),
        };
        let delete_through = self.read_journal.as_ref().map_or(0, |journal| {
            journal
                .copied_through
                .load(std::sync::atomic::Ordering::Relaxed)
        });
        let delete_copied = delete_through - held.journal_deleted_through >= JOURNAL_DELETE_EVERY;
        let connection = self.held_connection(held).await?;
        let appended = if delete_copied {
            delete_copied_and_append(connection, delete_through, entries).await
        } else {
            append_audit_on(connection, self.backend, table, entries).await
        };
        if appended.is_ok() {
            held.last_used = Instant::now();
            if delete_copied {
                held.journal_deleted_through = delete_through;
            }
        } else {
            // The connection may be broken, or left inside a transaction: the next group takes
            // a new one.
            held.connection = None;
        }
        appended
    }

    async fn sequence_pending(&self, limit: i64, lookback: i64) -> StoreResult<i64> {
        let store = self.clone();
        detached(async move { store.sequence_pending_now(limit, lookback).await }).await
    }

    async fn audit_size(&self) -> StoreResult<i64> {
        let row = sqlx::query("SELECT next_sequence FROM audit_counter WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?;
        row.try_get("next_sequence")
            .map_err(|error| StoreError::Internal(error.to_string()))
    }

    async fn audit_leaves(&self, from: i64, limit: i64) -> StoreResult<Vec<[u8; 32]>> {
        let rows = sqlx::query(
            "SELECT leaf_hash FROM audit_log WHERE sequence >= $1 ORDER BY sequence LIMIT $2",
        )
        .bind(from)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|row| {
                let bytes: Vec<u8> = row
                    .try_get("leaf_hash")
                    .map_err(|error| StoreError::Internal(error.to_string()))?;
                <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| StoreError::Internal("a leaf hash is not 32 bytes".into()))
            })
            .collect()
    }

    async fn audit_records(&self, from: i64, limit: i64) -> StoreResult<Vec<StoredAudit>> {
        let rows = sqlx::query(
            "SELECT l.sequence, r.record, l.leaf_hash FROM audit_log l \
             JOIN audit_records r ON r.record_id = l.record_id \
             WHERE l.sequence >= $1 ORDER BY l.sequence LIMIT $2",
        )
        .bind(from)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(decode_audit).collect()
    }

    async fn search_audit(
        &self,
        scope: &Scope,
        query: &AuditQuery,
    ) -> StoreResult<Vec<StoredAudit>> {
        let mut conditions = vec!["r.tenant = $1".to_string()];
        let mut next = 2;
        let mut add = |condition: &str| {
            conditions.push(condition.replace('?', &format!("${next}")));
            next += 1;
        };
        let texts = [
            ("r.patient = ?", &query.patient),
            ("r.agent = ?", &query.agent),
            ("r.interaction = ?", &query.interaction),
            ("r.interaction <> ?", &query.exclude_interaction),
            ("r.resource_type = ?", &query.resource_type),
            ("r.resource_id = ?", &query.resource_id),
        ];
        for (condition, value) in &texts {
            if value.is_some() {
                add(condition);
            }
        }
        let numbers = [
            ("r.outcome >= ?", query.outcome_from),
            ("r.outcome < ?", query.outcome_to),
            ("r.recorded_us >= ?", query.from_us),
            ("r.recorded_us < ?", query.to_us),
        ];
        for (condition, value) in &numbers {
            if value.is_some() {
                add(condition);
            }
        }
        let statement = format!(
            "SELECT l.sequence, r.record, l.leaf_hash FROM audit_records r \
             JOIN audit_log l ON l.record_id = r.record_id WHERE {} ORDER BY l.sequence DESC LIMIT ${next}",
            conditions.join(" AND ")
        );
        let mut sql = sqlx::query(&statement).bind(scope.tenant());
        for (_, value) in &texts {
            if let Some(value) = value {
                sql = sql.bind(value.as_str());
            }
        }
        for (_, value) in &numbers {
            if let Some(value) = value {
                sql = sql.bind(*value);
            }
        }
        let rows = sql
            .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.iter().map(decode_audit).collect()
    }

    async fn insert_checkpoint(&self, checkpoint: &Checkpoint) -> StoreResult<()> {
        let _turn = self.sqlite_writer_turn().await?;
        sqlx::query(
            "INSERT INTO audit_checkpoints (tree_size, root_hash, signed_us, key_id, signature) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(checkpoint.tree_size)
        .bind(checkpoint.root_hash.as_slice())
        .bind(checkpoint.signed_us)
        .bind(&checkpoint.key_id)
        .bind(checkpoint.signature.as_slice())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn latest_checkpoint(&self) -> StoreResult<Option<Checkpoint>> {
        let row = sqlx::query(
            "SELECT tree_size, root_hash, signed_us, key_id, signature FROM audit_checkpoints \
             ORDER BY tree_size DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        row.as_ref().map(decode_checkpoint).transpose()
    }

    async fn checkpoints_since(&self, since_us: i64) -> StoreResult<Vec<Checkpoint>> {
        let rows = sqlx::query(
            "SELECT tree_size, root_hash, signed_us, key_id, signature FROM audit_checkpoints \
             WHERE signed_us >= $1 ORDER BY tree_size",
        )
        .bind(since_us)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(decode_checkpoint).collect()
    }

    async fn current_in_compartment(
        &self,
        scope: &Scope,
        compartment: &str,
    ) -> StoreResult<Vec<VersionRecord>> {
        // `v.tenant` is stated, not left to the join: SQLite does not carry `h.tenant = $1`
        // over to `v`, and without it the (tenant, compartment) index is unusable and every
        // head of the tenant is walked (seconds per patient at 70,000 resources).
        let statement = format!(
            "SELECT {VERSION_COLUMNS} FROM resource_heads h \
             JOIN resource_versions v ON v.tenant = h.tenant AND v.resource_type = h.resource_type \
              AND v.resource_id = h.resource_id AND v.version_id = h.version_id \
             WHERE h.tenant = $1 AND h.deleted = 0 AND v.tenant = $1 AND v.compartment = $2 \
             ORDER BY v.resource_type, v.resource_id"
        );
        let rows = sqlx::query(&statement)
            .bind(scope.tenant())
            .bind(compartment)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.iter().map(decode).collect()
    }

    async fn compartment_pseudonym(&self, scope: &Scope, patient_id: &str) -> StoreResult<String> {
        let select =
            "SELECT pseudonym FROM patient_compartments WHERE tenant = $1 AND patient_id = $2";
        let existing = sqlx::query(select)
            .bind(scope.tenant())
            .bind(patient_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        if existing.is_none() {
            let _turn = self.sqlite_writer_turn().await?;
            sqlx::query(
                "INSERT INTO patient_compartments (tenant, patient_id, pseudonym) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant, patient_id) DO NOTHING",
            )
            .bind(scope.tenant())
            .bind(patient_id)
            .bind(uuid::Uuid::new_v4().to_string())
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        }
        let row = match existing {
            Some(row) => row,
            // Whoever inserted first (this request or a concurrent one) decided the pseudonym.
            None => sqlx::query(select)
                .bind(scope.tenant())
                .bind(patient_id)
                .fetch_one(&self.pool)
                .await
                .map_err(classify)?,
        };
        row.try_get("pseudonym")
            .map_err(|error| StoreError::Internal(error.to_string()))
    }

    async fn find_data_key(
        &self,
        scope: &Scope,
        compartment: Option<&str>,
    ) -> StoreResult<Option<StoredDataKey>> {
        // `compartment = NULL` is never true in SQL, so the tenant's key needs its own condition.
        let statement = format!(
            "SELECT {DATA_KEY_COLUMNS} FROM data_keys WHERE tenant = $1 AND {}",
            if compartment.is_some() {
                "compartment = $2"
            } else {
                "compartment IS NULL"
            }
        );
        let mut query = sqlx::query(&statement).bind(scope.tenant());
        if let Some(compartment) = compartment {
            query = query.bind(compartment);
        }
        let row = query.fetch_optional(&self.pool).await.map_err(classify)?;
        row.as_ref().map(decode_data_key).transpose()
    }

    async fn data_key_by_id(
        &self,
        scope: &Scope,
        key_id: &str,
    ) -> StoreResult<Option<StoredDataKey>> {
        let row = sqlx::query(&format!(
            "SELECT {DATA_KEY_COLUMNS} FROM data_keys WHERE tenant = $1 AND key_id = $2"
        ))
        .bind(scope.tenant())
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        row.as_ref().map(decode_data_key).transpose()
    }

    async fn insert_data_key(&self, key: &StoredDataKey) -> StoreResult<bool> {
        let _turn = self.sqlite_writer_turn().await?;
        let inserted = sqlx::query(
            "INSERT INTO data_keys (key_id, tenant, compartment, kek_id, wrapped, created_us) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&key.key_id)
        .bind(&key.tenant)
        .bind(key.compartment.as_deref())
        .bind(&key.kek_id)
        .bind(key.wrapped.as_slice())
        .bind(micros(chrono::Utc::now()))
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(inserted.rows_affected() == 1)
    }

    async fn all_data_keys(&self) -> StoreResult<Vec<StoredDataKey>> {
        let rows = sqlx::query(&format!(
            "SELECT {DATA_KEY_COLUMNS} FROM data_keys ORDER BY tenant, key_id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(decode_data_key).collect()
    }

    async fn rewrap_data_key(
        &self,
        key_id: &str,
        old_kek_id: &str,
        new_kek_id: &str,
        wrapped: &[u8],
    ) -> StoreResult<bool> {
        let updated = sqlx::query(
            "UPDATE data_keys SET kek_id = $1, wrapped = $2, rewrapped_us = $3 \
             WHERE key_id = $4 AND kek_id = $5",
        )
        .bind(new_kek_id)
        .bind(wrapped)
        .bind(micros(chrono::Utc::now()))
        .bind(key_id)
        .bind(old_kek_id)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(updated.rows_affected() == 1)
    }

    async fn current_of_type(
        &self,
        scope: &Scope,
        resource_type: &str,
        after_id: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<VersionRecord>> {
        let statement = format!(
            "SELECT {VERSION_COLUMNS} FROM resource_heads h \
             JOIN resource_versions v ON v.tenant = h.tenant AND v.resource_type = h.resource_type \
              AND v.resource_id = h.resource_id AND v.version_id = h.version_id \
             WHERE h.tenant = $1 AND h.resource_type = $2 AND h.deleted = 0 AND h.resource_id > $3 \
             ORDER BY h.resource_id LIMIT $4"
        );
        let rows = sqlx::query(&statement)
            .bind(scope.tenant())
            .bind(resource_type)
            .bind(after_id.unwrap_or(""))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.iter().map(decode).collect()
    }

    async fn count_candidates(&self, scope: &Scope, query: &CandidateQuery) -> StoreResult<usize> {
        let (statement, binds) = candidate_statement(self.backend, scope, query, false);
        let count: i64 = bind_all(
            sqlx::query(&format!("SELECT COUNT(*) FROM ({statement}) c")),
            binds,
        )
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?
        .try_get(0)
        .map_err(internal)?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    async fn search_candidates(
        &self,
        scope: &Scope,
        query: &CandidateQuery,
    ) -> StoreResult<Vec<(String, String)>> {
        let (statement, binds) = candidate_statement(self.backend, scope, query, true);
        let rows = bind_all(sqlx::query(&statement), binds)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("resource_type")
                        .map_err(|error| StoreError::Internal(error.to_string()))?,
                    row.try_get("resource_id")
                        .map_err(|error| StoreError::Internal(error.to_string()))?,
                ))
            })
            .collect()
    }

    async fn first_candidate_each(
        &self,
        scope: &Scope,
        query: &CandidateQuery,
        each: &EachKey,
        keys: &[String],
    ) -> StoreResult<Vec<Option<String>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let (statement, binds) =
            first_candidate_each_statement(self.backend, scope, query, each, keys).ok_or_else(
                || StoreError::Internal("a per-key candidate query must name one type".into()),
            )?;
        let rows = bind_all(sqlx::query(&statement), binds)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        if rows.len() != keys.len() {
            return Err(StoreError::Internal(
                "a per-key candidate query lost a key".into(),
            ));
        }
        rows.iter()
            .map(|row| {
                row.try_get::<Option<String>, _>("resource_id")
                    .map_err(internal)
            })
            .collect()
    }

    async fn current_consent_versions(
        &self,
        scope: &Scope,
        compartments: &[String],
    ) -> StoreResult<Vec<CompartmentConsents>> {
        // One row per compartment, its versions folded into one text ("id version,id
        // version"): on SQLite every row returned is a hand-off between threads, and this runs
        // on every request that touches a patient.
        let fold = match self.backend {
            Backend::Sqlite => "group_concat",
            Backend::Postgres => "string_agg",
        };
        let mut found = Vec::new();
        for chunk in compartments.chunks(MAX_LIST_BINDS) {
            let list = placeholders(2, chunk.len());
            // The type is a literal so that the partial index (0006_consent.sql) applies.
            let statement = format!(
                "SELECT v.compartment, {fold}(v.resource_id || ' ' || CAST(v.version_id AS TEXT), ',') \
                 FROM resource_versions v \
                 JOIN resource_heads h ON h.tenant = v.tenant AND h.resource_type = v.resource_type \
                  AND h.resource_id = v.resource_id AND h.version_id = v.version_id \
                 WHERE v.tenant = $1 AND v.resource_type = 'Consent' AND v.compartment IN ({list}) \
                  AND h.deleted = 0 \
                 GROUP BY v.compartment"
            );
            let mut sql = sqlx::query(&statement).bind(scope.tenant());
            for compartment in chunk {
                sql = sql.bind(compartment.as_str());
            }
            for row in &sql.fetch_all(&self.pool).await.map_err(classify)? {
                let compartment: String = row.try_get(0).map_err(classify)?;
                let folded: String = row.try_get(1).map_err(classify)?;
                found.push(CompartmentConsents {
                    compartment,
                    versions: unfold_versions(&folded)?,
                });
            }
        }
        Ok(found)
    }

    async fn open_break_glass(
        &self,
        session: &BreakGlassSession,
    ) -> StoreResult<BreakGlassSession> {
        sqlx::query(
            "INSERT INTO break_glass_sessions (tenant, session_id, token_hash, subject, fhir_user, \
             roles, opened_us, expires_us, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (tenant, token_hash) DO NOTHING",
        )
        .bind(session.tenant.as_str())
        .bind(session.session_id.as_str())
        .bind(session.token_hash.as_str())
        .bind(session.subject.as_str())
        .bind(session.fhir_user.as_deref())
        .bind(session.roles.as_str())
        .bind(session.opened_us)
        .bind(session.expires_us)
        .bind(session.reason.as_slice())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        let row = sqlx::query(&format!(
            "SELECT {BREAK_GLASS_COLUMNS} FROM break_glass_sessions WHERE tenant = $1 AND token_hash = $2"
        ))
        .bind(session.tenant.as_str())
        .bind(session.token_hash.as_str())
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        decode_break_glass(&row)
    }

    async fn break_glass_sessions(
        &self,
        tenant: &str,
        since_us: i64,
        limit: usize,
    ) -> StoreResult<Vec<BreakGlassSession>> {
        let rows = sqlx::query(&format!(
            "SELECT {BREAK_GLASS_COLUMNS} FROM break_glass_sessions \
             WHERE tenant = $1 AND opened_us >= $2 ORDER BY opened_us DESC, session_id LIMIT $3"
        ))
        .bind(tenant)
        .bind(since_us)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(decode_break_glass).collect()
    }

    async fn break_glass_session(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> StoreResult<Option<BreakGlassSession>> {
        let row = sqlx::query(&format!(
            "SELECT {BREAK_GLASS_COLUMNS} FROM break_glass_sessions WHERE tenant = $1 AND session_id = $2"
        ))
        .bind(tenant)
        .bind(session_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        row.as_ref().map(decode_break_glass).transpose()
    }

    async fn add_break_glass_review(&self, review: &BreakGlassReview) -> StoreResult<bool> {
        let inserted = sqlx::query(
            "INSERT INTO break_glass_reviews (tenant, session_id, reviewed_us, reviewer, status, note) \
             SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS \
             (SELECT 1 FROM break_glass_sessions WHERE tenant = $1 AND session_id = $2)",
        )
        .bind(review.tenant.as_str())
        .bind(review.session_id.as_str())
        .bind(review.reviewed_us)
        .bind(review.reviewer.as_str())
        .bind(review.status.as_str())
        .bind(review.note.as_deref())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(inserted.rows_affected() == 1)
    }

    async fn break_glass_reviews(
        &self,
        tenant: &str,
        session_ids: &[String],
    ) -> StoreResult<Vec<BreakGlassReview>> {
        let mut reviews = Vec::new();
        for chunk in session_ids.chunks(MAX_LIST_BINDS) {
            let list = placeholders(2, chunk.len());
            let statement = format!(
                "SELECT tenant, session_id, reviewed_us, reviewer, status, note FROM break_glass_reviews \
                 WHERE tenant = $1 AND session_id IN ({list}) ORDER BY reviewed_us"
            );
            let mut sql = sqlx::query(&statement).bind(tenant);
            for id in chunk {
                sql = sql.bind(id.as_str());
            }
            for row in &sql.fetch_all(&self.pool).await.map_err(classify)? {
                reviews.push(BreakGlassReview {
                    tenant: row.try_get(0).map_err(internal)?,
                    session_id: row.try_get(1).map_err(internal)?,
                    reviewed_us: row.try_get(2).map_err(internal)?,
                    reviewer: row.try_get(3).map_err(internal)?,
                    status: row.try_get(4).map_err(internal)?,
                    note: row.try_get(5).map_err(internal)?,
                });
            }
        }
        Ok(reviews)
    }

    async fn resource_types(&self, scope: &Scope) -> StoreResult<Vec<String>> {
        let rows = sqlx::query(
            "SELECT DISTINCT resource_type FROM resource_heads WHERE tenant = $1 \
             ORDER BY resource_type",
        )
        .bind(scope.tenant())
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|row| row.try_get::<String, _>(0).map_err(internal))
            .collect()
    }

    async fn index_format(&self, scope: &Scope) -> StoreResult<Option<i64>> {
        let row = sqlx::query("SELECT format FROM search_index_format WHERE tenant = $1")
            .bind(scope.tenant())
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        row.map(|row| row.try_get::<i64, _>(0).map_err(internal))
            .transpose()
    }

    async fn set_index_format(&self, scope: &Scope, format: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO search_index_format (tenant, format) VALUES ($1, $2) \
             ON CONFLICT (tenant) DO UPDATE SET format = excluded.format",
        )
        .bind(scope.tenant())
        .bind(format)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn replace_index(&self, scope: &Scope, rebuilt: Vec<RebuiltIndex>) -> StoreResult<usize> {
        let (store, scope) = (self.clone(), scope.clone());
        detached(async move { store.replace_index_now(&scope, rebuilt).await }).await
    }

    async fn read_current_many(
        &self,
        scope: &Scope,
        resource_type: &str,
        ids: &[String],
    ) -> StoreResult<Vec<VersionRecord>> {
        let mut records = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(MAX_LIST_BINDS) {
            let list = placeholders(3, chunk.len());
            let statement = format!(
                "SELECT {VERSION_COLUMNS} FROM resource_heads h \
                 JOIN resource_versions v ON v.tenant = h.tenant AND v.resource_type = h.resource_type \
                  AND v.resource_id = h.resource_id AND v.version_id = h.version_id \
                 WHERE h.tenant = $1 AND h.resource_type = $2 AND h.resource_id IN ({list})"
            );
            let mut sql = sqlx::query(&statement)
                .bind(scope.tenant())
                .bind(resource_type);
            for id in chunk {
                sql = sql.bind(id.as_str());
            }
            let rows = sql.fetch_all(&self.pool).await.map_err(classify)?;
            for row in &rows {
                records.push(decode(row)?);
            }
        }
        Ok(records)
    }

    async fn find_pseudonym(&self, scope: &Scope, patient_id: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query(
            "SELECT pseudonym FROM patient_compartments WHERE tenant = $1 AND patient_id = $2",
        )
        .bind(scope.tenant())
        .bind(patient_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        row.map(|row| row.try_get("pseudonym"))
            .transpose()
            .map_err(|error| StoreError::Internal(error.to_string()))
    }

    async fn compartment_page(
        &self,
        scope: &Scope,
        query: &CompartmentQuery,
    ) -> StoreResult<Vec<VersionRecord>> {
        self.compartment_page_now(scope, query).await
    }

    async fn erase_compartment(
        &self,
        scope: &Scope,
        request: &ErasureRequest,
    ) -> StoreResult<ErasureOutcome> {
        let (store, scope, request) = (self.clone(), scope.clone(), request.clone());
        detached(async move { store.erase_now(&scope, &request).await }).await
    }

    async fn erasures_after(&self, after_id: i64) -> StoreResult<Vec<Tombstone>> {
        self.erasures_after_now(after_id).await
    }

    async fn legal_hold(&self, scope: &Scope, pseudonym: &str) -> StoreResult<Option<LegalHold>> {
        self.legal_hold_now(scope, pseudonym).await
    }

    async fn place_hold(&self, scope: &Scope, hold: &LegalHold) -> StoreResult<()> {
        self.place_hold_now(scope, hold).await
    }

    async fn release_hold(&self, scope: &Scope, pseudonym: &str) -> StoreResult<bool> {
        self.release_hold_now(scope, pseudonym).await
    }

    async fn legal_holds(&self, scope: &Scope) -> StoreResult<Vec<LegalHold>> {
        self.legal_holds_now(scope).await
    }

    async fn insert_export_job(&self, job: &ExportJobRow) -> StoreResult<()> {
        export::insert_job(self, job).await
    }

    async fn export_job(&self, tenant: &str, job_id: &str) -> StoreResult<Option<ExportJobRow>> {
        export::job(self, tenant, job_id).await
    }

    async fn claim_export_job(
        &self,
        lease: &ExportLease,
        now_us: i64,
    ) -> StoreResult<Option<ExportJobRow>> {
        export::claim_job(self, lease, now_us).await
    }

    async fn append_export_chunks(
        &self,
        lease: &ExportLease,
        chunks: &[ExportChunk],
    ) -> StoreResult<bool> {
        export::append_chunks(self, lease, chunks).await
    }

    async fn finish_export_job(
        &self,
        lease: &ExportLease,
        status: &str,
        error: Option<&str>,
        expires_us: i64,
    ) -> StoreResult<bool> {
        export::finish_job(self, lease, status, error, expires_us).await
    }

    async fn export_outputs(&self, tenant: &str, job_id: &str) -> StoreResult<Vec<(String, i64)>> {
        export::outputs(self, tenant, job_id).await
    }

    async fn export_chunks(
        &self,
        tenant: &str,
        job_id: &str,
        resource_type: &str,
        after_chunk: i64,
        limit: usize,
    ) -> StoreResult<Vec<ExportChunk>> {
        export::chunks(self, tenant, job_id, resource_type, after_chunk, limit).await
    }

    async fn delete_export_job(&self, tenant: &str, job_id: &str) -> StoreResult<bool> {
        export::delete_job(self, tenant, job_id).await
    }

    async fn sweep_export_jobs(&self, now_us: i64) -> StoreResult<u64> {
        export::sweep(self, now_us).await
    }
}

/// One version write inside an open transaction: the head (which decides races), the version
/// row, its index rows and its audit record.
async fn write_in(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    scope: &Scope,
    write: VersionWrite,
) -> StoreResult<VersionRecord> {
    let deleted = i64::from(write.body.is_none());
    match write.expected {
        Expected::Absent => {
            let head = vec![head_row(scope, &write)];
            if insert_rows(transaction, HEADS, head, ABSENT_ONLY).await? != 1 {
                return Err(StoreError::VersionConflict);
            }
        }
        Expected::Version(current) => advance_head_in(transaction, scope, &write, current).await?,
    }
    claim_in(transaction, scope, &write).await?;
    let compartment = write.compartment;
    let inserted = sqlx::query(
        "INSERT INTO resource_versions (tenant, resource_type, resource_id, version_id, method, \
               last_updated_us, deleted, compartment, key_id, body) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING sequence",
    )
    .bind(scope.tenant())
    .bind(&write.resource_type)
    .bind(&write.id)
    .bind(write.version)
    .bind(write.method.as_str())
    .bind(micros(write.last_updated))
    .bind(deleted)
    .bind(compartment.as_deref())
    .bind(write.key_id.as_deref())
    .bind(write.body.as_deref())
    .fetch_one(&mut **transaction)
    .await
    .map_err(classify)?;
    let sequence: i64 = inserted
        .try_get("sequence")
        .map_err(|error| StoreError::Internal(error.to_string()))?;
    // A resource that had no head has no index rows to replace.
    let target = (write.resource_type.as_str(), write.id.as_str());
    if !matches!(write.expected, Expected::Absent) {
        delete_index_in(transaction, scope, target).await?;
    }
    let mut index = IndexInserts::default();
    index.add(scope, target, write.index);
    index.insert_in(transaction).await?;
    if let Some(audit) = &write.audit {
        // The audit record commits with the data, or neither does; a write that cannot be
        // audited is answered like an unavailable database (503), never written.
        append_audit_in(transaction, std::slice::from_ref(audit))
            .await
            .map_err(|error| StoreError::Unavailable(format!("audit append failed: {error}")))?;
    }
    Ok(VersionRecord {
        sequence,
        resource_type: write.resource_type,
        id: write.id,
        version: write.version,
        method: write.method,
        // Stored at microsecond precision; hand back exactly what a read will return.
        last_updated: from_micros(micros(write.last_updated))?,
        deleted: deleted == 1,
        body: write.body,
        compartment,
        key_id: write.key_id,
    })
}

/// The head table and its columns, for [`head_row`]s.
const HEADS: &str = "resource_heads (tenant, resource_type, resource_id, version_id, deleted)";
/// A new head is inserted only where none exists: a conflict means another writer created the
/// resource first, and the insert reports fewer rows than it was given.
const ABSENT_ONLY: &str = " ON CONFLICT DO NOTHING";

/// The head row a write of a resource that had none inserts.
fn head_row(scope: &Scope, write: &VersionWrite) -> Vec<Bind> {
    vec![
        Bind::Text(scope.tenant().to_string()),
        Bind::Text(write.resource_type.clone()),
        Bind::Text(write.id.clone()),
        Bind::Integer(write.version),
        Bind::Integer(i64::from(write.body.is_none())),
    ]
}

/// The version row of a write (the body moves into the statement).
fn version_row(scope: &Scope, write: &mut VersionWrite) -> Vec<Bind> {
    vec![
        Bind::Text(scope.tenant().to_string()),
        Bind::Text(write.resource_type.clone()),
        Bind::Text(write.id.clone()),
        Bind::Integer(write.version),
        Bind::Text(write.method.as_str().to_string()),
        Bind::Integer(micros(write.last_updated)),
        Bind::Integer(i64::from(write.body.is_none())),
        Bind::OptionalText(write.compartment.clone()),
        Bind::OptionalText(write.key_id.clone()),
        Bind::OptionalBytes(write.body.take()),
    ]
}

/// Moves an existing head from `current` to the write's version. The head decides the race: an
/// update that touches no row means another writer moved it first.
async fn advance_head_in(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    scope: &Scope,
    write: &VersionWrite,
    current: i64,
) -> StoreResult<()> {
    let moved = sqlx::query(
        "UPDATE resource_heads SET version_id = $4, deleted = $5 \
             WHERE tenant = $1 AND resource_type = $2 AND resource_id = $3 AND version_id = $6",
    )
    .bind(scope.tenant())
    .bind(&write.resource_type)
    .bind(&write.id)
    .bind(write.version)
    .bind(i64::from(write.body.is_none()))
    .bind(current)
    .execute(&mut **transaction)
    .await
    .map_err(classify)?;
    if moved.rows_affected() != 1 {
        return Err(StoreError::VersionConflict);
    }
    Ok(())
}

/// Takes the write's conditional-create claim, if it has one: taken unless another live claim
/// holds the key (see 0005_conditional_claims.sql).
async fn claim_in(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    scope: &Scope,
    write: &VersionWrite,
) -> StoreResult<()> {
    let Some(claim) = &write.claim else {
        return Ok(());
    };
    let now = micros(write.last_updated);
    let claimed = sqlx::query(
        "INSERT INTO conditional_claims (tenant, claim_key, created_us) VALUES ($1, $2, $3) \
         ON CONFLICT (tenant, claim_key) DO UPDATE SET created_us = excluded.created_us \
         WHERE conditional_claims.created_us < $4",
    )
    .bind(scope.tenant())
    .bind(claim)
    .bind(now)
    .bind(now - super::CLAIM_LIFETIME_MICROS)
    .execute(&mut **transaction)
    .await
    .map_err(classify)?;
    if claimed.rows_affected() != 1 {
        return Err(StoreError::VersionConflict);
    }
    Ok(())
}

/// The writes of a transaction bundle inside its database transaction, with a few multi-row
/// statements for all of them: new heads, versions and index rows each go in together, and
/// only updates and deletions (which must each find their head at the expected version) and
/// conditional-create claims take a statement per write.
async fn write_all_in(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    scope: &Scope,
    writes: Vec<VersionWrite>,
    audit: &mut Vec<AuditEntry>,
) -> StoreResult<()> {
    let mut new_heads = Vec::new();
    let mut versions = Vec::with_capacity(writes.len());
    let mut index = IndexInserts::default();
    for mut write in writes {
        audit.extend(write.audit.take());
        match write.expected {
            Expected::Absent => new_heads.push(head_row(scope, &write)),
            Expected::Version(current) => {
                advance_head_in(transaction, scope, &write, current).await?;
                delete_index_in(transaction, scope, (&write.resource_type, &write.id)).await?;
            }
        }
        claim_in(transaction, scope, &write).await?;
        versions.push(version_row(scope, &mut write));
        let rows = std::mem::take(&mut write.index);
        index.add(scope, (&write.resource_type, &write.id), rows);
    }
    let wanted = new_heads.len() as u64;
    if insert_rows(transaction, HEADS, new_heads, ABSENT_ONLY).await? != wanted {
        return Err(StoreError::VersionConflict);
    }
    insert_rows(
        transaction,
        "resource_versions (tenant, resource_type, resource_id, version_id, method, \
         last_updated_us, deleted, compartment, key_id, body)",
        versions,
        "",
    )
    .await?;
    index.insert_in(transaction).await
}

/// Most values bound in one `IN (…)` list (SQLite allows 32,766 parameters per statement).
const MAX_LIST_BINDS: usize = 500;

/// `$first, $first+1, …` for `count` values.
const BREAK_GLASS_COLUMNS: &str = "tenant, session_id, token_hash, subject, fhir_user, roles, \
     opened_us, expires_us, reason";

fn decode_break_glass(row: &AnyRow) -> StoreResult<BreakGlassSession> {
    Ok(BreakGlassSession {
        tenant: row.try_get(0).map_err(internal)?,
        session_id: row.try_get(1).map_err(internal)?,
        token_hash: row.try_get(2).map_err(internal)?,
        subject: row.try_get(3).map_err(internal)?,
        fhir_user: row.try_get(4).map_err(internal)?,
        roles: row.try_get(5).map_err(internal)?,
        opened_us: row.try_get(6).map_err(internal)?,
        expires_us: row.try_get(7).map_err(internal)?,
        reason: row.try_get(8).map_err(internal)?,
    })
}

/// The `(id, version)` pairs of a folded "id version,id version" list, sorted. Resource ids
/// hold neither spaces nor commas (FHIR ids are `[A-Za-z0-9\-\.]{1,64}`); anything else is a
/// corrupt row and an error, never an empty list.
fn unfold_versions(folded: &str) -> StoreResult<Vec<(String, i64)>> {
    let mut versions = folded
        .split(',')
        .map(|pair| {
            pair.split_once(' ')
                .and_then(|(id, version)| Some((id.to_string(), version.parse::<i64>().ok()?)))
                .filter(|(id, _)| !id.is_empty())
                .ok_or_else(|| {
                    StoreError::Internal("a folded Consent version list is corrupt".into())
                })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    versions.sort();
    Ok(versions)
}

fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|number| format!("${number}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A value bound to a statement built at run time.
enum Bind {
    Text(String),
    Integer(i64),
    Real(f64),
    /// Text or NULL.
    OptionalText(Option<String>),
    /// Bytes or NULL.
    OptionalBytes(Option<Vec<u8>>),
}

fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    binds: Vec<Bind>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for bind in binds {
        query = match bind {
            Bind::Text(text) => query.bind(text),
            Bind::Integer(number) => query.bind(number),
            Bind::Real(number) => query.bind(number),
            Bind::OptionalText(text) => query.bind(text),
            Bind::OptionalBytes(bytes) => query.bind(bytes),
        };
    }
    query
}

/// Collects binds and hands out their placeholders.
#[derive(Default)]
struct Binds(Vec<Bind>);

impl Binds {
    fn push(&mut self, bind: Bind) -> String {
        self.0.push(bind);
        format!("${}", self.0.len())
    }
    fn text(&mut self, text: &str) -> String {
        self.push(Bind::Text(text.to_string()))
    }
}

/// Escapes `%`, `_` and `\` for a `LIKE … ESCAPE '\'` pattern, so client text matches literally.
fn like_prefix(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for character in prefix.chars() {
        if matches!(character, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(character);
    }
    pattern.push('%');
    pattern
}

/// The SQL of a candidate query, in (type, id) order when `ordered` (else the database may stop
/// at the limit without sorting; a lone walked term is in id order either way). Every client
/// value is bound, never spliced into the text.
fn candidate_statement(
    backend: Backend,
    scope: &Scope,
    query: &CandidateQuery,
    ordered: bool,
) -> (String, Vec<Bind>) {
    // A probe must stay a probe: PostgreSQL turns an `EXISTS` into a semi-join where it can,
    // and then chose to hash every index row of the probed term (12,500 Observations of one
    // code at the search benchmark's 10,000 patients: 75 ms, against 2 ms probing the 48
    // Observations of the driving patient). An `OFFSET` keeps the subquery from being pulled
    // up; SQLite probes correlated subqueries row by row anyway.
    let probe_tail = match backend {
        Backend::Postgres => " OFFSET 0",
        Backend::Sqlite => "",
    };
    let mut binds = Binds::default();
    let tenant = binds.text(scope.tenant());
    let mut conditions = vec![format!("h.tenant = {tenant}"), "h.deleted = 0".to_string()];
    // The same type list also narrows every index subquery: the index tables' lookup indexes
    // lead with (tenant, resource_type, param), and without the type a subquery reads every
    // index row of the parameter's name across all types (seconds on 70,000 resources).
    let types = (!query.resource_types.is_empty()).then(|| {
        query
            .resource_types
            .iter()
            .map(|name| binds.text(name))
            .collect::<Vec<String>>()
            .join(", ")
    });
    if let Some(types) = &types {
        conditions.push(format!("h.resource_type IN ({types})"));
    }
    // One filter drives the query (its index rows are looked up once and joined to the heads);
    // every other filter is probed per candidate. Written as `IN (subquery)` each, SQLite
    // would materialize every subquery in full before joining: for a broad filter (the
    // Observations of a date range) that is most of an index table per search. No filter
    // drives when an id list already pins the heads down.
    let first_drives = !query
        .filters
        .iter()
        .any(|filter| matches!(filter, CandidateFilter::Ids(_)));
    // A lone filter of one term over one type is walked in index order instead: the lookup
    // index keeps one term's rows sorted by resource id, so a page reads about as many index
    // rows as it shows. As `IN (subquery)` the database read every row of the term, joined and
    // sorted them for each page: on the search benchmark's 10,000 patients, 1,250 born on one
    // day or 5,000 of one gender for a page of 50 or 10. (A term's rows are unique per
    // resource: the index keeps each parameter's terms deduplicated.) Not beside probes: in
    // the join form PostgreSQL turned a probe into a hash of every row of its term (all 35,000
    // Observations of one code, to check the 35 of one patient). Counting walks too (the chain
    // and `_has` strategy counts, bounded by their LIMIT): as `IN (subquery)` PostgreSQL
    // deduplicated every row of the term before the LIMIT applied (all 35,000 Observations of
    // one code, 19–47 ms, to count 125), the walk reads 125 (about 1 ms).
    let walked = match (
        first_drives && query.filters.len() == 1,
        types.as_deref(),
        query.filters.first(),
    ) {
        (true, Some(single_type), Some(CandidateFilter::Terms { param, terms }))
            if query.resource_types.len() == 1 && terms.len() == 1 =>
        {
            let (param, term) = (binds.text(param), binds.text(&terms[0]));
            conditions.push(format!(
                "d.tenant = {tenant} AND d.resource_type = {single_type} AND d.param = {param} \
                 AND d.term = {term}"
            ));
            true
        }
        _ => false,
    };
    if let Some((after_type, after_id)) = &query.after {
        let same_type = walked && query.resource_types.first() == Some(after_type);
        let after_type = binds.text(after_type);
        let after_id = binds.text(after_id);
        conditions.push(format!(
            "(h.resource_type > {after_type} OR (h.resource_type = {after_type} AND h.resource_id > {after_id}))"
        ));
        if same_type {
            // The same bound on the walked index rows, where it narrows the index range.
            conditions.push(format!("d.resource_id > {after_id}"));
        }
    }
    for (position, filter) in query.filters.iter().enumerate() {
        if position == 0 && walked {
            continue;
        }
        let role = if position == 0 && first_drives {
            FilterRole::Drives
        } else {
            FilterRole::Probes
        };
        conditions.push(filter_condition(
            &tenant,
            types.as_deref(),
            filter,
            role,
            probe_tail,
            &mut binds,
        ));
    }
    let limit = binds.push(Bind::Integer(
        i64::try_from(query.limit).unwrap_or(i64::MAX),
    ));
    let (from, order) = match (walked, ordered) {
        (true, _) => (
            "search_terms d JOIN resource_heads h ON h.tenant = d.tenant \
             AND h.resource_type = d.resource_type AND h.resource_id = d.resource_id",
            "ORDER BY d.resource_id ",
        ),
        (false, true) => (
            "resource_heads h",
            "ORDER BY h.resource_type, h.resource_id ",
        ),
        (false, false) => ("resource_heads h", ""),
    };
    let statement = format!(
        "SELECT h.resource_type, h.resource_id FROM {from} WHERE {} {order}LIMIT {limit}",
        conditions.join(" AND ")
    );
    (statement, binds.0)
}

/// The SQL of [`Store::first_candidate_each`]: the keys are bound as one JSON array and
/// unnested in the database, and for each a scalar subquery finds the first head that has the
/// key and passes every filter (each probed, as beside a driving filter in
/// [`candidate_statement`]). The statement's text depends on the filters only, not on the
/// number of keys. `None` unless `query` names exactly one type.
fn first_candidate_each_statement(
    backend: Backend,
    scope: &Scope,
    query: &CandidateQuery,
    each: &EachKey,
    keys: &[String],
) -> Option<(String, Vec<Bind>)> {
    let [resource_type] = query.resource_types.as_slice() else {
        return None;
    };
    let mut binds = Binds::default();
    let tenant = binds.text(scope.tenant());
    let single_type = binds.text(resource_type);
    let key_list = binds.text(&serde_json::Value::from(keys.to_vec()).to_string());
    let (key_rows, probe_tail) = match backend {
        Backend::Postgres => (
            format!(
                "SELECT value AS key, position FROM json_array_elements_text({key_list}::json) \
                 WITH ORDINALITY AS u(value, position)"
            ),
            " OFFSET 0",
        ),
        Backend::Sqlite => (
            format!("SELECT value AS key, key AS position FROM json_each({key_list})"),
            "",
        ),
    };
    let mut conditions = vec![
        format!("h.tenant = {tenant}"),
        "h.deleted = 0".to_string(),
        format!("h.resource_type = {single_type}"),
    ];
    // A term's index rows are walked in id order (as a lone term in candidate_statement), an
    // id pins its head down.
    let (from, order) = match each {
        EachKey::Term { param } => {
            let param = binds.text(param);
            conditions.push(format!(
                "d.tenant = {tenant} AND d.resource_type = {single_type} AND d.param = {param} \
                 AND d.term = k.key"
            ));
            (
                "search_terms d JOIN resource_heads h ON h.tenant = d.tenant \
                 AND h.resource_type = d.resource_type AND h.resource_id = d.resource_id",
                "ORDER BY d.resource_id ",
            )
        }
        EachKey::Id => {
            conditions.push("h.resource_id = k.key".to_string());
            ("resource_heads h", "")
        }
    };
    for filter in &query.filters {
        conditions.push(filter_condition(
            &tenant,
            Some(&single_type),
            filter,
            FilterRole::Probes,
            probe_tail,
            &mut binds,
        ));
    }
    let statement = format!(
        "SELECT k.key, (SELECT h.resource_id FROM {from} WHERE {} {order}LIMIT 1) AS resource_id \
         FROM ({key_rows}) k ORDER BY k.position",
        conditions.join(" AND ")
    );
    Some((statement, binds.0))
}

/// How a filter's index rows meet the head row `h` (see [`candidate_statement`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FilterRole {
    /// `(type, id) IN (the qualifying index rows)`: looked up once, the rows lead to the heads.
    Drives,
    /// `EXISTS (a qualifying index row of h)`: one index probe per candidate head.
    Probes,
}

/// One filter as a condition on the head row `h`, the index rows limited to `types`
/// (placeholders of the searched types) when given.
fn filter_condition(
    tenant: &str,
    types: Option<&str>,
    filter: &CandidateFilter,
    role: FilterRole,
    probe_tail: &str,
    binds: &mut Binds,
) -> String {
    let of_types = types
        .map(|types| format!(" AND x.resource_type IN ({types})"))
        .unwrap_or_default();
    // The index rows of `param` in `table` (that meet `condition`), as the rows of `h` or as
    // the rows of any resource of the searched types.
    let of_head = |table: &str, param: &str, condition: &str| {
        format!(
            "EXISTS (SELECT 1 FROM {table} x WHERE x.tenant = {tenant} \
             AND x.resource_type = h.resource_type AND x.param = {param}{condition} \
             AND x.resource_id = h.resource_id{probe_tail})"
        )
    };
    let of_types_rows = |table: &str, param: &str, condition: &str| {
        format!(
            "SELECT x.resource_type, x.resource_id FROM {table} x \
             WHERE x.tenant = {tenant}{of_types} AND x.param = {param}{condition}"
        )
    };
    let rows_of = |table: &str, param: &str, condition: String| {
        let condition = format!(" AND ({condition})");
        match role {
            FilterRole::Drives => format!(
                "(h.resource_type, h.resource_id) IN ({})",
                of_types_rows(table, param, &condition)
            ),
            FilterRole::Probes => of_head(table, param, &condition),
        }
    };
    // Every resource with a value of the parameter has a row of it in one of the index tables
    // (a presence term where its values gave no other row; see search::index).
    match filter {
        CandidateFilter::Ids(ids) => {
            if ids.is_empty() {
                return "1 = 0".into();
            }
            let list: Vec<String> = ids.iter().map(|id| binds.text(id)).collect();
            format!("h.resource_id IN ({})", list.join(", "))
        }
        CandidateFilter::Terms { param, terms } => {
            if terms.is_empty() {
                return "1 = 0".into();
            }
            let param = binds.text(param);
            let list: Vec<String> = terms.iter().map(|term| binds.text(term)).collect();
            rows_of(
                "search_terms",
                &param,
                format!("x.term IN ({})", list.join(", ")),
            )
        }
        CandidateFilter::TermPrefixes { param, prefixes } => {
            if prefixes.is_empty() {
                return "1 = 0".into();
            }
            let param = binds.text(param);
            let alternatives: Vec<String> = prefixes
                .iter()
                .map(|prefix| {
                    format!(
                        "x.term LIKE {} ESCAPE '\\'",
                        binds.text(&like_prefix(prefix))
                    )
                })
                .collect();
            rows_of("search_terms", &param, alternatives.join(" OR "))
        }
        CandidateFilter::Dates { param, any_of } => {
            let param = binds.text(param);
            let alternatives = range_alternatives(any_of, binds, Bind::Integer);
            rows_of("search_dates", &param, alternatives)
        }
        CandidateFilter::Numbers { param, any_of } => {
            let param = binds.text(param);
            let alternatives = range_alternatives(any_of, binds, Bind::Real);
            rows_of("search_numbers", &param, alternatives)
        }
        // Absence is probed whatever the role: there are no rows to drive from.
        CandidateFilter::Missing { param } => {
            let param = binds.text(param);
            let probes: Vec<String> = INDEX_TABLES
                .iter()
                .map(|table| format!("NOT {}", of_head(table, &param, "")))
                .collect();
            format!("({})", probes.join(" AND "))
        }
        CandidateFilter::Present { param } => {
            let param = binds.text(param);
            match role {
                FilterRole::Drives => format!(
                    "(h.resource_type, h.resource_id) IN ({})",
                    INDEX_TABLES
                        .iter()
                        .map(|table| of_types_rows(table, &param, ""))
                        .collect::<Vec<_>>()
                        .join(" UNION ALL ")
                ),
                FilterRole::Probes => {
                    let probes: Vec<String> = INDEX_TABLES
                        .iter()
                        .map(|table| of_head(table, &param, ""))
                        .collect();
                    format!("({})", probes.join(" OR "))
                }
            }
        }
    }
}

fn range_alternatives<T: Copy>(
    any_of: &[RangeBounds<T>],
    binds: &mut Binds,
    bind: impl Fn(T) -> Bind,
) -> String {
    if any_of.is_empty() {
        return "1 = 0".into();
    }
    let alternatives: Vec<String> = any_of
        .iter()
        .map(|bounds| {
            let mut parts = Vec::new();
            if let Some(value) = bounds.low_at_least {
                parts.push(format!("x.low >= {}", binds.push(bind(value))));
            }
            if let Some(value) = bounds.low_below {
                parts.push(format!("x.low < {}", binds.push(bind(value))));
            }
            if let Some(value) = bounds.high_above {
                parts.push(format!("x.high > {}", binds.push(bind(value))));
            }
            if let Some(value) = bounds.high_at_most {
                parts.push(format!("x.high <= {}", binds.push(bind(value))));
            }
            if parts.is_empty() {
                "1 = 1".to_string()
            } else {
                format!("({})", parts.join(" AND "))
            }
        })
        .collect();
    alternatives.join(" OR ")
}

/// Most rows one multi-row insert carries (a power of two; see [`insert_chunk_sizes`]).
const MAX_ROWS_PER_INSERT: usize = 256;

/// How `total` rows are split into multi-row statements: full chunks of
/// [`MAX_ROWS_PER_INSERT`], then the binary decomposition of the rest (70 → 64 + 4 + 2). Every
/// statement text is one of a few shapes per table, so prepared statements stay cached (a
/// statement per row count would be planned afresh and churn the connection's statement
/// cache), and `total` rows take at most a logarithmic number of round trips.
fn insert_chunk_sizes(total: usize) -> Vec<usize> {
    let mut sizes = vec![MAX_ROWS_PER_INSERT; total / MAX_ROWS_PER_INSERT];
    let mut rest = total % MAX_ROWS_PER_INSERT;
    let mut size = MAX_ROWS_PER_INSERT / 2;
    while rest > 0 {
        if rest >= size {
            sizes.push(size);
            rest -= size;
        }
        size /= 2;
    }
    sizes
}

/// `(…), (…), …`: `rows` rows of `columns` placeholders, for a statement that has no other
/// parameters: `$1`, `$2`, … on PostgreSQL, anonymous `?`s (the same positions) on SQLite.
///
/// Why not `$n` on SQLite as well: sqlx binds each parameter after asking SQLite for its name,
/// and SQLite finds a parameter's name by a linear scan of the statement's named parameters,
/// so binding a statement of n numbered parameters costs n² steps. For a 256-row audit insert
/// (2,304 parameters) that was about 5 % of all CPU time under the read benchmark (perf);
/// anonymous parameters have no names to scan.
fn values_placeholders(backend: Backend, rows: usize, columns: usize) -> String {
    let row_of = |row: usize| match backend {
        Backend::Sqlite => vec!["?"; columns].join(", "),
        Backend::Postgres => placeholders(row * columns + 1, columns),
    };
    (0..rows)
        .map(|row| format!("({})", row_of(row)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The backend a connection talks to (by sqlx's `AnyConnection::backend_name`).
fn backend_of(connection: &sqlx::AnyConnection) -> Backend {
    if connection.backend_name() == "SQLite" {
        Backend::Sqlite
    } else {
        Backend::Postgres
    }
}

/// Inserts rows (each its bound values, in `target`'s column order, all of one width) with
/// many rows per statement, well under SQLite's parameter limit; `suffix` follows the VALUES
/// (an `ON CONFLICT` clause). Returns how many rows were inserted.
async fn insert_rows(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    target: &str,
    rows: Vec<Vec<Bind>>,
    suffix: &str,
) -> StoreResult<u64> {
    let Some(columns) = rows.first().map(Vec::len) else {
        return Ok(0);
    };
    let mut rows = rows.into_iter();
    let mut inserted = 0;
    for size in insert_chunk_sizes(rows.len()) {
        let statement = format!(
            "INSERT INTO {target} VALUES {}{suffix}",
            values_placeholders(backend_of(transaction), size, columns)
        );
        let binds: Vec<Bind> = rows.by_ref().take(size).flatten().collect();
        inserted += bind_all(sqlx::query(&statement), binds)
            .execute(&mut **transaction)
            .await
            .map_err(classify)?
            .rows_affected();
    }
    Ok(inserted)
}

/// The search index tables (see `migrations/*/0004_search.sql`), whose rows are keyed by
/// (tenant, type, id).
const INDEX_TABLES: [&str; 3] = ["search_terms", "search_dates", "search_numbers"];

/// Removes the index rows of one resource (before its new version's rows go in).
async fn delete_index_in(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    scope: &Scope,
    (resource_type, id): (&str, &str),
) -> StoreResult<()> {
    for table in INDEX_TABLES {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE tenant = $1 AND resource_type = $2 AND resource_id = $3"
        ))
        .bind(scope.tenant())
        .bind(resource_type)
        .bind(id)
        .execute(&mut **transaction)
        .await
        .map_err(classify)?;
    }
    Ok(())
}

/// Index rows of one or more resources, inserted together (a transaction bundle's writes
/// share three multi-row inserts instead of three per resource).
#[derive(Default)]
struct IndexInserts {
    /// How many resources' rows were added.
    resources: usize,
    terms: Vec<Vec<Bind>>,
    dates: Vec<Vec<Bind>>,
    numbers: Vec<Vec<Bind>>,
}

impl IndexInserts {
    /// Adds the rows of `resource_type/id`.
    fn add(&mut self, scope: &Scope, (resource_type, id): (&str, &str), rows: IndexRows) {
        self.resources += 1;
        let key = |param: String| {
            vec![
                Bind::Text(scope.tenant().to_string()),
                Bind::Text(resource_type.to_string()),
                Bind::Text(id.to_string()),
                Bind::Text(param),
            ]
        };
        let with = |mut row: Vec<Bind>, extra: [Bind; 2]| {
            row.extend(extra);
            row
        };
        self.terms
            .extend(rows.terms.into_iter().map(|(param, term)| {
                let mut row = key(param);
                row.push(Bind::Text(term));
                row
            }));
        self.dates.extend(
            rows.dates.into_iter().map(|(param, low, high)| {
                with(key(param), [Bind::Integer(low), Bind::Integer(high)])
            }),
        );
        self.numbers.extend(
            rows.numbers
                .into_iter()
                .map(|(param, low, high)| with(key(param), [Bind::Real(low), Bind::Real(high)])),
        );
    }

    async fn insert_in(
        self,
        transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    ) -> StoreResult<()> {
        let tables = [
            (
                "search_terms (tenant, resource_type, resource_id, param, term)",
                self.terms,
            ),
            (
                "search_dates (tenant, resource_type, resource_id, param, low, high)",
                self.dates,
            ),
            (
                "search_numbers (tenant, resource_type, resource_id, param, low, high)",
                self.numbers,
            ),
        ];
        for (target, rows) in tables {
            insert_rows(transaction, target, rows, "").await?;
        }
        Ok(())
    }
}

/// The statement that begins a write transaction. SQLite: take the write lock up front so
/// that two writers queue on the busy timeout instead of failing when a read lock cannot be
/// upgraded.
fn begin_statement(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "BEGIN IMMEDIATE",
        Backend::Postgres => "BEGIN",
    }
}

/// Appends a group of audit records on `connection`, committed when this returns Ok. Up to
/// [`AUDIT_EXACT_SHAPES`] records are one statement, atomic by itself: no BEGIN and COMMIT
/// round trips around it. Group commits are mostly this small (a few reads' records), and on
/// PostgreSQL each round trip costs both processes a wake-up.
async fn append_audit_on(
    connection: &mut sqlx::AnyConnection,
    backend: Backend,
    table: AuditTable,
    entries: &[AuditEntry],
) -> StoreResult<Vec<i64>> {
    if entries.len() <= AUDIT_EXACT_SHAPES {
        return insert_audit_rows(connection, table, entries).await;
    }
    let mut transaction = sqlx::Connection::begin_with(connection, begin_statement(backend))
        .await
        .map_err(classify)?;
    let ids = append_audit_rows_in(&mut transaction, table, entries).await?;
    transaction.commit().await.map_err(classify)?;
    Ok(ids)
}

/// Inserts audit records on a connection inside an open transaction (a write's own, or a
/// group commit's). No lock is taken: records get their place in the log later, from the
/// sequencer.
async fn append_audit_in(
    connection: &mut sqlx::AnyConnection,
    entries: &[AuditEntry],
) -> StoreResult<Vec<i64>> {
    append_audit_rows_in(connection, AuditTable::Records, entries).await
}

/// Where audit records are inserted.
#[derive(Debug, Clone, Copy)]
enum AuditTable {
    /// `audit_records`, the log's own table.
    Records,
    /// SQLite's read-audit journal (see [`ReadAuditJournal`]).
    ReadJournal,
}

/// Inserts audit records into `table` inside an open transaction, many rows per statement.
async fn append_audit_rows_in(
    connection: &mut sqlx::AnyConnection,
    table: AuditTable,
    entries: &[AuditEntry],
) -> StoreResult<Vec<i64>> {
    // Many rows per statement: a group commit costs a few round trips, not one per record, and
    // a few statement shapes (see insert_chunk_sizes).
    let mut ids = Vec::with_capacity(entries.len());
    let mut rest = entries;
    for size in insert_chunk_sizes(entries.len()) {
        let (chunk, after) = rest.split_at(size);
        rest = after;
        ids.extend(insert_audit_rows(connection, table, chunk).await?);
    }
    Ok(ids)
}

/// Group commits of up to this many records are one statement of their exact row count:
/// a few dozen statement shapes, each prepared once per connection.
const AUDIT_EXACT_SHAPES: usize = 32;

/// The columns of an audit record that its writer supplies, the same in `audit_records` and in
/// the read-audit journal (the order [`insert_audit_rows`] binds them in).
const AUDIT_COLUMNS: &str =
    "tenant, recorded_us, interaction, resource_type, resource_id, outcome, agent, patient, record";

/// Inserts `entries` as one multi-row statement and returns their record ids in order.
async fn insert_audit_rows(
    connection: &mut sqlx::AnyConnection,
    table: AuditTable,
    entries: &[AuditEntry],
) -> StoreResult<Vec<i64>> {
    let (table_name, id_column) = match table {
        AuditTable::Records => ("audit_records", "record_id"),
        AuditTable::ReadJournal => ("audit_journal", "journal_id"),
    };
    let statement = format!(
        "INSERT INTO {table_name} ({AUDIT_COLUMNS}) VALUES {} \
         RETURNING {id_column} AS record_id",
        values_placeholders(
            backend_of(connection),
            entries.len(),
            AUDIT_COLUMNS.split(',').count()
        )
    );
    let mut query = sqlx::query(&statement);
    for entry in entries {
        query = query
            .bind(entry.tenant.clone())
            .bind(entry.recorded_us)
            .bind(entry.interaction.clone())
            .bind(entry.resource_type.clone())
            .bind(entry.resource_id.clone())
            .bind(entry.outcome)
            .bind(entry.agent.clone())
            .bind(entry.patient.clone())
            .bind(entry.record.clone());
    }
    query
        .fetch_all(connection)
        .await
        .map_err(classify)?
        .iter()
        .map(|row| {
            row.try_get("record_id")
                .map_err(|error| StoreError::Internal(error.to_string()))
        })
        .collect()
}

fn decode_audit(row: &AnyRow) -> StoreResult<StoredAudit> {
    let get_error = |error: sqlx::Error| StoreError::Internal(format!("bad audit row: {error}"));
    Ok(StoredAudit {
        sequence: row.try_get("sequence").map_err(get_error)?,
        record: row.try_get("record").map_err(get_error)?,
        leaf_hash: row.try_get("leaf_hash").map_err(get_error)?,
    })
}

fn decode_checkpoint(row: &AnyRow) -> StoreResult<Checkpoint> {
    let get_error =
        |error: sqlx::Error| StoreError::Internal(format!("bad checkpoint row: {error}"));
    Ok(Checkpoint {
        tree_size: row.try_get("tree_size").map_err(get_error)?,
        root_hash: row.try_get("root_hash").map_err(get_error)?,
        signed_us: row.try_get("signed_us").map_err(get_error)?,
        key_id: row.try_get("key_id").map_err(get_error)?,
        signature: row.try_get("signature").map_err(get_error)?,
    })
}

#[cfg(test)]
mod tests {
    use super::{
        candidate_statement, first_candidate_each_statement, insert_chunk_sizes, unfold_versions,
        values_placeholders, Backend, Bind, MAX_ROWS_PER_INSERT,
    };
    use crate::store::{CandidateFilter, CandidateQuery, EachKey, RangeBounds, Scope};

    #[test]
    fn multi_row_inserts_number_their_parameters_on_postgresql_only() {
        assert_eq!(
            values_placeholders(Backend::Postgres, 2, 3),
            "($1, $2, $3), ($4, $5, $6)"
        );
        // SQLite: no names, so that binding stays linear in the number of parameters.
        assert_eq!(
            values_placeholders(Backend::Sqlite, 2, 3),
            "(?, ?, ?), (?, ?, ?)"
        );
    }

    fn statement_of(filters: Vec<CandidateFilter>) -> String {
        let query = CandidateQuery {
            resource_types: vec!["Observation".into()],
            filters,
            after: None,
            limit: 50,
        };
        candidate_statement(Backend::Sqlite, &Scope::system("t"), &query, true).0
    }

    #[test]
    fn the_first_filter_drives_and_the_others_are_probed_per_candidate() {
        let patient = CandidateFilter::Terms {
            param: "patient".into(),
            terms: vec!["r:Patient/p1".into()],
        };
        let since_2020 = CandidateFilter::Dates {
            param: "date".into(),
            any_of: vec![RangeBounds {
                high_above: Some(1_577_836_800_000_000),
                ..RangeBounds::default()
            }],
        };
        let absent = CandidateFilter::Missing {
            param: "value-quantity".into(),
        };
        let two_patients = CandidateFilter::Terms {
            param: "patient".into(),
            terms: vec!["r:Patient/p1".into(), "r:Patient/p2".into()],
        };
        let statement = statement_of(vec![two_patients, since_2020.clone(), absent.clone()]);
        // The patients' index rows are looked up once; the date range, which may hold most
        // Observations, is only probed for each of them (never materialized whole).
        assert_eq!(statement.matches("IN (SELECT").count(), 1, "{statement}");
        let driver = statement.find("IN (SELECT x.resource_type, x.resource_id FROM search_terms");
        let date_probe = statement.find("EXISTS (SELECT 1 FROM search_dates");
        assert!(driver.is_some() && date_probe.is_some(), "{statement}");
        assert_eq!(statement.matches("NOT EXISTS").count(), 3, "{statement}");

        // A lone term is walked in id order, for a page and for a count (unordered) alike, so
        // that the LIMIT bounds the index rows read instead of applying after every row of the
        // term was deduplicated; beside probes it drives as a list.
        let lone = CandidateQuery {
            resource_types: vec!["Observation".into()],
            filters: vec![patient.clone()],
            after: None,
            limit: 50,
        };
        for backend in [Backend::Sqlite, Backend::Postgres] {
            for ordered in [true, false] {
                let walked = candidate_statement(backend, &Scope::system("t"), &lone, ordered).0;
                assert!(!walked.contains("IN (SELECT"), "{walked}");
                assert!(
                    walked.contains("FROM search_terms d JOIN resource_heads h")
                        && walked.contains("ORDER BY d.resource_id LIMIT"),
                    "{walked}"
                );
            }
        }
        let probed = statement_of(vec![patient.clone(), since_2020.clone(), absent.clone()]);
        assert!(!probed.contains("search_terms d"), "{probed}");
        assert_eq!(probed.matches("IN (SELECT").count(), 1, "{probed}");
        // On PostgreSQL every probe keeps its OFFSET, so none is turned into a join.
        let query = CandidateQuery {
            resource_types: vec!["Observation".into()],
            filters: vec![patient.clone(), since_2020.clone(), absent],
            after: None,
            limit: 50,
        };
        let on_postgres =
            candidate_statement(Backend::Postgres, &Scope::system("t"), &query, true).0;
        assert_eq!(
            on_postgres.matches("EXISTS (SELECT 1").count(),
            4,
            "{on_postgres}"
        );
        assert_eq!(on_postgres.matches("OFFSET 0)").count(), 4, "{on_postgres}");
        assert!(!probed.contains("OFFSET"), "{probed}");

        // An id list pins the heads down: every index filter is a probe.
        let by_ids = statement_of(vec![
            CandidateFilter::Ids(vec!["o1".into(), "o2".into()]),
            patient,
            since_2020,
        ]);
        assert!(!by_ids.contains("IN (SELECT"), "{by_ids}");
        assert_eq!(by_ids.matches("EXISTS (SELECT 1").count(), 2, "{by_ids}");
    }

    #[test]
    fn one_statement_answers_every_key_and_keeps_its_text() {
        let code = CandidateFilter::Terms {
            param: "code".into(),
            terms: vec!["c:8480-6".into()],
        };
        let query = CandidateQuery {
            resource_types: vec!["Observation".into()],
            filters: vec![code],
            after: None,
            limit: 1,
        };
        let each = EachKey::Term {
            param: "patient".into(),
        };
        let scope = Scope::system("t");
        let three = ["r:Patient/a", "r:Patient/b", "r:Patient/c"].map(String::from);
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let (statement, binds) =
                first_candidate_each_statement(backend, &scope, &query, &each, &three).unwrap();
            // The keys travel as one bound JSON array, never in the text, and the other
            // filters are probes (with their OFFSET on PostgreSQL).
            assert!(!statement.contains("Patient/"), "{statement}");
            assert!(
                binds.iter().any(|bind| matches!(bind, Bind::Text(text)
                    if text == r#"["r:Patient/a","r:Patient/b","r:Patient/c"]"#)),
                "{statement}"
            );
            assert!(statement.contains("d.term = k.key"), "{statement}");
            assert_eq!(
                statement.matches("EXISTS (SELECT 1").count(),
                1,
                "{statement}"
            );
            assert_eq!(
                statement.contains("OFFSET 0)"),
                backend == Backend::Postgres,
                "{statement}"
            );
            // The same text for any number of keys, so a prepared statement is reused.
            let (for_one, _) =
                first_candidate_each_statement(backend, &scope, &query, &each, &three[..1])
                    .unwrap();
            assert_eq!(for_one, statement);
        }
        let ids =
            first_candidate_each_statement(Backend::Sqlite, &scope, &query, &EachKey::Id, &three)
                .unwrap()
                .0;
        assert!(
            ids.contains("h.resource_id = k.key") && !ids.contains("search_terms d"),
            "{ids}"
        );
        // One type only: the key's index rows are of that type.
        let two_types = CandidateQuery {
            resource_types: vec!["Observation".into(), "Condition".into()],
            ..query
        };
        assert!(
            first_candidate_each_statement(Backend::Sqlite, &scope, &two_types, &each, &three)
                .is_none()
        );
    }

    #[test]
    fn insert_chunks_cover_every_row_with_few_statement_shapes() {
        let mut shapes = std::collections::BTreeSet::new();
        for total in 0..=3 * MAX_ROWS_PER_INSERT + 7 {
            let sizes = insert_chunk_sizes(total);
            assert_eq!(sizes.iter().sum::<usize>(), total, "{total} rows");
            assert!(sizes
                .iter()
                .all(|&size| size > 0 && size <= MAX_ROWS_PER_INSERT));
            // Full chunks, then at most one statement per power of two below the maximum.
            let partial = sizes
                .iter()
                .filter(|&&size| size < MAX_ROWS_PER_INSERT)
                .count();
            assert!(
                partial <= MAX_ROWS_PER_INSERT.trailing_zeros() as usize,
                "{sizes:?}"
            );
            shapes.extend(sizes);
        }
        assert_eq!(
            shapes.len(),
            MAX_ROWS_PER_INSERT.trailing_zeros() as usize + 1
        );
        assert_eq!(insert_chunk_sizes(70), vec![64, 4, 2]);
    }

    #[test]
    fn folded_consent_versions_unfold_sorted() {
        assert_eq!(
            unfold_versions("b-2 3,a.1 12,b-2 1").unwrap(),
            vec![
                ("a.1".to_string(), 12),
                ("b-2".to_string(), 1),
                ("b-2".to_string(), 3)
            ]
        );
        assert_eq!(unfold_versions("x 1").unwrap(), vec![("x".to_string(), 1)]);
    }

    #[test]
    fn corrupt_folded_consent_versions_are_an_error_not_an_empty_list() {
        for corrupt in ["", "x", "x one", " 1", "x 1,", "x 1,,y 2"] {
            assert!(unfold_versions(corrupt).is_err(), "{corrupt:?}");
        }
    }
}
