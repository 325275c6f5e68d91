//! BUDGET.SET, BUDGET.GET, BUDGET.LIST, BUDGET.DEL: the nutrient ledger.

use mesh_common::proto::{Args, Code, ProtoError};

use super::{Reply, app_name, items, ok};
use crate::connection::Session;
use crate::state::{BudgetPatch, Mutation};

/// `BUDGET.SET <app> [max_instances=] [cpu_milli=] [memory_mb=]`: all three for a new budget,
/// any of them to change one.
pub struct BudgetSet {
    app: String,
    max_instances: Option<u32>,
    cpu_milli: Option<u64>,
    memory_mb: Option<u64>,
}

impl BudgetSet {
    pub fn parse(a: &mut Args<'_>) -> Result<BudgetSet, ProtoError> {
        Ok(BudgetSet {
            app: app_name(a.positional("app")?)?,
            max_instances: a.number("max_instances", 0..=100_000)?,
            cpu_milli: a.number("cpu_milli", 0..=100_000_000)?,
            memory_mb: a.number("memory_mb", 0..=1 << 40)?,
        })
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        let patch = BudgetPatch {
            app: self.app,
            max_instances: self.max_instances,
            cpu_milli: self.cpu_milli,
            memory_mb: self.memory_mb,
        };
        ok(s.shared.write(Mutation::PatchBudget(patch)).await?)
    }
}

/// `BUDGET.GET <app>`
pub struct BudgetGet(String);

impl BudgetGet {
    pub fn parse(a: &mut Args<'_>) -> Result<BudgetGet, ProtoError> {
        Ok(BudgetGet(app_name(a.positional("app")?)?))
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        let st = s.shared.state.read().await;
        let b = st.budgets.get(&self.0).ok_or_else(|| {
            ProtoError::new(Code::NotFound, format!("no budget for app {}", self.0))
        })?;
        items([b.to_fields().to_string()], st.rev)
    }
}

pub async fn list(s: &Session) -> Reply {
    let st = s.shared.state.read().await;
    items(
        st.budgets.values().map(|b| b.to_fields().to_string()),
        st.rev,
    )
}

/// `BUDGET.DEL <app>`
pub struct BudgetDel(String);

impl BudgetDel {
    pub fn parse(a: &mut Args<'_>) -> Result<BudgetDel, ProtoError> {
        Ok(BudgetDel(app_name(a.positional("app")?)?))
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        ok(s.shared
            .write(Mutation::DeleteBudget { app: self.0 })
            .await?)
    }
}
