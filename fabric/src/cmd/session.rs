//! PING, INFO, AUTH, TOKEN.CREATE, STATUS: the connection's own business.

use std::sync::atomic::Ordering::Relaxed;

use mesh_common::proto::{self, Args, Code, Fields, ProtoError};

use super::{Reply, ok};
use crate::auth::{self, Role, TokenRecord};
use crate::connection::Session;
use crate::state::Mutation;

/// `PING [word]` -> `+PONG [word]`
pub struct Ping(Option<String>);

impl Ping {
    pub fn parse(a: &mut Args<'_>) -> Ping {
        Ping(a.optional_positional().map(str::to_string))
    }

    pub fn apply(self) -> Reply {
        Ok(Some(match self.0 {
            Some(w) => format!("+PONG {w}\n"),
            None => "+PONG\n".into(),
        }))
    }
}

pub fn info(s: &Session) -> Reply {
    ok(Fields::new()
        .add("proto", proto::PROTO_VERSION)
        .add("server", concat!("mesh-fabric/", env!("CARGO_PKG_VERSION")))
        .add("blob_url", &s.shared.blob_url)
        .add("max_line", proto::MAX_LINE)
        .add("role", s.role.map(Role::as_str).unwrap_or("none")))
}

/// `AUTH <token>`
pub struct Auth(String);

impl Auth {
    pub fn parse(a: &mut Args<'_>) -> Result<Auth, ProtoError> {
        Ok(Auth(a.positional("token")?.to_string()))
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        let hash = auth::token_hash(&self.0);
        let record = s.shared.state.read().await.tokens.get(&hash).cloned();
        match record {
            Some(r) => {
                s.role = Some(r.role);
                tracing::debug!(peer = %s.peer, role = %r.role, "authenticated");
                ok(Fields::new().add("role", r.role).add("name", &r.name))
            }
            None => {
                // A failed AUTH leaves the connection unauthenticated, whatever it was before,
                // and ends what it subscribed to.
                s.role = None;
                if let Ok(mut subs) = s.shared.state.read().await.subscribers.lock() {
                    subs.remove_conn(s.handle.id);
                }
                tracing::info!(peer = %s.peer, "authentication failed");
                Err(ProtoError::new(
                    Code::AuthFailed,
                    "token not valid; use the fabric's DATA/admin.token or one from `mesh token create`",
                ))
            }
        }
    }
}

/// `TOKEN.CREATE role=ROLE [name=NAME]` -> `+OK token=... role=...`
pub struct TokenCreate {
    role: Role,
    name: String,
}

impl TokenCreate {
    pub fn parse(a: &mut Args<'_>) -> Result<TokenCreate, ProtoError> {
        let role = a.require("role")?.parse().map_err(ProtoError::bad_args)?;
        let name = a.get("name").unwrap_or("").to_string();
        Ok(TokenCreate { role, name })
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        let token = auth::new_token();
        let hash = auth::token_hash(&token);
        let record = TokenRecord {
            role: self.role,
            name: self.name,
        };
        s.shared
            .write(Mutation::CreateToken { hash, record })
            .await?;
        ok(Fields::new().add("token", token).add("role", self.role))
    }
}

pub async fn status(s: &Session) -> Reply {
    let st = s.shared.state.read().await;
    let subs = st.subscribers.lock().map(|x| x.count()).unwrap_or(0);
    ok(Fields::new()
        .add("rev", st.rev)
        .add("plans", st.plans.len())
        .add("budgets", st.budgets.len())
        .add("endpoints", st.endpoints.len())
        .add("nodes", st.nodes.len())
        .add("leases", st.leases.len())
        .add(
            "connections",
            s.shared.metrics.connections_open.load(Relaxed),
        )
        .add("subscriptions", subs)
        .add("uptime_s", s.shared.started.elapsed().as_secs()))
}
