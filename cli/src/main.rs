//! `mesh`: the one command of Mycelium Mesh.
//!
//! Each subcommand lives in its own module; this file only parses arguments, dispatches and
//! turns errors into one readable line and an exit code.

mod key;
mod output;
mod spore;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Run signed native binaries ("spores") on bare-metal Linux, supervised, budgeted and
/// accounted, behind an HTTP edge.
#[derive(Parser)]
#[command(name = "mesh", version, max_term_width = 100)]
#[command(after_help = "The life of a spore:\n  \
    mesh key gen --out ~/.mesh                      create a signing key\n  \
    mesh spore pack ./app --name app --version 1.0.0 --key ~/.mesh/mesh.key -o app.spore\n  \
    mesh spore verify app.spore --trust ~/.mesh/mesh.pub")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create and identify Ed25519 signing keys.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Pack, inspect, verify and extract signed spores.
    #[command(subcommand)]
    Spore(spore::SporeCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Key(cmd) => key::run(cmd),
        Command::Spore(cmd) => spore::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mesh: {}", output::render_error(&err));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
