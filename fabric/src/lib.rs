//! Control fabric of Mycelium Mesh.
//!
//! One process that holds the mesh's desired state: the registry of plans and endpoints, the
//! nutrient ledger of per-app budgets, leases, pub/sub over the line protocol, persistence in
//! an embedded store behind a storage trait, and the content repository served over HTTP.
//! It meets agents and edges only on the line protocol and the blob HTTP API.
//!
//! Shape: `server` accepts, `connection` frames lines and runs one session per socket,
//! `cmd` has one module per verb family, `state` is the state machine that only `writer`
//! mutates (group commit through `storage`), `pubsub` fans events out, `http` serves blobs and
//! metrics.

pub mod auth;
mod cmd;
mod connection;
mod http;
pub mod metrics;
pub mod pubsub;
mod server;
pub mod state;
pub mod storage;
mod writer;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_common::proto::{Fields, ProtoError};
use mesh_common::store::ContentStore;
use tokio::sync::{RwLock, mpsc, oneshot};

use crate::auth::{Role, TokenRecord};
use crate::state::{Mutation, State};
use crate::storage::{RedbStorage, Storage};
pub use crate::writer::WriteRequest;

/// How a fabric is run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Line protocol address.
    pub listen: SocketAddr,
    /// Blob HTTP API and /metrics address.
    pub http: SocketAddr,
    /// Data directory: fabric.redb, content/, admin.token.
    pub data: PathBuf,
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// The blob URL advertised to clients; default `http://<http address>` (set it when the
    /// HTTP address is a wildcard like 0.0.0.0, which clients cannot connect to).
    pub blob_url: Option<String>,
    /// Replies and events queued for one connection before it counts as a slow consumer.
    pub outbound_queue: usize,
    /// Kernel send buffer per connection (SO_SNDBUF): with the queue, it bounds what a client
    /// that stops reading can pin before it is cut off.
    pub send_buffer: usize,
}

impl Config {
    pub fn new(listen: SocketAddr, http: SocketAddr, data: PathBuf) -> Self {
        Config {
            listen,
            http,
            data,
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(120),
            blob_url: None,
            outbound_queue: 1024,
            send_buffer: 256 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("data dir {path}: {source}")]
    Data {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Storage(#[from] storage::StorageError),
    #[error("content repository: {0}")]
    Content(#[from] mesh_common::store::StoreError),
    #[error("cannot listen on {addr}: {source} (is another fabric running? pick another address)")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What every connection and task of a fabric shares.
pub struct Shared {
    pub state: RwLock<State>,
    writer: mpsc::Sender<WriteRequest>,
    pub metrics: metrics::Metrics,
    pub content: ContentStore,
    pub config: Config,
    /// Where clients fetch blobs (advertised in the greeting).
    pub blob_url: String,
    pub started: Instant,
}

impl Shared {
    /// Submits a mutation and waits until it is durable (or refused).
    pub async fn write(&self, mutation: Mutation) -> Result<Fields, ProtoError> {
        let (tx, rx) = oneshot::channel();
        let req = WriteRequest {
            mutation,
            reply: Some(tx),
        };
        let gone = || {
            ProtoError::new(
                mesh_common::proto::Code::Internal,
                "the fabric is shutting down",
            )
        };
        self.writer.send(req).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// A running fabric: its addresses and the admin token file.
pub struct Fabric {
    pub shared: Arc<Shared>,
    pub listen: SocketAddr,
    pub http: SocketAddr,
    pub admin_token_path: PathBuf,
}

impl Fabric {
    /// Opens the data dir, loads state, binds both listeners and starts serving. Returns once
    /// the fabric accepts connections; it runs until the runtime stops.
    pub async fn start(config: Config) -> Result<Fabric, FabricError> {
        let data = config.data.clone();
        create_private_dir(&data)?;
        let storage = RedbStorage::open(&data.join("fabric.redb"))?;
        let state = State::load(&storage)?;
        let admin_token_path = data.join("admin.token");
        let new_admin_token = prepare_admin_token(&state, &admin_token_path)?;
        let content = ContentStore::open(data.join("content"))?;

        let line_listener =
            tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|source| FabricError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let http_listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|source| FabricError::Listen {
                addr: config.http,
                source,
            })?;
        let listen = line_listener
            .local_addr()
            .map_err(|source| FabricError::Listen {
                addr: config.listen,
                source,
            })?;
        let http = http_listener
            .local_addr()
            .map_err(|source| FabricError::Listen {
                addr: config.http,
                source,
            })?;

        let (tx, rx) = mpsc::channel(4096);
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            writer: tx,
            metrics: metrics::Metrics::default(),
            content,
            config: config.clone(),
            blob_url: config
                .blob_url
                .clone()
                .unwrap_or_else(|| format!("http://{http}")),
            started: Instant::now(),
        });
        writer::spawn(shared.clone(), Box::new(storage) as Box<dyn Storage>, rx);

        if let Some(token) = new_admin_token {
            register_admin_token(&shared, &token, &admin_token_path).await?;
        }

        if config.blob_url.is_none() && http.ip().is_unspecified() {
            tracing::warn!(
                "the blob service listens on {http}; clients on other hosts cannot use that address: pass --blob-url http://<reachable host>:{}",
                http.port()
            );
        }
        tokio::spawn(server::expire_leases(shared.clone()));
        tokio::spawn(server::accept_loop(shared.clone(), line_listener));
        tokio::spawn(http::serve(shared.clone(), http_listener));
        let st = shared.state.read().await;
        tracing::info!(
            line = %listen,
            http = %http,
            data = %data.display(),
            rev = st.rev,
            plans = st.plans.len(),
            endpoints = st.endpoints.len(),
            "fabric started"
        );
        drop(st);
        Ok(Fabric {
            shared,
            listen,
            http,
            admin_token_path,
        })
    }
}

fn create_private_dir(path: &Path) -> Result<(), FabricError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| FabricError::Data {
        path: path.to_path_buf(),
        source,
    };
    if !path.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(err)?;
    }
    Ok(())
}

/// On first start (no token at all) writes an admin token to DATA/admin.token (0600) and
/// returns it for registration. The file is written before the listeners open (so whoever sees
/// the port open finds the file) and before the token's hash is committed (so a crash in
/// between leaves a file whose token the next start adopts).
fn prepare_admin_token(state: &State, path: &Path) -> Result<Option<String>, FabricError> {
    if !state.tokens.is_empty() {
        return Ok(None);
    }
    let err = |source| FabricError::Data {
        path: path.to_path_buf(),
        source,
    };
    let token = match std::fs::read_to_string(path) {
        Ok(t) if t.trim().starts_with("mesh_") => t.trim().to_string(),
        _ => {
            let t = auth::new_token();
            mesh_common::fsutil::write_atomic(path, format!("{t}\n").as_bytes(), 0o600)
                .map_err(err)?;
            t
        }
    };
    Ok(Some(token))
}

async fn register_admin_token(
    shared: &Shared,
    token: &str,
    path: &Path,
) -> Result<(), FabricError> {
    let record = TokenRecord {
        role: Role::Admin,
        name: "admin (first start)".into(),
    };
    shared
        .write(Mutation::CreateToken {
            hash: auth::token_hash(token),
            record,
        })
        .await
        .map_err(|e| FabricError::Storage(storage::StorageError(e.to_string())))?;
    tracing::info!(path = %path.display(), "created the admin token");
    Ok(())
}
