//! eBPF accounting: loads mesh-ebpf's programs with aya, registers each instance's v2 cgroup
//! id, reads the in-kernel counters when asked (on scrape, never on a timer), and drains the
//! exec/exit ring buffer into exit statuses that survive agent restarts.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{MapData, PerCpuHashMap, PerCpuValues, RingBuf};
use aya::programs::{BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
use aya::util::nr_cpus;
use aya::{Btf, Ebpf, EbpfLoader, Pod};
use mesh_ebpf::{CgroupStats, EVENT_EXIT, Event};
use tokio::io::unix::AsyncFd;

/// `CgroupStats` as aya map values.
#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct Stats(CgroupStats);

// SAFETY: CgroupStats is #[repr(C)] plain integers: any bit pattern is valid, no padding.
unsafe impl Pod for Stats {}

#[derive(Debug, thiserror::Error)]
pub enum AccountingError {
    #[error("the kernel refused the eBPF programs: {0}")]
    Load(String),
    #[error("cgroup {0}: {1}")]
    Cgroup(String, std::io::Error),
    #[error("eBPF map: {0}")]
    Map(String),
}

/// One program's own cost, from the kernel's statistics (BPF_ENABLE_STATS).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgramCost {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl ProgramCost {
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.run_count > 0).then(|| self.run_time_ns as f64 / self.run_count as f64)
    }
}

/// What eBPF saw of a process exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitSeen {
    /// wait(2) status: (code << 8) | signal.
    pub status: i32,
    pub at: Instant,
}

struct Loaded {
    /// Owns the programs and their links: dropping it detaches everything.
    ebpf: Ebpf,
    stats: PerCpuHashMap<MapData, u64, Stats>,
    enable_stats: Option<OwnedFd>,
}

/// The loaded programs. Cheap to share (`Arc`).
pub struct Accounting {
    loaded: Mutex<Loaded>,
    /// (cgroup id, pid) -> exit seen, for a minute.
    exits: Mutex<HashMap<(u64, u32), ExitSeen>>,
    exit_seen: tokio::sync::Notify,
    cpus: usize,
    pub programs: Vec<String>,
}

const TRACEPOINTS: [(&str, &str); 5] = [
    ("mesh_sched_switch", "sched_switch"),
    ("mesh_sched_wakeup", "sched_wakeup"),
    ("mesh_sched_wakeup_new", "sched_wakeup_new"),
    ("mesh_exec", "sched_process_exec"),
    ("mesh_exit", "sched_process_exit"),
];

impl Accounting {
    /// Loads and attaches every program; the cgroup_skb pair is attached once, at
    /// `spores_v2` (the parent of every spore's cgroup). Must run inside a tokio runtime
    /// (the ring buffer reader is a task).
    pub fn load(spores_v2: &Path) -> Result<Arc<Accounting>, AccountingError> {
        let load_err = |e: &dyn std::fmt::Display| AccountingError::Load(e.to_string());
        let btf = Btf::from_sys_fs().map_err(|e| {
            AccountingError::Load(format!("no kernel BTF at /sys/kernel/btf/vmlinux ({e})"))
        })?;
        // task-local storage (the run-queue timestamps) has no typed wrapper in aya; the
        // kernel creates it like any other map
        let mut ebpf = EbpfLoader::new()
            .allow_unsupported_maps()
            .load(mesh_ebpf::OBJECT)
            .map_err(|e| load_err(&e))?;
        let mut programs = Vec::new();
        for (name, tp) in TRACEPOINTS {
            let prog: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| AccountingError::Load(format!("program {name} missing")))?
                .try_into()
                .map_err(|e| load_err(&e))?;
            prog.load(tp, &btf)
                .map_err(|e| AccountingError::Load(format!("{name}: {e}")))?;
            prog.attach()
                .map_err(|e| AccountingError::Load(format!("attach {name} to {tp}: {e}")))?;
            programs.push(name.to_string());
        }
        let cgroup = std::fs::File::open(spores_v2)
            .map_err(|e| AccountingError::Cgroup(spores_v2.display().to_string(), e))?;
        for (name, kind) in [
            ("mesh_skb_ingress", CgroupSkbAttachType::Ingress),
            ("mesh_skb_egress", CgroupSkbAttachType::Egress),
        ] {
            let prog: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or_else(|| AccountingError::Load(format!("program {name} missing")))?
                .try_into()
                .map_err(|e| load_err(&e))?;
            prog.load()
                .map_err(|e| AccountingError::Load(format!("{name}: {e}")))?;
            prog.attach(&cgroup, kind, CgroupAttachMode::Single)
                .map_err(|e| {
                    AccountingError::Load(format!("attach {name} to {}: {e}", spores_v2.display()))
                })?;
            programs.push(name.to_string());
        }
        let stats_map = ebpf
            .take_map("cgroup_stats")
            .ok_or_else(|| AccountingError::Map("cgroup_stats missing".into()))?;
        let stats = PerCpuHashMap::try_from(stats_map).map_err(|e| load_err(&e))?;
        let ring = ebpf
            .take_map("events")
            .ok_or_else(|| AccountingError::Map("events missing".into()))?;
        let ring = RingBuf::try_from(ring).map_err(|e| load_err(&e))?;
        let cpus =
            nr_cpus().map_err(|(_, e)| AccountingError::Map(format!("possible CPUs: {e}")))?;
        let acc = Arc::new(Accounting {
            loaded: Mutex::new(Loaded {
                ebpf,
                stats,
                enable_stats: None,
            }),
            exits: Mutex::new(HashMap::new()),
            exit_seen: tokio::sync::Notify::new(),
            cpus,
            programs,
        });
        // SAFETY: the RingBuf owns its map fd for its whole life and always returns it; the
        // AsyncFd owns the RingBuf.
        let reader =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| {
                    AccountingError::Map(format!("ring buffer fd: {}", std::io::Error::from(e)))
                })?;
        tokio::spawn(read_events(Arc::downgrade(&acc), reader));
        Ok(acc)
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count this cgroup from now on (before its first process starts, to see its exec).
    pub fn watch(&self, cgroup_id: u64) -> Result<(), AccountingError> {
        let values = PerCpuValues::try_from(vec![Stats::default(); self.cpus])
            .map_err(|e| AccountingError::Map(e.to_string()))?;
        // BPF_NOEXIST: re-watching (an adoption) keeps what was counted.
        match self.loaded().stats.insert(cgroup_id, values, 1) {
            Ok(()) => Ok(()),
            Err(e) if e.to_string().contains("File exists") => Ok(()),
            Err(e) => Err(AccountingError::Map(format!(
                "watch cgroup {cgroup_id}: {e}"
            ))),
        }
    }

    pub fn unwatch(&self, cgroup_id: u64) {
        let _ = self.loaded().stats.remove(&cgroup_id);
    }

    /// The cgroup's counters summed over CPUs (None if it is not watched).
    pub fn stats(&self, cgroup_id: u64) -> Option<CgroupStats> {
        let per_cpu = self.loaded().stats.get(&cgroup_id, 0).ok()?;
        let mut sum = CgroupStats::default();
        for v in per_cpu.iter() {
            sum.add(&v.0);
        }
        Some(sum)
    }

    /// Turns the kernel's per-program run time statistics on or off (they cost a little on
    /// every run, so they are on only while someone asks).
    pub fn set_cost_stats(&self, on: bool) -> Result<(), AccountingError> {
        let mut l = self.loaded();
        if on && l.enable_stats.is_none() {
            let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .map_err(|e| AccountingError::Load(format!("BPF_ENABLE_STATS: {e}")))?;
            l.enable_stats = Some(fd);
        } else if !on {
            l.enable_stats = None;
        }
        Ok(())
    }

    pub fn cost_stats_enabled(&self) -> bool {
        self.loaded().enable_stats.is_some()
    }

    /// Run count and time of each program (zero unless cost stats were enabled).
    pub fn costs(&self) -> Vec<ProgramCost> {
        let l = self.loaded();
        l.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some(ProgramCost {
                    name: name.to_string(),
                    run_count: info.run_count(),
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                })
            })
            .collect()
    }

    /// The exit status eBPF saw for `pid` in `cgroup_id`, waiting up to `wait` for the ring
    /// buffer to deliver it.
    pub async fn exit_status(&self, cgroup_id: u64, pid: u32, wait: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.exit_seen.notified();
            if let Some(e) = self
                .exits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(cgroup_id, pid))
            {
                return Some(e.status);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    fn record(&self, e: &Event) {
        if e.kind == EVENT_EXIT {
            let mut exits = self.exits.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            exits.retain(|_, x| now.duration_since(x.at) < Duration::from_secs(60));
            exits.insert(
                (e.cgroup_id, e.pid),
                ExitSeen {
                    status: e.exit_code,
                    at: now,
                },
            );
            drop(exits);
            self.exit_seen.notify_waiters();
            tracing::debug!(pid = e.pid, cgroup = e.cgroup_id, code = ?e.code(), signal = ?e.signal(), comm = %e.comm(), "exit");
        } else {
            tracing::debug!(pid = e.pid, ppid = e.ppid, cgroup = e.cgroup_id, file = %e.filename(), "exec");
        }
    }
}

async fn read_events(acc: std::sync::Weak<Accounting>, mut ring: AsyncFd<RingBuf<MapData>>) {
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!("eBPF ring buffer: {e}");
                return;
            }
        };
        let Some(acc) = acc.upgrade() else { return };
        let rb = guard.get_inner_mut();
        while let Some(item) = rb.next() {
            if let Some(e) = Event::from_bytes(&item) {
                acc.record(&e);
            }
        }
        guard.clear_ready();
    }
}
