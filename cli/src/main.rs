//! `ferry`: the one user-facing binary. Each subcommand is a thin shell over a library
//! crate; errors are printed as one line naming what was wrong, with a non-zero exit.

mod agent_cmd;
mod commands;
mod progress;
mod quickstart;
mod server_cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors already carry their causes in their text: print the top.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
