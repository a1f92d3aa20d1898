//! Configuration: built-in defaults, then an optional TOML file (`--config` or `CUSTODIAN_CONFIG`),
//! then environment variables `CUSTODIAN_<KEY>` (e.g. `CUSTODIAN_LISTEN`, `CUSTODIAN_DATA_DIR`,
//! `CUSTODIAN_DATABASE_URL`). Later sources win. Every key is documented on [`Settings`] and in
//! README.md.
//!
//! Secrets (the database URL may carry a password) are `secrecy` types: they never appear in
//! `Debug` output or logs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Every setting of the server. Field names are the TOML keys and, upper-cased with the
/// `CUSTODIAN_` prefix, the environment variables.
#[derive(Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Address to listen on (`CUSTODIAN_LISTEN`, default `127.0.0.1:8080`; port 0 picks a free port).
    pub listen: String,
    /// Directory of local state: the SQLite file and, later, the local key file
    /// (`CUSTODIAN_DATA_DIR`, default `./data`). Created on first start.
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…` (`CUSTODIAN_DATABASE_URL`). Default: `custodian.db` in the
    /// data directory.
    pub database_url: Option<SecretString>,
    /// Maximum database connections in the pool (`CUSTODIAN_MAX_CONNECTIONS`).
    pub max_connections: u32,
    /// The public base URL used in `Location`, `fullUrl` and paging links
    /// (`CUSTODIAN_BASE_URL`, default `http://<listen>`). Set it when behind a proxy.
    pub base_url: Option<String>,
    /// Directory of FHIR definition data (`CUSTODIAN_PROFILES_DIR`, default `./fhir-profiles`).
    pub profiles_dir: PathBuf,
    /// Largest request body accepted, in bytes (`CUSTODIAN_MAX_BODY_BYTES`, default 8 MiB);
    /// larger bodies get 413 before they are read whole.
    pub max_body_bytes: usize,
    /// Largest transaction or batch Bundle accepted, in bytes (413 beyond).
    pub max_bundle_bytes: usize,
    /// Most entries in one transaction or batch Bundle (413 beyond).
    pub max_bundle_entries: usize,
    /// Seconds after which a request is abandoned with 503 (`CUSTODIAN_REQUEST_TIMEOUT_SECS`).
    pub request_timeout_secs: u64,
    /// Seconds after which PostgreSQL cancels one statement of this process
    /// (`CUSTODIAN_STATEMENT_TIMEOUT_SECS`, default 30; 0 = no limit). A request abandoned at
    /// its timeout drops its connection, but PostgreSQL would go on running the statement (or
    /// waiting for a lock) until it ends; this bounds it. Migrations run without the limit.
    pub statement_timeout_secs: u64,
    /// Default and maximum page size of history bundles (`CUSTODIAN_PAGE_SIZE`,
    /// `CUSTODIAN_MAX_PAGE_SIZE`).
    pub page_size: usize,
    pub max_page_size: usize,
    /// Log output: `text` or `json` (`CUSTODIAN_LOG_FORMAT`). The level filter is `CUSTODIAN_LOG`.
    pub log_format: LogFormat,
    /// The tenant this node serves (`CUSTODIAN_TENANT`); every row carries it.
    pub tenant: String,
    /// Envelope encryption: `[keys]` in TOML, `CUSTODIAN_KEYS__<KEY>` in the environment.
    pub keys: KeySettings,
    /// Authentication and authorization: `[auth]`, `CUSTODIAN_AUTH__<KEY>`.
    pub auth: AuthSettings,
    /// The audit log: `[audit]`, `CUSTODIAN_AUDIT__<KEY>`.
    pub audit: AuditSettings,
    /// Patient consent and break-the-glass: `[consent]`, `CUSTODIAN_CONSENT__<KEY>`.
    pub consent: ConsentSettings,
    /// Erasure (`Patient/$erase`): `[erasure]`, `CUSTODIAN_ERASURE__<KEY>`.
    pub erasure: ErasureSettings,
    /// Bulk Data export: `[export]`, `CUSTODIAN_EXPORT__<KEY>`.
    pub export: ExportSettings,
    /// Per-client request budgets: `[rate_limit]`, `CUSTODIAN_RATE_LIMIT__<KEY>`.
    pub rate_limit: RateLimitSettings,
    /// Whether `serve` applies pending migrations first (`CUSTODIAN_MIGRATE_ON_START`). Off when
    /// the server runs as the restricted application role and migrations as the owner.
    pub migrate_on_start: bool,
}

/// How patient consent is enforced.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ConsentSettings {
    /// The decision when no active Consent of the patient speaks to an access: `permit` for an
    /// opt-out jurisdiction (the default), `deny` for an opt-in one.
    pub default_decision: crate::consent::Verdict,
    /// How long a break-the-glass session lasts from its first override, seconds (default one
    /// hour). After it, the same access token can no longer break the glass.
    pub break_glass_secs: u64,
}

impl Default for ConsentSettings {
    fn default() -> Self {
        ConsentSettings {
            default_decision: crate::consent::Verdict::Permit,
            break_glass_secs: 3600,
        }
    }
}

/// Request budgets (see `src/api/rate_limit.rs`). A rate of 0 turns a budget off.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RateLimitSettings {
    /// Sustained requests per second of one client (token issuer, `client_id` and subject);
    /// fractions allowed (0.5 = one request every two seconds).
    pub client_per_sec: f64,
    /// Requests one client may send at once above its sustained rate.
    pub client_burst: u32,
    /// Sustained requests per second from one network address without a valid token.
    pub unauthenticated_per_sec: f64,
    /// Requests without a valid token one address may send at once.
    pub unauthenticated_burst: u32,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        // Generous for an EHR integration (which sends transactions, not single resources) and
        // far above what a person at a screen does; tight for a credential-guessing flood.
        RateLimitSettings {
            client_per_sec: 200.0,
            client_burst: 400,
            unauthenticated_per_sec: 20.0,
            unauthenticated_burst: 40,
        }
    }
}

/// Bulk Data `$export` jobs (see `src/export/`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ExportSettings {
    /// How long a job and its output files are kept after the job ends (or, for a job that never
    /// ran, after its kick-off), seconds (default one hour). Then they are deleted and polling
    /// answers 404.
    pub retention_secs: u64,
    /// Resources read, checked and sealed per batch; the worker yields between batches so that
    /// an export never starves the API.
    pub batch_size: usize,
    /// How long a worker's lease on a running job lasts without renewal, seconds. A node that
    /// stops leaves its job to be taken over (and restarted) when the lease runs out.
    pub lease_secs: u64,
    /// How often an idle worker looks for queued jobs and expired ones, milliseconds.
    pub poll_ms: u64,
    /// How many times a job is started before it is failed (a job that keeps stopping its node,
    /// or keeps losing its lease, must not run forever).
    pub max_attempts: i64,
    /// Whether this node runs export jobs (kick-off, polling and download work on every node).
    pub worker: bool,
}

impl Default for ExportSettings {
    fn default() -> Self {
        ExportSettings {
            retention_secs: 3600,
            batch_size: 500,
            lease_secs: 30,
            poll_ms: 500,
            max_attempts: 3,
            worker: true,
        }
    }
}

/// The audit log's files and checkpoint cadence.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AuditSettings {
    /// Directory of the audit catalog (default `./audit`).
    pub catalog_dir: PathBuf,
    /// The Ed25519 key that signs checkpoints (default `<data_dir>/audit-ed25519.key`, created
    /// 0600). Every node writing to one database must use the same key.
    pub signing_key_file: Option<PathBuf>,
    /// The key of the keyed hash of query strings (default `<data_dir>/audit-query.key`); shared
    /// by all nodes like the signing key.
    pub query_key_file: Option<PathBuf>,
    /// A checkpoint after this many new records …
    pub checkpoint_every_records: i64,
    /// … or after this many seconds with at least one new record.
    pub checkpoint_every_secs: u64,
    /// Group-commit writers of reads' records on PostgreSQL (`CUSTODIAN_AUDIT__WRITERS`; SQLite
    /// always has one). Fewer writers gather bigger batches: fewer commits, each waited for
    /// longer.
    pub writers: usize,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            catalog_dir: PathBuf::from("audit"),
            signing_key_file: None,
            query_key_file: None,
            checkpoint_every_records: 1000,
            checkpoint_every_secs: 60,
            writers: 2,
        }
    }
}

/// Where the erasure ledger lives and how quickly a node learns of another node's erasures.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ErasureSettings {
    /// The erasure ledger: an append-only file outside the database naming every erased
    /// compartment (pseudonym and key ids only), re-applied at start so that a restored older
    /// database cannot bring an erased patient back (default `<data_dir>/erasure-ledger.jsonl`).
    /// Keep it on storage that outlives the database's backups, and back it up separately.
    pub ledger_file: Option<PathBuf>,
    /// How often (milliseconds) a node looks for erasures made by other nodes, to drop their
    /// data keys from its cache and record them in its own ledger.
    pub poll_ms: u64,
}

impl Default for ErasureSettings {
    fn default() -> Self {
        ErasureSettings {
            ledger_file: None,
            poll_ms: 1000,
        }
    }
}

/// Token issuers and the policy files.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AuthSettings {
    /// OIDC issuer URLs to trust, separated by spaces or commas.
    pub issuers: String,
    /// The `aud` access tokens must carry (default: the base URL).
    pub audience: Option<String>,
    /// The claim that holds the caller's roles.
    pub roles_claim: String,
    /// Clock leeway for `exp` and `nbf`, seconds.
    pub leeway_secs: u64,
    /// The built-in development issuer (`custodian token`): `auto` (on for the embedded default:
    /// SQLite, local keys, no issuer), `on` (also with PostgreSQL; refused together with AWS KMS
    /// or an OIDC issuer), or `off`.
    pub dev_issuer: DevIssuerMode,
    /// Directory of the Casbin model and policy (default `./policies`).
    pub policies_dir: PathBuf,
}

/// Whether the development issuer is trusted.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DevIssuerMode {
    Auto,
    On,
    Off,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            issuers: String::new(),
            audience: None,
            roles_claim: "roles".into(),
            leeway_secs: 30,
            dev_issuer: DevIssuerMode::Auto,
            policies_dir: PathBuf::from("policies"),
        }
    }
}

impl AuthSettings {
    /// The configured issuer URLs.
    pub fn issuer_list(&self) -> Vec<String> {
        self.issuers
            .split([' ', ','])
            .filter(|issuer| !issuer.is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// Which key provider wraps the data keys, and the data-key cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct KeySettings {
    /// `local` (a key file; the development default) or `aws` (AWS KMS or a compatible endpoint).
    pub provider: KeyProviderKind,
    /// Directory of the local KEK files (default `<data_dir>/keys`).
    pub local_dir: Option<PathBuf>,
    /// KMS key id, ARN or alias that wraps new data keys (`aws`).
    pub aws_key_id: Option<String>,
    /// KMS region (`aws`; default from the AWS chain).
    pub aws_region: Option<String>,
    /// KMS endpoint URL (`aws`; default AWS itself), for API-compatible endpoints.
    pub aws_endpoint_url: Option<String>,
    /// Milliseconds a provider call may take before the request answers 503.
    pub timeout_ms: u64,
    /// Most data keys held in clear in memory.
    pub cache_max_entries: u64,
    /// Seconds a data key stays cached.
    pub cache_max_age_secs: u64,
}

/// The key provider kinds.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeyProviderKind {
    Local,
    Aws,
}

impl Default for KeySettings {
    fn default() -> Self {
        KeySettings {
            provider: KeyProviderKind::Local,
            local_dir: None,
            aws_key_id: None,
            aws_region: None,
            aws_endpoint_url: None,
            timeout_ms: 3000,
            cache_max_entries: 100_000,
            cache_max_age_secs: 300,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("data"),
            database_url: None,
            max_connections: 16,
            base_url: None,
            profiles_dir: PathBuf::from("fhir-profiles"),
            max_body_bytes: 8 * 1024 * 1024,
            max_bundle_bytes: 64 * 1024 * 1024,
            max_bundle_entries: 10_000,
            request_timeout_secs: 30,
            statement_timeout_secs: 30,
            page_size: 50,
            max_page_size: 500,
            log_format: LogFormat::Text,
            tenant: "default".into(),
            keys: KeySettings::default(),
            auth: AuthSettings::default(),
            audit: AuditSettings::default(),
            consent: ConsentSettings::default(),
            erasure: ErasureSettings::default(),
            export: ExportSettings::default(),
            rate_limit: RateLimitSettings::default(),
            migrate_on_start: true,
        }
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("database", &self.database_kind())
            .field("max_connections", &self.max_connections)
            .field("statement_timeout_secs", &self.statement_timeout_secs)
            .field("base_url", &self.base_url)
            .field("profiles_dir", &self.profiles_dir)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_bundle_bytes", &self.max_bundle_bytes)
            .field("max_bundle_entries", &self.max_bundle_entries)
            .field("tenant", &self.tenant)
            .field("keys", &self.keys)
            .field("auth", &self.auth)
            .field("consent", &self.consent)
            .field("rate_limit", &self.rate_limit)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Loads defaults, then the TOML file if given, then `CUSTODIAN_*` environment variables.
    ///
    /// # Errors
    /// A readable message naming the bad key when a value has the wrong type.
    pub fn load(config_file: Option<&Path>) -> Result<Settings, String> {
        let mut figment = Figment::new();
        if let Some(path) = config_file {
            if !path.exists() {
                return Err(format!(
                    "configuration file {} does not exist",
                    path.display()
                ));
            }
            figment = figment.merge(Toml::file(path));
        }
        // CUSTODIAN_CONFIG names the file and CUSTODIAN_LOG the log filter; neither is a setting.
        figment = figment.merge(
            Env::prefixed("CUSTODIAN_")
                .ignore(&["config", "log"])
                .split("__"),
        );
        figment.extract().map_err(|error| error.to_string())
    }

    /// The database URL, defaulting to a SQLite file in the data directory.
    pub fn database_url(&self) -> SecretString {
        match &self.database_url {
            Some(url) => url.clone(),
            None => {
                let file = self.data_dir.join("custodian.db");
                SecretString::from(format!("sqlite://{}?mode=rwc", file.display()))
            }
        }
    }

    /// The limit on one PostgreSQL statement (see `statement_timeout_secs`); `None`: no limit.
    pub fn statement_timeout(&self) -> Option<std::time::Duration> {
        (self.statement_timeout_secs > 0)
            .then(|| std::time::Duration::from_secs(self.statement_timeout_secs))
    }

    /// The checkpoint signing key file.
    pub fn audit_signing_key_file(&self) -> PathBuf {
        self.audit
            .signing_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit-ed25519.key"))
    }

    /// The audit query-hash key file.
    pub fn audit_query_key_file(&self) -> PathBuf {
        self.audit
            .query_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit-query.key"))
    }

    /// The erasure ledger file.
    pub fn erasure_ledger_file(&self) -> PathBuf {
        self.erasure
            .ledger_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("erasure-ledger.jsonl"))
    }

    /// Settings that only make sense in production: AWS KMS or a real token issuer.
    pub fn production_settings(&self) -> Vec<&'static str> {
        let mut found = Vec::new();
        if self.keys.provider == KeyProviderKind::Aws {
            found.push("the aws key provider");
        }
        if !self.auth.issuer_list().is_empty() {
            found.push("an OIDC issuer");
        }
        found
    }

    /// Whether the development issuer is trusted.
    ///
    /// # Errors
    /// When it is forced on together with production settings.
    pub fn dev_issuer_enabled(&self) -> Result<bool, String> {
        let production = self.production_settings();
        match self.auth.dev_issuer {
            DevIssuerMode::Off => Ok(false),
            // The embedded default: SQLite, local keys, no issuer.
            DevIssuerMode::Auto => Ok(production.is_empty() && self.database_kind() == "sqlite"),
            DevIssuerMode::On if production.is_empty() => Ok(true),
            DevIssuerMode::On => Err(format!(
                "auth.dev_issuer = on is refused with production settings ({})",
                production.join(", ")
            )),
        }
    }

    /// The directory of the local KEK files.
    pub fn local_key_dir(&self) -> PathBuf {
        self.keys
            .local_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys"))
    }

    /// `sqlite` or `postgres` (never the URL itself, which may hold a password).
    pub fn database_kind(&self) -> &'static str {
        if self.database_url().expose_secret().starts_with("postgres") {
            "postgres"
        } else {
            "sqlite"
        }
    }

    /// The configured listen address.
    ///
    /// # Errors
    /// When `listen` is not `host:port`.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen
            .parse()
            .map_err(|_| format!("listen must be host:port, got {:?}", self.listen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_database_url() {
        let settings = Settings {
            database_url: Some(SecretString::from("postgres://app:hunter2@db/custodian")),
            ..Settings::default()
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("postgres"));
    }

    #[test]
    fn default_database_is_a_sqlite_file_in_the_data_dir() {
        let settings = Settings {
            data_dir: PathBuf::from("/tmp/x"),
            ..Settings::default()
        };
        assert_eq!(
            settings.database_url().expose_secret(),
            "sqlite:///tmp/x/custodian.db?mode=rwc"
        );
        assert_eq!(settings.database_kind(), "sqlite");
    }
}
