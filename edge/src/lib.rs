//! Edge of Mycelium Mesh: an HTTP/1.1 reverse proxy.
//!
//! Thread per core, each with its own io_uring and SO_REUSEPORT listener; request and
//! response heads parsed with httparse, bodies above a threshold moved with splice(2)
//! through a pooled pipe. Routes come from the fabric's endpoint stream and are swapped
//! atomically. Modules: `uring` (the only io_uring code), `proxy` (forwarding loop),
//! `http` (heads and framing), `routes` (routing), `metrics` (accounting), `control`
//! (fabric subscription and admin HTTP), `sys` (plain syscalls).

mod control;
pub mod http;
pub mod metrics;
mod proxy;
pub mod routes;
mod slab;
mod sys;
mod uring;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use mesh_common::client::ClientConfig;

pub use metrics::Metrics;
pub use routes::{OutlierPolicy, Routes};

/// Everything `mesh edge` can be told. Times in milliseconds.
#[derive(Debug, Clone)]
pub struct Config {
    pub fabric: ClientConfig,
    pub listen: Vec<SocketAddr>,
    /// Prometheus /metrics, /healthz and /routes (None: no admin port).
    pub admin: Option<SocketAddr>,
    pub threads: usize,
    /// `Host: <app>.<domain>` routes to `<app>`.
    pub domain: String,
    /// Apps whose `/app/<name>` prefix is sent upstream as it came (default: stripped).
    pub keep_prefix: HashSet<String>,
    pub max_connections: usize,
    pub max_head_bytes: usize,
    pub head_timeout_ms: u64,
    pub client_idle_ms: u64,
    pub upstream_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub upstream_idle_ms: u64,
    /// Response bodies with at least this many bytes still to come are spliced.
    pub splice_threshold: u64,
    pub max_pipes: usize,
    pub pipe_size: usize,
    pub recv_buffers: u16,
    pub recv_buffer_size: usize,
    /// How long a stopping edge lets exchanges in flight finish.
    pub drain_ms: u64,
    pub outlier: OutlierPolicy,
}

impl Config {
    pub fn new(fabric: ClientConfig, listen: Vec<SocketAddr>) -> Config {
        Config {
            fabric,
            listen,
            admin: None,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            domain: "localhost".to_string(),
            keep_prefix: HashSet::new(),
            max_connections: 10_000,
            max_head_bytes: 16 * 1024,
            head_timeout_ms: 10_000,
            client_idle_ms: 60_000,
            upstream_timeout_ms: 30_000,
            connect_timeout_ms: 2_000,
            upstream_idle_ms: 30_000,
            splice_threshold: 64 * 1024,
            max_pipes: 256,
            pipe_size: 256 * 1024,
            recv_buffers: 512,
            recv_buffer_size: 16 * 1024,
            drain_ms: 5_000,
            outlier: OutlierPolicy::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot set up io_uring: {0} (the edge needs Linux 6.0 or later with io_uring enabled)"
    )]
    Ring(std::io::Error),
    #[error("cannot serve the admin port {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// A flag the workers and the control thread look at.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A running edge.
pub struct Edge {
    /// The addresses traffic is accepted on (ports resolved).
    pub listen: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub routes: Arc<Routes>,
    pub metrics: Arc<Metrics>,
    shutdown: Shutdown,
    workers: Vec<JoinHandle<std::io::Result<()>>>,
    control: Option<JoinHandle<()>>,
}

impl Edge {
    /// Bind every listener, start the workers and the control thread.
    pub fn start(cfg: Config) -> Result<Edge, EdgeError> {
        if cfg.listen.is_empty() {
            return Err(EdgeError::Config("no --listen address".into()));
        }
        if cfg.threads == 0 {
            return Err(EdgeError::Config("--threads must be at least 1".into()));
        }
        let cfg = Arc::new(cfg);
        let routes = Arc::new(Routes::new(cfg.outlier));
        let metrics = Arc::new(Metrics::default());
        let shutdown = Shutdown::default();
        // The first worker's listeners fix the ports (port 0 becomes a real one); the
        // others bind the same addresses with SO_REUSEPORT.
        let mut resolved = Vec::new();
        let mut per_worker: Vec<Vec<i32>> = Vec::new();
        let close_all = |per_worker: &Vec<Vec<i32>>| {
            per_worker.iter().flatten().for_each(|fd| sys::close(*fd));
        };
        for w in 0..cfg.threads {
            let mut fds = Vec::new();
            for (i, addr) in cfg.listen.iter().enumerate() {
                let addr = if w == 0 { *addr } else { resolved[i] };
                match sys::reuseport_listener(addr, 4096) {
                    Ok(fd) => {
                        if w == 0 {
                            resolved.push(sys::local_addr(fd).unwrap_or(addr));
                        }
                        fds.push(fd);
                    }
                    Err(source) => {
                        fds.iter().for_each(|fd| sys::close(*fd));
                        close_all(&per_worker);
                        return Err(EdgeError::Listen { addr, source });
                    }
                }
            }
            per_worker.push(fds);
        }
        let per_worker_clients = cfg.max_connections.div_ceil(cfg.threads).max(1);
        // Rings are made inside the threads (single issuer), but a kernel that refuses
        // io_uring should fail start, not a thread later: try one here.
        if let Err(e) = uring::Ring::new(8, 8, 4096) {
            close_all(&per_worker);
            return Err(EdgeError::Ring(e));
        }
        let (admin, control) = match control::start(
            cfg.clone(),
            routes.clone(),
            metrics.clone(),
            shutdown.clone(),
        ) {
            Ok(x) => x,
            Err(e) => {
                close_all(&per_worker);
                return Err(e);
            }
        };
        let mut workers = Vec::new();
        for (w, fds) in per_worker.into_iter().enumerate() {
            let (cfg, routes, metrics, shutdown) = (
                cfg.clone(),
                routes.clone(),
                metrics.clone(),
                shutdown.clone(),
            );
            let handle = std::thread::Builder::new()
                .name(format!("edge-{w}"))
                .spawn(move || {
                    let worker = proxy::Worker::new(
                        cfg,
                        routes,
                        metrics,
                        shutdown,
                        fds,
                        per_worker_clients,
                    )?;
                    worker.run()
                })
                .map_err(EdgeError::Thread)?;
            workers.push(handle);
        }
        tracing::info!(listen = ?resolved, admin = ?admin, threads = cfg.threads, domain = %cfg.domain,
            "edge started: io_uring workers with SO_REUSEPORT listeners, splice above {} bytes", cfg.splice_threshold);
        Ok(Edge {
            listen: resolved,
            admin,
            routes,
            metrics,
            shutdown,
            workers,
            control: Some(control),
        })
    }

    /// Fabric revision of the route table in use.
    pub fn routes_rev(&self) -> u64 {
        self.routes.load().rev
    }

    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Stop accepting, let exchanges in flight finish (up to the drain time), join.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.shutdown.request();
        self.join()
    }

    /// Wait until the edge stops (after `Shutdown::request` from elsewhere).
    pub fn join(&mut self) -> std::io::Result<()> {
        let mut result = Ok(());
        for w in self.workers.drain(..) {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(std::io::Error::other("an edge worker panicked")),
            }
        }
        self.shutdown.request();
        if let Some(c) = self.control.take() {
            let _ = c.join();
        }
        result
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.shutdown.request();
        let _ = self.join();
    }
}
