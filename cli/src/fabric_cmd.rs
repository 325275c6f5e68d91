//! `mesh fabric` (the daemon), `mesh token create`, `mesh status`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use mesh_fabric::{Config, Fabric};

use crate::fabric_client::{FabricArgs, block_on};

#[derive(Args)]
pub struct FabricCmd {
    /// Line-protocol address (commands, subscriptions).
    #[arg(long, default_value = "127.0.0.1:7700", value_name = "ADDR")]
    listen: SocketAddr,
    /// HTTP address (blob API, /metrics).
    #[arg(long, default_value = "127.0.0.1:7701", value_name = "ADDR")]
    http: SocketAddr,
    /// Data directory (created 0700): fabric.redb, content/, admin.token.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Blob URL advertised to clients [default: http://<--http>]; needed when --http is a
    /// wildcard address such as 0.0.0.0:7701.
    #[arg(long, value_name = "URL")]
    blob_url: Option<String>,
    /// Most line-protocol connections at once.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
}

pub fn run_fabric(cmd: FabricCmd) -> Result<()> {
    crate::init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fabric")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let mut config = Config::new(cmd.listen, cmd.http, cmd.data.clone());
        config.max_connections = cmd.max_connections;
        config.blob_url = cmd.blob_url.clone();
        let fabric = Fabric::start(config).await?;
        println!(
            "mesh fabric: line protocol on {}, blobs and /metrics on http://{}, data in {}",
            fabric.listen,
            fabric.http,
            cmd.data.display()
        );
        println!("admin token: {}", fabric.admin_token_path.display());
        wait_for_shutdown().await;
        println!("mesh fabric: stopping (every acknowledged write is already on disk)");
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a token with a role (admin, deployer, agent, viewer); prints it once.
    Create {
        #[arg(long)]
        role: String,
        /// A name to recognise it by.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        fabric: FabricArgs,
    },
}

pub fn run_token(cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create { role, name, fabric } => block_on(async move {
            let mut c = fabric.connect().await?;
            let mut line = format!("TOKEN.CREATE role={role}");
            if !name.is_empty() {
                line.push_str(&format!(" name={}", name.replace(' ', "_")));
            }
            let r = c.call(&line).await?;
            println!("{}", r.get("token").unwrap_or_default());
            Ok(())
        })?,
    }
}

pub fn run_status(fabric: FabricArgs) -> Result<()> {
    block_on(async move {
        let mut c = fabric.connect().await?;
        let r = c.call("STATUS").await?;
        for (k, v) in mesh_common::proto::parse_fields(&r.fields) {
            println!("{k:<14} {v}");
        }
        println!("{:<14} {}", "blob_url", c.blob_url().unwrap_or("-"));
        println!("{:<14} {}", "your role", c.role());
        Ok(())
    })?
}
