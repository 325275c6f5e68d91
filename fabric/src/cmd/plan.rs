//! PLAN.SET, PLAN.GET, PLAN.LIST, PLAN.DEL: what should run.

use std::sync::Arc;

use mesh_common::Digest;
use mesh_common::proto::{Args, Code, ProtoError};

use super::{Reply, app_name, items, ok};
use crate::connection::Session;
use crate::state::{Mutation, PlanPatch};

const MAX_INSTANCES: u32 = 10_000;
const MAX_MS: u64 = 24 * 3_600_000;

/// `PLAN.SET <app> [digest=] [min=] [max=] [port=] [health=] [min_healthy_ms=]
/// [max_parallel=] [drain_ms=] [deadline_ms=]`: creates a plan (digest required) or changes
/// the given fields of an existing one.
pub struct PlanSet {
    app: String,
    digest: Option<Digest>,
    min: Option<u32>,
    max: Option<u32>,
    port: Option<u16>,
    health: Option<String>,
    min_healthy_ms: Option<u64>,
    max_parallel: Option<u32>,
    drain_ms: Option<u64>,
    deadline_ms: Option<u64>,
}

impl PlanSet {
    pub fn parse(a: &mut Args<'_>) -> Result<PlanSet, ProtoError> {
        let app = app_name(a.positional("app")?)?;
        let digest = match a.get("digest") {
            Some(d) => Some(
                d.parse()
                    .map_err(|e| ProtoError::bad_args(format!("digest=: {e}")))?,
            ),
            None => None,
        };
        let health = a.get("health").map(str::to_string);
        if let Some(h) = &health
            && !h.starts_with('/')
        {
            return Err(ProtoError::bad_args(format!(
                "health={h} must be an HTTP path starting with /"
            )));
        }
        Ok(PlanSet {
            app,
            digest,
            min: a.number("min", 0..=MAX_INSTANCES)?,
            max: a.number("max", 0..=MAX_INSTANCES)?,
            port: a.number("port", 0..=65535)?,
            health,
            min_healthy_ms: a.number("min_healthy_ms", 0..=MAX_MS)?,
            max_parallel: a.number("max_parallel", 1..=MAX_INSTANCES)?,
            drain_ms: a.number("drain_ms", 0..=MAX_MS)?,
            deadline_ms: a.number("deadline_ms", 1000..=MAX_MS)?,
        })
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        // The spore's own nutrients count against the budget; read them from its manifest
        // (the agents verify the signature; the fabric only needs the numbers and the name).
        let digest = match self.digest {
            Some(d) => {
                let (cpu, mem) = spore_nutrients(s, &self.app, d).await?;
                Some((d, cpu, mem))
            }
            None => None,
        };
        let patch = PlanPatch {
            app: self.app,
            digest,
            min: self.min,
            max: self.max,
            port: self.port,
            health: self.health,
            min_healthy_ms: self.min_healthy_ms,
            max_parallel: self.max_parallel,
            drain_ms: self.drain_ms,
            deadline_ms: self.deadline_ms,
        };
        ok(s.shared.write(Mutation::PatchPlan(patch)).await?)
    }
}

async fn spore_nutrients(s: &Session, app: &str, digest: Digest) -> Result<(u32, u32), ProtoError> {
    let shared = Arc::clone(&s.shared);
    let app = app.to_string();
    tokio::task::spawn_blocking(move || {
        let path = shared.content.path(&digest);
        let file = std::fs::File::open(&path).map_err(|_| {
            ProtoError::new(
                Code::NoBlob,
                format!("blob {digest} is not in the content repository; push it first (mesh spore push FILE)"),
            )
        })?;
        let (_, m) = mesh_common::spore::inspect_unverified(std::io::BufReader::new(file))
            .map_err(|e| ProtoError::new(Code::Conflict, format!("blob {digest} is not a usable spore: {e}")))?;
        if m.name != app {
            return Err(ProtoError::new(
                Code::Conflict,
                format!("blob {digest} is a spore of app {:?}, not {app:?}", m.name),
            ));
        }
        Ok((m.nutrients.cpu_milli, m.nutrients.memory_mb))
    })
    .await
    .map_err(|e| ProtoError::new(Code::Internal, format!("reading the spore: {e}")))?
}

/// `PLAN.GET <app>`
pub struct PlanGet(String);

impl PlanGet {
    pub fn parse(a: &mut Args<'_>) -> Result<PlanGet, ProtoError> {
        Ok(PlanGet(app_name(a.positional("app")?)?))
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        let st = s.shared.state.read().await;
        let p = st.plans.get(&self.0).ok_or_else(|| {
            ProtoError::new(Code::NotFound, format!("no plan for app {}", self.0))
        })?;
        items([p.to_fields().to_string()], st.rev)
    }
}

pub async fn list(s: &Session) -> Reply {
    let st = s.shared.state.read().await;
    items(st.plans.values().map(|p| p.to_fields().to_string()), st.rev)
}

/// `PLAN.DEL <app>`
pub struct PlanDel(String);

impl PlanDel {
    pub fn parse(a: &mut Args<'_>) -> Result<PlanDel, ProtoError> {
        Ok(PlanDel(app_name(a.positional("app")?)?))
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        ok(s.shared.write(Mutation::DeletePlan { app: self.0 }).await?)
    }
}
