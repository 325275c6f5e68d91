//! ASSIGNMENT.LIST, INSTANCE.SET, INSTANCE.DEL, INSTANCE.LIST: where slots are placed and what
//! the agents say about the instances they run.

use mesh_common::model::InstanceStatus;
use mesh_common::proto::{self, Args, ProtoError};

use super::{Reply, app_name, items, name, ok};
use crate::connection::Session;
use crate::state::Mutation;

/// `ASSIGNMENT.LIST [app]`
pub struct AssignmentList(Option<String>);

impl AssignmentList {
    pub fn parse(a: &mut Args<'_>) -> Result<AssignmentList, ProtoError> {
        Ok(AssignmentList(
            a.optional_positional().map(app_name).transpose()?,
        ))
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        let st = s.shared.state.read().await;
        let lines = st
            .assignments
            .values()
            .filter(|x| self.0.as_deref().is_none_or(|a| a == x.app))
            .map(|x| x.to_fields().to_string());
        items(lines, st.rev)
    }
}

const STATES: [&str; 8] = [
    "launching",
    "ready",
    "unhealthy",
    "draining",
    "failed",
    "crashloop",
    "backoff",
    "stopped",
];

/// `INSTANCE.SET <app> instance= node= slot= digest= state= pid= port= restarts= last= [msg=]
/// since= lease=`
pub struct InstanceSet(InstanceStatus);

impl InstanceSet {
    pub fn parse(a: &mut Args<'_>) -> Result<InstanceSet, ProtoError> {
        let app = app_name(a.positional("app")?)?;
        let instance = name("instance", a.require("instance")?)?;
        let node = name("node", a.require("node")?)?;
        let need = |v: Option<u64>, k: &str| {
            v.ok_or_else(|| ProtoError::bad_args(format!("INSTANCE.SET needs {k}=")))
        };
        let slot = need(a.number("slot", 0..=100_000)?, "slot")? as u32;
        let digest = a
            .require("digest")?
            .parse()
            .map_err(|e| ProtoError::bad_args(format!("digest=: {e}")))?;
        let state = a.require("state")?;
        if !STATES.contains(&state) {
            return Err(ProtoError::bad_args(format!(
                "state={state} is not one of {}",
                STATES.join(", ")
            )));
        }
        let reason = a.require("last")?;
        if reason.len() > 64 {
            return Err(ProtoError::bad_args(
                "last= is at most 64 bytes (use msg= for text)",
            ));
        }
        let message = proto::decode_text(a.get("msg").unwrap_or(""));
        Ok(InstanceSet(InstanceStatus {
            app,
            instance,
            node,
            slot,
            digest,
            state: state.to_string(),
            pid: need(a.number("pid", 0..=u64::from(u32::MAX))?, "pid")? as u32,
            port: need(a.number("port", 0..=65535)?, "port")? as u16,
            restarts: need(a.number("restarts", 0..=u64::from(u32::MAX))?, "restarts")? as u32,
            reason: reason.to_string(),
            message: message.chars().take(1024).collect(),
            since: need(a.number("since", 0..=u64::MAX)?, "since")?,
            lease: need(a.number("lease", 1..=u64::MAX)?, "lease")?,
            rev: 0,
        }))
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        ok(s.shared.write(Mutation::PutInstance(self.0)).await?)
    }
}

/// `INSTANCE.DEL <app> instance=`
pub struct InstanceDel {
    app: String,
    instance: String,
}

impl InstanceDel {
    pub fn parse(a: &mut Args<'_>) -> Result<InstanceDel, ProtoError> {
        Ok(InstanceDel {
            app: app_name(a.positional("app")?)?,
            instance: name("instance", a.require("instance")?)?,
        })
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        ok(s.shared
            .write(Mutation::DeleteInstance {
                app: self.app,
                instance: self.instance,
            })
            .await?)
    }
}

/// `INSTANCE.LIST [app]`
pub struct InstanceList(Option<String>);

impl InstanceList {
    pub fn parse(a: &mut Args<'_>) -> Result<InstanceList, ProtoError> {
        Ok(InstanceList(
            a.optional_positional().map(app_name).transpose()?,
        ))
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        let st = s.shared.state.read().await;
        let lines = st
            .instances
            .values()
            .filter(|x| self.0.as_deref().is_none_or(|a| a == x.app))
            .map(|x| x.to_fields().to_string());
        items(lines, st.rev)
    }
}
