//! One client connection: a reader loop that frames lines and runs commands in order, and a
//! writer task that sends replies and events from the connection's bounded queue.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_common::lines::{Line, LineReader};
use mesh_common::proto::{self, Code, Fields, ProtoError, Request};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;

use crate::Shared;
use crate::auth::Role;
use crate::cmd::Command;
use crate::pubsub::ConnHandle;

/// What a command needs to know about its connection.
pub struct Session {
    pub shared: Arc<Shared>,
    pub handle: Arc<ConnHandle>,
    pub role: Option<Role>,
    pub peer: SocketAddr,
    pub quit: bool,
}

pub async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, id: u64) {
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<String>(shared.config.outbound_queue);
    let handle = ConnHandle::new(id, tx.clone());
    let writer = tokio::spawn(write_loop(wr, rx, handle.clone()));

    let greeting = Fields::new()
        .add("proto", proto::PROTO_VERSION)
        .add("server", concat!("mesh-fabric/", env!("CARGO_PKG_VERSION")))
        .add("blob_url", &shared.blob_url)
        .add("max_line", proto::MAX_LINE)
        .add("auth", "token");
    let _ = tx.send(format!("> info {greeting}\n")).await;

    let mut session = Session {
        shared: shared.clone(),
        handle: handle.clone(),
        role: None,
        peer,
        quit: false,
    };
    let mut reader = LineReader::new(rd, proto::MAX_LINE);
    let idle = shared.config.idle_timeout;
    loop {
        let line = tokio::select! {
            r = tokio::time::timeout(idle, reader.next_line()) => r,
            () = handle.closed() => break,
        };
        let reply = match line {
            Err(_) => {
                let e = ProtoError::new(
                    Code::Limit,
                    format!("idle for {} s; closing", idle.as_secs()),
                );
                let _ = tx.send(format!("{}\n", e.to_line())).await;
                break;
            }
            Ok(Err(_)) | Ok(Ok(None)) => break,
            Ok(Ok(Some(Line::TooLong))) => {
                shared.metrics.command("?", Code::LineTooLong.as_str());
                Some(error_line(&ProtoError::new(
                    Code::LineTooLong,
                    format!("line exceeds {} bytes; it was discarded", proto::MAX_LINE),
                )))
            }
            Ok(Ok(Some(Line::Text(bytes)))) => run_line(&mut session, &bytes).await,
        };
        if let Some(reply) = reply
            && tx.send(reply).await.is_err()
        {
            break;
        }
        if session.quit {
            break;
        }
    }
    if let Ok(mut subs) = shared.state.read().await.subscribers.lock() {
        subs.remove_conn(id);
    }
    drop(tx);
    drop(session);
    // Let the writer flush what is queued (a QUIT's +OK, an error), unless it is stuck.
    // A writer stuck on a peer that never reads must not outlive its connection.
    let abort = writer.abort_handle();
    if tokio::time::timeout(std::time::Duration::from_secs(5), writer)
        .await
        .is_err()
    {
        abort.abort();
    }
}

/// Parses and runs one line; `None` when the command already queued its own reply.
async fn run_line(session: &mut Session, bytes: &[u8]) -> Option<String> {
    let shared = session.shared.clone();
    let metrics = &shared.metrics;
    let req = match Request::parse(bytes) {
        Ok(Some(r)) => r,
        Ok(None) => return None,
        Err(e) => {
            metrics.command("?", e.code.as_str());
            return Some(error_line(&e));
        }
    };
    // Before authentication only the session verbs are parsed at all, so an anonymous client
    // learns nothing about arguments.
    if session.role.is_none() && !crate::cmd::is_session_verb(&req.verb) {
        let e = ProtoError::new(Code::NoAuth, "authenticate first: AUTH <token>");
        metrics.command("?", e.code.as_str());
        return Some(error_line(&e));
    }
    let (label, result) = match Command::from_request(&req) {
        Ok(cmd) => {
            let label = cmd.verb();
            match check_access(session, &cmd) {
                Ok(()) => (label, cmd.apply(session).await),
                Err(e) => (label, Err(e)),
            }
        }
        // Unknown verbs share one metrics label so that clients cannot grow the label set.
        Err(e) if e.code == Code::UnknownVerb => ("?", Err(e)),
        Err(e) => (crate::cmd::known_verb(&req.verb).unwrap_or("?"), Err(e)),
    };
    match result {
        Ok(reply) => {
            metrics.command(label, "ok");
            reply
        }
        Err(e) => {
            metrics.command(label, e.code.as_str());
            Some(error_line(&e))
        }
    }
}

fn check_access(session: &Session, cmd: &Command) -> Result<(), ProtoError> {
    let Some(access) = cmd.access() else {
        return Ok(());
    };
    let Some(role) = session.role else {
        return Err(ProtoError::new(
            Code::NoAuth,
            "authenticate first: AUTH <token>",
        ));
    };
    if crate::auth::allows(role, access) {
        Ok(())
    } else {
        Err(ProtoError::new(
            Code::Denied,
            format!(
                "role {role} may not run {}; use a token with a role that may",
                cmd.verb()
            ),
        ))
    }
}

pub fn error_line(e: &ProtoError) -> String {
    format!("{}\n", e.to_line())
}

async fn write_loop(wr: OwnedWriteHalf, mut rx: mpsc::Receiver<String>, handle: Arc<ConnHandle>) {
    let mut out = BufWriter::with_capacity(64 * 1024, wr);
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            () = handle.closed() => {
                if handle.is_slow() {
                    let e = ProtoError::new(Code::SlowConsumer, "events were not read fast enough; reconnect and resume with SUB ... from=<last rev>");
                    let _ = out.write_all(error_line(&e).as_bytes()).await;
                }
                break;
            }
        };
        let Some(mut msg) = msg else { break };
        // Write what is queued in one go, then flush once.
        loop {
            if !msg.ends_with('\n') {
                msg.push('\n');
            }
            if out.write_all(msg.as_bytes()).await.is_err() {
                return;
            }
            match rx.try_recv() {
                Ok(m) => msg = m,
                Err(_) => break,
            }
        }
        if out.flush().await.is_err() {
            return;
        }
    }
    let _ = out.flush().await;
    let _ = out.shutdown().await;
}
