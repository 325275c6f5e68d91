//! The fabric's state machine: every object, the revision counter, leases, and the recent
//! event log. Only the writer mutates it ([`State::apply`]), turning each [`Mutation`] into
//! storage changes and events; connections read it under a shared lock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use mesh_common::Digest;
use mesh_common::model::{self, Budget, Endpoint, Node, Plan};
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
    PlanDel { app: String },
    BudgetPut(Budget),
    BudgetDel { app: String },
    EndpointPut(Endpoint),
    EndpointDel { endpoint: Endpoint, reason: String },
    NodePut(Node),
    NodeDel { node: String, reason: String },
}

/// What a subscription is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    Plans,
    Budgets,
    Endpoints,
    Nodes,
}

impl Topic {
    pub fn parse(s: &str) -> Option<Topic> {
        match s {
            "plans" => Some(Topic::Plans),
            "budgets" => Some(Topic::Budgets),
            "endpoints" => Some(Topic::Endpoints),
            "nodes" => Some(Topic::Nodes),
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
        }
    }

    /// The event line for subscription `sub`: `> kind sub=N op=put|del rev=R ...`.
    pub fn line(&self, sub: u64) -> String {
        let head = |kind: &str, op: &str| format!("> {kind} sub={sub} op={op}");
        match &self.kind {
            EventKind::PlanPut(p) => format!("{} {}", head("plan", "put"), p.to_fields()),
            EventKind::PlanDel { app } => {
                format!(
                    "{} {}",
                    head("plan", "del"),
                    Fields::new().add("app", app).add("rev", self.rev)
                )
            }
            EventKind::BudgetPut(b) => format!("{} {}", head("budget", "put"), b.to_fields()),
            EventKind::BudgetDel { app } => {
                format!(
                    "{} {}",
                    head("budget", "del"),
                    Fields::new().add("app", app).add("rev", self.rev)
                )
            }
            EventKind::EndpointPut(e) => format!("{} {}", head("endpoint", "put"), e.to_fields()),
            EventKind::EndpointDel { endpoint, reason } => {
                let mut e = endpoint.clone();
                e.rev = self.rev;
                format!(
                    "{} {} reason={reason}",
                    head("endpoint", "del"),
                    e.to_fields()
                )
            }
            EventKind::NodePut(n) => format!("{} {}", head("node", "put"), n.to_fields()),
            EventKind::NodeDel { node, reason } => format!(
                "{} {} reason={reason}",
                head("node", "del"),
                Fields::new().add("node", node).add("rev", self.rev)
            ),
        }
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
                self.emit(EventKind::PlanPut(plan), rev, changes, events);
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
                self.emit(EventKind::PlanDel { app }, rev, changes, events);
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
                if !self.leases.contains_key(&id) {
                    return Err(no_lease(id));
                }
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
                let Some(ep) = self.endpoints.remove(&(app.clone(), instance.clone())) else {
                    return Err(ProtoError::new(
                        Code::NotFound,
                        format!("no endpoint for app {app} instance {instance}"),
                    ));
                };
                let rev = self.next_rev(changes);
                del(changes, Table::Endpoints, &endpoint_key(&app, &instance));
                self.emit(
                    EventKind::EndpointDel {
                        endpoint: ep,
                        reason: "deregistered".into(),
                    },
                    rev,
                    changes,
                    events,
                );
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
            if let Some(ep) = self.endpoints.remove(key) {
                let rev = self.next_rev(changes);
                del(changes, Table::Endpoints, &endpoint_key(&key.0, &key.1));
                self.emit(
                    EventKind::EndpointDel {
                        endpoint: ep,
                        reason: reason.to_string(),
                    },
                    rev,
                    changes,
                    events,
                );
            }
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
        eps.len() + nodes.len()
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

    /// The current objects of a topic as events (each with its own revision), for a
    /// subscription's first replay.
    pub fn snapshot(&self, topic: Topic, app: Option<&str>) -> Vec<Event> {
        let keep = |a: &str| app.is_none_or(|want| want == a);
        match topic {
            Topic::Plans => self
                .plans
                .values()
                .filter(|p| keep(&p.app))
                .map(|p| Event {
                    rev: p.rev,
                    kind: EventKind::PlanPut(p.clone()),
                })
                .collect(),
            Topic::Budgets => self
                .budgets
                .values()
                .filter(|b| keep(&b.app))
                .map(|b| Event {
                    rev: b.rev,
                    kind: EventKind::BudgetPut(b.clone()),
                })
                .collect(),
            Topic::Endpoints => self
                .endpoints
                .values()
                .filter(|e| keep(&e.app))
                .map(|e| Event {
                    rev: e.rev,
                    kind: EventKind::EndpointPut(e.clone()),
                })
                .collect(),
            Topic::Nodes => self
                .nodes
                .values()
                .map(|n| Event {
                    rev: n.rev,
                    kind: EventKind::NodePut(n.clone()),
                })
                .collect(),
        }
    }

    /// The events after `from` for a resuming subscriber, or `None` when the log no longer
    /// reaches back that far (or `from` is from the future): then it needs a full replay.
    pub fn events_since(&self, from: u64, topic: Topic, app: Option<&str>) -> Option<Vec<Event>> {
        if from < self.log_floor || from > self.rev {
            return None;
        }
        Some(
            self.log
                .iter()
                .filter(|e| {
                    e.rev > from && e.topic() == topic && app.is_none_or(|a| e.app() == Some(a))
                })
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
        let since = h.st.events_since(3, Topic::Plans, None).unwrap();
        assert_eq!(since.iter().map(|e| e.rev).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(
            h.st.events_since(3, Topic::Plans, Some("app4"))
                .unwrap()
                .len(),
            1
        );
        assert!(
            h.st.events_since(6, Topic::Plans, None).is_none(),
            "from the future"
        );
        h.st.log_floor = 4;
        assert!(
            h.st.events_since(3, Topic::Plans, None).is_none(),
            "compacted away"
        );
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
