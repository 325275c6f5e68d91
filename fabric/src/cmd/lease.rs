//! LEASE.GRANT, LEASE.RENEW, LEASE.REVOKE: liveness for what agents register.

use mesh_common::proto::{Args, ProtoError};

use super::{Reply, ok};
use crate::connection::Session;
use crate::state::Mutation;

/// `LEASE.GRANT ttl_ms=N` (100 ms to 1 hour)
pub struct LeaseGrant(u64);

impl LeaseGrant {
    pub fn parse(a: &mut Args<'_>) -> Result<LeaseGrant, ProtoError> {
        let ttl = a.number("ttl_ms", 100..=3_600_000)?;
        Ok(LeaseGrant(ttl.ok_or_else(|| {
            ProtoError::bad_args("LEASE.GRANT needs ttl_ms=")
        })?))
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        ok(s.shared
            .write(Mutation::GrantLease { ttl_ms: self.0 })
            .await?)
    }
}

/// `LEASE.RENEW <id>` and `LEASE.REVOKE <id>`
pub struct LeaseId(u64);

impl LeaseId {
    pub fn parse(a: &mut Args<'_>) -> Result<LeaseId, ProtoError> {
        let raw = a.positional("lease")?;
        raw.parse()
            .map(LeaseId)
            .map_err(|_| ProtoError::bad_args(format!("lease {raw:?} is not a lease id")))
    }

    pub async fn renew(self, s: &mut Session) -> Reply {
        ok(s.shared.write(Mutation::RenewLease { id: self.0 }).await?)
    }

    pub async fn revoke(self, s: &mut Session) -> Reply {
        ok(s.shared.write(Mutation::RevokeLease { id: self.0 }).await?)
    }
}
