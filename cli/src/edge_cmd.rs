//! `mesh edge`: the HTTP edge daemon.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Args;
use mesh_edge::{Config, Edge, OutlierPolicy};

use crate::fabric_client::FabricArgs;

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    mesh edge --fabric 127.0.0.1:7700 --token-file /var/lib/mesh/fabric/admin.token\n  \
    mesh edge --listen 0.0.0.0:8080 --listen [::]:8080 --domain mesh.example.com --threads 4\n\n\
Requests reach app NAME as /app/NAME/... (the prefix is removed before forwarding unless\n\
--keep-prefix NAME) or with Host: NAME.<domain>. Unknown apps get 404, apps without a Ready\n\
instance 503. Metrics: http://<admin>/metrics, current routes: http://<admin>/routes.")]
pub struct EdgeCmd {
    #[command(flatten)]
    fabric: FabricArgs,
    /// Address to accept HTTP on (repeat for several, e.g. IPv4 and IPv6).
    #[arg(long = "listen", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    listen: Vec<SocketAddr>,
    /// Admin address: /metrics (Prometheus), /healthz, /routes.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9180")]
    admin: SocketAddr,
    /// Worker threads, each with its own io_uring and listener [default: one per core].
    #[arg(long)]
    threads: Option<usize>,
    /// Domain for Host-based routing: `Host: NAME.<domain>` goes to app NAME.
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// Forward /app/NAME/... with the prefix kept for app NAME (repeatable).
    #[arg(long = "keep-prefix", value_name = "APP")]
    keep_prefix: Vec<String>,
    /// Most client connections open at once; more are closed at accept.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Largest request head (431 above it).
    #[arg(long, default_value_t = 16 * 1024, value_name = "BYTES")]
    max_head_bytes: usize,
    /// Time a client has to send a complete request head (408 after it; slowloris).
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    head_timeout_ms: u64,
    /// Idle keep-alive connections (client side) close after this.
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    client_idle_ms: u64,
    /// An app must start answering (and keep sending) within this (504 after it).
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    upstream_timeout_ms: u64,
    /// Connecting to an instance may take this long before the next one is tried.
    #[arg(long, default_value_t = 2_000, value_name = "MS")]
    connect_timeout_ms: u64,
    /// Pooled idle upstream connections close after this.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    upstream_idle_ms: u64,
    /// Response bodies at least this large move with splice(2) instead of being copied.
    #[arg(long, default_value_t = 64 * 1024, value_name = "BYTES")]
    splice_threshold: u64,
    /// Pipes per worker for splicing (bodies copy when all are busy).
    #[arg(long, default_value_t = 256)]
    max_pipes: usize,
    /// Consecutive failures that take an instance out of rotation.
    #[arg(long, default_value_t = 3)]
    eject_after: u32,
    /// How long an ejected instance gets no requests.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    eject_ms: u64,
}

pub fn run(cmd: EdgeCmd) -> Result<()> {
    crate::init_logging();
    let fabric = cmd.fabric.resolve()?;
    let mut cfg = Config::new(fabric, cmd.listen);
    cfg.admin = Some(cmd.admin);
    if let Some(t) = cmd.threads {
        cfg.threads = t;
    }
    cfg.domain = cmd.domain.trim_matches('.').to_ascii_lowercase();
    cfg.keep_prefix = cmd.keep_prefix.into_iter().collect();
    cfg.max_connections = cmd.max_connections;
    cfg.max_head_bytes = cmd.max_head_bytes;
    cfg.head_timeout_ms = cmd.head_timeout_ms;
    cfg.client_idle_ms = cmd.client_idle_ms;
    cfg.upstream_timeout_ms = cmd.upstream_timeout_ms;
    cfg.connect_timeout_ms = cmd.connect_timeout_ms;
    cfg.upstream_idle_ms = cmd.upstream_idle_ms;
    cfg.splice_threshold = cmd.splice_threshold;
    cfg.max_pipes = cmd.max_pipes;
    cfg.outlier = OutlierPolicy {
        consecutive_failures: cmd.eject_after.max(1),
        ejection: std::time::Duration::from_millis(cmd.eject_ms),
    };
    let mut edge = Edge::start(cfg).context("edge did not start")?;
    let addrs: Vec<String> = edge.listen.iter().map(|a| a.to_string()).collect();
    eprintln!(
        "edge listening on {} (admin {})",
        addrs.join(", "),
        edge.admin.map(|a| a.to_string()).unwrap_or_default()
    );
    let stop = edge.shutdown_handle();
    crate::fabric_client::block_on(async move {
        crate::fabric_cmd::wait_for_shutdown().await;
        stop.request();
    })?;
    edge.join().context("edge worker failed")?;
    Ok(())
}
