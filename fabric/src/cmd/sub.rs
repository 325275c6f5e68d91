//! SUB and UNSUB: a replay of the current state (or of the changes since a revision), then
//! every change as it commits.

use mesh_common::proto::{Args, Code, Fields, ProtoError};

use super::{Reply, app_name, name};
use crate::connection::Session;
use crate::state::{Filter, Topic};

/// Most subscriptions on one connection.
const MAX_SUBS_PER_CONN: usize = 64;

/// `SUB <plans|budgets|endpoints|nodes|assignments|instances> [app=NAME] [node=ID] [from=REV]`
pub struct Sub {
    topic: Topic,
    filter: Filter,
    from: Option<u64>,
}

impl Sub {
    pub fn parse(a: &mut Args<'_>) -> Result<Sub, ProtoError> {
        let raw = a.positional("topic")?;
        let topic = Topic::parse(raw).ok_or_else(|| {
            ProtoError::bad_args(format!(
                "topic {raw:?} is not one of plans, budgets, endpoints, nodes, assignments, instances"
            ))
        })?;
        let app = a
            .get("app")
            .filter(|a| *a != "*")
            .map(app_name)
            .transpose()?;
        let node = a.get("node").map(|n| name("node", n)).transpose()?;
        if app.is_some() && topic == Topic::Nodes {
            return Err(ProtoError::bad_args("nodes are not per app; drop app="));
        }
        if node.is_some() && matches!(topic, Topic::Plans | Topic::Budgets) {
            return Err(ProtoError::bad_args(
                "plans and budgets are not per node; drop node=",
            ));
        }
        Ok(Sub {
            topic,
            filter: Filter { app, node },
            from: a.number("from", 0..=u64::MAX)?,
        })
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        // Under the read lock the writer cannot commit: the replay and the registration see
        // the same revision, so no change is lost or sent twice.
        let st = s.shared.state.read().await;
        let (replay, mode) = match self
            .from
            .and_then(|f| st.events_since(f, self.topic, &self.filter))
        {
            Some(events) => (events, "resume"),
            None => (
                st.snapshot(self.topic, &self.filter),
                if self.from.is_some() {
                    "reset"
                } else {
                    "snapshot"
                },
            ),
        };
        let Ok(mut subs) = st.subscribers.lock() else {
            return Err(ProtoError::new(
                Code::Internal,
                "subscription registry unavailable",
            ));
        };
        if subs.count_for(s.handle.id) >= MAX_SUBS_PER_CONN {
            return Err(ProtoError::new(
                Code::Limit,
                format!("at most {MAX_SUBS_PER_CONN} subscriptions per connection"),
            ));
        }
        let id = subs.add(s.handle.clone(), self.topic, self.filter);
        let mut out = format!(
            "+OK {}\n",
            Fields::new()
                .add("sub", id)
                .add("rev", st.rev)
                .add("mode", mode)
        );
        if mode == "reset" {
            out.push_str(&format!("> reset sub={id} rev={}\n", st.rev));
        }
        for ev in &replay {
            out.push_str(&ev.line(id));
            out.push('\n');
        }
        out.push_str(&format!("> sync sub={id} rev={}\n", st.rev));
        // Queued while still holding the lock, so it precedes every later event. Never wait
        // here: a client that does not read must not stall the writer.
        if s.handle.tx.try_send(out).is_err() {
            // Same rule as for events: a connection that does not read is closed.
            subs.remove(id, s.handle.id);
            s.handle.mark_slow();
            s.shared
                .metrics
                .slow_consumers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(None)
    }
}

/// `UNSUB <id>`
pub struct Unsub(u64);

impl Unsub {
    pub fn parse(a: &mut Args<'_>) -> Result<Unsub, ProtoError> {
        let raw = a.positional("sub")?;
        raw.parse()
            .map(Unsub)
            .map_err(|_| ProtoError::bad_args(format!("{raw:?} is not a subscription id")))
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        let st = s.shared.state.read().await;
        let removed = st
            .subscribers
            .lock()
            .map(|mut x| x.remove(self.0, s.handle.id))
            .unwrap_or(false);
        if removed {
            super::ok(Fields::new().add("sub", self.0))
        } else {
            Err(ProtoError::new(
                Code::NotFound,
                format!("no subscription {} on this connection", self.0),
            ))
        }
    }
}
