//! cgroups of the agent and its spores.
//!
//! ```text
//! <root>/mycelium/agent                     the agent itself (daemon mode)
//! <root>/mycelium/spores/<app>              the app's budget
//! <root>/mycelium/spores/<app>/<instance>   one instance: its nutrients, its processes
//! ```
//!
//! `<root>` is the cgroup the agent was started in (a systemd unit with Delegate=yes), or one a
//! test created. Processes live only in leaves. On hybrid hosts the same tree exists in the v2
//! hierarchy (placement, cgroup id, cgroup.kill) and in each v1 controller (limits).

pub mod layout;
pub mod limits;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use layout::{Layout, Mode};
pub use limits::Limits;

/// Where a tree of ours starts, in v2 and (hybrid) in each v1 controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRoot {
    pub mode: Mode,
    pub v2: PathBuf,
    pub v1: BTreeMap<String, PathBuf>,
}

impl CgroupRoot {
    /// This process's own cgroups (what a delegated systemd unit gets).
    pub fn own(layout: &Layout) -> CgroupRoot {
        CgroupRoot {
            mode: layout.mode,
            v2: layout.v2_self_dir(),
            v1: layout
                .v1
                .iter()
                .map(|(c, (mount, own))| (c.clone(), layout::join_cgroup(mount, own)))
                .collect(),
        }
    }

    /// A new cgroup `name` under this root (created by the caller with [`CgroupRoot::create`]).
    pub fn child(&self, name: &str) -> CgroupRoot {
        CgroupRoot {
            mode: self.mode,
            v2: self.v2.join(name),
            v1: self
                .v1
                .iter()
                .map(|(c, p)| (c.clone(), p.join(name)))
                .collect(),
        }
    }

    /// Where a new root named `name` for a tree of ours goes: below this process's own
    /// cgroup, except in pure v2 when that cgroup holds processes (this one) and is not the
    /// hierarchy's root: such a cgroup cannot hand controllers down, so the new root goes
    /// beside it.
    pub fn new_root(layout: &Layout, name: &str) -> CgroupRoot {
        let own = CgroupRoot::own(layout);
        let own_is_root = layout.v2_self == Path::new("/");
        match (layout.mode, own.parent()) {
            (Mode::Unified, Some(parent)) if !own_is_root => parent.child(name),
            _ => own.child(name),
        }
    }

    /// The parent of this root (for tests that need a cgroup beside their own).
    pub fn parent(&self) -> Option<CgroupRoot> {
        Some(CgroupRoot {
            mode: self.mode,
            v2: self.v2.parent()?.to_path_buf(),
            v1: self
                .v1
                .iter()
                .map(|(c, p)| p.parent().map(|pp| (c.clone(), pp.to_path_buf())))
                .collect::<Option<_>>()?,
        })
    }

    fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.v2).chain(self.v1.values())
    }

    /// Creates the cgroup in every hierarchy (fine if it exists).
    pub fn create(&self) -> io::Result<()> {
        for d in self.dirs() {
            match std::fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("creating cgroup {}: {e}", d.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// In unified mode, lets children use cpu, memory and pids (the cgroup must hold no
    /// processes). Hybrid hierarchies need nothing.
    pub fn enable_controllers(&self) -> io::Result<()> {
        if self.mode != Mode::Unified {
            return Ok(());
        }
        let f = self.v2.join("cgroup.subtree_control");
        std::fs::write(&f, "+cpu +memory +pids").map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: {e} (does the cgroup hold processes?)", f.display()),
            )
        })
    }

    /// Applies limits with whichever controllers this host has.
    pub fn apply(&self, l: &Limits) -> io::Result<()> {
        match self.mode {
            Mode::Unified => limits::ALL.iter().try_for_each(|c| c.apply_v2(&self.v2, l)),
            Mode::Hybrid => limits::ALL
                .iter()
                .try_for_each(|c| match self.v1.get(c.name()) {
                    Some(dir) => c.apply_v1(dir, l),
                    None => Ok(()),
                }),
        }
    }

    /// Moves a process into this cgroup in every hierarchy.
    pub fn add_process(&self, pid: u32) -> io::Result<()> {
        for d in self.dirs() {
            let f = d.join("cgroup.procs");
            std::fs::write(&f, pid.to_string())
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", f.display())))?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files of the v1 hierarchies (the spawner places a child there).
    pub fn v1_procs_files(&self) -> Vec<PathBuf> {
        self.v1.values().map(|d| d.join("cgroup.procs")).collect()
    }

    /// An O_PATH descriptor of the v2 directory, for clone3's CLONE_INTO_CGROUP.
    pub fn open_v2(&self) -> io::Result<OwnedFd> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&self.v2)?;
        Ok(f.into())
    }

    /// The v2 cgroup id (the directory's inode): what eBPF programs see.
    pub fn id(&self) -> io::Result<u64> {
        Ok(std::fs::metadata(&self.v2)?.ino())
    }

    /// Pids in the v2 cgroup (not its children).
    pub fn procs(&self) -> io::Result<Vec<u32>> {
        Ok(std::fs::read_to_string(self.v2.join("cgroup.procs"))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// Whether any process is left in the cgroup or below it.
    pub fn populated(&self) -> io::Result<bool> {
        let events = std::fs::read_to_string(self.v2.join("cgroup.events"))?;
        Ok(events.lines().any(|l| l == "populated 1"))
    }

    /// OOM kills inside this cgroup so far.
    pub fn oom_kills(&self) -> u64 {
        let (path, key) = match self.mode {
            Mode::Unified => (self.v2.join("memory.events"), "oom_kill"),
            Mode::Hybrid => match self.v1.get("memory") {
                Some(d) => (d.join("memory.oom_control"), "oom_kill"),
                None => return 0,
            },
        };
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// What the cgroup files say about this cgroup now: v2's cpu.stat (present without
    /// controllers too), memory and pids from v2 or, on hybrid hosts, from v1.
    pub fn usage(&self) -> Usage {
        let read = |p: PathBuf| std::fs::read_to_string(p).ok();
        let num = |p: PathBuf| read(p).and_then(|t| t.trim().parse::<u64>().ok());
        let keyed = |p: PathBuf, key: &str| {
            read(p).and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
            })
        };
        let cpu_usec = keyed(self.v2.join("cpu.stat"), "usage_usec ");
        let (memory, memory_peak, pids) = match self.mode {
            Mode::Unified => (
                num(self.v2.join("memory.current")),
                num(self.v2.join("memory.peak")),
                num(self.v2.join("pids.current")),
            ),
            Mode::Hybrid => (
                self.v1
                    .get("memory")
                    .and_then(|d| num(d.join("memory.usage_in_bytes"))),
                self.v1
                    .get("memory")
                    .and_then(|d| num(d.join("memory.max_usage_in_bytes"))),
                self.v1
                    .get("pids")
                    .and_then(|d| num(d.join("pids.current"))),
            ),
        };
        Usage {
            cpu_usec,
            memory,
            memory_peak,
            pids,
            oom_kills: self.oom_kills(),
        }
    }

    /// How often the CPU limit throttled this cgroup (cpu.stat nr_throttled).
    pub fn cpu_throttled(&self) -> u64 {
        let dir = match self.mode {
            Mode::Unified => Some(&self.v2),
            Mode::Hybrid => self.v1.get("cpu"),
        };
        dir.and_then(|d| std::fs::read_to_string(d.join("cpu.stat")).ok())
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("nr_throttled ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// SIGKILLs every process in the cgroup and below, atomically where the kernel has
    /// cgroup.kill (5.14+); otherwise kills what cgroup.procs lists until nothing is left.
    pub fn kill_all(&self) -> io::Result<()> {
        let kill_file = self.v2.join("cgroup.kill");
        if kill_file.exists() {
            return std::fs::write(&kill_file, "1");
        }
        for _ in 0..100 {
            let pids = self.procs()?;
            if pids.is_empty() {
                return Ok(());
            }
            for pid in pids {
                // SAFETY: kill(2) with a pid read from our own cgroup's procs file; on this
                // old-kernel path there is no pidfd-based alternative for arbitrary members.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(io::Error::other(format!(
            "{}: processes keep appearing",
            self.v2.display()
        )))
    }

    /// Waits until the cgroup is empty, up to `timeout`.
    pub fn wait_empty(&self, timeout: Duration) -> io::Result<bool> {
        let end = Instant::now() + timeout;
        loop {
            if !self.populated()? {
                return Ok(true);
            }
            if Instant::now() >= end {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills every process in this cgroup and below it, then removes it and every cgroup
    /// below it from every hierarchy, children first. Only processes inside the tree are
    /// touched: `1` goes to each `cgroup.kill` (before 5.14: SIGKILL to the pids each
    /// `cgroup.procs` lists). Fine if the cgroup does not exist.
    pub fn remove_tree(&self) -> io::Result<()> {
        if self.v2.is_dir() {
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                for d in dirs_bottom_up(&self.v2) {
                    let kill = d.join("cgroup.kill");
                    if kill.exists() {
                        let _ = std::fs::write(&kill, "1");
                    } else {
                        let procs =
                            std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                            // SAFETY: kill(2) of a process listed as a member of this tree
                            // (kernels before 5.14 have no cgroup.kill).
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                }
                if !self.populated().unwrap_or(false) {
                    break;
                }
                if Instant::now() >= end {
                    return Err(io::Error::other(format!(
                        "{}: processes left 30 s after cgroup.kill",
                        self.v2.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for top in self.dirs() {
            for d in dirs_bottom_up(top) {
                // A cgroup whose last process just died can be busy for a moment.
                let end = Instant::now() + Duration::from_secs(10);
                loop {
                    match std::fs::remove_dir(&d) {
                        Ok(()) => break,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                        Err(e) if Instant::now() < end && e.raw_os_error() == Some(libc::EBUSY) => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            return Err(io::Error::new(
                                e.kind(),
                                format!("removing cgroup {}: {e}", d.display()),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes the (empty) cgroup from every hierarchy; missing ones are fine.
    pub fn remove(&self) -> io::Result<()> {
        for d in self.dirs() {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("removing cgroup {}: {e}", d.display()),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A cgroup's resource use from its files (None: the file is not there in this mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub cpu_usec: Option<u64>,
    pub memory: Option<u64>,
    pub memory_peak: Option<u64>,
    pub pids: Option<u64>,
    pub oom_kills: u64,
}

/// The agent's tree under a root.
#[derive(Debug, Clone)]
pub struct CgroupTree {
    root: CgroupRoot,
    base: CgroupRoot,
    /// The budget last written to each app's cgroup.
    applied: std::sync::Arc<std::sync::Mutex<BTreeMap<String, Limits>>>,
}

impl CgroupTree {
    /// Creates `<root>/mycelium/{agent,spores}`. With `move_self`, moves this process into
    /// `agent` first so that `<root>` holds no processes and can delegate controllers.
    pub fn setup(root: CgroupRoot, move_self: bool) -> io::Result<CgroupTree> {
        let base = root.child("mycelium");
        base.create()?;
        let agent = base.child("agent");
        agent.create()?;
        if move_self {
            agent.add_process(std::process::id())?;
        }
        // The root hands the controllers down (it holds no processes: a fresh cgroup, or the
        // agent's own once the agent moved out).
        root.enable_controllers()?;
        base.enable_controllers()?;
        let spores = base.child("spores");
        spores.create()?;
        spores.enable_controllers()?;
        Ok(CgroupTree {
            root,
            base,
            applied: Default::default(),
        })
    }

    pub fn root(&self) -> &CgroupRoot {
        &self.root
    }

    /// `spores/<app>` with the app's budget (created if needed). The budget is written only
    /// when it changed: a CPU limit write walks the whole cgroup tree in the kernel, so
    /// rewriting it on every start would make starts slower as instances accumulate.
    pub fn app(&self, app: &str, budget: &Limits) -> io::Result<CgroupRoot> {
        let cg = self.base.child("spores").child(app);
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if applied.get(app) == Some(budget) && cg.v2.is_dir() {
            return Ok(cg);
        }
        cg.create()?;
        cg.enable_controllers().or_else(|e| {
            if cg.mode == Mode::Unified {
                Err(e)
            } else {
                Ok(())
            }
        })?;
        cg.apply(budget)?;
        applied.insert(app.to_string(), *budget);
        Ok(cg)
    }

    /// `spores`: the parent of every app's cgroup.
    pub fn spores(&self) -> CgroupRoot {
        self.base.child("spores")
    }

    /// `spores/<app>/<instance>` (the app's cgroup must exist).
    pub fn instance(&self, app: &str, instance: &str) -> CgroupRoot {
        self.base.child("spores").child(app).child(instance)
    }

    /// Removes app cgroups without instances, then the tree itself if `all` (agent stop).
    pub fn prune(&self, all: bool) -> io::Result<()> {
        let spores = self.base.child("spores");
        if let Ok(apps) = std::fs::read_dir(&spores.v2) {
            for a in apps.flatten().filter(|e| e.path().is_dir()) {
                let name = a.file_name().to_string_lossy().into_owned();
                let app = spores.child(&name);
                let has_instances = std::fs::read_dir(&app.v2)
                    .map(|d| d.flatten().any(|e| e.path().is_dir()))
                    .unwrap_or(false);
                if !has_instances {
                    let _ = app.remove();
                }
            }
        }
        if all {
            let _ = spores.remove();
            let _ = self.base.child("agent").remove();
            let _ = self.base.remove();
        }
        Ok(())
    }
}

/// `dir` and every directory below it, children before their parents.
fn dirs_bottom_up(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        if dir.is_dir() {
            out.push(dir.to_path_buf());
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

/// Whether `path` looks like a cgroup v2 directory (tests use temp dirs instead).
pub fn is_cgroup_v2(path: &Path) -> bool {
    path.join("cgroup.procs").exists() && path.join("cgroup.events").exists()
}
