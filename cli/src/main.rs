//! `mesh`: the one command of Mycelium Mesh.
//!
//! Each subcommand lives in its own module; this file only parses arguments, dispatches and
//! turns errors into one readable line and an exit code.

mod agent_cmd;
mod bench_cmd;
mod daemon_config;
mod deploy;
mod edge_cmd;
mod fabric_client;
mod fabric_cmd;
mod key;
mod logs_cmd;
mod output;
mod spore;
mod top;
mod up;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// Run signed native binaries ("spores") on bare-metal Linux, supervised, budgeted and
/// accounted, behind an HTTP edge.
#[derive(Parser)]
#[command(name = "mesh", version, max_term_width = 100)]
#[command(after_help = "Start here:\n  \
    sudo mesh up                                    the whole mesh on this machine, hello deployed\n\n\
The life of a spore:\n  \
    mesh key gen --out ~/.mesh                      create a signing key\n  \
    mesh spore pack ./app --name app --version 1.0.0 --key ~/.mesh/mesh.key -o app.spore\n  \
    mesh spore push app.spore                       prints its digest\n  \
    mesh deploy app sha256:... --min 2              run two instances behind the edge\n  \
    mesh top                                        watch them")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create and identify Ed25519 signing keys.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Pack, inspect, verify, extract, push and pull signed spores.
    #[command(subcommand)]
    Spore(spore::SporeCommand),
    /// The whole mesh on this machine: fabric, agent and edge, with the example deployed.
    Up(Box<up::UpCmd>),
    /// One report of every benchmark with the peers side by side (--run runs them first).
    Bench(bench_cmd::BenchCmd),
    /// Run the control fabric (registry, budgets, pub/sub, blob service).
    Fabric(fabric_cmd::FabricCmd),
    /// Run the node agent: follow the fabric's plans and supervise this node's spores (root).
    Agent(Box<agent_cmd::AgentCmd>),
    /// Run the HTTP edge: route /app/NAME/ and NAME.<domain> to Ready instances (io_uring).
    Edge(Box<edge_cmd::EdgeCmd>),
    /// Manage the fabric's access tokens.
    #[command(subcommand)]
    Token(fabric_cmd::TokenCmd),
    /// Show the fabric's state counters.
    Status {
        #[command(flatten)]
        fabric: fabric_client::FabricArgs,
    },
    /// Set the plan of an app: which spore digest runs, how many instances, on which port.
    Deploy(deploy::DeployCmd),
    /// Change how many instances of an app run.
    Scale(deploy::ScaleCmd),
    /// Remove an app's plan; its instances drain and stop.
    Undeploy(deploy::UndeployCmd),
    /// Show or set an app's budget (the nutrient ledger): instances, CPU, memory.
    Budget(deploy::BudgetCmd),
    /// List plans and Ready instances.
    Ps(deploy::PsCmd),
    /// List the Ready endpoints of an app (or of all apps).
    Endpoints(deploy::EndpointsCmd),
    /// Show (and follow) the output of an app's instances on this node.
    Logs(logs_cmd::LogsCmd),
    /// Live view of every spore on a node or the whole mesh: CPU, run-queue, memory, network.
    Top(top::TopCmd),
}

/// Logs for daemons: to stderr, level from MESH_LOG (default info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    // `mesh fabric|agent|edge --config FILE`: the file's settings become flags
    let args = match daemon_config::expand(std::env::args_os().collect(), &Cli::command()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mesh: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let result = match cli.command {
        Command::Key(cmd) => key::run(cmd),
        Command::Spore(cmd) => spore::run(cmd),
        Command::Up(cmd) => up::run(*cmd),
        Command::Bench(cmd) => bench_cmd::run(cmd),
        Command::Fabric(cmd) => fabric_cmd::run_fabric(cmd),
        Command::Agent(cmd) => agent_cmd::run(*cmd),
        Command::Edge(cmd) => edge_cmd::run(*cmd),
        Command::Token(cmd) => fabric_cmd::run_token(cmd),
        Command::Status { fabric } => fabric_cmd::run_status(fabric),
        Command::Deploy(cmd) => deploy::deploy(cmd),
        Command::Scale(cmd) => deploy::scale(cmd),
        Command::Undeploy(cmd) => deploy::undeploy(cmd),
        Command::Budget(cmd) => deploy::budget(cmd),
        Command::Ps(cmd) => deploy::ps(cmd),
        Command::Endpoints(cmd) => deploy::endpoints(cmd),
        Command::Logs(cmd) => logs_cmd::run(cmd),
        Command::Top(cmd) => top::run(cmd),
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
