//! # Custodian
//!
//! A FHIR R4 server for health records: every resource stored encrypted, every access decided
//! and recorded. See DESIGN (../shared/DESIGN.md in the team's workspace) and README.md.
//!
//! # Layout
//! - [`api`]: the FHIR RESTful endpoints, one file per interaction, and the router.
//! - [`authz`]: bearer tokens, SMART scopes, Casbin policy, the access decision.
//! - [`consent`]: patient Consent directives and break-the-glass.
//! - [`fhir`]: wire formats, strict parsing and validation, patient compartment, Bundles,
//!   CapabilityStatement.
//! - [`crypto`]: envelope encryption (key providers, data-key cache, sealing of bodies).
//! - [`store`]: the storage trait and its SQL implementation (SQLite and PostgreSQL).
//! - [`error`]: the one mapping from errors to OperationOutcome and HTTP status.
//! - [`import`]: `custodian import`, bulk loading through the API's code paths.
//! - [`erasure`]: the erasure ledger outside the database, its re-application at start, and
//!   how every node learns of an erasure (`Patient/$erase` itself is in [`api`]).
//! - [`export`]: Bulk Data `$export` jobs and the background worker that runs them.
//! - [`config`], [`startup`], [`telemetry`], [`cli`]: settings, wiring, logging, commands.
//! - `src/fhir-codec/`: a separate crate that compiles fhirbolt's generic parser once.
//! - `fuzzing` (hidden): the harnesses of the fuzz targets in `tests/fuzz/`.

pub mod api;
pub mod audit;
pub mod authz;
pub mod cli;
pub mod config;
pub mod consent;
pub mod crypto;
pub mod erasure;
pub mod error;
pub mod export;
pub mod fhir;
#[doc(hidden)]
pub mod fuzzing;
pub mod import;
pub mod search;
pub mod startup;
pub mod store;
pub mod telemetry;

/// Installs aws-lc-rs as the process's TLS crypto provider (for outgoing HTTPS: OIDC discovery
/// and JWKS). Idempotent; called at start-up before any HTTP client is built.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
