//! The tamper-evident, append-only audit log: one AuditEvent-shaped record per request,
//! allowed or denied.
//!
//! - [`event`]: the record and the FHIR AuditEvent (IHE BALP) built from it, with the codes
//!   from the audit catalog (`audit/catalog.json`).
//! - [`log`]: durable appends (group commit), signed checkpoints, proofs.
//! - [`merkle`]: the RFC 9162 Merkle tree.
//! - [`verify`]: recomputes everything and names the first bad record.

pub mod event;
pub mod log;
pub mod merkle;
pub mod verify;
