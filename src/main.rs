//! The `custodian` binary: parses the command line and hands over to the library.

use clap::Parser;

// jemalloc, not glibc's malloc: faster ingest and a flatter RSS under long load (see Cargo.toml).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = custodian::cli::Cli::parse();
    match custodian::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("custodian: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}
