//! `custodian audit verify`: recomputes the whole log and names the first thing that is wrong.
//!
//! It reads every record in sequence order and checks that sequence numbers are dense (a deleted
//! record leaves a gap), that each stored leaf hash is the hash of its record at its position
//! (a changed or moved record no longer matches), that the Merkle root at each checkpoint's size
//! equals the checkpoint's root (a record rewritten together with its leaf hash, or a truncated
//! tail, changes it), and that each checkpoint is signed by a trusted key. Memory stays
//! O(log n): the tree is folded in a [`Frontier`].

use super::log::{checkpoint_signature_valid, key_id_of, record_leaf};
use super::merkle::{to_hex, Frontier};
use crate::store::{Store, StoreError};

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Records checked.
    pub records: i64,
    /// Checkpoints checked.
    pub checkpoints: usize,
    /// The first problem found, if any.
    pub first_problem: Option<String>,
}

/// Verifies the log against the checkpoints signed by any of `trusted_keys` (raw Ed25519 public
/// keys).
///
/// # Errors
/// When the store cannot be read.
pub async fn verify(
    store: &dyn Store,
    trusted_keys: &[Vec<u8>],
) -> Result<Verification, StoreError> {
    let checkpoints = store.checkpoints_since(0).await?;
    let mut pending = checkpoints.iter().peekable();
    let mut frontier = Frontier::new();
    let mut expected_sequence = 0i64;
    let mut checked_checkpoints = 0;
    let fail = |records, checkpoints, problem: String| {
        Ok(Verification {
            records,
            checkpoints,
            first_problem: Some(problem),
        })
    };
    loop {
        let page = store.audit_records(expected_sequence, 10_000).await?;
        if page.is_empty() {
            break;
        }
        for record in &page {
            if record.sequence != expected_sequence {
                return fail(
                    expected_sequence,
                    checked_checkpoints,
                    format!(
                        "record {expected_sequence} is missing (next present: {})",
                        record.sequence
                    ),
                );
            }
            let leaf = record_leaf(record.sequence, &record.record);
            if leaf.as_slice() != record.leaf_hash.as_slice() {
                return fail(
                    expected_sequence,
                    checked_checkpoints,
                    format!("record {expected_sequence} was altered: its content does not match its leaf hash"),
                );
            }
            frontier.push(leaf);
            expected_sequence += 1;
            while let Some(checkpoint) =
                pending.next_if(|checkpoint| checkpoint.tree_size == expected_sequence)
            {
                if let Some(problem) = check_checkpoint(checkpoint, &frontier.root(), trusted_keys)
                {
                    return fail(expected_sequence, checked_checkpoints, problem);
                }
                checked_checkpoints += 1;
            }
        }
    }
    // The counter says how many records were ever appended: fewer rows means a removed tail.
    let appended = store.audit_size().await?;
    if expected_sequence < appended {
        return fail(
            expected_sequence,
            checked_checkpoints,
            format!(
                "records {expected_sequence} to {} are missing: the tail of the log was removed",
                appended - 1
            ),
        );
    }
    if let Some(checkpoint) = pending.next() {
        return fail(
            expected_sequence,
            checked_checkpoints,
            format!(
                "the log ends at {expected_sequence} records but a checkpoint covers {}: records after {expected_sequence} were removed",
                checkpoint.tree_size
            ),
        );
    }
    Ok(Verification {
        records: expected_sequence,
        checkpoints: checked_checkpoints,
        first_problem: None,
    })
}

fn check_checkpoint(
    checkpoint: &crate::store::Checkpoint,
    root: &super::merkle::Hash,
    trusted_keys: &[Vec<u8>],
) -> Option<String> {
    let size = checkpoint.tree_size;
    let key = trusted_keys
        .iter()
        .find(|key| key_id_of(key) == checkpoint.key_id);
    let Some(key) = key else {
        return Some(format!(
            "checkpoint at {size} records is signed by untrusted key {}",
            checkpoint.key_id
        ));
    };
    if !checkpoint_signature_valid(checkpoint, key) {
        return Some(format!(
            "checkpoint at {size} records has an invalid signature"
        ));
    }
    if checkpoint.root_hash.as_slice() != root.as_slice() {
        return Some(format!(
            "the records before checkpoint {size} do not match its root (recomputed {}): a record up to {} was rewritten",
            to_hex(root),
            size - 1
        ));
    }
    None
}
