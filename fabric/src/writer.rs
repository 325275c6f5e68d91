//! The single writer: every mutation goes through one thread that applies a batch under the
//! state's write lock, commits it durably in one storage transaction (group commit),
//! acknowledges each command, then publishes the events. Readers wait at most one commit; no
//! reader or subscriber ever sees a change that is not durable. A command's reply and its own
//! events on the same connection come in no fixed order.

use std::sync::Arc;
use std::time::Instant;

use mesh_common::proto::{Fields, ProtoError};
use tokio::sync::{mpsc, oneshot};

use crate::Shared;
use crate::state::Mutation;
use crate::storage::Storage;

/// Most mutations committed in one transaction.
const MAX_BATCH: usize = 256;

pub struct WriteRequest {
    pub mutation: Mutation,
    pub reply: Option<oneshot::Sender<Result<Fields, ProtoError>>>,
}

/// Runs the writer on its own thread until every sender is gone.
pub fn spawn(
    shared: Arc<Shared>,
    mut storage: Box<dyn Storage>,
    mut rx: mpsc::Receiver<WriteRequest>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("fabric-writer".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                let mut st = shared.state.blocking_write();
                let now = Instant::now();
                let mut changes = Vec::new();
                let mut events = Vec::new();
                let mut replies = Vec::with_capacity(batch.len());
                for req in batch {
                    let r = st.apply(req.mutation, now, &mut changes, &mut events);
                    replies.push((req.reply, r));
                }
                if !changes.is_empty() {
                    let t = Instant::now();
                    if let Err(e) = storage.commit(&changes) {
                        // Memory is ahead of disk now; nothing of this batch was acknowledged.
                        // Stop, so that a restart reloads the last durable state.
                        tracing::error!(
                            "{e}; stopping the fabric: restart it once storage works again"
                        );
                        std::process::exit(70);
                    }
                    shared.metrics.store_commit(t.elapsed());
                }
                // Durable now: acknowledge first, so that a write's latency does not grow
                // with the number of subscribers its events fan out to.
                for (reply, r) in replies {
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
                // Still under the write lock, so no new subscription can slip between the
                // commit and its events.
                if !events.is_empty() {
                    let (sent, slow) = st
                        .subscribers
                        .lock()
                        .map(|mut s| s.publish(&events))
                        .unwrap_or((0, 0));
                    let m = &shared.metrics;
                    m.events_fanned_out
                        .fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
                    m.slow_consumers
                        .fetch_add(slow, std::sync::atomic::Ordering::Relaxed);
                }
                drop(st);
            }
        })
        .expect("spawning the fabric writer thread")
}
