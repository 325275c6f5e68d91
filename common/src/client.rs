//! Client of the fabric's line protocol, shared by the CLI, the agent and the edge.
//!
//! [`Client`] connects, reads the greeting (which names the blob URL), authenticates and runs
//! commands one at a time. [`Subscription`] follows a topic and survives disconnects: it
//! reconnects with backoff and resumes from the last revision it saw, so its user sees every
//! change once, or a `Reset` followed by the whole current state when resuming was impossible.

use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::lines::{Line, LineReader};
use crate::proto::{self, Code, ProtoError, ServerLine, field, parse_fields};

/// Where the fabric is and how to prove who we are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `host:port` of the line protocol.
    pub fabric: String,
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the fabric at {addr}: {source} (is `mesh fabric` running there? set --fabric or MESH_FABRIC)"
    )]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to the fabric lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("the fabric closed the connection")]
    Closed,
    #[error("the fabric said: {0}")]
    Refused(ProtoError),
    #[error("unexpected line from the fabric: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Whether retrying later could help (the fabric is down or restarting), as opposed to a
    /// refusal that will not change (bad token, bad arguments).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Closed => true,
            ClientError::Refused(e) => {
                matches!(e.code, Code::Internal | Code::Limit | Code::SlowConsumer)
            }
            ClientError::Protocol(_) => false,
        }
    }

    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Refused(e) => Some(e.code),
            _ => None,
        }
    }
}

/// A successful reply: the `+OK` fields and any `*` items before it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub fields: String,
    pub items: Vec<String>,
}

impl Response {
    /// The value of `key=` in the `+OK` line.
    pub fn get(&self, key: &str) -> Option<&str> {
        field(&parse_fields(&self.fields), key)
    }
}

/// An event pushed by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: String,
    pub fields: String,
}

impl Event {
    pub fn get(&self, key: &str) -> Option<&str> {
        field(&parse_fields(&self.fields), key)
    }
}

/// One authenticated connection.
pub struct Client {
    reader: LineReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    info: String,
    role: String,
    /// Events that arrived while waiting for a reply.
    pending: std::collections::VecDeque<Event>,
}

impl Client {
    /// Connects, reads the greeting and authenticates.
    pub async fn connect(cfg: &ClientConfig) -> Result<Client, ClientError> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&cfg.fabric))
            .await
            .map_err(|_| ClientError::Connect {
                addr: cfg.fabric.clone(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out after 10 s"),
            })?
            .map_err(|source| ClientError::Connect {
                addr: cfg.fabric.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let mut c = Client {
            reader: LineReader::new(rd, proto::MAX_LINE),
            writer: BufWriter::new(wr),
            info: String::new(),
            role: String::new(),
            pending: Default::default(),
        };
        match c.read_line().await? {
            ServerLine::Event { kind, fields } if kind == "info" => c.info = fields,
            ServerLine::Err(e) => return Err(ClientError::Refused(e)),
            other => {
                return Err(ClientError::Protocol(format!(
                    "{other:?} instead of the greeting"
                )));
            }
        }
        if cfg.token.contains(' ') || cfg.token.is_empty() {
            return Err(ClientError::Refused(ProtoError::new(
                Code::AuthFailed,
                "the token is empty or has spaces",
            )));
        }
        let r = c.call(&format!("AUTH {}", cfg.token)).await?;
        c.role = r.get("role").unwrap_or("").to_string();
        Ok(c)
    }

    /// The blob service URL the fabric advertised (`http://host:port`).
    pub fn blob_url(&self) -> Option<&str> {
        field(&parse_fields(&self.info), "blob_url")
    }

    pub fn role(&self) -> &str {
        &self.role
    }

    async fn read_line(&mut self) -> Result<ServerLine, ClientError> {
        match self.reader.next_line().await? {
            None => Err(ClientError::Closed),
            Some(Line::TooLong) => Err(ClientError::Protocol("a line over the limit".into())),
            Some(Line::Text(bytes)) => {
                let text = String::from_utf8(bytes)
                    .map_err(|_| ClientError::Protocol("a line that is not UTF-8".into()))?;
                ServerLine::parse(&text).map_err(ClientError::Protocol)
            }
        }
    }

    /// Sends one command line and waits for its reply; events that arrive meanwhile are kept
    /// for [`Client::next_event`].
    pub async fn call(&mut self, line: &str) -> Result<Response, ClientError> {
        if line.contains(['\n', '\r']) {
            return Err(ClientError::Protocol("a command is one line".into()));
        }
        self.writer.write_all(line.as_bytes()).await?;
        self.writer.write_all(b"\n").await?;
        self.writer.flush().await?;
        let mut items = Vec::new();
        loop {
            match self.read_line().await? {
                ServerLine::Ok(fields) => return Ok(Response { fields, items }),
                ServerLine::Err(e) => return Err(ClientError::Refused(e)),
                ServerLine::Item(i) => items.push(i),
                ServerLine::Event { kind, fields } => {
                    self.pending.push_back(Event { kind, fields })
                }
            }
        }
    }

    /// The next pushed event (buffered ones first).
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        if let Some(e) = self.pending.pop_front() {
            return Ok(e);
        }
        loop {
            match self.read_line().await? {
                ServerLine::Event { kind, fields } => return Ok(Event { kind, fields }),
                ServerLine::Err(e) => return Err(ClientError::Refused(e)),
                // A PING's reply while following events.
                ServerLine::Ok(_) => continue,
                ServerLine::Item(i) => {
                    return Err(ClientError::Protocol(format!("item {i:?} outside a reply")));
                }
            }
        }
    }

    /// Sends a line without waiting for its reply (keepalive pings while following events).
    pub async fn send(&mut self, line: &str) -> Result<(), ClientError> {
        self.writer.write_all(line.as_bytes()).await?;
        self.writer.write_all(b"\n").await?;
        self.writer.flush().await?;
        Ok(())
    }
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubEvent {
    /// Forget everything known about the topic: the whole state follows.
    Reset,
    /// An object was created or changed (`kind` is plan, endpoint, budget, node).
    Put(Event),
    /// An object was deleted.
    Del(Event),
    /// Everything up to `rev` has been delivered; the view is consistent.
    Sync { rev: u64 },
}

/// A subscription that follows a topic across disconnects and fabric restarts.
pub struct Subscription {
    cfg: ClientConfig,
    topic: String,
    app: Option<String>,
    node: Option<String>,
    client: Option<Client>,
    /// Highest revision delivered; resumes start after it.
    last_rev: u64,
    synced: bool,
    /// Lines of a replay are arriving (until `> sync`): their revisions are not a resume point.
    in_replay: bool,
    /// Something was handed to the user (so a fresh snapshot must start with a Reset).
    delivered: bool,
    pending_reset: bool,
    backoff: Duration,
    last_ping: tokio::time::Instant,
}

const PING_EVERY: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Subscription {
    pub fn new(cfg: ClientConfig, topic: &str, app: Option<&str>) -> Self {
        Subscription {
            cfg,
            topic: topic.to_string(),
            app: app.map(str::to_string),
            node: None,
            client: None,
            last_rev: 0,
            synced: false,
            in_replay: false,
            delivered: false,
            pending_reset: false,
            backoff: Duration::from_millis(50),
            last_ping: tokio::time::Instant::now(),
        }
    }

    /// Only events about this node (e.g. its slot assignments).
    pub fn set_node(&mut self, node: &str) {
        self.node = Some(node.to_string());
    }

    pub fn last_rev(&self) -> u64 {
        self.last_rev
    }

    /// The next change. Transient failures are retried forever (with backoff up to 5 s);
    /// only refusals that retrying cannot fix (a bad token) are returned.
    pub async fn next(&mut self) -> Result<SubEvent, ClientError> {
        loop {
            if self.client.is_none() {
                match self.subscribe().await {
                    Ok(c) => {
                        self.client = Some(c);
                        self.backoff = Duration::from_millis(50);
                        self.last_ping = tokio::time::Instant::now();
                        if std::mem::take(&mut self.pending_reset) {
                            return Ok(SubEvent::Reset);
                        }
                    }
                    Err(e) if e.is_transient() => {
                        tracing::debug!(topic = %self.topic, "fabric unreachable, retrying: {e}");
                        tokio::time::sleep(self.backoff).await;
                        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some(client) = self.client.as_mut() else {
                continue;
            };
            // The server closes connections that send nothing for a while, however many
            // events flow the other way: ping on a schedule, not on silence.
            let ping_at = self.last_ping + PING_EVERY;
            let ev = match tokio::time::timeout_at(ping_at, client.next_event()).await {
                Err(_) => {
                    self.last_ping = tokio::time::Instant::now();
                    if client.send("PING").await.is_err() {
                        self.client = None;
                    }
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::debug!(topic = %self.topic, "subscription lost, resuming: {e}");
                    self.client = None;
                    continue;
                }
                Ok(Ok(ev)) => ev,
            };
            let rev = ev.get("rev").and_then(|r| r.parse::<u64>().ok());
            // A replay's lines carry each object's own revision; only `> sync` says how far
            // the replay reached, so only live events and syncs move the resume point.
            if let (Some(rev), false) = (rev, self.in_replay) {
                self.last_rev = self.last_rev.max(rev);
            }
            match (ev.kind.as_str(), ev.get("op")) {
                ("sync", _) => {
                    self.in_replay = false;
                    self.synced = true;
                    if let Some(rev) = rev {
                        self.last_rev = self.last_rev.max(rev);
                    }
                    return Ok(SubEvent::Sync { rev: self.last_rev });
                }
                // The server could not resume from our revision: a full replay follows.
                ("reset", _) => return Ok(SubEvent::Reset),
                (_, Some("put")) => {
                    self.delivered = true;
                    return Ok(SubEvent::Put(ev));
                }
                (_, Some("del")) => {
                    self.delivered = true;
                    return Ok(SubEvent::Del(ev));
                }
                _ => continue,
            }
        }
    }

    /// Connects and subscribes, resuming after the last revision once synced.
    async fn subscribe(&mut self) -> Result<Client, ClientError> {
        let mut c = Client::connect(&self.cfg).await?;
        let mut line = format!("SUB {}", self.topic);
        if let Some(app) = &self.app {
            line.push_str(&format!(" app={app}"));
        }
        if let Some(node) = &self.node {
            line.push_str(&format!(" node={node}"));
        }
        if self.synced {
            line.push_str(&format!(" from={}", self.last_rev));
        }
        let r = c.call(&line).await?;
        self.in_replay = true;
        // A plain snapshot after we handed out events (a reconnect before the first sync):
        // the user's view may hold objects deleted since, so it starts over.
        if r.get("mode") == Some("snapshot") && self.delivered {
            self.pending_reset = true;
        }
        Ok(c)
    }
}
