//! The command line: `custodian serve | migrate | import | keys | audit | erasure | token`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::startup::Application;
use crate::store::SqlStore;

/// Custodian: a FHIR R4 server that seals, decides and proves every access to health records.
#[derive(Debug, Parser)]
#[command(name = "custodian", version, about)]
pub struct Cli {
    /// TOML configuration file; `CUSTODIAN_*` environment variables override it.
    #[arg(long, global = true, env = "CUSTODIAN_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the FHIR server (migrates the database first). Stops cleanly on SIGINT/SIGTERM.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Data keys: status, rotation of the key-encryption key, retirement of an old local KEK.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The audit log: verify it, export checkpoints, prove inclusion and consistency.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Legal holds that block `Patient/$erase`: place, release, list.
    #[command(subcommand)]
    Erasure(ErasureCommand),
    /// Print a development access token (dev mode only), signed by the key in the data
    /// directory. The token is the last line of standard output.
    Token(TokenArgs),
    /// Rebuild the search index from the stored resources (decrypting each), as every start
    /// does by itself after an upgrade that changed what the index holds. Exits when done.
    Reindex,
    /// Load transaction, batch and collection Bundles (`*.json`) and bulk NDJSON files
    /// (`*.ndjson`) from files or directories, through the same code paths as the API, as the
    /// local operator. A re-run changes nothing. Exits non-zero when anything failed.
    Import(ImportArgs),
}

/// `custodian import …`
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// No progress bar (it is also hidden when standard error is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Bundles (or runs of 100 NDJSON lines) imported at once; default four per CPU core.
    /// Bundles without a Patient entry always go first, one after the other.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: Option<u16>,
    /// Files or directories (walked in name order for `*.json` and `*.ndjson`).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

/// `custodian token …`
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The caller's role: practitioner, patient, ehr-system, compliance-officer or admin.
    #[arg(long)]
    pub role: String,
    /// `fhirUser`, e.g. Practitioner/123.
    #[arg(long)]
    pub fhir_user: Option<String>,
    /// The launch patient id (confines `patient/` scopes).
    #[arg(long)]
    pub patient: Option<String>,
    /// SMART scopes; default: the role's natural scopes.
    #[arg(long)]
    pub scope: Option<String>,
    /// Purpose of use, e.g. TREAT or ETREAT.
    #[arg(long)]
    pub purpose: Option<String>,
    /// `sub` (default: dev-<role>).
    #[arg(long)]
    pub subject: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub lifetime_secs: i64,
}

/// `custodian audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the whole log: dense sequence, every leaf, every checkpoint root and signature.
    /// Names the first bad record and exits non-zero if anything is wrong.
    Verify {
        /// Further trusted checkpoint public keys (base64, raw Ed25519), e.g. of other nodes.
        #[arg(long)]
        trusted_key: Vec<String>,
    },
    /// Print signed checkpoints (JSON lines) to anchor outside the database.
    Checkpoints {
        /// Only checkpoints signed at or after this instant or date.
        #[arg(long)]
        since: Option<String>,
    },
    /// Inclusion proof of one record.
    Prove {
        /// The record's sequence number.
        #[arg(long)]
        sequence: i64,
        /// The tree size to prove against (default: the whole log).
        #[arg(long)]
        size: Option<i64>,
    },
    /// Benchmark only (dev mode, empty log): append N synthetic records, to time `verify`.
    #[command(hide = true)]
    FillSynthetic {
        #[arg(long)]
        records: i64,
    },
    /// Consistency proof between two tree sizes.
    Consistency {
        #[arg(long)]
        from: i64,
        #[arg(long)]
        to: i64,
    },
}

/// `custodian erasure …`
#[derive(Debug, Subcommand)]
pub enum ErasureCommand {
    /// Place a legal hold on a patient: `Patient/$erase` answers 409 until it is released.
    Hold {
        /// The Patient's id.
        #[arg(long)]
        patient: String,
        /// The case or docket reference the hold is for (letters, digits, `.` `_` `:` `/` `-`;
        /// at most 64). It is shown to whoever attempts the erasure: never put a name here.
        #[arg(long)]
        case: String,
    },
    /// Release a patient's legal hold.
    Release {
        /// The Patient's id.
        #[arg(long)]
        patient: String,
    },
    /// List the legal holds (compartment pseudonym, case, since).
    Holds,
}

/// `custodian keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Counts of data keys per key-encryption key, the provider, and the cache settings.
    Status,
    /// Re-wrap every data key under the current key-encryption key, without re-encrypting any
    /// resource. With the local provider a new KEK version is created first; with aws, set
    /// keys.aws_key_id to the new KMS key before running it. Safe to run again after a failure.
    Rotate,
    /// Delete an old local KEK file (e.g. `local:1`) once no data key uses it.
    Retire {
        /// The KEK id, as `keys status` shows it.
        kek_id: String,
    },
}

/// Runs the parsed command.
///
/// # Errors
/// A message for the operator; the process exits non-zero.
pub async fn run(cli: Cli) -> Result<(), String> {
    let settings = Settings::load(cli.config.as_deref())?;
    crate::telemetry::init(settings.log_format);
    tracing::debug!(?settings, "configuration loaded");
    match cli.command {
        Command::Serve => {
            let application = Application::build(settings).await?;
            application
                .run_until_stopped()
                .await
                .map_err(|error| format!("server failed: {error}"))
        }
        Command::Keys(command) => keys(settings, command).await,
        Command::Token(arguments) => token(&settings, arguments),
        Command::Audit(command) => audit(settings, command).await,
        Command::Import(arguments) => crate::import::run(settings, arguments).await,
        Command::Erasure(command) => erasure(settings, command).await,
        Command::Reindex => {
            std::fs::create_dir_all(&settings.data_dir).map_err(|error| error.to_string())?;
            let store = crate::startup::open_store(&settings, 1).await?;
            store.migrate().await.map_err(|error| error.to_string())?;
            crate::search::reindex::mark_stale(&store, &settings.tenant).await?;
            store.close().await;
            // Building the application rebuilds a stale index before anything else.
            let app = crate::startup::build_app(settings).await?;
            let format = app
                .store
                .index_format(&crate::store::Scope::system(&app.settings.tenant))
                .await
                .map_err(|error| error.to_string())?;
            println!(
                "search index rebuilt (format {})",
                format.unwrap_or_default()
            );
            Ok(())
        }
        Command::Migrate => {
            std::fs::create_dir_all(&settings.data_dir).map_err(|error| error.to_string())?;
            let store = crate::startup::open_store(&settings, 1).await?;
            store.migrate().await.map_err(|error| error.to_string())?;
            store.close().await;
            println!("migrations applied ({})", settings.database_kind());
            Ok(())
        }
    }
}

async fn keys(settings: Settings, command: KeysCommand) -> Result<(), String> {
    use crate::config::KeyProviderKind;
    use crate::crypto::local::LocalKeyProvider;
    use crate::store::Store;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    std::fs::create_dir_all(&settings.data_dir).map_err(|error| error.to_string())?;
    let store = Arc::new(crate::startup::open_store(&settings, 2).await?);
    store.migrate().await.map_err(|error| error.to_string())?;
    let count_by_kek = |keys: &[crate::store::StoredDataKey]| {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for key in keys {
            *counts.entry(key.kek_id.clone()).or_default() += 1;
        }
        counts
    };
    match command {
        KeysCommand::Status => {
            let provider = crate::crypto::provider_from_settings(&settings).await?;
            let keys = store
                .all_data_keys()
                .await
                .map_err(|error| error.to_string())?;
            println!("provider: {}", provider.name());
            println!("current KEK: {}", provider.current_kek_id());
            println!("data keys: {}", keys.len());
            for (kek, count) in count_by_kek(&keys) {
                println!("  {kek}: {count}");
            }
            println!(
                "cache: at most {} keys, each for at most {} s (live counters: GET /health of a running server)",
                settings.keys.cache_max_entries, settings.keys.cache_max_age_secs
            );
        }
        KeysCommand::Rotate => {
            if settings.keys.provider == KeyProviderKind::Local {
                let created = LocalKeyProvider::add_version(&settings.local_key_dir())
                    .map_err(|error| error.to_string())?;
                println!("created local KEK {created}");
            }
            let provider = crate::crypto::provider_from_settings(&settings).await?;
            let vault = crate::crypto::vault::Vault::new(
                provider,
                store.clone(),
                16,
                std::time::Duration::from_secs(1),
                std::time::Duration::from_millis(settings.keys.timeout_ms.max(1)),
            );
            let (rewrapped, already) = vault
                .rewrap_all()
                .await
                .map_err(|error| error.to_string())?;
            println!(
                "re-wrapped {rewrapped} data keys under {} ({already} already were); no resource was re-encrypted",
                vault.provider().current_kek_id()
            );
        }
        KeysCommand::Retire { kek_id } => {
            if settings.keys.provider != KeyProviderKind::Local {
                return Err("retire deletes local KEK files; retire a KMS key in the KMS".into());
            }
            let keys = store
                .all_data_keys()
                .await
                .map_err(|error| error.to_string())?;
            if let Some(count) = count_by_kek(&keys).get(&kek_id) {
                return Err(format!(
                    "{count} data keys are still wrapped under {kek_id}: run `custodian keys rotate` first"
                ));
            }
            LocalKeyProvider::retire(&settings.local_key_dir(), &kek_id)
                .map_err(|error| error.to_string())?;
            println!("retired {kek_id}");
        }
    }
    store.close().await;
    Ok(())
}

/// Whether a case reference is an opaque docket number (it appears in 409 answers and listings).
fn is_case_reference(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"._:/-".contains(&byte))
}

async fn erasure(settings: Settings, command: ErasureCommand) -> Result<(), String> {
    use crate::store::{LegalHold, Scope, Store};

    std::fs::create_dir_all(&settings.data_dir).map_err(|error| error.to_string())?;
    let store = crate::startup::open_store(&settings, 2).await?;
    store.migrate().await.map_err(|error| error.to_string())?;
    // The operator's own command: no caller to decide for.
    let scope = Scope::system(&settings.tenant);
    let result = match command {
        ErasureCommand::Hold { patient, case } => {
            if !crate::fhir::is_valid_id(&patient) {
                return Err("--patient must be a FHIR id".into());
            }
            if !is_case_reference(&case) {
                return Err(
                    "--case must be 1-64 letters, digits or . _ : / - (a docket number, no names)"
                        .into(),
                );
            }
            let pseudonym = store
                .compartment_pseudonym(&scope, &patient)
                .await
                .map_err(|error| error.to_string())?;
            store
                .place_hold(
                    &scope,
                    &LegalHold {
                        pseudonym: pseudonym.clone(),
                        case_reference: case,
                        placed_us: chrono::Utc::now().timestamp_micros(),
                    },
                )
                .await
                .map_err(|error| error.to_string())?;
            println!("legal hold in place on compartment {pseudonym}");
            Ok(())
        }
        ErasureCommand::Release { patient } => {
            let pseudonym = store
                .find_pseudonym(&scope, &patient)
                .await
                .map_err(|error| error.to_string())?;
            let released = match &pseudonym {
                Some(pseudonym) => store
                    .release_hold(&scope, pseudonym)
                    .await
                    .map_err(|error| error.to_string())?,
                None => false,
            };
            if released {
                println!("legal hold released");
                Ok(())
            } else {
                Err("no legal hold stands on that patient".into())
            }
        }
        ErasureCommand::Holds => {
            for hold in store
                .legal_holds(&scope)
                .await
                .map_err(|error| error.to_string())?
            {
                let since = chrono::DateTime::from_timestamp_micros(hold.placed_us)
                    .map(|time| time.to_rfc3339())
                    .unwrap_or_default();
                println!("{}\t{}\t{since}", hold.pseudonym, hold.case_reference);
            }
            Ok(())
        }
    };
    store.close().await;
    result
}

fn token(settings: &Settings, arguments: TokenArgs) -> Result<(), String> {
    use crate::authz::dev::{DevIssuer, DevTokenRequest};
    if !settings.dev_issuer_enabled()? {
        return Err(
            "the development issuer is off in this configuration (auth.dev_issuer); use your IdP"
                .into(),
        );
    }
    let issuer = DevIssuer::load_or_create(&settings.data_dir)?;
    let audience = settings
        .auth
        .audience
        .clone()
        .or_else(|| settings.base_url.clone())
        .unwrap_or_else(|| format!("http://{}", settings.listen))
        .trim_end_matches('/')
        .to_string();
    let scope = arguments.scope.unwrap_or_else(|| {
        crate::authz::scopes::Scopes::natural_for_role(&arguments.role).to_string()
    });
    let request = DevTokenRequest {
        subject: arguments
            .subject
            .unwrap_or_else(|| format!("dev-{}", arguments.role)),
        roles: vec![arguments.role],
        fhir_user: arguments.fhir_user,
        patient: arguments.patient,
        scope,
        tenant: Some(settings.tenant.clone()),
        purpose_of_use: arguments.purpose,
        lifetime_secs: arguments.lifetime_secs,
    };
    let token = issuer.mint(&audience, &request)?;
    eprintln!(
        "development token for audience {audience} (scopes: {})",
        request.scope
    );
    println!("{token}");
    Ok(())
}

async fn audit(settings: Settings, command: AuditCommand) -> Result<(), String> {
    use crate::audit::log::CheckpointSigner;
    use crate::store::Store;
    use base64::Engine;

    let store = crate::startup::open_store(&settings, 2).await?;
    store.migrate().await.map_err(|error| error.to_string())?;
    let signer = CheckpointSigner::load_or_create(&settings.audit_signing_key_file())?;
    // Committed records not yet in the ordered log take their place first.
    crate::audit::log::sequence_all(&store)
        .await
        .map_err(|error| error.to_string())?;
    let hex = |bytes: &[u8]| {
        bytes
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    };
    match command {
        AuditCommand::Verify { trusted_key } => {
            let mut keys = vec![signer.public_key()];
            for key in trusted_key {
                keys.push(
                    base64::engine::general_purpose::STANDARD
                        .decode(key.trim())
                        .map_err(|_| "a --trusted-key must be base64".to_string())?,
                );
            }
            let outcome = crate::audit::verify::verify(&store, &keys)
                .await
                .map_err(|error| error.to_string())?;
            store.close().await;
            match outcome.first_problem {
                None => {
                    println!(
                        "audit log verified: {} records, {} signed checkpoints",
                        outcome.records, outcome.checkpoints
                    );
                    Ok(())
                }
                Some(problem) => Err(format!("AUDIT LOG VERIFICATION FAILED: {problem}")),
            }
        }
        AuditCommand::Checkpoints { since } => {
            let since_us = since
                .as_deref()
                .map(|text| {
                    crate::api::parse_instant(text)
                        .ok_or_else(|| format!("--since {text:?} is not an instant or date"))
                })
                .transpose()?
                .map(|time| time.timestamp_micros())
                .unwrap_or(0);
            let public_key = base64::engine::general_purpose::STANDARD.encode(signer.public_key());
            for checkpoint in store
                .checkpoints_since(since_us)
                .await
                .map_err(|error| error.to_string())?
            {
                println!(
                    "{}",
                    serde_json::json!({
                        "tree_size": checkpoint.tree_size,
                        "root_hash": hex(&checkpoint.root_hash),
                        "signed_at": chrono::DateTime::from_timestamp_micros(checkpoint.signed_us).map(|time| time.to_rfc3339()),
                        "signed_us": checkpoint.signed_us,
                        "key_id": checkpoint.key_id,
                        "signature": base64::engine::general_purpose::STANDARD.encode(&checkpoint.signature),
                        "public_key": public_key,
                    })
                );
            }
            store.close().await;
            Ok(())
        }
        AuditCommand::Prove { sequence, size } => {
            let proof = crate::audit::log::inclusion(&store, sequence, size).await;
            print_proof(store, proof).await
        }
        AuditCommand::FillSynthetic { records } => {
            if !settings.dev_issuer_enabled()?
                || store
                    .audit_size()
                    .await
                    .map_err(|error| error.to_string())?
                    != 0
            {
                return Err("fill-synthetic runs only in dev mode on an empty audit log".into());
            }
            let started = std::time::Instant::now();
            let mut written = 0;
            while written < records {
                let batch: Vec<crate::store::AuditEntry> = (written..(written + 5000).min(records))
                    .map(|index| synthetic_entry(&settings.tenant, index))
                    .collect();
                written += store
                    .append_audit(&batch)
                    .await
                    .map_err(|error| error.to_string())?
                    .len() as i64;
            }
            println!(
                "appended {written} synthetic records in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            store.close().await;
            Ok(())
        }
        AuditCommand::Consistency { from, to } => {
            let proof = crate::audit::log::consistency(&store, from, to).await;
            print_proof(store, proof).await
        }
    }
}

async fn print_proof(
    store: SqlStore,
    proof: Result<serde_json::Value, String>,
) -> Result<(), String> {
    store.close().await;
    println!(
        "{}",
        serde_json::to_string_pretty(&proof?).unwrap_or_default()
    );
    Ok(())
}

/// A record shaped like a real read's (same fields and sizes), for the verify benchmark.
fn synthetic_entry(tenant: &str, index: i64) -> crate::store::AuditEntry {
    let record = serde_json::json!({
        "recorded": "2026-01-01T00:00:00Z",
        "interaction": "read",
        "resource_type": "Observation",
        "resource_id": format!("{index:032x}"),
        "version": 1,
        "outcome": 200,
        "agent_subject": "bench-agent",
        "agent_client_id": "bench-client",
        "agent_fhir_user": "Practitioner/bench",
        "agent_roles": ["practitioner"],
        "purpose_of_use": "TREAT",
        "network_address": "127.0.0.1",
        "patient_pseudonym": "00000000-0000-4000-8000-000000000000",
        "request_id": format!("{index:036x}"),
        "query_hash": null,
        "tenant": tenant,
    });
    crate::store::AuditEntry {
        tenant: tenant.to_string(),
        recorded_us: 0,
        interaction: "read".into(),
        resource_type: Some("Observation".into()),
        resource_id: Some(format!("{index:032x}")),
        outcome: 200,
        agent: Some("bench-agent".into()),
        patient: None,
        record: serde_json::to_vec(&record).unwrap_or_default(),
    }
}
