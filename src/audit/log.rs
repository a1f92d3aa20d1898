//! The audit log at run time: durable appends (group-committed for reads, in the data's own
//! transaction for writes), signed checkpoints of the Merkle tree, and verification.
//!
//! Durability, fail closed: a read's response is sent only after its audit record is committed;
//! if it cannot be, the request answers 503 and returns no data. Appends from many concurrent
//! requests are gathered by one writer task into a single transaction (group commit), so the
//! cost of a commit is shared instead of paid per request. Each writer keeps a database
//! connection of its own, so that a group costs one round trip.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use super::merkle::{self, Frontier, Hash};
use crate::store::{AuditEntry, Checkpoint, HeldConnection, Store, StoreError};

/// Most records one group commit writes.
const MAX_BATCH: usize = 512;

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The record could not be made durable: the request must fail with 503.
    #[error("audit record not written: {0}")]
    NotWritten(String),
    #[error("audit error: {0}")]
    Internal(String),
}

struct Pending {
    entry: AuditEntry,
    done: oneshot::Sender<Result<i64, String>>,
}

/// The append side of the audit log, shared by all requests.
pub struct AuditLog {
    sender: mpsc::Sender<Pending>,
}

impl AuditLog {
    /// Starts `writers` group-commit writers over `store`. With PostgreSQL several batches can
    /// be in flight at once (the database overlaps their commits); SQLite has one writer anyway.
    pub fn start(store: Arc<dyn Store>, writers: usize) -> AuditLog {
        let (sender, receiver) = mpsc::channel(8192);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(store.clone(), receiver.clone()));
        }
        AuditLog { sender }
    }

    /// Appends one record and returns once it is committed, with its record id.
    ///
    /// # Errors
    /// [`AuditError::NotWritten`] when the database refused or is unreachable.
    pub async fn append(&self, entry: AuditEntry) -> Result<i64, AuditError> {
        let (done, result) = oneshot::channel();
        self.sender
            .send(Pending { entry, done })
            .await
            .map_err(|_| AuditError::NotWritten("the audit writer stopped".into()))?;
        result
            .await
            .map_err(|_| AuditError::NotWritten("the audit writer stopped".into()))?
            .map_err(AuditError::NotWritten)
    }
}

async fn write_batches(
    store: Arc<dyn Store>,
    receiver: Arc<tokio::sync::Mutex<mpsc::Receiver<Pending>>>,
) {
    let mut held = HeldConnection::default();
    loop {
        // Take everything waiting (at least one record), then let another writer take the next.
        let batch = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut batch = vec![first];
            take_waiting(&mut receiver, &mut batch);
            // With company (two records or more: requests are running concurrently), one
            // yield before the group closes, so that requests this runtime is about to finish
            // append their records to it: fewer, larger groups. Under 32 concurrent reads on
            // SQLite the journal writer's CPU per read (mostly the `fsync` of each commit) fell
            // from 31–40 to 19–24 µs (benches/README.md). A lone record is committed at once:
            // with one client the yield could only add latency.
            if (2..MAX_BATCH).contains(&batch.len()) {
                tokio::task::yield_now().await;
                take_waiting(&mut receiver, &mut batch);
            }
            batch
        };
        let (entries, waiting): (Vec<AuditEntry>, Vec<_>) = batch
            .into_iter()
            .map(|pending| (pending.entry, pending.done))
            .unzip();
        match store.append_audit_held(&mut held, &entries).await {
            Ok(ids) => {
                for (done, id) in waiting.into_iter().zip(ids) {
                    let _ = done.send(Ok(id));
                }
            }
            Err(error) => {
                tracing::error!(%error, records = entries.len(), "audit append failed");
                for done in waiting {
                    let _ = done.send(Err(error.to_string()));
                }
            }
        }
    }
}

/// Moves the records already waiting in `receiver` into `batch`, up to [`MAX_BATCH`].
fn take_waiting(receiver: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>) {
    while batch.len() < MAX_BATCH {
        match receiver.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
}

/// The leaf hash of a record: its sequence number (8 bytes, big-endian) then its bytes, so that
/// a record moved to another position no longer matches. On PostgreSQL the sequencer computes
/// the same hash in SQL (`place_pending_in_database` in src/store/sql.rs): change both together;
/// `custodian audit verify` recomputes every leaf with this function.
pub fn record_leaf(sequence: i64, record: &[u8]) -> Hash {
    let mut data = Vec::with_capacity(8 + record.len());
    data.extend_from_slice(&sequence.to_be_bytes());
    data.extend_from_slice(record);
    merkle::leaf_hash(&data)
}

/// Signs checkpoints with an Ed25519 key kept in a file (created 0600 on first use).
pub struct CheckpointSigner {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl CheckpointSigner {
    /// Loads or creates the key file.
    ///
    /// # Errors
    /// A message when the file cannot be read, written or parsed.
    pub fn load_or_create(file: &Path) -> Result<CheckpointSigner, String> {
        if !file.exists() {
            let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| "cannot generate the audit signing key".to_string())?;
            write_secret(file, document.as_ref())?;
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(file)
                .map_err(|error| format!("cannot read {}: {error}", file.display()))?,
        );
        let pkcs8 = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| format!("{} is not base64", file.display()))?,
        );
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| format!("{} is not an Ed25519 key", file.display()))?;
        let key_id = key_id_of(pair.public_key().as_ref());
        Ok(CheckpointSigner { pair, key_id })
    }

    /// The public key (raw 32 bytes), to publish with exported checkpoints.
    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// The key's id: the first 16 hex digits of SHA-256 of the public key.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// A signed checkpoint of the tree of `tree_size` records with `root`.
    pub fn sign(&self, tree_size: i64, root: &Hash, signed_us: i64) -> Checkpoint {
        let message = checkpoint_message(tree_size, root, signed_us);
        Checkpoint {
            tree_size,
            root_hash: root.to_vec(),
            signed_us,
            key_id: self.key_id.clone(),
            signature: self.pair.sign(&message).as_ref().to_vec(),
        }
    }
}

/// The id of a public key.
pub fn key_id_of(public_key: &[u8]) -> String {
    merkle::to_hex(&Sha256::digest(public_key).into())[..16].to_string()
}

/// What a checkpoint signature covers.
pub fn checkpoint_message(tree_size: i64, root: &Hash, signed_us: i64) -> Vec<u8> {
    format!(
        "custodian-audit-checkpoint-v1\n{tree_size}\n{}\n{signed_us}\n",
        merkle::to_hex(root)
    )
    .into_bytes()
}

/// Whether `checkpoint` carries a valid signature by `public_key`.
pub fn checkpoint_signature_valid(checkpoint: &Checkpoint, public_key: &[u8]) -> bool {
    let Ok(root) = <Hash>::try_from(checkpoint.root_hash.as_slice()) else {
        return false;
    };
    let message = checkpoint_message(checkpoint.tree_size, &root, checkpoint.signed_us);
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&message, &checkpoint.signature)
        .is_ok()
}

/// A 32-byte secret in a file, created 0600 on first use (the audit query-hash key).
///
/// # Errors
/// A message when the file cannot be read or written.
pub fn load_or_create_secret(file: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    use aws_lc_rs::rand::SecureRandom;
    if !file.exists() {
        let mut secret = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(secret.as_mut_slice())
            .map_err(|_| "no randomness".to_string())?;
        write_secret(file, secret.as_slice())?;
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(file)
            .map_err(|error| format!("cannot read {}: {error}", file.display()))?,
    );
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map(Zeroizing::new)
        .map_err(|_| format!("{} is not base64", file.display()))
}

fn write_secret(file: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent).map_err(|error| error.to_string())?;
    }
    let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(bytes));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut handle = options
        .open(file)
        .map_err(|error| format!("cannot create {}: {error}", file.display()))?;
    handle
        .write_all(encoded.as_bytes())
        .and_then(|()| handle.sync_all())
        .map_err(|error| format!("cannot write {}: {error}", file.display()))
}

/// Places committed records in the log (every 100 ms) and writes a checkpoint when at least
/// `every_records` records, or `every` time with at least one
/// record, came after the last one. Several processes may run this: the store keeps the first
/// checkpoint of each size.
pub fn start_checkpointer(
    store: Arc<dyn Store>,
    signer: Arc<CheckpointSigner>,
    every_records: i64,
    every: Duration,
) {
    tokio::spawn(async move {
        let mut last_written = std::time::Instant::now();
        // The tree as of this process's last checkpoint, extended at the next one.
        let mut frontier = Frontier::new();
        let mut ticks = 0u32;
        loop {
            // Records take their place in the log within ~100 ms of their commit; one that
            // commits with an id below records already placed, within about a second, at the
            // sweep (a pass with a look back), which is also when SQLite's reads' records are
            // copied from their journal (see `ReadAuditJournal` in src/store/sql.rs).
            tokio::time::sleep(Duration::from_millis(100)).await;
            ticks = ticks.wrapping_add(1);
            let lookback = if ticks.is_multiple_of(10) {
                LATE_COMMIT_LOOKBACK
            } else {
                0
            };
            if let Err(error) = sequence_up_to_date(&*store, lookback).await {
                tracing::warn!(%error, "audit records not sequenced");
                continue;
            }
            if !ticks.is_multiple_of(5) {
                continue;
            }
            if let Err(error) = checkpoint_if_due(
                &*store,
                &signer,
                (every_records, every),
                &mut frontier,
                &mut last_written,
            )
            .await
            {
                tracing::warn!(%error, "audit checkpoint not written");
            }
        }
    });
}

/// Writes a checkpoint when `every_records` records, or `every` time with at least one record,
/// came after the last one.
async fn checkpoint_if_due(
    store: &dyn Store,
    signer: &CheckpointSigner,
    (every_records, every): (i64, Duration),
    frontier: &mut Frontier,
    last_written: &mut std::time::Instant,
) -> Result<(), StoreError> {
    let size = store.audit_size().await?;
    let last = store
        .latest_checkpoint()
        .await?
        .map(|checkpoint| checkpoint.tree_size)
        .unwrap_or(0);
    let due =
        size - last >= every_records.max(1) || (size > last && last_written.elapsed() >= every);
    if !due {
        return Ok(());
    }
    let checkpoint = checkpoint_extending(store, signer, frontier, size).await?;
    store.insert_checkpoint(&checkpoint).await?;
    *last_written = std::time::Instant::now();
    Ok(())
}

/// Places every committed record in the ordered log.
///
/// # Errors
/// When the store refuses.
pub async fn sequence_all(store: &dyn Store) -> Result<(), StoreError> {
    sequence_up_to_date(store, LATE_COMMIT_LOOKBACK).await
}

/// How far below the highest placed record id a sequencer looks for records that committed
/// late (far more ids than can be in flight at once).
const LATE_COMMIT_LOOKBACK: i64 = 10_000;

/// Records one sequencing statement places at most.
const SEQUENCE_BATCH: i64 = 10_000;

/// Places committed records in batches until none is left, looking back `lookback` ids for
/// late commits (see [`Store::sequence_pending`]).
async fn sequence_up_to_date(store: &dyn Store, lookback: i64) -> Result<(), StoreError> {
    while store.sequence_pending(SEQUENCE_BATCH, lookback).await? == SEQUENCE_BATCH {}
    Ok(())
}

/// Signs the tree of the first `size` records as it is in the store now.
///
/// # Errors
/// When the store cannot be read.
pub async fn checkpoint_now(
    store: &dyn Store,
    signer: &CheckpointSigner,
    size: i64,
) -> Result<Checkpoint, StoreError> {
    checkpoint_extending(store, signer, &mut Frontier::new(), size).await
}

/// Signs the tree of the first `size` records, reading only the leaves `frontier` does not
/// hold yet and extending it: placed leaves never change, so a checkpointer that keeps its
/// frontier reads each leaf once instead of the whole log per checkpoint. A frontier larger
/// than `size` (another process's smaller tree) is not usable and is rebuilt from the start.
async fn checkpoint_extending(
    store: &dyn Store,
    signer: &CheckpointSigner,
    frontier: &mut Frontier,
    size: i64,
) -> Result<Checkpoint, StoreError> {
    if i64::try_from(frontier.size()).map_or(true, |held| held > size) {
        *frontier = Frontier::new();
    }
    let mut from = i64::try_from(frontier.size()).unwrap_or_default();
    while from < size {
        let page = store.audit_leaves(from, (size - from).min(10_000)).await?;
        if page.is_empty() {
            break;
        }
        for leaf in &page {
            frontier.push(*leaf);
        }
        from += page.len() as i64;
    }
    if from != size {
        return Err(StoreError::Internal(format!(
            "the log holds {from} leaves where {size} were counted"
        )));
    }
    Ok(signer.sign(
        size,
        &frontier.root(),
        chrono::Utc::now().timestamp_micros(),
    ))
}

async fn leaves_up_to(store: &dyn Store, size: i64) -> Result<Vec<Hash>, String> {
    let available = store
        .audit_size()
        .await
        .map_err(|error| error.to_string())?;
    if size < 1 || size > available {
        return Err(format!(
            "the log holds {available} records; a tree of {size} does not exist"
        ));
    }
    let mut leaves = Vec::with_capacity(usize::try_from(size).unwrap_or_default());
    while (leaves.len() as i64) < size {
        let from = leaves.len() as i64;
        let page = store
            .audit_leaves(from, (size - from).min(10_000))
            .await
            .map_err(|error| error.to_string())?;
        if page.is_empty() {
            return Err(format!("record {from} is missing"));
        }
        leaves.extend(page);
    }
    Ok(leaves)
}

/// An inclusion proof of record `sequence` in the tree of `size` records (default: all).
///
/// # Errors
/// A message when the record or tree size does not exist.
pub async fn inclusion(
    store: &dyn Store,
    sequence: i64,
    size: Option<i64>,
) -> Result<serde_json::Value, String> {
    let size = match size {
        Some(size) => size,
        None => store
            .audit_size()
            .await
            .map_err(|error| error.to_string())?,
    };
    if sequence < 0 || sequence >= size {
        return Err(format!(
            "record {sequence} is not in a tree of {size} records"
        ));
    }
    let leaves = leaves_up_to(store, size).await?;
    let index = usize::try_from(sequence).map_err(|_| "sequence out of range".to_string())?;
    let path = merkle::inclusion_proof(&leaves, index).ok_or("no proof for this record")?;
    Ok(serde_json::json!({
        "sequence": sequence,
        "tree_size": size,
        "leaf_hash": merkle::to_hex(&leaves[index]),
        "audit_path": path.iter().map(merkle::to_hex).collect::<Vec<_>>(),
        "root_hash": merkle::to_hex(&merkle::root(&leaves)),
    }))
}

/// A consistency proof between the trees of `from` and `to` records.
///
/// # Errors
/// A message when either size does not exist or `from > to`.
pub async fn consistency(
    store: &dyn Store,
    from: i64,
    to: i64,
) -> Result<serde_json::Value, String> {
    if from < 1 || from > to {
        return Err("consistency needs 1 <= from <= to".into());
    }
    let leaves = leaves_up_to(store, to).await?;
    let old = usize::try_from(from).map_err(|_| "size out of range".to_string())?;
    let proof = merkle::consistency_proof(&leaves, old).ok_or("no proof for these sizes")?;
    Ok(serde_json::json!({
        "from": from,
        "to": to,
        "old_root": merkle::to_hex(&merkle::root(&leaves[..old])),
        "new_root": merkle::to_hex(&merkle::root(&leaves)),
        "proof": proof.iter().map(merkle::to_hex).collect::<Vec<_>>(),
    }))
}
