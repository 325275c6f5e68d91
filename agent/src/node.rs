//! The node agent: follows the fabric's plans and this node's slot assignments, and drives one
//! [`Machine`] per instance through the supervisor, the health checks and the fabric.
//!
//! One task owns all state and reacts to messages (subscription events, process exits, health
//! results, launch results, a 100 ms tick); everything slow runs in tasks that report back, so
//! the loop never waits on I/O. Talking to the fabric is queued and retried, so a fabric
//! restart or a network cut changes nothing for running, healthy spores.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_common::Digest;
use mesh_common::client::{Client, ClientConfig, ClientError, SubEvent, Subscription};
use mesh_common::manifest::Manifest;
use mesh_common::model::{Assignment, Budget, Plan};
use mesh_common::proto::{Fields, encode_text};
use mesh_common::trust::TrustStore;
use tokio::sync::mpsc;

use crate::cgroup::{CgroupRoot, Limits};
use crate::machine::{Action, Input, Machine, MachineConfig, Phase};
use crate::metrics::{AgentMetrics, InstanceView};
use crate::spores::{PrepareError, SporeCache};
use crate::supervisor::{ExitEvent, StartSpec, Supervisor, SupervisorConfig};

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub fabric: ClientConfig,
    pub node: String,
    pub state_dir: PathBuf,
    pub trust: TrustStore,
    pub cgroup_root: CgroupRoot,
    pub move_self: bool,
    /// The address other hosts (and the edge) reach this node's spores at.
    pub advertise_ip: IpAddr,
    /// Ports for apps whose plan has no base port.
    pub port_range: (u16, u16),
    pub max_instances: u32,
    pub lease_ttl: Duration,
    /// Stop every instance when the agent stops (`mesh up`); otherwise they keep running.
    pub stop_on_exit: bool,
    pub users: crate::users::UserMap,
    /// Prometheus /metrics and /v1/instances (None: not served).
    pub metrics: Option<SocketAddr>,
    /// Load the eBPF accounting programs (a refusal only logs a warning).
    pub ebpf: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Supervisor(#[from] crate::supervisor::SupervisorError),
    #[error("{0}")]
    Fabric(#[from] ClientError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// One instance this node runs (or tries to).
struct Inst {
    app: String,
    slot: u32,
    digest: Digest,
    machine: Machine,
    port: u16,
    pid: u32,
    since: u64,
    manifest: Option<Manifest>,
    health_path: Option<String>,
    next_check: Instant,
    checking: bool,
    failed_at: Option<Instant>,
    /// A fetch/verify/start is in flight: the instance must not be forgotten before it reports.
    launching: bool,
    /// Why the last health check failed, for the message of a failed launch.
    last_health: String,
    /// Last status sent to the fabric, to send only changes.
    reported: String,
}

impl Inst {
    fn new(app: &str, slot: u32, digest: Digest, machine: Machine, port: u16) -> Inst {
        Inst {
            app: app.to_string(),
            slot,
            digest,
            machine,
            port,
            pid: 0,
            since: now_unix(),
            manifest: None,
            health_path: None,
            next_check: Instant::now(),
            checking: false,
            failed_at: None,
            launching: false,
            last_health: String::new(),
            reported: String::new(),
        }
    }
}

enum Msg {
    Plans(SubEvent),
    Assignments(SubEvent),
    Budgets(SubEvent),
    Launched {
        app: String,
        name: String,
        result: Result<(u32, Box<Manifest>), PrepareError>,
    },
    Health {
        name: String,
        ok: bool,
        detail: String,
    },
    /// The fabric no longer knows this node's lease.
    LeaseLost,
    /// Stopping found no such process (it ended before the stop): treat it as gone.
    StopGone {
        name: String,
    },
    /// The node is registered under `lease`; `slots` are its assignments as of `rev`.
    Registered {
        lease: u64,
        slots: Vec<(String, u32)>,
        rev: u64,
    },
    BlobUrl(String),
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `<app>-s<slot>-<first 8 hex digits of the digest>`: unique per app across the mesh, and the
/// same after an agent restart.
pub fn instance_name(app: &str, slot: u32, digest: &Digest) -> String {
    format!("{app}-s{slot}-{}", &digest.hex()[..8])
}

fn parse_slot(app: &str, name: &str) -> Option<u32> {
    name.strip_prefix(app)?
        .strip_prefix("-s")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

struct Agent {
    cfg: AgentConfig,
    sup: Supervisor,
    spores: Arc<SporeCache>,
    tx: mpsc::UnboundedSender<Msg>,
    commands: mpsc::UnboundedSender<String>,
    blob_url: Option<String>,
    lease: Option<u64>,
    plans: BTreeMap<String, Plan>,
    budgets: BTreeMap<String, Budget>,
    assigned: BTreeSet<(String, u32)>,
    plans_synced: bool,
    assignments_synced: bool,
    /// The node is registered in this run; until then nothing is drained or started.
    node_registered: bool,
    /// Assignment events up to this revision are already in `assigned`.
    assign_floor: u64,
    insts: BTreeMap<String, Inst>,
    /// (app, slot, digest) that failed while an older version served: not retried until the
    /// plan changes (auto-revert).
    reverted: BTreeSet<(String, u32, Digest)>,
    metrics: Arc<AgentMetrics>,
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    mut cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let mut sup_cfg = SupervisorConfig::new(cfg.state_dir.clone(), cfg.cgroup_root.clone());
    sup_cfg.move_self = cfg.move_self;
    sup_cfg.users = cfg.users.clone();
    sup_cfg.ebpf = cfg.ebpf;
    let (sup, mut exits) = Supervisor::new(sup_cfg)?;
    let metrics = Arc::new(AgentMetrics::new(&cfg.node));
    if let Some(addr) = cfg.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Io {
                what: format!("metrics address {addr}"),
                source,
            })?;
        let addr = listener.local_addr().unwrap_or(addr);
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
        // what the node registers: where others reach it (0.0.0.0 means the advertised IP)
        cfg.metrics = Some(if addr.ip().is_unspecified() {
            SocketAddr::new(cfg.advertise_ip, addr.port())
        } else {
            addr
        });
        tokio::spawn(crate::metrics::serve(
            listener,
            sup.clone(),
            metrics.clone(),
        ));
    }
    let spores =
        SporeCache::open(&cfg.state_dir, cfg.trust.clone()).map_err(|source| AgentError::Io {
            what: "the spore cache".into(),
            source,
        })?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (ctx, crx) = mpsc::unbounded_channel();
    tokio::spawn(commander(cfg.fabric.clone(), crx, tx.clone()));
    tokio::spawn(lease_keeper(cfg.clone(), tx.clone()));
    for (topic, wrap) in [
        ("plans", Msg::Plans as fn(SubEvent) -> Msg),
        ("budgets", Msg::Budgets),
    ] {
        tokio::spawn(follow(
            Subscription::new(cfg.fabric.clone(), topic, None),
            tx.clone(),
            wrap,
        ));
    }
    let mut assign_sub = Subscription::new(cfg.fabric.clone(), "assignments", None);
    assign_sub.set_node(&cfg.node);
    tokio::spawn(follow(assign_sub, tx.clone(), Msg::Assignments));

    let mut agent = Agent {
        cfg,
        sup,
        spores,
        tx,
        commands: ctx,
        blob_url: None,
        lease: None,
        plans: BTreeMap::new(),
        budgets: BTreeMap::new(),
        assigned: BTreeSet::new(),
        plans_synced: false,
        assignments_synced: false,
        node_registered: false,
        assign_floor: 0,
        insts: BTreeMap::new(),
        reverted: BTreeSet::new(),
        metrics,
    };
    agent.adopt().await;
    tracing::info!(node = %agent.cfg.node, mode = %agent.sup.mode(), "agent running");
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
            Some(ev) = exits.recv() => agent.on_exit(ev),
            Some(msg) = rx.recv() => agent.on_msg(msg),
        }
        agent.step();
    }
    if agent.cfg.stop_on_exit {
        tracing::info!("stopping every instance");
        agent.sup.stop_all(None).await;
        let _ = agent.sup.tree().prune(true);
        // a root the agent made for itself (--cgroup-root) goes too; its own cgroup stays
        if !agent.cfg.move_self {
            let _ = agent.sup.tree().root().remove();
        }
        // Nothing of this node runs any more: end its lease now, so that its endpoints,
        // statuses and node entry go at once rather than when the lease would expire (a
        // restarted fabric would otherwise keep routing to them for a full TTL).
        if let Some(id) = agent.lease {
            let revoke = async {
                let mut c = Client::connect(&agent.cfg.fabric).await?;
                c.call(&format!("LEASE.REVOKE {id}")).await
            };
            match tokio::time::timeout(Duration::from_secs(3), revoke).await {
                Ok(Ok(_)) => {
                    let _ = std::fs::remove_file(agent.cfg.state_dir.join("lease"));
                    tracing::info!(
                        lease = id,
                        "lease revoked: endpoints and statuses withdrawn"
                    );
                }
                Ok(Err(e)) => tracing::warn!("could not revoke lease {id}: {e}"),
                Err(_) => {
                    tracing::warn!("could not revoke lease {id}: the fabric did not answer in 3 s")
                }
            }
        }
    }
    Ok(())
}

/// Forwards a subscription's events to the loop; a refusal (bad token) ends it loudly.
async fn follow(mut sub: Subscription, tx: mpsc::UnboundedSender<Msg>, wrap: fn(SubEvent) -> Msg) {
    loop {
        match sub.next().await {
            Ok(ev) => {
                if tx.send(wrap(ev)).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!("subscription refused: {e}; retrying in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// Sends commands to the fabric in order, reconnecting and retrying on transient failures.
async fn commander(
    cfg: ClientConfig,
    mut rx: mpsc::UnboundedReceiver<String>,
    tx: mpsc::UnboundedSender<Msg>,
) {
    let mut client: Option<Client> = None;
    let mut backoff = Duration::from_millis(50);
    while let Some(line) = rx.recv().await {
        loop {
            if client.is_none() {
                match Client::connect(&cfg).await {
                    Ok(c) => {
                        if let Some(url) = c.blob_url() {
                            let _ = tx.send(Msg::BlobUrl(url.to_string()));
                        }
                        client = Some(c);
                        backoff = Duration::from_millis(50);
                    }
                    Err(e) => {
                        tracing::debug!("fabric unreachable: {e}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            let Some(c) = client.as_mut() else { continue };
            match c.call(&line).await {
                Ok(_) => break,
                Err(e) if e.is_transient() => {
                    client = None;
                }
                Err(e) => {
                    tracing::warn!(command = %line.split(' ').next().unwrap_or(""), "the fabric refused: {e}");
                    break;
                }
            }
        }
    }
}

/// Holds this node's lease and registration; tells the loop whenever the lease changes.
async fn lease_keeper(cfg: AgentConfig, tx: mpsc::UnboundedSender<Msg>) {
    let ttl = cfg.lease_ttl.as_millis() as u64;
    // A restarted agent keeps its lease if the fabric still has it: its endpoints, node and
    // statuses stay in place instead of expiring and coming back.
    let lease_file = cfg.state_dir.join("lease");
    let mut lease: Option<u64> = std::fs::read_to_string(&lease_file)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let mut client: Option<Client> = None;
    let mut announced = false;
    loop {
        if client.is_none() {
            match Client::connect(&cfg.fabric).await {
                Ok(c) => {
                    if let Some(url) = c.blob_url() {
                        let _ = tx.send(Msg::BlobUrl(url.to_string()));
                    }
                    client = Some(c);
                }
                Err(e) => {
                    tracing::debug!("lease: fabric unreachable: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let result = match lease {
            Some(id) if announced => c.call(&format!("LEASE.RENEW {id}")).await.map(|_| id),
            // The lease of an earlier run: renew it, then say who we are again.
            Some(id) => match c.call(&format!("LEASE.RENEW {id}")).await {
                Ok(_) => register_node(c, &cfg, id).await.map(|_| id),
                Err(e) => Err(e),
            },
            None => grant_and_register(c, &cfg, ttl).await,
        };
        match result {
            Ok(id) => {
                if lease != Some(id) || !announced {
                    // The registration may have moved slots here: read them as of now, so the
                    // loop never acts on assignments from before the registration.
                    let Ok(listed) = c.call("ASSIGNMENT.LIST").await else {
                        client = None;
                        continue;
                    };
                    let rev = listed.get("rev").and_then(|r| r.parse().ok()).unwrap_or(0);
                    let slots = listed
                        .items
                        .iter()
                        .filter_map(|i| Assignment::from_fields(i).ok())
                        .filter(|a| a.node == cfg.node)
                        .map(|a| (a.app, a.slot))
                        .collect();
                    tracing::info!(lease = id, node = %cfg.node, "node registered");
                    let _ = mesh_common::fsutil::write_atomic(
                        &lease_file,
                        id.to_string().as_bytes(),
                        0o600,
                    );
                    let _ = tx.send(Msg::Registered {
                        lease: id,
                        slots,
                        rev,
                    });
                    announced = true;
                }
                lease = Some(id);
                tokio::time::sleep(Duration::from_millis(ttl / 4)).await;
            }
            Err(e) if e.code() == Some(mesh_common::proto::Code::NotFound) => {
                tracing::warn!(
                    "the fabric lost this node's lease (down longer than its TTL?); registering again"
                );
                lease = None;
                announced = false;
                let _ = tx.send(Msg::LeaseLost);
            }
            Err(e) if e.is_transient() => {
                client = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                tracing::error!("node registration refused: {e}; retrying in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

async fn grant_and_register(
    c: &mut Client,
    cfg: &AgentConfig,
    ttl: u64,
) -> Result<u64, ClientError> {
    let r = c.call(&format!("LEASE.GRANT ttl_ms={ttl}")).await?;
    let id: u64 = r.get("lease").and_then(|v| v.parse().ok()).unwrap_or(0);
    register_node(c, cfg, id).await?;
    Ok(id)
}

async fn register_node(c: &mut Client, cfg: &AgentConfig, id: u64) -> Result<(), ClientError> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = memory_mb();
    let mut line = format!(
        "NODE.REG node={} cpus={cpus} memory_mb={mem} max_instances={} lease={id}",
        cfg.node, cfg.max_instances
    );
    if let Some(m) = cfg.metrics {
        line.push_str(&format!(" metrics={m}"));
    }
    c.call(&line).await?;
    Ok(())
}

fn memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .map(|kb| kb / 1024)
        .unwrap_or(1)
}

impl Agent {
    async fn adopt(&mut self) {
        for info in self.sup.adopt().await {
            let rec = &info.record;
            let (Some(slot), Ok(digest)) = (
                parse_slot(&rec.app, &rec.instance),
                rec.digest.parse::<Digest>(),
            ) else {
                tracing::warn!(instance = %rec.instance, "an adopted instance with an unexpected name; stopping it");
                let _ = self.sup.stop(&rec.app, &rec.instance, None).await;
                continue;
            };
            let manifest = self.spores.extracted_manifest(&rec.app, &rec.instance);
            let health_path = manifest.as_ref().and_then(|m| m.slo.health_path.clone());
            self.insts.insert(
                rec.instance.clone(),
                Inst {
                    pid: rec.pid,
                    since: rec.started_at,
                    manifest,
                    health_path,
                    ..Inst::new(
                        &rec.app,
                        slot,
                        digest,
                        Machine::adopted(MachineConfig::default(), Instant::now()),
                        rec.port.unwrap_or(0),
                    )
                },
            );
        }
    }

    fn on_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Plans(ev) => match ev {
                // A full replay follows: until its sync, the view is incomplete.
                SubEvent::Reset => {
                    self.plans.clear();
                    self.plans_synced = false;
                }
                SubEvent::Put(e) => {
                    if let Ok(p) = Plan::from_fields(&e.fields) {
                        // A changed plan gives failed versions another chance.
                        if self.plans.get(&p.app).is_none_or(|old| old.rev != p.rev) {
                            self.reverted
                                .retain(|(a, _, d)| *a != p.app || *d != p.digest);
                            // Its failed instances go too, so that the slots try it afresh.
                            self.insts.retain(|_, i| {
                                !(i.app == p.app
                                    && i.digest == p.digest
                                    && i.machine.phase == Phase::Failed
                                    && !i.machine.running
                                    && !i.launching)
                            });
                        }
                        self.plans.insert(p.app.clone(), p);
                    }
                }
                SubEvent::Del(e) => {
                    if let Some(app) = e.get("app") {
                        self.plans.remove(app);
                    }
                }
                SubEvent::Sync { .. } => self.plans_synced = true,
            },
            Msg::Assignments(ev) => match ev {
                SubEvent::Reset => {
                    self.assigned.clear();
                    self.assign_floor = 0;
                    self.assignments_synced = false;
                }
                SubEvent::Put(e) => {
                    if let Ok(a) = Assignment::from_fields(&e.fields)
                        && a.node == self.cfg.node
                        && a.rev > self.assign_floor
                    {
                        self.assigned.insert((a.app, a.slot));
                    }
                }
                SubEvent::Del(e) => {
                    let rev: u64 = e.get("rev").and_then(|r| r.parse().ok()).unwrap_or(0);
                    if e.get("reason") == Some("node_lost") && rev > self.assign_floor {
                        // The fabric gave up on this node (its lease expired): hold everything
                        // as it is until the node is registered again and knows its slots.
                        if self.node_registered {
                            tracing::warn!(
                                "the fabric dropped this node; holding instances until it is registered again"
                            );
                        }
                        self.node_registered = false;
                    } else if let Ok(a) = Assignment::from_fields(&e.fields)
                        && a.rev > self.assign_floor
                    {
                        self.assigned.remove(&(a.app, a.slot));
                    }
                }
                SubEvent::Sync { .. } => self.assignments_synced = true,
            },
            Msg::Budgets(ev) => match ev {
                SubEvent::Reset => self.budgets.clear(),
                SubEvent::Put(e) => {
                    if let Ok(b) = Budget::from_fields(&e.fields) {
                        // Apps already running here get the new budget now, not at their next
                        // start.
                        if self
                            .insts
                            .values()
                            .any(|i| i.app == b.app && i.machine.running)
                        {
                            let (tree, app, limits) =
                                (self.sup.tree().clone(), b.app.clone(), budget_limits(&b));
                            tokio::task::spawn_blocking(move || {
                                if let Err(e) = tree.app(&app, &limits) {
                                    tracing::warn!(app = %app, "applying the new budget: {e}");
                                }
                            });
                        }
                        self.budgets.insert(b.app.clone(), b);
                    }
                }
                SubEvent::Del(e) => {
                    if let Some(app) = e.get("app") {
                        self.budgets.remove(app);
                    }
                }
                SubEvent::Sync { .. } => {}
            },
            Msg::Launched { app, name, result } => {
                let now = Instant::now();
                if let Some(i) = self.insts.get_mut(&name) {
                    i.launching = false;
                }
                let live = self
                    .insts
                    .get_mut(&name)
                    .filter(|i| i.machine.phase == Phase::Launching);
                let Some(inst) = live else {
                    // The instance moved on (drained, failed, forgotten) while it was being
                    // started: a process that started anyway must not run unsupervised.
                    if result.is_ok() {
                        tracing::info!(instance = %name, "started after it was no longer wanted; stopping it");
                        self.stop_process(&app, &name);
                    }
                    return;
                };
                let input = match result {
                    Ok((pid, manifest)) => {
                        inst.pid = pid;
                        inst.since = now_unix();
                        let warmup = Duration::from_millis(manifest.slo.warmup_ms);
                        inst.health_path = self
                            .plans
                            .get(&inst.app)
                            .and_then(|p| p.health.clone())
                            .or(manifest.slo.health_path.clone());
                        inst.manifest = Some(*manifest);
                        inst.next_check = now + warmup;
                        Input::Started
                    }
                    Err(e) => {
                        tracing::warn!(instance = %name, fatal = e.fatal, "launch failed: {}", e.message);
                        Input::LaunchFailed {
                            message: e.message,
                            fatal: e.fatal,
                        }
                    }
                };
                self.feed(&name, input, now);
            }
            Msg::Health { name, ok, detail } => {
                let now = Instant::now();
                if let Some(inst) = self.insts.get_mut(&name) {
                    inst.checking = false;
                    let interval = inst.manifest.as_ref().map_or(1000, |m| m.slo.interval_ms);
                    // Until Ready, check often so that min_healthy_time is measured closely.
                    let every = if inst.machine.phase == Phase::Ready {
                        interval
                    } else {
                        interval.min(100)
                    };
                    inst.next_check = now + Duration::from_millis(every);
                    if !ok {
                        inst.last_health = detail.clone();
                    }
                    if !ok && inst.machine.phase == Phase::Ready {
                        tracing::warn!(instance = %name, "health check failed: {detail}");
                    }
                }
                self.feed(&name, Input::Health(ok), now);
            }
            Msg::Registered {
                lease: id,
                slots,
                rev,
            } => {
                self.lease = Some(id);
                self.assigned = slots.into_iter().collect();
                self.assign_floor = rev;
                self.node_registered = true;
                // Everything registered under the old lease is gone: register it again.
                for (name, inst) in &mut self.insts {
                    inst.reported.clear();
                    if inst.machine.registered {
                        let _ = self.commands.send(register_line(
                            name,
                            inst,
                            &self.cfg.node,
                            self.cfg.advertise_ip,
                            id,
                        ));
                    }
                }
            }
            Msg::BlobUrl(url) => self.blob_url = Some(url),
            Msg::LeaseLost => self.node_registered = false,
            Msg::StopGone { name } => {
                if let Some(inst) = self.insts.get_mut(&name) {
                    inst.pid = 0;
                }
                self.feed(
                    &name,
                    Input::Exited(crate::supervisor::ExitReason::Vanished),
                    Instant::now(),
                );
            }
        }
    }

    fn on_exit(&mut self, ev: ExitEvent) {
        let Some(inst) = self.insts.get_mut(&ev.instance) else {
            // An instance that ended while the agent was away (or one it no longer tracks):
            // withdraw what may still be registered for it under the surviving lease.
            tracing::info!(instance = %ev.instance, reason = %ev.reason, "an instance this agent does not track ended; withdrawing it");
            let _ = self.commands.send(format!(
                "ENDPOINT.DEREG {} instance={}",
                ev.app, ev.instance
            ));
            let _ = self
                .commands
                .send(format!("INSTANCE.DEL {} instance={}", ev.app, ev.instance));
            self.spores.remove_run_dir(&ev.app, &ev.instance);
            return;
        };
        tracing::info!(instance = %ev.instance, reason = %ev.reason, stopped = ev.stopped, "instance exited");
        if !ev.stopped {
            self.metrics.exited(&ev.app, &ev.reason);
        }
        inst.pid = 0;
        self.feed(&ev.instance, Input::Exited(ev.reason), Instant::now());
    }

    /// Feeds one input to an instance's machine and carries out its actions.
    fn feed(&mut self, name: &str, input: Input, now: Instant) {
        let Some(inst) = self.insts.get_mut(name) else {
            return;
        };
        let before = inst.machine.phase;
        let actions = inst.machine.on(input, now);
        if inst.machine.phase != before {
            tracing::info!(instance = %name, from = ?before, to = ?inst.machine.phase, reason = %inst.machine.reason, "transition");
        }
        if inst.machine.phase == Phase::Failed && inst.failed_at.is_none() {
            inst.failed_at = Some(now);
            if inst.machine.reason == "deadline" && !inst.last_health.is_empty() {
                inst.machine.message =
                    format!("{}; last check: {}", inst.machine.message, inst.last_health);
            }
        }
        for a in actions {
            self.act(name, a);
        }
    }

    fn act(&mut self, name: &str, action: Action) {
        let Some(inst) = self.insts.get(name) else {
            return;
        };
        match action {
            Action::Start => self.launch(name),
            Action::Register => {
                if let Some(lease) = self.lease {
                    let _ = self.commands.send(register_line(
                        name,
                        inst,
                        &self.cfg.node,
                        self.cfg.advertise_ip,
                        lease,
                    ));
                }
            }
            Action::Deregister => {
                let _ = self
                    .commands
                    .send(format!("ENDPOINT.DEREG {} instance={name}", inst.app));
            }
            Action::Stop => {
                let app = inst.app.clone();
                self.stop_process(&app, name);
            }
        }
    }

    /// Stops an instance's process through the supervisor; if there is none (it ended on
    /// its own in between), the instance is told it is gone.
    fn stop_process(&self, app: &str, name: &str) {
        let (sup, tx, app, name) = (
            self.sup.clone(),
            self.tx.clone(),
            app.to_string(),
            name.to_string(),
        );
        tokio::spawn(async move {
            match sup.stop(&app, &name, None).await {
                Ok(_) => {}
                Err(crate::supervisor::SupervisorError::NotFound { .. }) => {
                    let _ = tx.send(Msg::StopGone { name });
                }
                Err(e) => tracing::warn!(instance = %name, "stop failed: {e}"),
            }
        });
    }

    fn launch(&mut self, name: &str) {
        if let Some(i) = self.insts.get_mut(name) {
            i.launching = true;
        }
        let Some(inst) = self.insts.get(name) else {
            return;
        };
        let Some(url) = self.blob_url.clone() else {
            let _ = self.tx.send(Msg::Launched {
                app: inst.app.clone(),
                name: name.to_string(),
                result: Err(PrepareError {
                    message: "the fabric's blob URL is not known yet".into(),
                    fatal: false,
                }),
            });
            return;
        };
        let token = self.cfg.fabric.token.clone();
        let (spores, sup, tx) = (self.spores.clone(), self.sup.clone(), self.tx.clone());
        let (app, slot, digest, port) = (inst.app.clone(), inst.slot, inst.digest, inst.port);
        let budget = self.budgets.get(&app).map(budget_limits);
        let name = name.to_string();
        tokio::spawn(async move {
            let result = async {
                let (manifest, run_dir) = spores.prepare(&url, &token, &app, &name, digest).await?;
                let spec = StartSpec {
                    app: app.clone(),
                    instance: name.clone(),
                    digest: digest.to_string(),
                    manifest: manifest.clone(),
                    run_dir,
                    port: Some(port),
                    app_budget: budget.unwrap_or_default(),
                };
                let info = sup.start(spec).await.map_err(|e| PrepareError {
                    message: format!("starting slot {slot}: {e}"),
                    fatal: matches!(
                        e,
                        crate::supervisor::SupervisorError::User(_)
                            | crate::supervisor::SupervisorError::Caps(_)
                    ),
                })?;
                Ok((info.record.pid, Box::new(manifest)))
            }
            .await;
            let _ = tx.send(Msg::Launched { app, name, result });
        });
    }

    /// One pass of reconciliation: what runs should match what is assigned.
    fn step(&mut self) {
        let now = Instant::now();
        let names: Vec<String> = self.insts.keys().cloned().collect();
        for n in &names {
            self.feed(n, Input::Tick, now);
        }
        // Until both views are complete, do not touch what runs (adopted instances included).
        if self.plans_synced
            && self.assignments_synced
            && self.node_registered
            && self.blob_url.is_some()
        {
            self.reconcile(now);
        }
        self.health_checks(now);
        self.report_and_reap(now);
    }

    fn reconcile(&mut self, now: Instant) {
        let mut in_rollout = 0usize;
        let wanted: Vec<(String, u32, Plan)> = self
            .assigned
            .iter()
            .filter_map(|(a, s)| self.plans.get(a).map(|p| (a.clone(), *s, p.clone())))
            .filter(|(_, s, p)| *s < p.min)
            .collect();
        for (app, slot, plan) in &wanted {
            let name = instance_name(app, *slot, &plan.digest);
            let olds: Vec<String> = self
                .insts
                .iter()
                .filter(|(n, i)| {
                    i.app == *app
                        && i.slot == *slot
                        && **n != name
                        && !matches!(i.machine.phase, Phase::Draining | Phase::Stopped)
                })
                .map(|(n, _)| n.clone())
                .collect();
            let old_serving = olds.iter().any(|n| {
                self.insts
                    .get(n)
                    .is_some_and(|i| i.machine.phase == Phase::Ready)
            });
            // Failed attempts at other versions are history once the plan moved on.
            let stale_failures: Vec<String> = olds
                .iter()
                .filter(|n| {
                    self.insts
                        .get(*n)
                        .is_some_and(|i| i.machine.phase == Phase::Failed && !i.machine.running)
                })
                .cloned()
                .collect();
            for n in &stale_failures {
                self.feed(n, Input::Drain, now);
            }
            match self
                .insts
                .get(&name)
                .map(|i| (i.machine.phase, i.failed_at))
            {
                None => {
                    // Reverted: the old version keeps the slot, as long as it is alive.
                    if !olds.is_empty()
                        && self.reverted.contains(&(app.clone(), *slot, plan.digest))
                    {
                        continue;
                    }
                    if !olds.is_empty() && in_rollout >= plan.max_parallel as usize {
                        continue;
                    }
                    if !olds.is_empty() {
                        in_rollout += 1;
                    }
                    if self.create(&name, app, *slot, plan) {
                        self.feed(&name, Input::Launch, now);
                    }
                }
                Some((Phase::Ready, _)) => {
                    for o in &olds {
                        self.feed(o, Input::Drain, now);
                    }
                }
                Some((Phase::Failed, failed_at)) => {
                    if old_serving {
                        // Auto-revert: the old version keeps serving; this one is reported
                        // failed until the plan changes.
                        if self.reverted.insert((app.clone(), *slot, plan.digest)) {
                            tracing::warn!(instance = %name, "new version failed; the old one keeps serving");
                        }
                    } else if failed_at
                        .is_some_and(|t| now.duration_since(t) > Duration::from_secs(30))
                        && self
                            .insts
                            .get(&name)
                            .is_some_and(|i| !i.launching && !i.machine.running)
                    {
                        // Nothing else serves this slot: try again from scratch now and then.
                        self.insts.remove(&name);
                    }
                }
                Some(_) => {
                    if !olds.is_empty() {
                        in_rollout += 1;
                    }
                }
            }
        }
        // Instances of slots that are no longer ours (or of plans that are gone) drain.
        let keep: BTreeSet<(String, u32)> =
            wanted.iter().map(|(a, s, _)| (a.clone(), *s)).collect();
        let names: Vec<String> = self
            .insts
            .iter()
            .filter(|(_, i)| {
                !keep.contains(&(i.app.clone(), i.slot))
                    && !matches!(i.machine.phase, Phase::Draining | Phase::Stopped)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            self.feed(&n, Input::Drain, now);
        }
    }

    /// Creates the instance, unless no port is free for it yet (it is tried again next pass).
    fn create(&mut self, name: &str, app: &str, slot: u32, plan: &Plan) -> bool {
        let Some(port) = self.pick_port(app, slot, plan.port) else {
            return false;
        };
        let cfg = MachineConfig {
            min_healthy: Duration::from_millis(plan.min_healthy_ms),
            deadline: Duration::from_millis(plan.deadline_ms),
            drain: Duration::from_millis(plan.drain_ms),
            ..MachineConfig::default()
        };
        self.insts.insert(
            name.to_string(),
            Inst::new(app, slot, plan.digest, Machine::new(cfg), port),
        );
        true
    }

    /// A plan's base port gives slot k the ports base+2k and base+2k+1 (one for each version
    /// during blue/green); otherwise the lowest free port of the agent's range. `None` while
    /// every candidate is held by a live instance.
    fn pick_port(&self, app: &str, slot: u32, base: u16) -> Option<u16> {
        let used: BTreeSet<u16> = self
            .insts
            .values()
            .filter(|i| i.machine.phase != Phase::Stopped)
            .map(|i| i.port)
            .collect();
        if base > 0 {
            let first = base.saturating_add((slot * 2) as u16);
            let second = first.saturating_add(1);
            // Whichever of the slot's two ports no live instance holds (the old version keeps
            // one during blue/green).
            let _ = app;
            return [first, second].into_iter().find(|p| !used.contains(p));
        }
        let (lo, hi) = self.cfg.port_range;
        (lo..=hi).find(|p| {
            !used.contains(p) && std::net::TcpListener::bind((self.cfg.advertise_ip, *p)).is_ok()
        })
    }

    fn health_checks(&mut self, now: Instant) {
        let ip = self.cfg.advertise_ip;
        for (name, inst) in self.insts.iter_mut() {
            if !inst.machine.wants_health() || inst.checking || now < inst.next_check {
                continue;
            }
            inst.checking = true;
            let addr = SocketAddr::new(ip, inst.port);
            let path = inst.health_path.clone();
            let timeout =
                Duration::from_millis(inst.manifest.as_ref().map_or(1000, |m| m.slo.timeout_ms));
            let (tx, name) = (self.tx.clone(), name.clone());
            tokio::spawn(async move {
                let r = crate::health::check(addr, path.as_deref(), timeout).await;
                let _ = tx.send(Msg::Health {
                    name,
                    ok: r.is_ok(),
                    detail: r.err().unwrap_or_default(),
                });
            });
        }
    }

    /// Sends changed statuses to the fabric and forgets stopped instances.
    fn report_and_reap(&mut self, _now: Instant) {
        let Some(lease) = self.lease else { return };
        let mut gone = Vec::new();
        for (name, inst) in self.insts.iter_mut() {
            if inst.machine.phase == Phase::Stopped {
                // Forget it only once no launch can still report in for it.
                if !inst.launching {
                    gone.push(name.clone());
                }
                continue;
            }
            let f = Fields::new()
                .add("instance", name)
                .add("node", &self.cfg.node)
                .add("slot", inst.slot)
                .add("digest", inst.digest)
                .add("state", inst.machine.state())
                .add("pid", inst.pid)
                .add("port", inst.port)
                .add("restarts", inst.machine.restarts)
                .add("last", &inst.machine.reason)
                .add("msg", encode_text(&inst.machine.message))
                .add("since", inst.since)
                .add("lease", lease);
            let line = format!("INSTANCE.SET {} {f}", inst.app);
            if line != inst.reported {
                inst.reported = line.clone();
                let _ = self.commands.send(line);
                self.metrics.set_instance(
                    name,
                    InstanceView {
                        app: inst.app.clone(),
                        state: inst.machine.state().to_string(),
                        restarts: inst.machine.restarts,
                        last: inst.machine.reason.to_string(),
                        digest: inst.digest.to_string(),
                        port: inst.port,
                    },
                );
            }
        }
        for name in gone {
            self.metrics.remove_instance(&name);
            if let Some(inst) = self.insts.remove(&name) {
                let _ = self
                    .commands
                    .send(format!("INSTANCE.DEL {} instance={name}", inst.app));
                self.spores.remove_run_dir(&inst.app, &name);
            }
        }
    }
}

/// An app's budget as the limits of its cgroup.
fn budget_limits(b: &Budget) -> Limits {
    Limits {
        memory_bytes: Some(b.memory_mb << 20),
        cpu_milli: Some(b.cpu_milli),
        pids: None,
    }
}

fn register_line(name: &str, inst: &Inst, node: &str, ip: IpAddr, lease: u64) -> String {
    format!(
        "ENDPOINT.REG {} instance={name} node={node} addr={} lease={lease}",
        inst.app,
        SocketAddr::new(ip, inst.port)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_carry_slot_and_digest() {
        let d = Digest::of(b"v1");
        let n = instance_name("hello", 3, &d);
        assert_eq!(n, format!("hello-s3-{}", &d.hex()[..8]));
        assert_eq!(parse_slot("hello", &n), Some(3));
        assert_eq!(parse_slot("hello-x", &n), None);
        mesh_common::model::check_name("instance", &n).unwrap();
    }
}
