//! Erasure of a patient compartment beyond one database: the **erasure ledger**, its
//! re-application at start, and how every node learns of an erasure another node made.
//!
//! `Patient/$erase` (`api::erase`) deletes the compartment's data key rows (crypto-shredding),
//! its resources, versions and index rows, and writes a tombstone, all in one transaction
//! ([`Store::erase_compartment`]). This module covers what lies outside that transaction:
//!
//! - **The ledger** (`erasure.ledger_file`, default `<data_dir>/erasure-ledger.jsonl`): one JSON
//!   line per erased compartment — tenant, pseudonym, the ids of the destroyed data keys, time.
//!   No PHI: pseudonyms are random UUIDs that nothing outside the (erased) mapping links to a
//!   person. It is append-only and synced to disk after each line. It lives outside the
//!   database so that **restoring an older database copy cannot bring an erased patient back**:
//!   at start, before serving, [`reconcile`] erases again every compartment the ledger names that
//!   the database has no tombstone for, and adds to the ledger every tombstone it lacks (an
//!   erasure whose ledger line was lost to a crash after the commit).
//! - **Other nodes** ([`watch`]): several nodes may share one PostgreSQL database. Nothing an
//!   erased compartment held can be read from the database by any node the moment the erasure
//!   commits (the rows are gone), and a write that still holds one of its keys either commits
//!   before the erasure (which then deletes it) or fails (see `store::sql::erasure`). What remains
//!   per node is its cache of data keys in clear: each node polls the `erasures` table every
//!   `erasure.poll_ms` for tombstones after the last one it saw, drops their keys from its cache
//!   and appends them to its own ledger.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::api::audit::AuditContext;
use crate::api::App;
use crate::store::{ErasureOutcome, ErasureRequest, Scope, Tombstone};

/// The request id of the audit records of erasures re-applied from the ledger.
pub const LEDGER_REQUEST_ID: &str = "erasure-ledger";

/// One line of the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub tenant: String,
    /// The compartment pseudonym (never a patient id).
    pub pseudonym: String,
    /// The data keys destroyed.
    pub key_ids: Vec<String>,
    /// When the erasure committed (RFC 3339).
    pub erased: String,
}

impl LedgerEntry {
    /// The ledger line of a tombstone.
    pub fn of(tombstone: &Tombstone) -> Self {
        let erased = DateTime::<Utc>::from_timestamp_micros(tombstone.erased_us)
            .unwrap_or_default()
            .to_rfc3339_opts(SecondsFormat::Micros, true);
        LedgerEntry {
            tenant: tombstone.tenant.clone(),
            pseudonym: tombstone.pseudonym.clone(),
            key_ids: tombstone.key_ids.clone(),
            erased,
        }
    }

    fn key(&self) -> (String, String) {
        (self.tenant.clone(), self.pseudonym.clone())
    }
}

/// The erasure ledger file and what this process knows is in it.
pub struct Ledger {
    path: PathBuf,
    /// (tenant, pseudonym) of every line, so that a tombstone is appended once.
    recorded: std::sync::Mutex<HashSet<(String, String)>>,
    /// One appender at a time: lines never interleave.
    append_lock: tokio::sync::Mutex<()>,
    /// The last tombstone (`erasures.erasure_id`) this node has acted on.
    last_seen: std::sync::atomic::AtomicI64,
}

impl Ledger {
    /// Opens the ledger, creating it (mode 0600) when missing, and reads what it holds.
    ///
    /// # Errors
    /// When the file cannot be created or read, or a line is not a ledger entry: the server
    /// must not start on a ledger it cannot trust to be complete.
    pub fn open(path: &Path) -> Result<(Ledger, Vec<LedgerEntry>), String> {
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|error| {
                format!("cannot create the directory of {}: {error}", path.display())
            })?;
        }
        let file = open_for_append(path)?;
        let mut entries = Vec::new();
        for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let entry: LedgerEntry = serde_json::from_str(&line).map_err(|_| {
                format!(
                    "{} line {} is not an erasure ledger entry; refusing to start",
                    path.display(),
                    number + 1
                )
            })?;
            entries.push(entry);
        }
        let recorded = entries.iter().map(LedgerEntry::key).collect();
        Ok((
            Ledger {
                path: path.to_path_buf(),
                recorded: std::sync::Mutex::new(recorded),
                append_lock: tokio::sync::Mutex::new(()),
                last_seen: std::sync::atomic::AtomicI64::new(0),
            },
            entries,
        ))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends the tombstone's line unless the ledger has it, and syncs it to disk.
    ///
    /// # Errors
    /// When the file cannot be written or synced.
    pub async fn record(&self, tombstone: &Tombstone) -> Result<(), String> {
        let entry = LedgerEntry::of(tombstone);
        let _guard = self.append_lock.lock().await;
        if self
            .recorded
            .lock()
            .map(|recorded| recorded.contains(&entry.key()))
            .unwrap_or(false)
        {
            return Ok(());
        }
        let mut line = serde_json::to_vec(&entry).map_err(|error| error.to_string())?;
        line.push(b'\n');
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let mut file = open_for_append(&path)?;
            file.write_all(&line)
                .and_then(|()| file.sync_data())
                .map_err(|error| format!("cannot append to {}: {error}", path.display()))
        })
        .await
        .map_err(|error| format!("ledger task failed: {error}"))??;
        if let Ok(mut recorded) = self.recorded.lock() {
            recorded.insert(entry.key());
        }
        Ok(())
    }
}

fn open_for_append(path: &Path) -> Result<std::fs::File, String> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .map_err(|error| format!("cannot open the erasure ledger {}: {error}", path.display()))
}

/// At start, before serving: erases again what the ledger names and the database does not know
/// as erased (a restored older copy), and appends to the ledger the tombstones it lacks.
///
/// # Errors
/// When the database or the ledger cannot be read or written: the server does not start rather
/// than serve a patient who was erased.
pub async fn reconcile(app: &App, entries: &[LedgerEntry]) -> Result<(), String> {
    let store = &app.store;
    let tombstones = store
        .erasures_after(0)
        .await
        .map_err(|error| format!("cannot read the erasure tombstones: {error}"))?;
    let in_database: HashSet<(String, String)> = tombstones
        .iter()
        .map(|tombstone| (tombstone.tenant.clone(), tombstone.pseudonym.clone()))
        .collect();
    let mut reapplied = 0usize;
    for entry in entries {
        if in_database.contains(&entry.key()) {
            continue;
        }
        let scope = Scope::system(&entry.tenant);
        let context = AuditContext {
            interaction: "erase",
            resource_type: Some("Patient".into()),
            patient: Some(entry.pseudonym.clone()),
            request_id: LEDGER_REQUEST_ID.into(),
            ..AuditContext::default()
        };
        let mut audit = app.audit_entry(&context, "erase", 200);
        // The record belongs to the ledger's tenant, whatever this node serves.
        audit.tenant = entry.tenant.clone();
        let erased_at = DateTime::parse_from_rfc3339(&entry.erased)
            .map(|time| time.with_timezone(&Utc))
            .unwrap_or_else(|_| Utc::now());
        let outcome = store
            .erase_compartment(
                &scope,
                &ErasureRequest {
                    pseudonym: entry.pseudonym.clone(),
                    erased_at,
                    respect_holds: false,
                    audit: Some(audit),
                },
            )
            .await
            .map_err(|error| format!("cannot re-apply an erasure from the ledger: {error}"))?;
        if let ErasureOutcome::Erased { changed: true, .. } = outcome {
            reapplied += 1;
            tracing::warn!(
                pseudonym = %entry.pseudonym,
                "erasure re-applied from the ledger: the database did not know it (restored from an older copy?)"
            );
        }
        app.vault.forget(&entry.key_ids);
    }
    // Tombstones the ledger lacks, and the position the watcher starts from.
    let mut last = 0;
    for tombstone in store
        .erasures_after(0)
        .await
        .map_err(|error| format!("cannot read the erasure tombstones: {error}"))?
    {
        app.erasure_ledger.record(&tombstone).await?;
        last = last.max(tombstone.erasure_id);
    }
    app.erasure_ledger
        .last_seen
        .store(last, std::sync::atomic::Ordering::SeqCst);
    if reapplied > 0 {
        crate::audit::log::sequence_all(store.as_ref())
            .await
            .map_err(|error| {
                format!("cannot place the re-applied erasures' audit records: {error}")
            })?;
    }
    Ok(())
}

/// Polls for erasures made by any node and acts on each once: drops its keys from this node's
/// cache and records it in this node's ledger. Stops when the server is gone.
pub fn watch(app: &Arc<App>) {
    let app: Weak<App> = Arc::downgrade(app);
    tokio::spawn(async move {
        loop {
            let Some(app) = app.upgrade() else {
                return;
            };
            let period = std::time::Duration::from_millis(app.settings.erasure.poll_ms.max(50));
            if let Err(error) = catch_up(&app).await {
                tracing::warn!(%error, "cannot look for erasures made by other nodes; retrying");
            }
            drop(app);
            tokio::time::sleep(period).await;
        }
    });
}

/// Acts on the tombstones after the last one seen.
///
/// # Errors
/// When the database or the ledger fails; the next round tries again from the same point.
pub async fn catch_up(app: &App) -> Result<(), String> {
    let ledger = &app.erasure_ledger;
    let after = ledger.last_seen.load(std::sync::atomic::Ordering::SeqCst);
    let tombstones = app
        .store
        .erasures_after(after)
        .await
        .map_err(|error| error.to_string())?;
    for tombstone in tombstones {
        app.vault.forget(&tombstone.key_ids);
        ledger.record(&tombstone).await?;
        ledger
            .last_seen
            .fetch_max(tombstone.erasure_id, std::sync::atomic::Ordering::SeqCst);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tombstone(pseudonym: &str) -> Tombstone {
        Tombstone {
            erasure_id: 1,
            tenant: "default".into(),
            pseudonym: pseudonym.into(),
            key_ids: vec!["k1".into()],
            resources_erased: 3,
            erased_us: 1_700_000_000_000_000,
        }
    }

    #[tokio::test]
    async fn the_ledger_appends_each_erasure_once_and_reads_it_back() {
        let dir = std::env::temp_dir().join(format!("ledger-{}", uuid::Uuid::new_v4()));
        let path = dir.join("erasure-ledger.jsonl");
        let (ledger, entries) = Ledger::open(&path).unwrap();
        assert!(entries.is_empty());
        ledger.record(&tombstone("p1")).await.unwrap();
        ledger.record(&tombstone("p1")).await.unwrap();
        ledger.record(&tombstone("p2")).await.unwrap();
        let (_, entries) = Ledger::open(&path).unwrap();
        let pseudonyms: Vec<&str> = entries
            .iter()
            .map(|entry| entry.pseudonym.as_str())
            .collect();
        assert_eq!(pseudonyms, ["p1", "p2"]);
        assert_eq!(entries[0].key_ids, ["k1"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "nobody else may read the ledger");
        }
        std::fs::write(&path, "not json\n").unwrap();
        assert!(
            Ledger::open(&path).is_err(),
            "a damaged ledger stops the start"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
