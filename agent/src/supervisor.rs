//! The supervisor: starts instances into their cgroups, watches them through pidfds, stops
//! them (SIGTERM, grace, then the whole cgroup killed), and re-adopts live ones after an agent
//! restart by cgroup membership plus process start time, never by pid alone.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_common::manifest::Manifest;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::accounting::Accounting;
use crate::capabilities::{CapError, CapPolicy};
use crate::cgroup::{CgroupRoot, CgroupTree, Limits, Mode};
use crate::record::InstanceRecord;
use crate::spawn::{self, SpawnError, SpawnMethod, SpawnSpec};
use crate::users::{UserError, UserMap};
use crate::{logs, pidfd, procfs};

/// How the supervisor runs.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Instance records and logs.
    pub state_dir: PathBuf,
    /// Where the `mycelium` tree is built.
    pub cgroup_root: CgroupRoot,
    /// Move this process into `<root>/mycelium/agent` (the daemon does; tests do not).
    pub move_self: bool,
    pub users: UserMap,
    pub caps: CapPolicy,
    pub spawn_method: SpawnMethod,
    pub log_max_bytes: u64,
    pub log_keep: usize,
    /// Load the eBPF accounting programs (the agent does; most tests do not).
    pub ebpf: bool,
}

impl SupervisorConfig {
    pub fn new(state_dir: PathBuf, cgroup_root: CgroupRoot) -> Self {
        SupervisorConfig {
            state_dir,
            cgroup_root,
            move_self: false,
            users: UserMap::default(),
            caps: CapPolicy::default(),
            spawn_method: SpawnMethod::Auto,
            log_max_bytes: 10 << 20,
            log_keep: 3,
            ebpf: false,
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct StartSpec {
    pub app: String,
    pub instance: String,
    pub digest: String,
    pub manifest: Manifest,
    /// The extracted spore (the command's cwd).
    pub run_dir: PathBuf,
    pub port: Option<u16>,
    /// The app's budget, applied to its cgroup.
    pub app_budget: Limits,
}

/// Why an instance is no longer running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum ExitReason {
    Exited(i32),
    Signaled(i32),
    /// Killed by the kernel for exceeding memory.max.
    OomKilled,
    /// It ended while the agent was not running (or was adopted): the code is unknown here.
    Vanished,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Exited(c) => write!(f, "exited with code {c}"),
            ExitReason::Signaled(s) => write!(f, "killed by {}", pidfd::signal_name(*s)),
            ExitReason::OomKilled => f.write_str("OOM-killed (memory limit)"),
            ExitReason::Vanished => f.write_str("ended while unsupervised (exit code unknown)"),
        }
    }
}

/// An instance ended (by itself or because it was stopped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitEvent {
    pub app: String,
    pub instance: String,
    pub pid: u32,
    pub reason: ExitReason,
    /// The supervisor was asked to stop it.
    pub stopped: bool,
}

/// A running instance as the supervisor sees it.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    pub record: InstanceRecord,
    pub cgroup_id: u64,
    /// Re-adopted after an agent restart (not this agent's child).
    pub adopted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("{0}")]
    User(#[from] UserError),
    #[error("{0}")]
    Caps(#[from] CapError),
    #[error("cgroup: {0}")]
    Cgroup(std::io::Error),
    #[error("starting the process: {0}")]
    Spawn(#[from] SpawnError),
    #[error("instance {app}/{instance} is already running")]
    Exists { app: String, instance: String },
    #[error("no running instance {app}/{instance}")]
    NotFound { app: String, instance: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

struct Running {
    record: InstanceRecord,
    cgroup: CgroupRoot,
    pidfd: Arc<AsyncFd<OwnedFd>>,
    /// Our child (exit status by waitid) or adopted (status unknown).
    child: bool,
    stopping: AtomicBool,
    done: watch::Sender<Option<ExitReason>>,
}

struct Inner {
    cfg: SupervisorConfig,
    tree: CgroupTree,
    instances: Mutex<HashMap<(String, String), Arc<Running>>>,
    events: mpsc::UnboundedSender<ExitEvent>,
    accounting: Option<Arc<Accounting>>,
}

/// Starts, watches, stops and re-adopts instances. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn cstring(what: &str, bytes: impl Into<Vec<u8>>) -> Result<CString, SupervisorError> {
    CString::new(bytes).map_err(|_| SupervisorError::Invalid(format!("{what} holds a NUL byte")))
}

impl Supervisor {
    /// Builds the cgroup tree and returns the supervisor and the stream of exits. Must run
    /// inside a tokio runtime.
    pub fn new(
        cfg: SupervisorConfig,
    ) -> Result<(Supervisor, mpsc::UnboundedReceiver<ExitEvent>), SupervisorError> {
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(io_err(format!("state dir {}", cfg.state_dir.display())))?;
        let tree = CgroupTree::setup(cfg.cgroup_root.clone(), cfg.move_self)
            .map_err(SupervisorError::Cgroup)?;
        tracing::info!(
            mode = %cfg.cgroup_root.mode,
            root = %cfg.cgroup_root.v2.display(),
            "supervisor ready"
        );
        // eBPF is an addition: a kernel that refuses it leaves a working supervisor.
        let accounting = if cfg.ebpf {
            let spores = tree.spores();
            match Accounting::load(&spores.v2) {
                Ok(a) => {
                    tracing::info!(programs = ?a.programs, "eBPF accounting loaded");
                    Some(a)
                }
                Err(e) => {
                    tracing::warn!(
                        "eBPF accounting is off: {e}. CPU, memory and pids still come from the cgroup files; network bytes, run-queue latency and exit codes of re-adopted spores are not available"
                    );
                    None
                }
            }
        } else {
            None
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let sup = Supervisor {
            inner: Arc::new(Inner {
                cfg,
                tree,
                instances: Mutex::new(HashMap::new()),
                events: tx,
                accounting,
            }),
        };
        tokio::spawn(rotate_logs(Arc::downgrade(&sup.inner)));
        Ok((sup, rx))
    }

    /// The eBPF accounting, if it loaded.
    pub fn accounting(&self) -> Option<&Arc<Accounting>> {
        self.inner.accounting.as_ref()
    }

    pub fn mode(&self) -> Mode {
        self.inner.cfg.cgroup_root.mode
    }

    fn instances(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Running>>> {
        // A poisoned lock only means another task panicked mid-update of a plain map.
        self.inner
            .instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Every running instance.
    pub fn list(&self) -> Vec<InstanceInfo> {
        let mut v: Vec<InstanceInfo> = self
            .instances()
            .values()
            .map(|r| InstanceInfo {
                record: r.record.clone(),
                cgroup_id: r.cgroup.id().unwrap_or(0),
                adopted: !r.child,
            })
            .collect();
        v.sort_by(|a, b| {
            (&a.record.app, &a.record.instance).cmp(&(&b.record.app, &b.record.instance))
        });
        v
    }

    /// Starts one instance; returns once the process runs the spore's command.
    pub async fn start(&self, spec: StartSpec) -> Result<InstanceInfo, SupervisorError> {
        let key = (spec.app.clone(), spec.instance.clone());
        mesh_common::model::check_name("instance", &spec.instance)
            .map_err(SupervisorError::Invalid)?;
        if self.instances().contains_key(&key) {
            return Err(SupervisorError::Exists {
                app: spec.app,
                instance: spec.instance,
            });
        }
        let m = &spec.manifest;
        let id = self.inner.cfg.users.resolve(&m.security.user)?;
        let keep_caps = self.inner.cfg.caps.mask(&m.security.capabilities)?;
        let run_dir = std::path::absolute(&spec.run_dir).map_err(io_err("run dir"))?;
        let program = run_dir.join(m.command_path());
        let mut argv = vec![cstring("command", m.command.as_bytes())?];
        for a in &m.args {
            argv.push(cstring("an argument", a.as_bytes())?);
        }
        let mut envp = Vec::new();
        for (k, v) in &m.env {
            envp.push(cstring("an environment variable", format!("{k}={v}"))?);
        }
        if let Some(p) = spec.port {
            envp.push(cstring("PORT", format!("PORT={p}"))?);
        }

        let inner = self.inner.clone();
        let app = spec.app.clone();
        let instance = spec.instance.clone();
        let budget = spec.app_budget;
        let limits = Limits::from_nutrients(&m.nutrients);
        let log_dir = logs::dir(&inner.cfg.state_dir, &app, &instance);
        let method = inner.cfg.spawn_method;
        // cgroup files, the clone and the exec handshake are blocking system calls.
        let (spawned, cgroup, log_dir) = tokio::task::spawn_blocking(move || {
            inner
                .tree
                .app(&app, &budget)
                .map_err(SupervisorError::Cgroup)?;
            let cg = inner.tree.instance(&app, &instance);
            cg.create().map_err(SupervisorError::Cgroup)?;
            // counted before its first process runs, so that eBPF sees the exec
            if let (Some(acc), Ok(id)) = (&inner.accounting, cg.id())
                && let Err(e) = acc.watch(id)
            {
                tracing::warn!("{e}");
            }
            let result = (|| -> Result<spawn::Spawned, SupervisorError> {
                cg.apply(&limits).map_err(SupervisorError::Cgroup)?;
                let output = logs::open_output(&log_dir)
                    .map_err(io_err(format!("log dir {}", log_dir.display())))?;
                let spec = SpawnSpec {
                    program: cstring("the command path", program.as_os_str().as_bytes())?,
                    argv,
                    envp,
                    cwd: cstring("the run dir", run_dir.as_os_str().as_bytes())?,
                    uid: id.uid,
                    gid: id.gid,
                    keep_caps,
                    output: OwnedFd::from(output),
                };
                // ETXTBSY: another thread's clone copied a descriptor of this binary still open
                // for writing (the extraction of another instance) and has not reached its
                // close_range yet. That window is microseconds: try again shortly.
                let mut tries = 0;
                loop {
                    match spawn::spawn(&spec, &cg, method) {
                        Err(spawn::SpawnError::Child {
                            step: "execve",
                            source,
                        }) if source.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 => {
                            tries += 1;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        r => break Ok(r?),
                    }
                }
            })();
            match result {
                Ok(s) => Ok((s, cg, log_dir)),
                Err(e) => {
                    let _ = cg.remove();
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| SupervisorError::Invalid(format!("spawn task failed: {e}")))??;

        let start_time = procfs::start_time(spawned.pid).unwrap_or(0);
        let layout_rel = cgroup_rel(&self.inner.cfg.cgroup_root, &cgroup);
        let record = InstanceRecord {
            app: spec.app.clone(),
            instance: spec.instance.clone(),
            digest: spec.digest.clone(),
            pid: spawned.pid,
            start_time,
            cgroup: cgroup.v2.clone(),
            cgroup_rel: layout_rel,
            port: spec.port,
            run_dir: spec.run_dir.clone(),
            log_dir,
            started_at: now_unix(),
            stop_grace_ms: spec.manifest.slo.stop_grace_ms,
        };
        // Remember it before anything else can go wrong: a crash from here on leaves a
        // record the next agent can re-adopt.
        if let Err(e) = record.save(&self.inner.cfg.state_dir) {
            let _ = pidfd::send_signal(&spawned.pidfd, libc::SIGKILL);
            let _ = pidfd::wait(&spawned.pidfd, false);
            let _ = cgroup.kill_all();
            let _ = cgroup.remove();
            return Err(io_err("saving the instance record")(e));
        }
        tracing::info!(
            app = %spec.app,
            instance = %spec.instance,
            digest = %short(&spec.digest),
            pid = spawned.pid,
            clone3 = spawned.cloned,
            "instance started"
        );
        self.watch(record, cgroup, spawned.pidfd, true)
    }

    /// Begins supervising a running process.
    fn watch(
        &self,
        record: InstanceRecord,
        cgroup: CgroupRoot,
        fd: OwnedFd,
        child: bool,
    ) -> Result<InstanceInfo, SupervisorError> {
        let interest = tokio::io::Interest::READABLE;
        // SAFETY: an OwnedFd always returns the same open descriptor and the AsyncFd owns it
        // until it is dropped.
        let afd = unsafe { AsyncFd::register_with_interest(fd, interest) }
            .map_err(|e| io_err("watching the pidfd")(std::io::Error::from(e)))?;
        let afd = Arc::new(afd);
        let (done, _) = watch::channel(None);
        let run = Arc::new(Running {
            record: record.clone(),
            cgroup: cgroup.clone(),
            pidfd: afd,
            child,
            stopping: AtomicBool::new(false),
            done,
        });
        let key = (record.app.clone(), record.instance.clone());
        self.instances().insert(key, run.clone());
        let span = tracing::info_span!("spore", app = %record.app, instance = %record.instance, digest = %short(&record.digest));
        let oom_before = cgroup.oom_kills();
        tokio::spawn(watch_exit(self.inner.clone(), run, oom_before).instrument(span));
        Ok(InstanceInfo {
            cgroup_id: cgroup.id().unwrap_or(0),
            record,
            adopted: !child,
        })
    }

    /// Stops an instance: SIGTERM through its pidfd, then after `grace` (default: the
    /// manifest's) SIGKILL to its whole cgroup. Returns how it ended.
    pub async fn stop(
        &self,
        app: &str,
        instance: &str,
        grace: Option<Duration>,
    ) -> Result<ExitReason, SupervisorError> {
        let run = self
            .instances()
            .get(&(app.to_string(), instance.to_string()))
            .cloned()
            .ok_or_else(|| SupervisorError::NotFound {
                app: app.into(),
                instance: instance.into(),
            })?;
        run.stopping.store(true, Ordering::SeqCst);
        let mut done = run.done.subscribe();
        let grace = grace.unwrap_or(Duration::from_millis(run.record.stop_grace_ms));
        if let Err(e) = pidfd::send_signal(run.pidfd.get_ref(), libc::SIGTERM)
            && e.raw_os_error() != Some(libc::ESRCH)
        {
            tracing::warn!(app, instance, "SIGTERM: {e}");
        }
        if let Ok(Ok(r)) = tokio::time::timeout(grace, done.wait_for(Option::is_some)).await {
            return Ok(r.unwrap_or(ExitReason::Vanished));
        }
        tracing::info!(
            app,
            instance,
            grace_ms = grace.as_millis() as u64,
            "still running after the grace period; killing its cgroup"
        );
        let cg = run.cgroup.clone();
        let _ = tokio::task::spawn_blocking(move || cg.kill_all()).await;
        match tokio::time::timeout(Duration::from_secs(30), done.wait_for(Option::is_some)).await {
            Ok(Ok(r)) => Ok(r.unwrap_or(ExitReason::Vanished)),
            _ => Err(SupervisorError::Invalid(format!(
                "{app}/{instance} did not end 30 s after SIGKILL"
            ))),
        }
    }

    /// Re-adopts the instances a previous agent left running; the rest are reported as ended
    /// and their cgroups cleaned up. Returns the adopted instances.
    pub async fn adopt(&self) -> Vec<InstanceInfo> {
        let state_dir = self.inner.cfg.state_dir.clone();
        let mut adopted = Vec::new();
        for rec in InstanceRecord::load_all(&state_dir) {
            let cgroup = self.inner.tree.instance(&rec.app, &rec.instance);
            match identify(&rec) {
                Some(fd) => match self.watch_adopted(rec.clone(), cgroup, fd) {
                    Ok(info) => {
                        tracing::info!(app = %rec.app, instance = %rec.instance, pid = rec.pid, "re-adopted a running instance");
                        adopted.push(info);
                    }
                    Err(e) => {
                        tracing::warn!(app = %rec.app, instance = %rec.instance, "cannot watch: {e}")
                    }
                },
                None => {
                    tracing::info!(app = %rec.app, instance = %rec.instance, pid = rec.pid, "instance ended while the agent was down");
                    let cg = cgroup.clone();
                    let _ = tokio::task::spawn_blocking(move || cleanup_cgroup(&cg)).await;
                    let _ = InstanceRecord::remove(&state_dir, &rec.app, &rec.instance);
                    let _ = self.inner.events.send(ExitEvent {
                        app: rec.app.clone(),
                        instance: rec.instance.clone(),
                        pid: rec.pid,
                        reason: ExitReason::Vanished,
                        stopped: false,
                    });
                }
            }
        }
        adopted
    }

    fn watch_adopted(
        &self,
        rec: InstanceRecord,
        cgroup: CgroupRoot,
        fd: OwnedFd,
    ) -> Result<InstanceInfo, SupervisorError> {
        if let (Some(acc), Ok(id)) = (&self.inner.accounting, cgroup.id()) {
            let _ = acc.watch(id);
        }
        self.watch(rec, cgroup, fd, false)
    }

    /// Stops every instance (agent shutdown with `stop_all`), then removes empty cgroups.
    pub async fn stop_all(&self, grace: Option<Duration>) {
        let keys: Vec<(String, String)> = self.instances().keys().cloned().collect();
        let mut tasks = Vec::new();
        for (app, instance) in keys {
            let s = self.clone();
            tasks.push(tokio::spawn(
                async move { s.stop(&app, &instance, grace).await },
            ));
        }
        for t in tasks {
            let _ = t.await;
        }
        let _ = self.inner.tree.prune(false);
    }

    /// The cgroup tree (for tests and for the agent's own status).
    pub fn tree(&self) -> &CgroupTree {
        &self.inner.tree
    }
}

/// Whether the record's process is still the one we started: same pid, same start time, in
/// our cgroup. Returns a pidfd on it if so. A pid now used by someone else is left alone.
fn identify(rec: &InstanceRecord) -> Option<OwnedFd> {
    let fd = pidfd::open(rec.pid).ok()?;
    // Checked after opening the pidfd, so the pidfd names the process that passed the checks.
    let same_start = procfs::start_time(rec.pid).ok()? == rec.start_time;
    let in_cgroup = procfs::in_v2_cgroup(rec.pid, &rec.cgroup_rel).unwrap_or(false);
    (same_start && in_cgroup && !pidfd::has_exited(&fd)).then_some(fd)
}

/// The instance cgroup's path as /proc/PID/cgroup shows it (relative to the v2 mount).
fn cgroup_rel(root: &CgroupRoot, cg: &CgroupRoot) -> PathBuf {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own_rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .to_string();
    // root.v2 = <mount><own_rel>[/...]; the mount is what remains when own_rel is removed.
    let root_str = root.v2.to_string_lossy().into_owned();
    let mount = find_mount(&root_str, &own_rel);
    let cg_str = cg.v2.to_string_lossy().into_owned();
    PathBuf::from(format!(
        "/{}",
        cg_str
            .strip_prefix(&mount)
            .unwrap_or(&cg_str)
            .trim_start_matches('/')
    ))
}

/// The v2 mount point, from the v2 path of a cgroup at or below this process's own.
fn find_mount(path: &str, own_rel: &str) -> String {
    let own = own_rel.trim_end_matches('/');
    if !own.is_empty()
        && let Some(i) = path.find(own)
    {
        return path[..i].to_string();
    }
    crate::cgroup::Layout::detect()
        .map(|l| l.v2_mount.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "/sys/fs/cgroup".into())
}

/// Kills what is left in an instance cgroup and removes it.
fn cleanup_cgroup(cg: &CgroupRoot) {
    if cg.v2.exists() {
        let _ = cg.kill_all();
        let _ = cg.wait_empty(Duration::from_secs(10));
    }
    let _ = cg.remove();
}

fn short(digest: &str) -> &str {
    let d = digest.strip_prefix("sha256:").unwrap_or(digest);
    &d[..d.len().min(12)]
}

async fn watch_exit(inner: Arc<Inner>, run: Arc<Running>, oom_before: u64) {
    // A pidfd polls readable once its process has exited.
    loop {
        match run.pidfd.readable().await {
            Ok(mut guard) => {
                if pidfd::has_exited(run.pidfd.get_ref()) {
                    break;
                }
                guard.clear_ready();
            }
            Err(e) => {
                tracing::warn!("waiting on the pidfd: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let cgroup_id = run.cgroup.id().ok();
    let status = if run.child {
        let fd = run.pidfd.clone();
        tokio::task::spawn_blocking(move || pidfd::wait(fd.get_ref(), false))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
    } else if let (Some(acc), Some(id)) = (&inner.accounting, cgroup_id) {
        // Not our child, so no waitid: eBPF saw the exit and kept its status.
        acc.exit_status(id, run.record.pid, Duration::from_millis(500))
            .await
            .map(pidfd::ExitStatus::from_wait_status)
    } else {
        None
    };
    let cg = run.cgroup.clone();
    let oom = cg.oom_kills() > oom_before;
    let reason = match status {
        Some(pidfd::ExitStatus::Signaled(libc::SIGKILL)) if oom => ExitReason::OomKilled,
        Some(pidfd::ExitStatus::Exited(c)) => ExitReason::Exited(c),
        Some(pidfd::ExitStatus::Signaled(s)) => ExitReason::Signaled(s),
        None if oom => ExitReason::OomKilled,
        None => ExitReason::Vanished,
    };
    // No process of the spore outlives its main process.
    let _ = tokio::task::spawn_blocking(move || cleanup_cgroup(&cg)).await;
    if let (Some(acc), Some(id)) = (&inner.accounting, cgroup_id) {
        acc.unwatch(id);
    }
    let rec = &run.record;
    let _ = InstanceRecord::remove(&inner.cfg.state_dir, &rec.app, &rec.instance);
    inner
        .instances
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&(rec.app.clone(), rec.instance.clone()));
    let stopped = run.stopping.load(Ordering::SeqCst);
    tracing::info!(pid = rec.pid, %reason, stopped, "instance ended");
    run.done.send_replace(Some(reason));
    let _ = inner.events.send(ExitEvent {
        app: rec.app.clone(),
        instance: rec.instance.clone(),
        pid: rec.pid,
        reason,
        stopped,
    });
}

async fn rotate_logs(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let dirs: Vec<PathBuf> = inner
            .instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|r| r.record.log_dir.clone())
            .collect();
        let (max, keep) = (inner.cfg.log_max_bytes, inner.cfg.log_keep);
        drop(inner);
        let _ = tokio::task::spawn_blocking(move || {
            for d in dirs {
                if let Err(e) = logs::rotate_if_large(&d, max, keep) {
                    tracing::warn!(dir = %d.display(), "log rotation: {e}");
                }
            }
        })
        .await;
    }
}
