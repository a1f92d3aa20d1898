//! Building and running the server: load the FHIR definition data, connect and migrate the
//! database, bind the listener, serve until a shutdown signal, then drain in-flight requests.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::api::{router, App, AppState};
use crate::audit::event::Catalog;
use crate::audit::log::{AuditLog, CheckpointSigner};
use crate::authz::decision::Decider;
use crate::authz::dev::DevIssuer;
use crate::authz::policy::PolicyEngine;
use crate::authz::token::{TokenValidator, ValidatorSettings};
use crate::config::Settings;
use crate::crypto::vault::Vault;
use crate::fhir::capability::capability_statement;
use crate::fhir::compartment::PatientCompartment;
use crate::fhir::validate::Validator;
use crate::store::{SqlStore, Store};

/// A server ready to run: bound to its port, database migrated.
pub struct Application {
    listener: TcpListener,
    port: u16,
    app: AppState,
    store: Arc<SqlStore>,
    /// Tells the background export worker to stop at shutdown.
    stop_workers: tokio::sync::watch::Sender<bool>,
}

impl Application {
    /// Builds the server from its settings. With `listen` port 0 the OS picks a free port
    /// (tests), readable with [`Application::port`].
    ///
    /// # Errors
    /// A message when the definition data, the database or the listen address is unusable.
    pub async fn build(settings: Settings) -> Result<Application, String> {
        let listener = TcpListener::bind(settings.listen_addr()?)
            .await
            .map_err(|error| format!("cannot listen on {}: {error}", settings.listen))?;
        let local = listener
            .local_addr()
            .map_err(|error| format!("cannot read the bound address: {error}"))?;
        let (app, store) = assemble(settings, &format!("http://{local}")).await?;
        tracing::info!(
            address = %local,
            database = store.backend_name(),
            key_provider = app.vault.provider().name(),
            base_url = %app.base_url,
            "custodian listening"
        );
        let (stop_workers, stop) = tokio::sync::watch::channel(false);
        crate::export::start_worker(app.clone(), stop);
        Ok(Application {
            listener,
            port: local.port(),
            app,
            store,
            stop_workers,
        })
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests and closes the pool.
    ///
    /// # Errors
    /// When the server fails to accept connections.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let served = axum::serve(
            self.listener,
            router(self.app).into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await;
        // A job in progress is left to its lease: another node, or this one restarted, takes it.
        let _ = self.stop_workers.send(true);
        self.store.close().await;
        tracing::info!("custodian stopped");
        served
    }

    /// Serves until SIGINT or SIGTERM.
    ///
    /// # Errors
    /// When the server fails to accept connections.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.run_until(shutdown_signal()).await
    }
}

/// Builds the application state without binding a listener: what `serve` runs behind its
/// router, and what `custodian import` writes through, so that both share every code path
/// (validation, authorization, encryption, index, audit). The public URL is `base_url`, else
/// `http://<listen>`.
///
/// # Errors
/// A message when the definition data, the database or the key provider is unusable.
pub async fn build_app(settings: Settings) -> Result<AppState, String> {
    let listen = format!("http://{}", settings.listen);
    assemble(settings, &listen).await.map(|(app, _)| app)
}

/// Connects to the configured database with `max_connections` and the statement limit, for
/// the server and every CLI command.
///
/// # Errors
/// A message naming the database failure.
pub(crate) async fn open_store(
    settings: &Settings,
    max_connections: u32,
) -> Result<SqlStore, String> {
    SqlStore::connect(
        &settings.database_url(),
        max_connections,
        settings.statement_timeout(),
    )
    .await
    .map_err(|error| format!("cannot open the database: {error}"))
}

/// Everything but the listener: definition data, database (migrated when configured), key
/// provider, policy, token validation, audit log and its checkpointer. `default_base_url` is the
/// public URL unless `base_url` is configured.
async fn assemble(
    settings: Settings,
    default_base_url: &str,
) -> Result<(AppState, Arc<SqlStore>), String> {
    let validator = Validator::load(&settings.profiles_dir)?;
    let compartment = PatientCompartment::load(&settings.profiles_dir)?;
    std::fs::create_dir_all(&settings.data_dir).map_err(|error| {
        format!(
            "cannot create data directory {}: {error}",
            settings.data_dir.display()
        )
    })?;
    let store = Arc::new(open_store(&settings, settings.max_connections).await?);
    if settings.migrate_on_start {
        store
            .migrate()
            .await
            .map_err(|error| format!("cannot migrate the database: {error}"))?;
    }
    for warning in store
        .server_setting_warnings()
        .await
        .map_err(|error| format!("cannot read the database's settings: {error}"))?
    {
        tracing::warn!("{warning}");
    }
    let provider = crate::crypto::provider_from_settings(&settings).await?;
    let vault = Arc::new(Vault::new(
        provider,
        store.clone(),
        settings.keys.cache_max_entries,
        std::time::Duration::from_secs(settings.keys.cache_max_age_secs),
        std::time::Duration::from_millis(settings.keys.timeout_ms.max(1)),
    ));
    let registry = crate::search::registry::Registry::load(&settings.profiles_dir, |name| {
        compartment.is_compartment_type(name)
    })?;
    let search = crate::search::Search::new(registry, vault.clone());
    let policy = Arc::new(PolicyEngine::load(&settings.auth.policies_dir).await?);
    policy.clone().watch(settings.auth.policies_dir.clone());
    let base_url = settings
        .base_url
        .clone()
        .unwrap_or_else(|| default_base_url.to_string())
        .trim_end_matches('/')
        .to_string();
    let dev_issuer = if settings.dev_issuer_enabled()? {
        tracing::warn!(
            "the development token issuer is trusted (custodian token): for development only"
        );
        Some(DevIssuer::load_or_create(&settings.data_dir)?)
    } else {
        None
    };
    let issuers = settings.auth.issuer_list();
    if dev_issuer.is_none() && issuers.is_empty() {
        tracing::warn!("no token issuer is configured: every FHIR request will be refused");
    }
    let tokens = TokenValidator::new(
        ValidatorSettings {
            audience: settings
                .auth
                .audience
                .clone()
                .unwrap_or_else(|| base_url.clone()),
            issuers,
            roles_claim: settings.auth.roles_claim.clone(),
            tenant: settings.tenant.clone(),
            leeway_secs: settings.auth.leeway_secs,
        },
        dev_issuer,
    );
    let decider = Decider::new(
        policy,
        store.clone(),
        vault.clone(),
        settings.tenant.clone(),
        settings.consent.default_decision,
    );
    let store_handle: Arc<dyn crate::store::Store> = store.clone();
    // SQLite takes one writer at a time; PostgreSQL overlaps concurrent commits.
    let audit_writers = if store.backend_name() == "postgres" {
        settings.audit.writers.max(1)
    } else {
        1
    };
    let audit = AuditLog::start(store_handle.clone(), audit_writers);
    let audit_catalog = Catalog::load(&settings.audit.catalog_dir)?;
    let signer = Arc::new(CheckpointSigner::load_or_create(
        &settings.audit_signing_key_file(),
    )?);
    crate::audit::log::start_checkpointer(
        store_handle,
        signer,
        settings.audit.checkpoint_every_records,
        std::time::Duration::from_secs(settings.audit.checkpoint_every_secs.max(1)),
    );
    let audit_query_key =
        crate::audit::log::load_or_create_secret(&settings.audit_query_key_file())?;
    let (erasure_ledger, ledger_entries) =
        crate::erasure::Ledger::open(&settings.erasure_ledger_file())?;
    let rate_limits = crate::api::rate_limit::RateLimits::new(&settings.rate_limit);
    let app = Arc::new(App {
        capability_statement: capability_statement(&base_url, "2026-11-22", &search.registry),
        settings,
        store: store.clone(),
        validator,
        compartment,
        base_url,
        vault,
        tokens,
        decider,
        audit,
        audit_catalog,
        audit_query_key,
        search,
        erasure_ledger,
        rate_limits,
    });
    app.rate_limits.spawn_housekeeping();
    // Before anything is served: no erased patient comes back from a restored database.
    crate::erasure::reconcile(&app, &ledger_entries).await?;
    crate::erasure::watch(&app);
    // Before anything is searched: rows written under another index format would be missed.
    crate::search::reindex::bring_up_to_date(&app).await?;
    Ok((app, store))
}

/// Resolves on Ctrl-C or SIGTERM (what a process manager sends).
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; draining requests");
}
