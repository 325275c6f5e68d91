//! Accepting connections (with a limit) and the lease expiry timer.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mesh_common::proto::{Code, ProtoError};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::Shared;
use crate::connection;
use crate::state::Mutation;

/// How often the expiry timer looks at lease deadlines: the worst-case extra delay between a
/// lease's deadline and its endpoints' removal.
const EXPIRY_TICK: Duration = Duration::from_millis(25);

pub async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    let mut next_id = 0u64;
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shared.metrics.connections_refused.fetch_add(1, Relaxed);
            let max = shared.config.max_connections;
            tokio::spawn(async move {
                let e = ProtoError::new(
                    Code::Limit,
                    format!("too many connections (max {max}); try again later"),
                );
                let _ = stream
                    .write_all(format!("{}\n", e.to_line()).as_bytes())
                    .await;
            });
            continue;
        };
        next_id += 1;
        let id = next_id;
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(shared.config.send_buffer);
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.metrics.connections_total.fetch_add(1, Relaxed);
            shared.metrics.connections_open.fetch_add(1, Relaxed);
            connection::serve(shared.clone(), stream, peer, id).await;
            shared.metrics.connections_open.fetch_sub(1, Relaxed);
            drop(permit);
        });
    }
}

/// Removes what hangs on expired leases, within one tick of their deadline.
pub async fn expire_leases(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let due = shared
            .state
            .read()
            .await
            .next_deadline()
            .is_some_and(|d| d <= Instant::now());
        if due && let Err(e) = shared.write(Mutation::ExpireLeases).await {
            tracing::warn!("lease expiry: {e}");
        }
    }
}
