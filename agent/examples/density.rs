//! Density driver for `cargo xtask bench density`: the real supervisor starts N `hello`
//! instances, each in its own cgroup with limits, and this measures how long until every port
//! accepts a connect and what that cost the supervising process.
//!
//! ```text
//! density N ROOT_NAME STATE_DIR RUN_DIR [CONCURRENCY [BASE_PORT]]
//! density --cleanup ROOT_NAME
//! ```
//!
//! RUN_DIR must hold `hello`, readable and executable by uid 65534. Prints one JSON line.
//! The cgroup root is created below this process's own cgroup (hybrid hosts) or beside it
//! (pure v2) and removed at the end, on error too; `--cleanup` removes one a killed run left.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mesh_agent::cgroup::{CgroupRoot, Layout, Limits, Mode};
use mesh_agent::supervisor::{StartSpec, Supervisor, SupervisorConfig};
use mesh_agent::users::Identity;
use mesh_common::manifest::{Compression, FileEntry, Manifest, Nutrients, Security, Slo};

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

const USAGE: &str = "usage: density N ROOT_NAME STATE_DIR RUN_DIR [CONCURRENCY [BASE_PORT]] | density --cleanup ROOT_NAME";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [flag, name] if flag == "--cleanup" => cgroup_root(name).map(|r| Tree(r).remove()),
        _ => Args::parse(&args).and_then(run),
    };
    if let Err(e) = result {
        eprintln!("density: {e}");
        std::process::exit(1);
    }
}

struct Args {
    n: usize,
    root: String,
    state_dir: PathBuf,
    run_dir: PathBuf,
    concurrency: usize,
    base_port: u16,
}

impl Args {
    fn parse(a: &[String]) -> Result<Args> {
        if !(4..=6).contains(&a.len()) {
            return Err(USAGE.into());
        }
        let num = |i: usize, what: &str, default: usize| -> Result<usize> {
            match a.get(i) {
                None => Ok(default),
                Some(s) => s
                    .parse()
                    .map_err(|_| format!("{what} {s:?}: not a number").into()),
            }
        };
        let args = Args {
            n: num(0, "N", 0)?,
            root: a[1].clone(),
            state_dir: PathBuf::from(&a[2]),
            run_dir: std::path::absolute(&a[3])?,
            concurrency: num(4, "CONCURRENCY", 32)?.max(1),
            base_port: u16::try_from(num(5, "BASE_PORT", 20_000)?)?,
        };
        if args.n == 0 || usize::from(args.base_port) + args.n > 65_535 {
            return Err(format!("N={} from port {} does not fit", args.n, args.base_port).into());
        }
        Ok(args)
    }
}

/// The root for this run: below our own cgroups on hybrid hosts; beside them in pure v2,
/// where our own cgroup holds processes and so cannot hand controllers down.
fn cgroup_root(name: &str) -> Result<CgroupRoot> {
    let layout = Layout::detect()?;
    let own = CgroupRoot::own(&layout);
    Ok(match (layout.mode, own.parent()) {
        (Mode::Unified, Some(parent)) if parent.v2.starts_with(&layout.v2_mount) => {
            parent.child(name)
        }
        _ => own.child(name),
    })
}

/// Our cgroup root; dropping it kills whatever is left inside and removes it bottom-up.
struct Tree(CgroupRoot);

impl Tree {
    fn remove(&self) {
        fn remove_dir(dir: &Path) {
            if !dir.exists() {
                return;
            }
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        remove_dir(&e.path());
                    }
                }
            }
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            for _ in 0..500 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            eprintln!("density: could not remove {}", dir.display());
        }
        // v2 first: its cgroup.kill ends the processes the v1 directories also hold.
        remove_dir(&self.0.v2);
        self.0.v1.values().for_each(|d| remove_dir(d));
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        self.remove();
    }
}

fn run(args: Args) -> Result<()> {
    if !args.run_dir.join("hello").is_file() {
        return Err(format!("{} holds no hello", args.run_dir.display()).into());
    }
    let root = cgroup_root(&args.root)?;
    root.create()?;
    let tree = Tree(root.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        tokio::select! {
            r = bench(&args, root) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    });
    drop(rt);
    drop(tree);
    println!("{}", result?);
    Ok(())
}

fn spec(i: usize, run_dir: &Path, base_port: u16) -> Result<StartSpec> {
    let manifest = Manifest {
        name: "hello".into(),
        version: "1.0.0".parse()?,
        command: "./hello".into(),
        args: Vec::new(),
        env: Default::default(),
        nutrients: Nutrients {
            cpu_milli: 100,
            memory_mb: 16,
            pids: 8,
        },
        slo: Slo {
            stop_grace_ms: 2000,
            ..Slo::default()
        },
        security: Security::default(),
        created_at: "2026-11-23T00:00:00Z".into(),
        compression: Compression::None,
        files: vec![FileEntry {
            path: "hello".into(),
            size: 0,
            mode: 0o755,
            sha256: mesh_common::Digest::of(b""),
        }],
    };
    Ok(StartSpec {
        app: "hello".into(),
        instance: format!("h{i}"),
        digest: "sha256:0123456789abcdef".into(),
        manifest,
        run_dir: run_dir.to_path_buf(),
        port: Some(base_port + i as u16),
        app_budget: Limits::default(),
    })
}

async fn bench(args: &Args, root: CgroupRoot) -> Result<serde_json::Value> {
    let pss_idle = pss_kib("self");
    let mem_before = (mem_used_kib(), kernel_kib());
    let mut cfg = SupervisorConfig::new(args.state_dir.clone(), root);
    cfg.users.explicit.insert(
        "mesh-spore".into(),
        Identity {
            uid: 65534,
            gid: 65534,
        },
    );
    let (sup, _exits) = Supervisor::new(cfg)?;
    let result = start_and_measure(&sup, args, pss_idle, mem_before).await;
    let t = Instant::now();
    sup.stop_all(Some(Duration::from_secs(2))).await;
    let _ = sup.tree().prune(true);
    let mut v = result?;
    v["stop_all_s"] = t.elapsed().as_secs_f64().into();
    Ok(v)
}

async fn start_and_measure(
    sup: &Supervisor,
    args: &Args,
    pss_idle: u64,
    mem_before: (u64, u64),
) -> Result<serde_json::Value> {
    let ports: Vec<u16> = (0..args.n).map(|i| args.base_port + i as u16).collect();
    let cpu0 = rusage_cpu_s();
    let t0 = Instant::now();
    // The port probe runs on a thread of its own so that its CPU can be told apart.
    let probe = std::thread::spawn(move || wait_serving(&ports));

    // `concurrency` workers take the next instance until all are started.
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.min(args.n) {
        let (sup, next) = (sup.clone(), next.clone());
        let (n, run_dir, base_port) = (args.n, args.run_dir.clone(), args.base_port);
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), Error>(());
                }
                sup.start(spec(i, &run_dir, base_port)?)
                    .await
                    .map_err(|e| format!("starting h{i}: {e}"))?;
            }
        });
    }
    let mut first_err = None;
    while let Some(r) = workers.join_next().await {
        if let Err(e) = r.map_err(Error::from).and_then(|r| r) {
            next.store(args.n, Ordering::Relaxed);
            first_err.get_or_insert(e);
        }
    }
    let started_s = t0.elapsed().as_secs_f64();
    if let Some(e) = first_err {
        // The caller stops what did start; the probe thread ends with the process.
        return Err(e);
    }
    let (serving, probe_cpu_s) = tokio::task::spawn_blocking(move || probe.join())
        .await?
        .map_err(|_| "the probe thread panicked")?;
    let serve_s = serving?;

    // The figures at the moment everything serves.
    let cpu_s = rusage_cpu_s() - cpu0 - probe_cpu_s;
    let pss = pss_kib("self");
    let (mem_used, kernel) = (mem_used_kib(), kernel_kib());
    let instances = sup.list();
    let inst_pss: u64 = instances
        .iter()
        .map(|i| pss_kib(&i.record.pid.to_string()))
        .sum();
    Ok(serde_json::json!({
        "n": args.n,
        "concurrency": args.concurrency,
        "mode": sup.mode().to_string(),
        "started_s": started_s,
        "serve_s": serve_s,
        "cpu_s": cpu_s,
        "probe_cpu_s": probe_cpu_s,
        "stat_cpu_s": stat_cpu_s(),
        "rss_kib": status_kib("VmRSS"),
        "pss_kib": pss,
        "pss_idle_kib": pss_idle,
        "threads": status_kib("Threads"),
        "instances": instances.len(),
        "instances_pss_kib": inst_pss,
        "mem_used_delta_kib": mem_used as i64 - mem_before.0 as i64,
        "kernel_delta_kib": kernel as i64 - mem_before.1 as i64,
    }))
}

/// Seconds from now until every port accepts a connect (an error once no new port came up
/// for 15 s), and this thread's CPU time in seconds. A light probe, so as not to steal a core
/// from what it measures: each round resumes where the last one stopped and ends after a few
/// refused connects.
fn wait_serving(ports: &[u16]) -> (std::result::Result<f64, String>, f64) {
    const REFUSALS_PER_ROUND: usize = 4;
    const STALL: Duration = Duration::from_secs(15);
    let t0 = Instant::now();
    let mut pending: Vec<u16> = ports.to_vec();
    let mut at = 0;
    let mut progress = Instant::now();
    let result = loop {
        let mut refused = 0;
        while refused < REFUSALS_PER_ROUND && !pending.is_empty() {
            at %= pending.len();
            let addr = SocketAddr::from(([127, 0, 0, 1], pending[at]));
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                pending.swap_remove(at);
                progress = Instant::now();
            } else {
                refused += 1;
                at += 1;
            }
        }
        if pending.is_empty() {
            break Ok(t0.elapsed().as_secs_f64());
        }
        if progress.elapsed() > STALL {
            break Err(format!(
                "only {} of {} ports accept; none more for {} s",
                ports.len() - pending.len(),
                ports.len(),
                STALL.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let cpu_ns: u64 = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (result, cpu_ns as f64 / 1e9)
}

/// User + system CPU of this process (all threads, live and ended), in seconds.
fn rusage_cpu_s() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a live rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// utime + stime from /proc/self/stat, in seconds (clock-tick resolution).
fn stat_cpu_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    // Fields 14 and 15; `after` starts at field 3.
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / hz
}

/// Pss of /proc/PID/smaps_rollup in KiB (0 if the process is gone).
fn pss_kib(pid: &str) -> u64 {
    field_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}

fn status_kib(key: &str) -> u64 {
    field_kib("/proc/self/status", &format!("{key}:"))
}

/// MemTotal - MemAvailable, in KiB.
fn mem_used_kib() -> u64 {
    let total = field_kib("/proc/meminfo", "MemTotal:");
    total.saturating_sub(field_kib("/proc/meminfo", "MemAvailable:"))
}

/// Kernel memory that grows with processes and cgroups: Slab + KernelStack + PageTables +
/// Percpu, in KiB.
fn kernel_kib() -> u64 {
    ["Slab:", "KernelStack:", "PageTables:", "Percpu:"]
        .iter()
        .map(|k| field_kib("/proc/meminfo", k))
        .sum()
}

fn field_kib(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
