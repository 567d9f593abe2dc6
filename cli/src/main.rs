//! `ferry`: the one user-facing binary. Each subcommand is a thin shell over a library
//! crate; errors are printed as one line naming what was wrong, with a non-zero exit.

mod agent_cmd;
mod agent_control;
mod commands;
mod control_plane_cmd;
mod cp;
mod progress;
mod quickstart;
mod recovery_host;
mod recovery_host_cmd;
mod reverse_cmd;
mod serve_point_cmd;
mod server_cmd;
mod sync_point_cmd;

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
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The whole chain of causes on one line: "image /missing: No such file or directory
/// (os error 2)", not just "image /missing". Some library errors also spell their
/// source in their own text; a cause already said is not said twice.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    // A person reads one line; a script greps one.
    line.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::one_line;
    use anyhow::Context;

    #[test]
    fn the_chain_is_one_line_each_cause_once() {
        let missing = std::fs::metadata("/nonexistent/ferry-test")
            .context("image /nonexistent/ferry-test")
            .unwrap_err();
        assert_eq!(
            one_line(&missing),
            "image /nonexistent/ferry-test: No such file or directory (os error 2)"
        );
        // A source the error's own text already spells is not repeated.
        #[derive(Debug)]
        struct Spells(std::io::Error);
        impl std::fmt::Display for Spells {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "read x: {}", self.0)
            }
        }
        impl std::error::Error for Spells {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone\nfor good");
        let spelled = anyhow::Error::new(Spells(io)).context("seed");
        assert_eq!(one_line(&spelled), "seed: read x: gone for good");
    }
}
