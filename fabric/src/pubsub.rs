//! Subscriptions and fan-out. Events are formatted per subscriber and handed to each
//! connection's bounded outbound queue without waiting: a connection whose queue is full is a
//! slow consumer, told so and closed, and nobody else waits for it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, watch};

use crate::state::{Event, Filter, Topic};

/// The writer's view of one connection: where its lines go and how to stop it.
pub struct ConnHandle {
    pub id: u64,
    pub tx: mpsc::Sender<String>,
    slow: AtomicBool,
    close: watch::Sender<bool>,
}

impl ConnHandle {
    pub fn new(id: u64, tx: mpsc::Sender<String>) -> Arc<Self> {
        Arc::new(ConnHandle {
            id,
            tx,
            slow: AtomicBool::new(false),
            close: watch::Sender::new(false),
        })
    }

    /// Marks the connection as too slow and tells its tasks to close it.
    pub fn mark_slow(&self) {
        if !self.slow.swap(true, Ordering::SeqCst) {
            self.close.send_replace(true);
        }
    }

    /// Resolves once the connection has been told to close.
    pub async fn closed(&self) {
        let mut rx = self.close.subscribe();
        let _ = rx.wait_for(|closing| *closing).await;
    }

    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::SeqCst)
    }
}

struct Subscription {
    id: u64,
    conn: Arc<ConnHandle>,
    filter: Filter,
}

/// Every live subscription, by topic.
#[derive(Default)]
pub struct Subscribers {
    by_topic: HashMap<Topic, Vec<Subscription>>,
    next_id: u64,
}

impl Subscribers {
    pub fn add(&mut self, conn: Arc<ConnHandle>, topic: Topic, filter: Filter) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.by_topic
            .entry(topic)
            .or_default()
            .push(Subscription { id, conn, filter });
        id
    }

    /// Removes subscription `id` if it belongs to connection `conn`.
    pub fn remove(&mut self, id: u64, conn: u64) -> bool {
        let mut found = false;
        for subs in self.by_topic.values_mut() {
            subs.retain(|s| {
                let hit = s.id == id && s.conn.id == conn;
                found |= hit;
                !hit
            });
        }
        found
    }

    pub fn remove_conn(&mut self, conn: u64) {
        for subs in self.by_topic.values_mut() {
            subs.retain(|s| s.conn.id != conn);
        }
    }

    pub fn count_for(&self, conn: u64) -> usize {
        self.by_topic
            .values()
            .flatten()
            .filter(|s| s.conn.id == conn)
            .count()
    }

    pub fn count(&self) -> usize {
        self.by_topic.values().map(Vec::len).sum()
    }

    /// Queues each event for every matching subscriber; returns how many lines were queued and
    /// how many connections were found too slow (and dropped).
    pub fn publish(&mut self, events: &[Event]) -> (u64, u64) {
        let mut sent = 0;
        let mut slow = Vec::new();
        for ev in events {
            let Some(subs) = self.by_topic.get(&ev.topic()) else {
                continue;
            };
            let parts = ev.parts();
            for s in subs {
                if !s.filter.matches(ev) || s.conn.is_slow() {
                    continue;
                }
                match s.conn.tx.try_send(parts.line(s.id)) {
                    Ok(()) => sent += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.conn.mark_slow();
                        slow.push(s.conn.id);
                    }
                    // The connection is gone; its cleanup removes the subscription.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        let slow_count = slow.len() as u64;
        for c in slow {
            self.remove_conn(c);
        }
        (sent, slow_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::EventKind;

    fn ev(app: &str, rev: u64) -> Event {
        Event {
            rev,
            kind: EventKind::PlanDel { app: app.into() },
        }
    }

    #[test]
    fn filters_by_topic_and_app_and_drops_slow_consumers() {
        let (tx_a, mut rx_a) = mpsc::channel(10);
        let (tx_b, mut rx_b) = mpsc::channel(1);
        let a = ConnHandle::new(1, tx_a);
        let b = ConnHandle::new(2, tx_b);
        let mut subs = Subscribers::default();
        let sa = subs.add(a.clone(), Topic::Plans, Filter::default());
        subs.add(
            b.clone(),
            Topic::Plans,
            Filter {
                app: Some("x".into()),
                node: None,
            },
        );
        subs.add(b.clone(), Topic::Endpoints, Filter::default());
        assert_eq!(subs.publish(&[ev("x", 1), ev("y", 2)]), (3, 0));
        assert_eq!(
            rx_a.try_recv().unwrap(),
            format!("> plan sub={sa} op=del app=x rev=1")
        );
        assert!(rx_a.try_recv().unwrap().contains("app=y"));
        assert!(rx_b.try_recv().unwrap().contains("app=x"));
        assert!(rx_b.try_recv().is_err(), "b filtered app y out");
        // b's queue holds one line: the second one overflows it.
        assert_eq!(subs.publish(&[ev("x", 3), ev("x", 4)]), (3, 1));
        assert!(b.is_slow() && !a.is_slow());
        assert_eq!(
            subs.count(),
            1,
            "the slow connection lost all its subscriptions"
        );
        assert!(subs.remove(sa, 1));
        assert_eq!(subs.count(), 0);
    }
}
