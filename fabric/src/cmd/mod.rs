//! Commands of the line protocol: one module per verb family, one `Command` enum that parses a
//! request into a typed command (refusing leftovers) and runs it.

mod budget;
mod endpoint;
mod instance;
mod lease;
mod node;
mod plan;
mod session;
mod sub;

use mesh_common::proto::{Code, ProtoError, Request};

use crate::auth::Access;
use crate::connection::Session;

/// A parsed command, ready to run.
pub enum Command {
    Ping(session::Ping),
    Quit,
    Info,
    Auth(session::Auth),
    TokenCreate(session::TokenCreate),
    Status,
    PlanSet(plan::PlanSet),
    PlanGet(plan::PlanGet),
    PlanList,
    PlanDel(plan::PlanDel),
    BudgetSet(budget::BudgetSet),
    BudgetGet(budget::BudgetGet),
    BudgetList,
    BudgetDel(budget::BudgetDel),
    LeaseGrant(lease::LeaseGrant),
    LeaseRenew(lease::LeaseId),
    LeaseRevoke(lease::LeaseId),
    EndpointReg(endpoint::EndpointReg),
    EndpointDereg(endpoint::EndpointDereg),
    EndpointList(endpoint::EndpointList),
    NodeReg(node::NodeReg),
    NodeList,
    Sub(sub::Sub),
    Unsub(sub::Unsub),
    AssignmentList(instance::AssignmentList),
    InstanceSet(instance::InstanceSet),
    InstanceDel(instance::InstanceDel),
    InstanceList(instance::InstanceList),
}

/// The reply of a command: lines to queue, or `None` when the command queued them itself.
pub type Reply = Result<Option<String>, ProtoError>;

impl Command {
    pub fn from_request(req: &Request) -> Result<Command, ProtoError> {
        let mut a = req.args();
        let cmd = match req.verb.as_str() {
            "PING" => Command::Ping(session::Ping::parse(&mut a)),
            "QUIT" => Command::Quit,
            "INFO" => Command::Info,
            "AUTH" => Command::Auth(session::Auth::parse(&mut a)?),
            "TOKEN.CREATE" => Command::TokenCreate(session::TokenCreate::parse(&mut a)?),
            "STATUS" => Command::Status,
            "PLAN.SET" => Command::PlanSet(plan::PlanSet::parse(&mut a)?),
            "PLAN.GET" => Command::PlanGet(plan::PlanGet::parse(&mut a)?),
            "PLAN.LIST" => Command::PlanList,
            "PLAN.DEL" => Command::PlanDel(plan::PlanDel::parse(&mut a)?),
            "BUDGET.SET" => Command::BudgetSet(budget::BudgetSet::parse(&mut a)?),
            "BUDGET.GET" => Command::BudgetGet(budget::BudgetGet::parse(&mut a)?),
            "BUDGET.LIST" => Command::BudgetList,
            "BUDGET.DEL" => Command::BudgetDel(budget::BudgetDel::parse(&mut a)?),
            "LEASE.GRANT" => Command::LeaseGrant(lease::LeaseGrant::parse(&mut a)?),
            "LEASE.RENEW" => Command::LeaseRenew(lease::LeaseId::parse(&mut a)?),
            "LEASE.REVOKE" => Command::LeaseRevoke(lease::LeaseId::parse(&mut a)?),
            "ENDPOINT.REG" => Command::EndpointReg(endpoint::EndpointReg::parse(&mut a)?),
            "ENDPOINT.DEREG" => Command::EndpointDereg(endpoint::EndpointDereg::parse(&mut a)?),
            "ENDPOINT.LIST" => Command::EndpointList(endpoint::EndpointList::parse(&mut a)?),
            "NODE.REG" => Command::NodeReg(node::NodeReg::parse(&mut a)?),
            "NODE.LIST" => Command::NodeList,
            "SUB" => Command::Sub(sub::Sub::parse(&mut a)?),
            "UNSUB" => Command::Unsub(sub::Unsub::parse(&mut a)?),
            "ASSIGNMENT.LIST" => Command::AssignmentList(instance::AssignmentList::parse(&mut a)?),
            "INSTANCE.SET" => Command::InstanceSet(instance::InstanceSet::parse(&mut a)?),
            "INSTANCE.DEL" => Command::InstanceDel(instance::InstanceDel::parse(&mut a)?),
            "INSTANCE.LIST" => Command::InstanceList(instance::InstanceList::parse(&mut a)?),
            other => {
                let shown: String = other.chars().take(32).collect();
                return Err(ProtoError::new(
                    Code::UnknownVerb,
                    format!("unknown verb {shown:?}; see docs/protocol.md for the verbs"),
                ));
            }
        };
        a.finish()?;
        Ok(cmd)
    }

    /// The canonical verb, for messages.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Ping(_) => "PING",
            Command::Quit => "QUIT",
            Command::Info => "INFO",
            Command::Auth(_) => "AUTH",
            Command::TokenCreate(_) => "TOKEN.CREATE",
            Command::Status => "STATUS",
            Command::PlanSet(_) => "PLAN.SET",
            Command::PlanGet(_) => "PLAN.GET",
            Command::PlanList => "PLAN.LIST",
            Command::PlanDel(_) => "PLAN.DEL",
            Command::BudgetSet(_) => "BUDGET.SET",
            Command::BudgetGet(_) => "BUDGET.GET",
            Command::BudgetList => "BUDGET.LIST",
            Command::BudgetDel(_) => "BUDGET.DEL",
            Command::LeaseGrant(_) => "LEASE.GRANT",
            Command::LeaseRenew(_) => "LEASE.RENEW",
            Command::LeaseRevoke(_) => "LEASE.REVOKE",
            Command::EndpointReg(_) => "ENDPOINT.REG",
            Command::EndpointDereg(_) => "ENDPOINT.DEREG",
            Command::EndpointList(_) => "ENDPOINT.LIST",
            Command::NodeReg(_) => "NODE.REG",
            Command::NodeList => "NODE.LIST",
            Command::Sub(_) => "SUB",
            Command::Unsub(_) => "UNSUB",
            Command::AssignmentList(_) => "ASSIGNMENT.LIST",
            Command::InstanceSet(_) => "INSTANCE.SET",
            Command::InstanceDel(_) => "INSTANCE.DEL",
            Command::InstanceList(_) => "INSTANCE.LIST",
        }
    }

    /// What the command needs; `None` for the few that run before AUTH.
    pub fn access(&self) -> Option<Access> {
        match self {
            Command::Ping(_) | Command::Quit | Command::Info | Command::Auth(_) => None,
            Command::TokenCreate(_) | Command::BudgetSet(_) | Command::BudgetDel(_) => {
                Some(Access::Administer)
            }
            Command::PlanSet(_) | Command::PlanDel(_) => Some(Access::Deploy),
            Command::LeaseGrant(_)
            | Command::LeaseRenew(_)
            | Command::LeaseRevoke(_)
            | Command::EndpointReg(_)
            | Command::EndpointDereg(_)
            | Command::NodeReg(_)
            | Command::InstanceSet(_)
            | Command::InstanceDel(_) => Some(Access::Agent),
            Command::Status
            | Command::PlanGet(_)
            | Command::PlanList
            | Command::BudgetGet(_)
            | Command::BudgetList
            | Command::EndpointList(_)
            | Command::NodeList
            | Command::Sub(_)
            | Command::Unsub(_)
            | Command::AssignmentList(_)
            | Command::InstanceList(_) => Some(Access::Read),
        }
    }

    pub async fn apply(self, s: &mut Session) -> Reply {
        match self {
            Command::Ping(c) => c.apply(),
            Command::Quit => {
                s.quit = true;
                ok("bye")
            }
            Command::Info => session::info(s),
            Command::Auth(c) => c.apply(s).await,
            Command::TokenCreate(c) => c.apply(s).await,
            Command::Status => session::status(s).await,
            Command::PlanSet(c) => c.apply(s).await,
            Command::PlanGet(c) => c.apply(s).await,
            Command::PlanList => plan::list(s).await,
            Command::PlanDel(c) => c.apply(s).await,
            Command::BudgetSet(c) => c.apply(s).await,
            Command::BudgetGet(c) => c.apply(s).await,
            Command::BudgetList => budget::list(s).await,
            Command::BudgetDel(c) => c.apply(s).await,
            Command::LeaseGrant(c) => c.apply(s).await,
            Command::LeaseRenew(c) => c.renew(s).await,
            Command::LeaseRevoke(c) => c.revoke(s).await,
            Command::EndpointReg(c) => c.apply(s).await,
            Command::EndpointDereg(c) => c.apply(s).await,
            Command::EndpointList(c) => c.apply(s).await,
            Command::NodeReg(c) => c.apply(s).await,
            Command::NodeList => node::list(s).await,
            Command::Sub(c) => c.apply(s).await,
            Command::Unsub(c) => c.apply(s).await,
            Command::AssignmentList(c) => c.apply(s).await,
            Command::InstanceSet(c) => c.apply(s).await,
            Command::InstanceDel(c) => c.apply(s).await,
            Command::InstanceList(c) => c.apply(s).await,
        }
    }
}

/// Verbs that run before AUTH.
pub fn is_session_verb(verb: &str) -> bool {
    matches!(verb, "PING" | "QUIT" | "INFO" | "AUTH")
}

/// The canonical spelling of a known verb (for metrics labels).
pub fn known_verb(verb: &str) -> Option<&'static str> {
    const VERBS: [&str; 28] = [
        "ASSIGNMENT.LIST",
        "INSTANCE.SET",
        "INSTANCE.DEL",
        "INSTANCE.LIST",
        "PING",
        "QUIT",
        "INFO",
        "AUTH",
        "TOKEN.CREATE",
        "STATUS",
        "PLAN.SET",
        "PLAN.GET",
        "PLAN.LIST",
        "PLAN.DEL",
        "BUDGET.SET",
        "BUDGET.GET",
        "BUDGET.LIST",
        "BUDGET.DEL",
        "LEASE.GRANT",
        "LEASE.RENEW",
        "LEASE.REVOKE",
        "ENDPOINT.REG",
        "ENDPOINT.DEREG",
        "ENDPOINT.LIST",
        "NODE.REG",
        "NODE.LIST",
        "SUB",
        "UNSUB",
    ];
    VERBS.iter().copied().find(|v| *v == verb)
}

/// `+OK fields\n`
pub fn ok(fields: impl std::fmt::Display) -> Reply {
    let f = fields.to_string();
    Ok(Some(if f.is_empty() {
        "+OK\n".to_string()
    } else {
        format!("+OK {f}\n")
    }))
}

/// `* item` lines followed by `+OK count=N rev=R`.
pub fn items(lines: impl IntoIterator<Item = String>, rev: u64) -> Reply {
    let mut out = String::new();
    let mut n = 0;
    for l in lines {
        out.push_str("* ");
        out.push_str(&l);
        out.push('\n');
        n += 1;
    }
    out.push_str(&format!("+OK count={n} rev={rev}\n"));
    Ok(Some(out))
}

/// Checks an app/node/instance name argument.
pub fn name(kind: &str, s: &str) -> Result<String, ProtoError> {
    mesh_common::model::check_name(kind, s).map_err(ProtoError::bad_args)?;
    Ok(s.to_string())
}

/// Checks an app name: the same rule as a spore's name (a DNS label).
pub fn app_name(s: &str) -> Result<String, ProtoError> {
    mesh_common::manifest::check_app_name(s).map_err(ProtoError::bad_args)?;
    Ok(s.to_string())
}
