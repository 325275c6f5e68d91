//! ENDPOINT.REG, ENDPOINT.DEREG, ENDPOINT.LIST: where Ready instances answer.

use mesh_common::model::Endpoint;
use mesh_common::proto::{Args, ProtoError};

use super::{Reply, app_name, items, name, ok};
use crate::connection::Session;
use crate::state::Mutation;

/// `ENDPOINT.REG <app> instance= node= addr=HOST:PORT lease=`
pub struct EndpointReg(Endpoint);

impl EndpointReg {
    pub fn parse(a: &mut Args<'_>) -> Result<EndpointReg, ProtoError> {
        let app = app_name(a.positional("app")?)?;
        let instance = name("instance", a.require("instance")?)?;
        let node = name("node", a.require("node")?)?;
        let raw = a.require("addr")?;
        let addr = raw.parse().map_err(|_| {
            ProtoError::bad_args(format!(
                "addr={raw} is not IP:PORT (e.g. 127.0.0.1:8081 or [::1]:8081)"
            ))
        })?;
        let lease = a.require("lease")?;
        let lease = lease
            .parse()
            .map_err(|_| ProtoError::bad_args(format!("lease={lease} is not a lease id")))?;
        Ok(EndpointReg(Endpoint {
            app,
            instance,
            node,
            addr,
            lease,
            rev: 0,
        }))
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        ok(s.shared.write(Mutation::PutEndpoint(self.0)).await?)
    }
}

/// `ENDPOINT.DEREG <app> instance=`
pub struct EndpointDereg {
    app: String,
    instance: String,
}

impl EndpointDereg {
    pub fn parse(a: &mut Args<'_>) -> Result<EndpointDereg, ProtoError> {
        Ok(EndpointDereg {
            app: app_name(a.positional("app")?)?,
            instance: name("instance", a.require("instance")?)?,
        })
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        ok(s.shared
            .write(Mutation::DeleteEndpoint {
                app: self.app,
                instance: self.instance,
            })
            .await?)
    }
}

/// `ENDPOINT.LIST [app]`
pub struct EndpointList(Option<String>);

impl EndpointList {
    pub fn parse(a: &mut Args<'_>) -> Result<EndpointList, ProtoError> {
        Ok(EndpointList(
            a.optional_positional().map(app_name).transpose()?,
        ))
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        let st = s.shared.state.read().await;
        let lines = st
            .endpoints
            .values()
            .filter(|e| self.0.as_deref().is_none_or(|a| a == e.app))
            .map(|e| e.to_fields().to_string());
        items(lines, st.rev)
    }
}
