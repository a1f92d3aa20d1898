//! The `custodian` binary: parses the command line and hands over to the library.

use clap::Parser;

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
