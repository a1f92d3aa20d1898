//! Logging with `tracing`. The filter comes from `CUSTODIAN_LOG` (default `info`); output is
//! text or JSON lines. What is logged is decided at each call site: ids, versions, statuses and
//! durations, never resource bodies, search values, tokens or keys.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber once; later calls (tests) are no-ops.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("CUSTODIAN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
