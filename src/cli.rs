//! The command line: `custodian serve` and `custodian migrate` (more commands come with their
//! issues: import, keys, audit, token).

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
        Command::Migrate => {
            std::fs::create_dir_all(&settings.data_dir).map_err(|error| error.to_string())?;
            let store = SqlStore::connect(&settings.database_url(), 1)
                .await
                .map_err(|error| format!("cannot open the database: {error}"))?;
            store.migrate().await.map_err(|error| error.to_string())?;
            store.close().await;
            println!("migrations applied ({})", settings.database_kind());
            Ok(())
        }
    }
}
