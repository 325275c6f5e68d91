//! NODE.REG, NODE.LIST: the agents that serve the mesh.

use mesh_common::model::Node;
use mesh_common::proto::{Args, ProtoError};

use super::{Reply, items, name, ok};
use crate::connection::Session;
use crate::state::Mutation;

/// `NODE.REG node= cpus= memory_mb= max_instances= lease= [metrics=]`
pub struct NodeReg(Node);

impl NodeReg {
    pub fn parse(a: &mut Args<'_>) -> Result<NodeReg, ProtoError> {
        let id = name("node", a.require("node")?)?;
        let need = |v: Option<u64>, k: &str| {
            v.ok_or_else(|| ProtoError::bad_args(format!("NODE.REG needs {k}=")))
        };
        let cpus = need(a.number("cpus", 1..=4096)?, "cpus")?;
        let memory_mb = need(a.number("memory_mb", 1..=1 << 40)?, "memory_mb")?;
        let max_instances = need(a.number("max_instances", 0..=1_000_000)?, "max_instances")?;
        let lease = need(a.number("lease", 1..=u64::MAX)?, "lease")?;
        let metrics = match a.get("metrics") {
            Some(m) => Some(m.parse().map_err(|_| {
                ProtoError::bad_args(format!("metrics={m} is not an ip:port address"))
            })?),
            None => None,
        };
        Ok(NodeReg(Node {
            id,
            cpus: cpus as u32,
            memory_mb,
            max_instances: max_instances as u32,
            lease,
            rev: 0,
            metrics,
        }))
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        ok(s.shared.write(Mutation::PutNode(self.0)).await?)
    }
}

pub async fn list(s: &Session) -> Reply {
    let st = s.shared.state.read().await;
    items(st.nodes.values().map(|n| n.to_fields().to_string()), st.rev)
}
