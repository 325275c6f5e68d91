//! The fabric's state machine: every object, the revision counter, leases, and the recent
//! event log. Only the writer mutates it ([`State::apply`]), turning each [`Mutation`] into
//! storage changes and events; connections read it under a shared lock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use mesh_common::Digest;
use mesh_common::model::{self, Assignment, Budget, Endpoint, InstanceStatus, Node, Plan};
use mesh_common::proto::{Code, Fields, ProtoError};
use serde::{Deserialize, Serialize};

use crate::auth::TokenRecord;
use crate::pubsub::Subscribers;
use crate::storage::{Change, Storage, StorageError, Table};

/// How many recent events are kept for subscribers that resume.
pub const EVENT_LOG_LEN: usize = 10_000;

/// A lease: endpoints and nodes attached to it disappear when it is not renewed within its TTL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lease {
    pub id: u64,
    pub ttl_ms: u64,
    /// Not persisted: after a restart every lease gets a fresh TTL.
    #[serde(skip, default = "Instant::now")]
    pub deadline: Instant,
}

/// What changed, with the revision it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub rev: u64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    PlanPut(Plan),
    PlanDel {
        app: String,
    },
    BudgetPut(Budget),
    BudgetDel {
        app: String,
    },
    EndpointPut(Endpoint),
    EndpointDel {
        endpoint: Endpoint,
        reason: String,
    },
    NodePut(Node),
    NodeDel {
        node: String,
        reason: String,
    },
    AssignmentPut(Assignment),
    AssignmentDel {
        assignment: Assignment,
        reason: String,
    },
    InstancePut(InstanceStatus),
    InstanceDel {
        instance: InstanceStatus,
        reason: String,
    },
}

/// Which events of a topic a subscription wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub app: Option<String>,
    pub node: Option<String>,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        self.app.as_deref().is_none_or(|a| e.app() == Some(a))
            && self.node.as_deref().is_none_or(|n| e.node() == Some(n))
    }
}

/// What a subscription is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    Plans,
    Budgets,
    Endpoints,
    Nodes,
    Assignments,
    Instances,
}

impl Topic {
    pub fn parse(s: &str) -> Option<Topic> {
        match s {
            "plans" => Some(Topic::Plans),
            "budgets" => Some(Topic::Budgets),
            "endpoints" => Some(Topic::Endpoints),
            "nodes" => Some(Topic::Nodes),
            "assignments" => Some(Topic::Assignments),
            "instances" => Some(Topic::Instances),
            _ => None,
        }
    }
}

impl Event {
    pub fn topic(&self) -> Topic {
        match &self.kind {
            EventKind::PlanPut(_) | EventKind::PlanDel { .. } => Topic::Plans,
            EventKind::BudgetPut(_) | EventKind::BudgetDel { .. } => Topic::Budgets,
            EventKind::EndpointPut(_) | EventKind::EndpointDel { .. } => Topic::Endpoints,
            EventKind::NodePut(_) | EventKind::NodeDel { .. } => Topic::Nodes,
            EventKind::AssignmentPut(_) | EventKind::AssignmentDel { .. } => Topic::Assignments,
            EventKind::InstancePut(_) | EventKind::InstanceDel { .. } => Topic::Instances,
        }
    }

    /// The app the event is about (nodes are about no app).
    pub fn app(&self) -> Option<&str> {
        match &self.kind {
            EventKind::PlanPut(p) => Some(&p.app),
            EventKind::PlanDel { app } | EventKind::BudgetDel { app } => Some(app),
            EventKind::BudgetPut(b) => Some(&b.app),
            EventKind::EndpointPut(e) | EventKind::EndpointDel { endpoint: e, .. } => Some(&e.app),
            EventKind::NodePut(_) | EventKind::NodeDel { .. } => None,
            EventKind::AssignmentPut(a) | EventKind::AssignmentDel { assignment: a, .. } => {
                Some(&a.app)
            }
            EventKind::InstancePut(i) | EventKind::InstanceDel { instance: i, .. } => Some(&i.app),
        }
    }

    /// The node the event is about, for subscriptions filtered by node.
    pub fn node(&self) -> Option<&str> {
        match &self.kind {
            EventKind::EndpointPut(e) | EventKind::EndpointDel { endpoint: e, .. } => Some(&e.node),
            EventKind::NodePut(n) => Some(&n.id),
            EventKind::NodeDel { node, .. } => Some(node),
            EventKind::AssignmentPut(a) | EventKind::AssignmentDel { assignment: a, .. } => {
                Some(&a.node)
            }
            EventKind::InstancePut(i) | EventKind::InstanceDel { instance: i, .. } => Some(&i.node),
            _ => None,
        }
    }

    /// The event line for subscription `sub`: `> kind sub=N op=put|del rev=R ...`.
    pub fn line(&self, sub: u64) -> String {
        self.parts().line(sub)
    }

    /// The line without its subscription id, formatted once per event and completed per
    /// subscriber: fan-out to many subscribers costs a copy each, not a formatting each.
    pub fn parts(&self) -> LineParts {
        let (kind, op, fields, reason): (&str, &str, Fields, Option<&str>) = match &self.kind {
            EventKind::PlanPut(p) => ("plan", "put", p.to_fields(), None),
            EventKind::PlanDel { app } => (
                "plan",
                "del",
                Fields::new().add("app", app).add("rev", self.rev),
                None,
            ),
            EventKind::BudgetPut(b) => ("budget", "put", b.to_fields(), None),
            EventKind::BudgetDel { app } => (
                "budget",
                "del",
                Fields::new().add("app", app).add("rev", self.rev),
                None,
            ),
            EventKind::EndpointPut(e) => ("endpoint", "put", e.to_fields(), None),
            EventKind::EndpointDel { endpoint, reason } => (
                "endpoint",
                "del",
                Endpoint {
                    rev: self.rev,
                    ..endpoint.clone()
                }
                .to_fields(),
                Some(reason),
            ),
            EventKind::NodePut(n) => ("node", "put", n.to_fields(), None),
            EventKind::NodeDel { node, reason } => (
                "node",
                "del",
                Fields::new().add("node", node).add("rev", self.rev),
                Some(reason),
            ),
            EventKind::AssignmentPut(a) => ("assignment", "put", a.to_fields(), None),
            EventKind::AssignmentDel { assignment, reason } => (
                "assignment",
                "del",
                Assignment {
                    rev: self.rev,
                    ..assignment.clone()
                }
                .to_fields(),
                Some(reason),
            ),
            EventKind::InstancePut(i) => ("instance", "put", i.to_fields(), None),
            EventKind::InstanceDel { instance, reason } => (
                "instance",
                "del",
                InstanceStatus {
                    rev: self.rev,
                    ..instance.clone()
                }
                .to_fields(),
                Some(reason),
            ),
        };
        let tail = match reason {
            Some(r) => format!(" op={op} {fields} reason={r}"),
            None => format!(" op={op} {fields}"),
        };
        LineParts {
            head: format!("> {kind} sub="),
            tail,
        }
    }
}

/// An event line split around its subscription id.
pub struct LineParts {
    head: String,
    tail: String,
}

impl LineParts {
    pub fn line(&self, sub: u64) -> String {
        let mut s = String::with_capacity(self.head.len() + self.tail.len() + 8);
        s.push_str(&self.head);
        s.push_str(&sub.to_string());
        s.push_str(&self.tail);
        s
    }
}

/// Changes to an app's plan; absent fields keep the current plan's values (or defaults for a
/// new plan, which needs a digest). Merged by the writer, so concurrent patches never lose
/// each other's fields.
#[derive(Debug, Clone, Default)]
pub struct PlanPatch {
    pub app: String,
    /// A new spore, with its per-instance (cpu_milli, memory_mb) read from its manifest.
    pub digest: Option<(Digest, u32, u32)>,
    pub min: Option<u32>,
    pub max: Option<u32>,
    pub port: Option<u16>,
    pub health: Option<String>,
    pub min_healthy_ms: Option<u64>,
    pub max_parallel: Option<u32>,
    pub drain_ms: Option<u64>,
    pub deadline_ms: Option<u64>,
}

impl PlanPatch {
    pub fn merge(self, current: Option<&Plan>) -> Result<Plan, ProtoError> {
        let c = current;
        let (digest, cpu_milli, memory_mb) = match (self.digest, c) {
            (Some(d), _) => d,
            (None, Some(p)) => (p.digest, p.cpu_milli, p.memory_mb),
            (None, None) => {
                return Err(ProtoError::bad_args(format!(
                    "app {} has no plan yet: PLAN.SET needs digest= to create one",
                    self.app
                )));
            }
        };
        let min = self.min.or(c.map(|p| p.min)).unwrap_or(1);
        let max = self.max.or(c.map(|p| p.max.max(min))).unwrap_or(min);
        if max < min {
            return Err(ProtoError::bad_args(format!(
                "max={max} is below min={min}"
            )));
        }
        let keep =
            |new: Option<u64>, old: Option<u64>, default: u64| new.or(old).unwrap_or(default);
        Ok(Plan {
            app: self.app,
            digest,
            min,
            max,
            port: self.port.or(c.map(|p| p.port)).unwrap_or(0),
            health: self.health.or(c.and_then(|p| p.health.clone())),
            min_healthy_ms: keep(
                self.min_healthy_ms,
                c.map(|p| p.min_healthy_ms),
                model::PLAN_DEFAULT_MIN_HEALTHY_MS,
            ),
            max_parallel: self
                .max_parallel
                .or(c.map(|p| p.max_parallel))
                .unwrap_or(model::PLAN_DEFAULT_MAX_PARALLEL),
            drain_ms: keep(
                self.drain_ms,
                c.map(|p| p.drain_ms),
                model::PLAN_DEFAULT_DRAIN_MS,
            ),
            deadline_ms: keep(
                self.deadline_ms,
                c.map(|p| p.deadline_ms),
                model::PLAN_DEFAULT_DEADLINE_MS,
            ),
            cpu_milli,
            memory_mb,
            rev: 0,
        })
    }
}

/// Changes to an app's budget: all three fields for a new one, any of them to change one.
#[derive(Debug, Clone, Default)]
pub struct BudgetPatch {
    pub app: String,
    pub max_instances: Option<u32>,
    pub cpu_milli: Option<u64>,
    pub memory_mb: Option<u64>,
}

impl BudgetPatch {
    pub fn merge(self, current: Option<&Budget>) -> Result<Budget, ProtoError> {
        match (current, self.max_instances, self.cpu_milli, self.memory_mb) {
            (Some(c), mi, cpu, mem) => Ok(Budget {
                app: self.app,
                max_instances: mi.unwrap_or(c.max_instances),
                cpu_milli: cpu.unwrap_or(c.cpu_milli),
                memory_mb: mem.unwrap_or(c.memory_mb),
                rev: 0,
            }),
            (None, Some(max_instances), Some(cpu_milli), Some(memory_mb)) => Ok(Budget {
                app: self.app,
                max_instances,
                cpu_milli,
                memory_mb,
                rev: 0,
            }),
            (None, ..) => Err(ProtoError::bad_args(format!(
                "app {} has no budget yet: give max_instances=, cpu_milli= and memory_mb=",
                self.app
            ))),
        }
    }
}

/// A change requested of the state machine.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// The plan's `rev` is ignored; cpu/memory come from the spore's manifest.
    PutPlan(Plan),
    PatchPlan(PlanPatch),
    PatchBudget(BudgetPatch),
    DeletePlan {
        app: String,
    },
    PutBudget(Budget),
    DeleteBudget {
        app: String,
    },
    GrantLease {
        ttl_ms: u64,
    },
    RenewLease {
        id: u64,
    },
    RevokeLease {
        id: u64,
    },
    PutEndpoint(Endpoint),
    DeleteEndpoint {
        app: String,
        instance: String,
    },
    PutNode(Node),
    PutInstance(InstanceStatus),
    DeleteInstance {
        app: String,
        instance: String,
    },
    CreateToken {
        hash: String,
        record: TokenRecord,
    },
    /// Removes everything attached to leases whose deadline passed.
    ExpireLeases,
}

impl Mutation {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Mutation::PutPlan(_) => "put_plan",
            Mutation::PatchPlan(_) => "patch_plan",
            Mutation::PatchBudget(_) => "patch_budget",
            Mutation::PutInstance(_) => "put_instance",
            Mutation::DeleteInstance { .. } => "delete_instance",
            Mutation::DeletePlan { .. } => "delete_plan",
            Mutation::PutBudget(_) => "put_budget",
            Mutation::DeleteBudget { .. } => "delete_budget",
            Mutation::GrantLease { .. } => "grant_lease",
            Mutation::RenewLease { .. } => "renew_lease",
            Mutation::RevokeLease { .. } => "revoke_lease",
            Mutation::PutEndpoint(_) => "put_endpoint",
            Mutation::DeleteEndpoint { .. } => "delete_endpoint",
            Mutation::PutNode(_) => "put_node",
            Mutation::CreateToken { .. } => "create_token",
            Mutation::ExpireLeases => "expire_leases",
        }
    }
}

/// Everything the fabric knows.
#[derive(Default)]
pub struct State {
    pub rev: u64,
    pub plans: BTreeMap<String, Plan>,
    pub budgets: BTreeMap<String, Budget>,
    pub endpoints: BTreeMap<(String, String), Endpoint>,
    pub nodes: BTreeMap<String, Node>,
    /// (app, slot) -> the node that runs it.
    pub assignments: BTreeMap<(String, u32), Assignment>,
    /// (app, instance) -> what its agent last reported.
    pub instances: BTreeMap<(String, String), InstanceStatus>,
    pub leases: BTreeMap<u64, Lease>,
    pub tokens: HashMap<String, TokenRecord>,
    next_lease: u64,
    /// Recent events, oldest first.
    pub log: VecDeque<Event>,
    /// Every event after this revision is in `log`.
    pub log_floor: u64,
    pub subscribers: std::sync::Mutex<Subscribers>,
}

fn put<T: Serialize>(changes: &mut Vec<Change>, table: Table, key: &str, value: &T) {
    // Serialising plain data structs to JSON cannot fail.
    let value = serde_json::to_vec(value).unwrap_or_default();
    changes.push(Change::Put {
        table,
        key: key.to_string(),
        value,
    });
}

fn del(changes: &mut Vec<Change>, table: Table, key: &str) {
    changes.push(Change::Delete {
        table,
        key: key.to_string(),
    });
}

fn endpoint_key(app: &str, instance: &str) -> String {
    format!("{app}/{instance}")
}

fn event_key(rev: u64) -> String {
    format!("{rev:020}")
}

impl State {
    /// Loads the state from storage (every lease restarts its TTL now).
    pub fn load(storage: &dyn Storage) -> Result<State, StorageError> {
        fn rows<T: for<'de> Deserialize<'de>>(
            s: &dyn Storage,
            t: Table,
        ) -> Result<Vec<(String, T)>, StorageError> {
            s.scan(t)?
                .into_iter()
                .map(|(k, v)| {
                    serde_json::from_slice(&v)
                        .map(|v| (k.clone(), v))
                        .map_err(|e| StorageError(format!("table {} key {k}: {e}", t.name())))
                })
                .collect()
        }
        let mut st = State::default();
        for (k, v) in rows::<u64>(storage, Table::Meta)? {
            match k.as_str() {
                "rev" => st.rev = v,
                "next_lease" => st.next_lease = v,
                "log_floor" => st.log_floor = v,
                _ => {}
            }
        }
        st.plans = rows::<Plan>(storage, Table::Plans)?.into_iter().collect();
        st.budgets = rows::<Budget>(storage, Table::Budgets)?
            .into_iter()
            .collect();
        st.endpoints = rows::<Endpoint>(storage, Table::Endpoints)?
            .into_iter()
            .map(|(_, e)| ((e.app.clone(), e.instance.clone()), e))
            .collect();
        st.nodes = rows::<Node>(storage, Table::Nodes)?.into_iter().collect();
        st.assignments = rows::<Assignment>(storage, Table::Assignments)?
            .into_iter()
            .map(|(_, a)| ((a.app.clone(), a.slot), a))
            .collect();
        st.instances = rows::<InstanceStatus>(storage, Table::Instances)?
            .into_iter()
            .map(|(_, i)| ((i.app.clone(), i.instance.clone()), i))
            .collect();
        let now = Instant::now();
        st.leases = rows::<Lease>(storage, Table::Leases)?
            .into_iter()
            .map(|(_, mut l)| {
                l.deadline = now + Duration::from_millis(l.ttl_ms);
                (l.id, l)
            })
            .collect();
        st.tokens = rows::<TokenRecord>(storage, Table::Tokens)?
            .into_iter()
            .collect();
        st.log = rows::<Event>(storage, Table::Events)?
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        Ok(st)
    }

    fn next_rev(&mut self, changes: &mut Vec<Change>) -> u64 {
        self.rev += 1;
        put(changes, Table::Meta, "rev", &self.rev);
        self.rev
    }

    fn emit(
        &mut self,
        kind: EventKind,
        rev: u64,
        changes: &mut Vec<Change>,
        events: &mut Vec<Event>,
    ) {
        let ev = Event { rev, kind };
        put(changes, Table::Events, &event_key(rev), &ev);
        self.log.push_back(ev.clone());
        while self.log.len() > EVENT_LOG_LEN {
            if let Some(old) = self.log.pop_front() {
                del(changes, Table::Events, &event_key(old.rev));
                self.log_floor = old.rev;
                put(changes, Table::Meta, "log_floor", &self.log_floor);
            }
        }
        events.push(ev);
    }

    /// Applies one mutation; on success returns the reply fields and has appended the storage
    /// changes and events. On refusal nothing was changed.
    pub fn apply(
        &mut self,
        m: Mutation,
        now: Instant,
        changes: &mut Vec<Change>,
        events: &mut Vec<Event>,
    ) -> Result<Fields, ProtoError> {
        match m {
            Mutation::PatchPlan(patch) => {
                let current = self.plans.get(&patch.app).cloned();
                let plan = patch.merge(current.as_ref())?;
                self.apply(Mutation::PutPlan(plan), now, changes, events)
            }
            Mutation::PatchBudget(patch) => {
                let current = self.budgets.get(&patch.app).cloned();
                let budget = patch.merge(current.as_ref())?;
                self.apply(Mutation::PutBudget(budget), now, changes, events)
            }
            Mutation::PutPlan(mut plan) => {
                if let Some(b) = self.budgets.get(&plan.app) {
                    check_plan_within_budget(&plan, b)?;
                }
                let rev = self.next_rev(changes);
                plan.rev = rev;
                put(changes, Table::Plans, &plan.app, &plan);
                self.plans.insert(plan.app.clone(), plan.clone());
                let app = plan.app.clone();
                self.emit(EventKind::PlanPut(plan), rev, changes, events);
                self.reschedule(Some(&app), changes, events);
                Ok(Fields::new().add("rev", rev))
            }
            Mutation::DeletePlan { app } => {
                if self.plans.remove(&app).is_none() {
                    return Err(ProtoError::new(
                        Code::NotFound,
                        format!("no plan for app {app}"),
                    ));
                }
                let rev = self.next_rev(changes);
                del(changes, Table::Plans, &app);
                self.emit(
                    EventKind::PlanDel { app: app.clone() },
                    rev,
                    changes,
                    events,
                );
                self.reschedule(Some(&app), changes, events);
                Ok(Fields::new().add("rev", rev))
            }
            Mutation::PutBudget(mut budget) => {
                if let Some(p) = self.plans.get(&budget.app) {
                    check_plan_within_budget(p, &budget).map_err(|e| {
                        ProtoError::new(
                            Code::Budget,
                            format!(
                                "{}; lower the plan first (mesh scale) or raise the budget",
                                e.message
                            ),
                        )
                    })?;
                }
                let rev = self.next_rev(changes);
                budget.rev = rev;
                put(changes, Table::Budgets, &budget.app, &budget);
                self.budgets.insert(budget.app.clone(), budget.clone());
                self.emit(EventKind::BudgetPut(budget), rev, changes, events);
                Ok(Fields::new().add("rev", rev))
            }
            Mutation::DeleteBudget { app } => {
                if self.budgets.remove(&app).is_none() {
                    return Err(ProtoError::new(
                        Code::NotFound,
                        format!("no budget for app {app}"),
                    ));
                }
                let rev = self.next_rev(changes);
                del(changes, Table::Budgets, &app);
                self.emit(EventKind::BudgetDel { app }, rev, changes, events);
                Ok(Fields::new().add("rev", rev))
            }
            Mutation::GrantLease { ttl_ms } => {
                self.next_lease += 1;
                let id = self.next_lease;
                put(changes, Table::Meta, "next_lease", &self.next_lease);
                let lease = Lease {
                    id,
                    ttl_ms,
                    deadline: now + Duration::from_millis(ttl_ms),
                };
                put(changes, Table::Leases, &id.to_string(), &lease);
                self.leases.insert(id, lease);
                Ok(Fields::new().add("lease", id).add("ttl_ms", ttl_ms))
            }
            Mutation::RenewLease { id } => {
                self.live_lease(id, now)?;
                let lease = self.leases.get_mut(&id).ok_or_else(|| no_lease(id))?;
                lease.deadline = now + Duration::from_millis(lease.ttl_ms);
                Ok(Fields::new().add("lease", id).add("ttl_ms", lease.ttl_ms))
            }
            Mutation::RevokeLease { id } => {
                self.live_lease(id, now)?;
                let removed = self.drop_lease(id, "revoked", changes, events);
                Ok(Fields::new().add("lease", id).add("removed", removed))
            }
            Mutation::PutEndpoint(mut ep) => {
                self.live_lease(ep.lease, now)?;
                // Registering the same endpoint again changes nothing and takes no revision.
                if let Some(cur) = self.endpoints.get(&(ep.app.clone(), ep.instance.clone())) {
                    ep.rev = cur.rev;
                    if *cur == ep {
                        return Ok(Fields::new().add("rev", cur.rev));
                    }
                }
                let rev = self.next_rev(changes);
                ep.rev = rev;
                put(
                    changes,
                    Table::Endpoints,
                    &endpoint_key(&ep.app, &ep.instance),
                    &ep,
                );
                self.endpoints
                    .insert((ep.app.clone(), ep.instance.clone()), ep.clone());
                self.emit(EventKind::EndpointPut(ep), rev, changes, events);
                Ok(Fields::new().add("rev", rev))
            }
            Mutation::DeleteEndpoint { app, instance } => {
                let key = (app, instance);
                let Some(rev) = self.remove_endpoint(&key, "deregistered", changes, events) else {
                    return Err(ProtoError::new(
                        Code::NotFound,
                        format!("no endpoint for app {} instance {}", key.0, key.1),
                    ));
                };
                Ok(Fields::new().add("rev", rev))
            }
            Mutation::PutNode(mut node) => {
                self.live_lease(node.lease, now)?;
                if let Some(cur) = self.nodes.get(&node.id) {
                    node.rev = cur.rev;
                    if *cur == node {
                        return Ok(Fields::new().add("rev", cur.rev));
                    }
                }
                let rev = self.next_rev(changes);
                node.rev = rev;
                put(changes, Table::Nodes, &node.id, &node);
                self.nodes.insert(node.id.clone(), node.clone());
                self.emit(EventKind::NodePut(node), rev, changes, events);
                // A new or larger node may take slots that found no room so far.
                self.reschedule(None, changes, events);
                Ok(Fields::new().add("rev", rev))
            }
            Mutation::PutInstance(mut inst) => {
                self.live_lease(inst.lease, now)?;
                let key = (inst.app.clone(), inst.instance.clone());
                if let Some(cur) = self.instances.get(&key) {
                    inst.rev = cur.rev;
                    if *cur == inst {
                        return Ok(Fields::new().add("rev", cur.rev));
                    }
                }
                let rev = self.next_rev(changes);
                inst.rev = rev;
                put(
                    changes,
                    Table::Instances,
                    &endpoint_key(&inst.app, &inst.instance),
                    &inst,
                );
                self.instances.insert(key, inst.clone());
                self.emit(EventKind::InstancePut(inst), rev, changes, events);
                Ok(Fields::new().add("rev", rev))
            }
            Mutation::DeleteInstance { app, instance } => {
                let key = (app, instance);
                let Some(rev) = self.remove_instance(&key, "removed", changes, events) else {
                    return Err(ProtoError::new(
                        Code::NotFound,
                        format!("no instance status for app {} instance {}", key.0, key.1),
                    ));
                };
                Ok(Fields::new().add("rev", rev))
            }
            Mutation::CreateToken { hash, record } => {
                put(changes, Table::Tokens, &hash, &record);
                let role = record.role;
                self.tokens.insert(hash, record);
                Ok(Fields::new().add("role", role))
            }
            Mutation::ExpireLeases => {
                let due: Vec<u64> = self
                    .leases
                    .values()
                    .filter(|l| l.deadline <= now)
                    .map(|l| l.id)
                    .collect();
                let mut removed = 0;
                for id in &due {
                    removed += self.drop_lease(*id, "expired", changes, events);
                }
                Ok(Fields::new()
                    .add("leases", due.len())
                    .add("removed", removed))
            }
        }
    }

    /// Deletes a lease and everything attached to it; returns how many objects went.
    /// Removes an endpoint durably with a `del` event; its revision, if it existed.
    fn remove_endpoint(
        &mut self,
        key: &(String, String),
        reason: &str,
        changes: &mut Vec<Change>,
        events: &mut Vec<Event>,
    ) -> Option<u64> {
        let endpoint = self.endpoints.remove(key)?;
        let rev = self.next_rev(changes);
        del(changes, Table::Endpoints, &endpoint_key(&key.0, &key.1));
        let kind = EventKind::EndpointDel {
            endpoint,
            reason: reason.to_string(),
        };
        self.emit(kind, rev, changes, events);
        Some(rev)
    }

    /// Removes an instance status durably with a `del` event; its revision, if it existed.
    fn remove_instance(
        &mut self,
        key: &(String, String),
        reason: &str,
        changes: &mut Vec<Change>,
        events: &mut Vec<Event>,
    ) -> Option<u64> {
        let instance = self.instances.remove(key)?;
        let rev = self.next_rev(changes);
        del(changes, Table::Instances, &endpoint_key(&key.0, &key.1));
        let kind = EventKind::InstanceDel {
            instance,
            reason: reason.to_string(),
        };
        self.emit(kind, rev, changes, events);
        Some(rev)
    }

    fn drop_lease(
        &mut self,
        id: u64,
        reason: &str,
        changes: &mut Vec<Change>,
        events: &mut Vec<Event>,
    ) -> usize {
        self.leases.remove(&id);
        del(changes, Table::Leases, &id.to_string());
        let eps: Vec<(String, String)> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.lease == id)
            .map(|(k, _)| k.clone())
            .collect();
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.lease == id)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &eps {
            self.remove_endpoint(key, reason, changes, events);
        }
        let insts: Vec<(String, String)> = self
            .instances
            .iter()
            .filter(|(_, i)| i.lease == id)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &insts {
            self.remove_instance(key, reason, changes, events);
        }
        for node in &nodes {
            self.nodes.remove(node);
            let rev = self.next_rev(changes);
            del(changes, Table::Nodes, node);
            self.emit(
                EventKind::NodeDel {
                    node: node.clone(),
                    reason: reason.to_string(),
                },
                rev,
                changes,
                events,
            );
        }
        if !nodes.is_empty() {
            // The lost nodes' slots go to the nodes that remain.
            self.reschedule(None, changes, events);
        }
        eps.len() + nodes.len() + insts.len()
    }

    /// Places the slots of each plan (of `only`, or of all apps) on nodes: slots beyond a
    /// plan's `min` and slots on lost nodes are released; free slots go to the live node with
    /// the fewest instances of the app, then the fewest in all, within `max_instances`.
    /// Placed slots never move while their node lives.
    fn reschedule(
        &mut self,
        only: Option<&str>,
        changes: &mut Vec<Change>,
        events: &mut Vec<Event>,
    ) {
        let apps: Vec<String> = match only {
            Some(a) => vec![a.to_string()],
            None => {
                let mut v: Vec<String> = self.plans.keys().cloned().collect();
                v.extend(self.assignments.keys().map(|(a, _)| a.clone()));
                v.sort();
                v.dedup();
                v
            }
        };
        for app in apps {
            let want = self.plans.get(&app).map_or(0, |p| p.min);
            let stale: Vec<((String, u32), &'static str)> = self
                .assignments
                .iter()
                .filter(|((a, _), _)| *a == app)
                .filter_map(|(k, asg)| {
                    if k.1 >= want {
                        Some((k.clone(), "scaled_down"))
                    } else if !self.nodes.contains_key(&asg.node) {
                        Some((k.clone(), "node_lost"))
                    } else {
                        None
                    }
                })
                .collect();
            for (key, reason) in stale {
                if let Some(a) = self.assignments.remove(&key) {
                    let rev = self.next_rev(changes);
                    del(changes, Table::Assignments, &format!("{}/{}", key.0, key.1));
                    self.emit(
                        EventKind::AssignmentDel {
                            assignment: a,
                            reason: reason.into(),
                        },
                        rev,
                        changes,
                        events,
                    );
                }
            }
            for slot in 0..want {
                if self.assignments.contains_key(&(app.clone(), slot)) {
                    continue;
                }
                let Some(node) = self.pick_node(&app) else {
                    break; // no room anywhere: the slot waits for a node
                };
                let rev = self.next_rev(changes);
                let a = Assignment {
                    app: app.clone(),
                    slot,
                    node,
                    rev,
                };
                put(changes, Table::Assignments, &format!("{app}/{slot}"), &a);
                self.assignments.insert((app.clone(), slot), a.clone());
                self.emit(EventKind::AssignmentPut(a), rev, changes, events);
            }
        }
    }

    fn pick_node(&self, app: &str) -> Option<String> {
        let mut total: BTreeMap<&str, u32> = BTreeMap::new();
        let mut of_app: BTreeMap<&str, u32> = BTreeMap::new();
        for a in self.assignments.values() {
            *total.entry(&a.node).or_default() += 1;
            if a.app == app {
                *of_app.entry(&a.node).or_default() += 1;
            }
        }
        self.nodes
            .values()
            .filter(|n| total.get(n.id.as_str()).copied().unwrap_or(0) < n.max_instances)
            .min_by_key(|n| {
                let id = n.id.as_str();
                (
                    of_app.get(id).copied().unwrap_or(0),
                    total.get(id).copied().unwrap_or(0),
                    id,
                )
            })
            .map(|n| n.id.clone())
    }

    /// A lease that exists and whose deadline has not passed (the expiry timer may not have
    /// removed it yet, but it is dead all the same).
    fn live_lease(&self, id: u64, now: Instant) -> Result<(), ProtoError> {
        match self.leases.get(&id) {
            Some(l) if l.deadline > now => Ok(()),
            _ => Err(no_lease(id)),
        }
    }

    /// The earliest lease deadline, for the expiry timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.deadline).min()
    }

    /// The current objects of a topic that pass `filter`, as events (each with its own
    /// revision), for a subscription's first replay.
    pub fn snapshot(&self, topic: Topic, filter: &Filter) -> Vec<Event> {
        let ev = |rev, kind| Event { rev, kind };
        let all: Vec<Event> = match topic {
            Topic::Plans => self
                .plans
                .values()
                .map(|p| ev(p.rev, EventKind::PlanPut(p.clone())))
                .collect(),
            Topic::Budgets => self
                .budgets
                .values()
                .map(|b| ev(b.rev, EventKind::BudgetPut(b.clone())))
                .collect(),
            Topic::Endpoints => self
                .endpoints
                .values()
                .map(|e| ev(e.rev, EventKind::EndpointPut(e.clone())))
                .collect(),
            Topic::Nodes => self
                .nodes
                .values()
                .map(|n| ev(n.rev, EventKind::NodePut(n.clone())))
                .collect(),
            Topic::Assignments => self
                .assignments
                .values()
                .map(|a| ev(a.rev, EventKind::AssignmentPut(a.clone())))
                .collect(),
            Topic::Instances => self
                .instances
                .values()
                .map(|i| ev(i.rev, EventKind::InstancePut(i.clone())))
                .collect(),
        };
        all.into_iter().filter(|e| filter.matches(e)).collect()
    }

    /// The events after `from` for a resuming subscriber, or `None` when the log no longer
    /// reaches back that far (or `from` is from the future): then it needs a full replay.
    pub fn events_since(&self, from: u64, topic: Topic, filter: &Filter) -> Option<Vec<Event>> {
        if from < self.log_floor || from > self.rev {
            return None;
        }
        Some(
            self.log
                .iter()
                .filter(|e| e.rev > from && e.topic() == topic && filter.matches(e))
                .cloned()
                .collect(),
        )
    }
}

fn no_lease(id: u64) -> ProtoError {
    ProtoError::new(
        Code::NotFound,
        format!("lease {id} does not exist (expired or revoked); grant a new one with LEASE.GRANT"),
    )
}

fn check_plan_within_budget(plan: &Plan, b: &Budget) -> Result<(), ProtoError> {
    let refuse = |what: String| ProtoError::new(Code::Budget, format!("app {}: {what}", plan.app));
    if plan.min > b.max_instances {
        return Err(refuse(format!(
            "plan min {} exceeds the budget's max_instances {}",
            plan.min, b.max_instances
        )));
    }
    if plan.max > b.max_instances {
        return Err(refuse(format!(
            "plan max {} exceeds the budget's max_instances {}",
            plan.max, b.max_instances
        )));
    }
    let cpu = u64::from(plan.min) * u64::from(plan.cpu_milli);
    if cpu > b.cpu_milli {
        return Err(refuse(format!(
            "plan min {} x {} cpu_milli = {cpu} exceeds the budget's cpu_milli {}",
            plan.min, plan.cpu_milli, b.cpu_milli
        )));
    }
    let mem = u64::from(plan.min) * u64::from(plan.memory_mb);
    if mem > b.memory_mb {
        return Err(refuse(format!(
            "plan min {} x {} memory_mb = {mem} exceeds the budget's memory_mb {}",
            plan.min, plan.memory_mb, b.memory_mb
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;
    use mesh_common::Digest;

    fn plan(app: &str, min: u32, max: u32) -> Plan {
        Plan {
            app: app.into(),
            digest: Digest::of(app.as_bytes()),
            min,
            max,
            port: 8080,
            health: None,
            min_healthy_ms: 1000,
            max_parallel: 1,
            drain_ms: 1000,
            deadline_ms: 60_000,
            cpu_milli: 250,
            memory_mb: 64,
            rev: 0,
        }
    }

    struct Harness {
        st: State,
        storage: MemoryStorage,
        events: Vec<Event>,
    }

    impl Harness {
        fn new() -> Self {
            Harness {
                st: State::default(),
                storage: MemoryStorage::default(),
                events: vec![],
            }
        }

        fn apply_at(&mut self, m: Mutation, now: Instant) -> Result<Fields, ProtoError> {
            let mut changes = vec![];
            let r = self.st.apply(m, now, &mut changes, &mut self.events);
            if r.is_err() {
                assert!(changes.is_empty(), "a refusal must not change storage");
            }
            self.storage.commit(&changes).unwrap();
            r
        }

        fn apply(&mut self, m: Mutation) -> Result<Fields, ProtoError> {
            self.apply_at(m, Instant::now())
        }
    }

    #[test]
    fn revisions_increase_and_state_reloads_from_storage() {
        let mut h = Harness::new();
        assert_eq!(
            h.apply(Mutation::PutPlan(plan("a", 1, 2)))
                .unwrap()
                .as_str(),
            "rev=1"
        );
        assert_eq!(
            h.apply(Mutation::PutPlan(plan("b", 1, 2)))
                .unwrap()
                .as_str(),
            "rev=2"
        );
        assert_eq!(
            h.apply(Mutation::DeletePlan { app: "a".into() })
                .unwrap()
                .as_str(),
            "rev=3"
        );
        let err = h
            .apply(Mutation::DeletePlan { app: "a".into() })
            .unwrap_err();
        assert_eq!(err.code, Code::NotFound);
        let loaded = State::load(&h.storage).unwrap();
        assert_eq!(loaded.rev, 3);
        assert_eq!(loaded.plans.keys().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(loaded.plans["b"].rev, 2);
        assert_eq!(loaded.log.len(), 3);
    }

    #[test]
    fn budget_refuses_plans_beyond_it_and_budgets_below_plans() {
        let mut h = Harness::new();
        h.apply(Mutation::PutBudget(Budget {
            app: "a".into(),
            max_instances: 2,
            cpu_milli: 1000,
            memory_mb: 1024,
            rev: 0,
        }))
        .unwrap();
        let e = h.apply(Mutation::PutPlan(plan("a", 3, 3))).unwrap_err();
        assert_eq!(e.code, Code::Budget);
        assert!(
            e.message
                .contains("plan min 3 exceeds the budget's max_instances 2"),
            "{}",
            e.message
        );
        let mut p = plan("a", 2, 2);
        p.cpu_milli = 600;
        let e = h.apply(Mutation::PutPlan(p)).unwrap_err();
        assert!(
            e.message.contains("cpu_milli = 1200 exceeds"),
            "{}",
            e.message
        );
        h.apply(Mutation::PutPlan(plan("a", 2, 2))).unwrap();
        let e = h
            .apply(Mutation::PutBudget(Budget {
                app: "a".into(),
                max_instances: 1,
                cpu_milli: 1000,
                memory_mb: 1024,
                rev: 0,
            }))
            .unwrap_err();
        assert!(e.message.contains("lower the plan first"), "{}", e.message);
    }

    #[test]
    fn expired_leases_take_their_endpoints_and_nodes() {
        let mut h = Harness::new();
        let t0 = Instant::now();
        h.apply_at(Mutation::GrantLease { ttl_ms: 500 }, t0)
            .unwrap();
        let ep = Endpoint {
            app: "a".into(),
            instance: "a-1".into(),
            node: "n1".into(),
            addr: "127.0.0.1:9000".parse().unwrap(),
            lease: 1,
            rev: 0,
        };
        h.apply_at(Mutation::PutEndpoint(ep.clone()), t0).unwrap();
        let node = Node {
            id: "n1".into(),
            cpus: 2,
            memory_mb: 1000,
            max_instances: 10,
            lease: 1,
            rev: 0,
            metrics: None,
        };
        h.apply_at(Mutation::PutNode(node), t0).unwrap();
        // Renewed at 400 ms, so still alive at 800 ms, gone at 901 ms.
        h.apply_at(
            Mutation::RenewLease { id: 1 },
            t0 + Duration::from_millis(400),
        )
        .unwrap();
        let r = h
            .apply_at(Mutation::ExpireLeases, t0 + Duration::from_millis(800))
            .unwrap();
        assert_eq!(r.as_str(), "leases=0 removed=0");
        let r = h
            .apply_at(Mutation::ExpireLeases, t0 + Duration::from_millis(901))
            .unwrap();
        assert_eq!(r.as_str(), "leases=1 removed=2");
        assert!(h.st.endpoints.is_empty() && h.st.nodes.is_empty());
        let last: Vec<String> = h.events.iter().rev().take(2).map(|e| e.line(7)).collect();
        assert!(
            last.iter()
                .any(|l| l.starts_with("> endpoint sub=7 op=del") && l.ends_with("reason=expired")),
            "{last:?}"
        );
        let e = h.apply(Mutation::PutEndpoint(ep)).unwrap_err();
        assert!(e.message.contains("lease 1 does not exist"));
        // Nothing about the lease survives a reload.
        assert!(State::load(&h.storage).unwrap().leases.is_empty());
    }

    #[test]
    fn resume_uses_the_log_or_asks_for_a_reset() {
        let mut h = Harness::new();
        for i in 0..5 {
            h.apply(Mutation::PutPlan(plan(&format!("app{i}"), 1, 1)))
                .unwrap();
        }
        let since =
            h.st.events_since(3, Topic::Plans, &Filter::default())
                .unwrap();
        assert_eq!(since.iter().map(|e| e.rev).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(
            h.st.events_since(
                3,
                Topic::Plans,
                &Filter {
                    app: Some("app4".into()),
                    node: None
                }
            )
            .unwrap()
            .len(),
            1
        );
        assert!(
            h.st.events_since(6, Topic::Plans, &Filter::default())
                .is_none(),
            "from the future"
        );
        h.st.log_floor = 4;
        assert!(
            h.st.events_since(3, Topic::Plans, &Filter::default())
                .is_none(),
            "compacted away"
        );
    }

    fn placement(h: &Harness, app: &str) -> Vec<(u32, String)> {
        h.st.assignments
            .values()
            .filter(|a| a.app == app)
            .map(|a| (a.slot, a.node.clone()))
            .collect()
    }

    #[test]
    fn slots_are_spread_moved_off_lost_nodes_and_released_on_scale_down() {
        let mut h = Harness::new();
        let t0 = Instant::now();
        h.apply_at(Mutation::GrantLease { ttl_ms: 1000 }, t0)
            .unwrap(); // lease 1: n1
        h.apply_at(Mutation::GrantLease { ttl_ms: 60_000 }, t0)
            .unwrap(); // lease 2: n2
        let node = |id: &str, lease, max| Node {
            id: id.into(),
            cpus: 2,
            memory_mb: 1000,
            max_instances: max,
            lease,
            rev: 0,
            metrics: None,
        };
        h.apply_at(Mutation::PutNode(node("n1", 1, 10)), t0)
            .unwrap();
        h.apply_at(Mutation::PutNode(node("n2", 2, 10)), t0)
            .unwrap();
        h.apply_at(Mutation::PutPlan(plan("a", 3, 3)), t0).unwrap();
        assert_eq!(
            placement(&h, "a"),
            vec![(0, "n1".into()), (1, "n2".into()), (2, "n1".into())]
        );
        // n1's lease runs out: its slots move to n2; slot 1 stays where it was.
        h.apply_at(Mutation::ExpireLeases, t0 + Duration::from_millis(1500))
            .unwrap();
        assert_eq!(
            placement(&h, "a"),
            vec![(0, "n2".into()), (1, "n2".into()), (2, "n2".into())]
        );
        let moved = h.events.iter().filter(|e| matches!(&e.kind, EventKind::AssignmentDel { reason, .. } if reason == "node_lost")).count();
        assert_eq!(moved, 2);
        h.apply_at(
            Mutation::PatchPlan(PlanPatch {
                app: "a".into(),
                min: Some(1),
                max: Some(1),
                ..Default::default()
            }),
            t0,
        )
        .unwrap();
        assert_eq!(placement(&h, "a"), vec![(0, "n2".into())]);
        h.apply_at(Mutation::DeletePlan { app: "a".into() }, t0)
            .unwrap();
        assert!(placement(&h, "a").is_empty());
    }

    #[test]
    fn slots_without_room_wait_for_a_node() {
        let mut h = Harness::new();
        let t0 = Instant::now();
        h.apply_at(Mutation::GrantLease { ttl_ms: 60_000 }, t0)
            .unwrap();
        let node = |id: &str, max| Node {
            id: id.into(),
            cpus: 2,
            memory_mb: 1000,
            max_instances: max,
            lease: 1,
            rev: 0,
            metrics: None,
        };
        h.apply_at(Mutation::PutNode(node("small", 1)), t0).unwrap();
        h.apply_at(Mutation::PutPlan(plan("a", 3, 3)), t0).unwrap();
        assert_eq!(placement(&h, "a"), vec![(0, "small".into())]);
        h.apply_at(Mutation::PutNode(node("big", 10)), t0).unwrap();
        assert_eq!(
            placement(&h, "a"),
            vec![(0, "small".into()), (1, "big".into()), (2, "big".into())]
        );
        // Instance statuses go with their lease too.
        let status = InstanceStatus {
            app: "a".into(),
            instance: "a-s0-x".into(),
            node: "small".into(),
            slot: 0,
            digest: Digest::of(b"a"),
            state: "ready".into(),
            pid: 42,
            port: 9000,
            restarts: 0,
            reason: "-".into(),
            message: String::new(),
            since: 0,
            lease: 1,
            rev: 0,
        };
        h.apply_at(Mutation::PutInstance(status.clone()), t0)
            .unwrap();
        let again = h.apply_at(Mutation::PutInstance(status), t0).unwrap();
        assert_eq!(
            again.as_str(),
            format!("rev={}", h.st.rev),
            "an unchanged status takes no revision"
        );
        h.apply_at(Mutation::RevokeLease { id: 1 }, t0).unwrap();
        assert!(h.st.instances.is_empty() && h.st.nodes.is_empty() && h.st.assignments.is_empty());
    }

    #[test]
    fn event_lines_carry_sub_op_and_fields() {
        let ev = Event {
            rev: 4,
            kind: EventKind::PlanDel { app: "a".into() },
        };
        assert_eq!(ev.line(2), "> plan sub=2 op=del app=a rev=4");
        let ev = Event {
            rev: 5,
            kind: EventKind::PlanPut(Plan {
                rev: 5,
                ..plan("a", 1, 2)
            }),
        };
        let line = ev.line(1);
        assert!(
            line.starts_with("> plan sub=1 op=put app=a rev=5 digest=sha256:"),
            "{line}"
        );
    }
}
