//! `cargo xtask bench density`: how fast N `hello` instances all serve, and what supervising
//! them costs, for the mesh supervisor (agent/examples/density.rs: the real library, one
//! cgroup with limits per instance) side by side with a bare fork+exec loop, supervisord, s6
//! and runit. Needs root. The workload and the figures are those of shared/baselines.md
//! ("Supervisors (density and spawn)").
//!
//! Everything started here descends from this process, which is made a child subreaper so that
//! orphans stay ours; after each run every descendant is killed through a pidfd and reaped,
//! and the ports are checked to be free again.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, workspace_root};

const BASE_PORT: u16 = 20_000;
/// (N, runs): medians of 3 where it is cheap; the largest N once.
const SIZES: [(usize, usize); 3] = [(100, 3), (1000, 3), (5000, 1)];
/// Concurrent starts in the mesh driver (the sweep below shows why).
const CONCURRENCY: usize = 32;
const SWEEP: [usize; 4] = [1, 8, 32, 128];
/// A run that brings up no new port for this long has hit a limit.
const STALL: Duration = Duration::from_secs(15);
const CGROUP_NAME: &str = "mesh-bench-density";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Peer {
    Mesh,
    Bare,
    Supervisord,
    S6,
    Runit,
}

const PEERS: [Peer; 5] = [
    Peer::Mesh,
    Peer::Bare,
    Peer::Supervisord,
    Peer::S6,
    Peer::Runit,
];

/// One run's figures, taken at the moment every port accepts.
#[derive(Clone, Debug, Default)]
struct Sample {
    serve_s: f64,
    /// CPU of the supervising processes from their start until all serve.
    cpu_s: f64,
    /// Sum of PSS of the supervising processes.
    pss_kib: f64,
    procs: f64,
    instances_pss_kib: f64,
    /// MemTotal - MemAvailable, at all serving minus before the start.
    mem_delta_kib: f64,
    /// The same for Slab + KernelStack + PageTables + Percpu.
    kernel_delta_kib: f64,
}

struct Ctx {
    dir: PathBuf,
    hello: PathBuf,
    run_dir: PathBuf,
    density: PathBuf,
    supervisord: Result<PathBuf, String>,
    s6: Result<PathBuf, String>,
    runit: Result<PathBuf, String>,
    /// The limit on open files every peer inherits.
    nofile: u64,
}

pub fn run() -> Result<()> {
    // A debug xtask would slow the bare loop and the port probe; run from a release build.
    if let Some(result) = crate::bench::in_release("density") {
        return result;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench density needs root (cgroups, users, apt-get)");
    }
    cargo(&[
        "build",
        "--release",
        "--locked",
        "-p",
        "mesh-agent",
        "-p",
        "mesh-example-hello",
        "--example",
        "density",
    ])?;
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) on ourselves; no pointers.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        bail!(
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            std::io::Error::last_os_error()
        );
    }
    // supervisord holds ~5 descriptors per program; every peer inherits the same limit.
    let nofile = raise_nofile()?;
    let ctx = prepare(nofile)?;

    let mut samples: BTreeMap<(usize, Peer), Vec<Sample>> = BTreeMap::new();
    let mut failures: BTreeMap<(usize, Peer), String> = BTreeMap::new();
    for (n, runs) in SIZES {
        let avail = field_kib("/proc/meminfo", "MemAvailable:");
        // ~250 KiB per instance across the peers measured here, with room to spare.
        if avail < (n as u64) * 1024 + (2 << 20) {
            for p in PEERS {
                failures.insert((n, p), format!("skipped: {avail} KiB available"));
            }
            continue;
        }
        for run in 0..runs {
            for peer in PEERS {
                if failures.contains_key(&(n, peer)) {
                    continue;
                }
                eprintln!("density: N={n} {peer:?} run {}/{runs}", run + 1);
                match run_once(&ctx, peer, n, CONCURRENCY) {
                    Ok(s) => samples.entry((n, peer)).or_default().push(s),
                    Err(e) => {
                        eprintln!("density: N={n} {peer:?}: {e:#}");
                        failures.insert((n, peer), format!("{e:#}"));
                    }
                }
            }
        }
    }
    let mut sweep_rows = Vec::new();
    for c in SWEEP {
        eprintln!("density: N=1000 mesh, concurrency {c}");
        sweep_rows.push((c, run_once(&ctx, Peer::Mesh, 1000, c)));
    }
    let report = report(&ctx, &samples, &failures, &sweep_rows);
    print!("{report}");
    fs::write(ctx.dir.join("report.md"), &report)?;
    eprintln!("written to {}", ctx.dir.join("report.md").display());
    Ok(())
}

/// The bench dir, hello copied where uid 65534 can run it, and the peers (installed if
/// missing; an error string says why one is not available here).
fn prepare(nofile: u64) -> Result<Ctx> {
    let root = workspace_root();
    let dir = root.join("target/bench/density");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let run_dir = dir.join("run");
    fs::create_dir_all(&run_dir)?;
    // The spores run as nobody: every directory down to hello must be searchable.
    for d in [
        root.clone(),
        root.join("target"),
        root.join("target/bench"),
        dir.clone(),
        run_dir.clone(),
    ] {
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod 0755 {}", d.display()))?;
    }
    let hello = run_dir.join("hello");
    fs::copy(root.join("target/release/hello"), &hello).context("copying hello")?;
    fs::set_permissions(&hello, fs::Permissions::from_mode(0o755))?;
    Ok(Ctx {
        supervisord: install_supervisord(&dir),
        s6: apt_tool("s6", "s6-svscan"),
        runit: apt_tool("runit", "runsvdir"),
        density: root.join("target/release/examples/density"),
        hello,
        run_dir,
        dir,
        nofile,
    })
}

fn install_supervisord(dir: &Path) -> Result<PathBuf, String> {
    let venv = dir.join("venv");
    let bin = venv.join("bin/supervisord");
    if bin.exists() {
        return Ok(bin);
    }
    let ok = |cmd: &mut Command| cmd.status().map(|s| s.success()).unwrap_or(false);
    if !ok(Command::new("python3").arg("-m").arg("venv").arg(&venv)) {
        return Err("not available here (python3 -m venv failed)".into());
    }
    if !ok(Command::new(venv.join("bin/pip")).args(["install", "-q", "supervisor"])) {
        return Err("not available here (pip install supervisor failed)".into());
    }
    Ok(bin)
}

/// The path of `tool`, from Debian's package `pkg` if missing.
fn apt_tool(pkg: &str, tool: &str) -> Result<PathBuf, String> {
    let find = || {
        ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let install = ["install", "-y", "-qq", "--no-install-recommends", pkg];
    let installed = apt(&install) || (apt(&["update", "-qq"]) && apt(&install));
    if !installed {
        return Err(format!("not available here (apt-get install {pkg} failed)"));
    }
    find().ok_or_else(|| format!("not available here ({pkg} has no {tool})"))
}

fn ports(n: usize) -> Vec<u16> {
    (0..n).map(|i| BASE_PORT + i as u16).collect()
}

/// One run of one peer; leaves nothing running whatever happens.
fn run_once(ctx: &Ctx, peer: Peer, n: usize, concurrency: usize) -> Result<Sample> {
    let result = match peer {
        Peer::Mesh => mesh(ctx, n, concurrency),
        Peer::Bare => bare(ctx, n),
        _ => external(ctx, peer, n),
    };
    sweep();
    ports_free(n)?;
    result
}

fn mesh(ctx: &Ctx, n: usize, concurrency: usize) -> Result<Sample> {
    let state = ctx.dir.join("mesh-state");
    let _ = fs::remove_dir_all(&state);
    let out = Command::new(&ctx.density)
        .arg(n.to_string())
        .arg(CGROUP_NAME)
        .arg(&state)
        .arg(&ctx.run_dir)
        .arg(concurrency.to_string())
        .arg(BASE_PORT.to_string())
        .stderr(Stdio::inherit())
        .output()
        .context("running the density driver");
    // Whatever a failed driver left in its cgroups.
    let _ = Command::new(&ctx.density)
        .args(["--cleanup", CGROUP_NAME])
        .status();
    let out = out?;
    if !out.status.success() {
        bail!("the density driver failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("the driver's output {text:?}"))?;
    let f = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("no {k} in the driver's output"))
    };
    if f("instances")? as usize != n {
        bail!("{} of {n} instances running", f("instances")?);
    }
    Ok(Sample {
        serve_s: f("serve_s")?,
        cpu_s: f("cpu_s")?,
        pss_kib: f("pss_kib")?,
        procs: 1.0,
        instances_pss_kib: f("instances_pss_kib")?,
        mem_delta_kib: f("mem_used_delta_kib")?,
        kernel_delta_kib: f("kernel_delta_kib")?,
    })
}

/// The floor: this process spawns N hello with std::process::Command, no cgroups.
fn bare(ctx: &Ctx, n: usize) -> Result<Sample> {
    let hello = ctx.hello.clone();
    let (mem0, kernel0) = (mem_used_kib(), kernel_kib());
    let t0 = Instant::now();
    let spawner = std::thread::spawn(move || {
        let mut children = Vec::with_capacity(n);
        for port in ports(n) {
            let child = Command::new(&hello)
                .env_clear()
                .env("PORT", port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            match child {
                Ok(c) => children.push(c),
                Err(e) => return (Err(e), thread_cpu_s()),
            }
        }
        (Ok(children), thread_cpu_s())
    });
    let served = wait_serving(&ports(n), t0);
    let (children, cpu_s) = spawner
        .join()
        .map_err(|_| anyhow::anyhow!("the spawner panicked"))?;
    let children = children.context("spawning hello")?;
    let sample = served.map(|serve_s| Sample {
        serve_s,
        cpu_s,
        pss_kib: pss_kib(std::process::id()),
        procs: 1.0,
        instances_pss_kib: children.iter().map(|c| pss_kib(c.id())).sum(),
        mem_delta_kib: mem_used_kib() - mem0,
        kernel_delta_kib: kernel_kib() - kernel0,
    });
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    sample
}

/// supervisord, s6-svscan or runsvdir over N services running hello on their own port.
fn external(ctx: &Ctx, peer: Peer, n: usize) -> Result<Sample> {
    let dir = ctx.dir.join(format!("{peer:?}").to_lowercase());
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let hello = ctx.hello.display();
    let not_here = |r: &Result<PathBuf, String>| r.clone().map_err(|e| anyhow::anyhow!(e));
    // The command, and the signal that asks it to stop everything.
    let (mut cmd, stop_signal) = match peer {
        Peer::Supervisord => {
            let bin = not_here(&ctx.supervisord)?;
            let logs = dir.join("logs");
            fs::create_dir_all(&logs)?;
            let mut conf = format!(
                "[supervisord]\nnodaemon=true\nlogfile={d}/supervisord.log\n\
                 pidfile={d}/supervisord.pid\nchildlogdir={l}\nminfds={fds}\nminprocs={procs}\n",
                d = dir.display(),
                l = logs.display(),
                fds = (5 * n as u64 + 256).min(ctx.nofile),
                procs = n + 200,
            );
            for (i, port) in ports(n).into_iter().enumerate() {
                let _ = write!(
                    conf,
                    "\n[program:h{i}]\ncommand={hello}\nenvironment=PORT=\"{port}\"\nautorestart=true\n"
                );
            }
            let path = dir.join("supervisord.conf");
            fs::write(&path, conf)?;
            let mut c = Command::new(bin);
            c.arg("-c").arg(path);
            (c, libc::SIGTERM)
        }
        Peer::S6 | Peer::Runit => {
            let scan = dir.join("scan");
            for (i, port) in ports(n).into_iter().enumerate() {
                let svc = scan.join(format!("h{i}"));
                fs::create_dir_all(&svc)?;
                let run = svc.join("run");
                fs::write(&run, format!("#!/bin/sh\nPORT={port} exec {hello}\n"))?;
                fs::set_permissions(&run, fs::Permissions::from_mode(0o755))?;
            }
            // runsvdir puts off scanning a directory changed within the current second; a
            // real scan dir is older than that.
            let past = std::time::SystemTime::now() - Duration::from_secs(10);
            fs::File::open(&scan)?.set_modified(past)?;
            if peer == Peer::S6 {
                // Its default is at most 500 services.
                let mut c = Command::new(not_here(&ctx.s6)?);
                c.arg("-c").arg((n + 16).to_string()).arg(&scan);
                (c, libc::SIGTERM)
            } else {
                // runsvdir: HUP = TERM each runsv, then exit (a runsv then waits for its
                // service, which the sweep ends).
                let mut c = Command::new(not_here(&ctx.runit)?);
                c.arg(&scan);
                (c, libc::SIGHUP)
            }
        }
        Peer::Mesh | Peer::Bare => bail!("{peer:?} is not an external supervisor"),
    };
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let (mem0, kernel0) = (mem_used_kib(), kernel_kib());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {peer:?}"))?;
    let sample = wait_serving(&ports(n), t0).map(|serve_s| {
        let all = descendants(child.id());
        let (inst, sup): (Vec<u32>, Vec<u32>) = all
            .into_iter()
            .partition(|p| fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == ctx.hello));
        Sample {
            serve_s,
            cpu_s: sup.iter().map(|p| proc_cpu_s(*p)).sum(),
            pss_kib: sup.iter().map(|p| pss_kib(*p)).sum(),
            procs: sup.len() as f64,
            instances_pss_kib: inst.iter().map(|p| pss_kib(*p)).sum(),
            mem_delta_kib: mem_used_kib() - mem0,
            kernel_delta_kib: kernel_kib() - kernel0,
        }
    });
    // Ask politely, give it time to stop its services, then the sweep ends what is left.
    // SAFETY: kill(2) on our own unreaped child: its pid cannot have been reused.
    unsafe { libc::kill(child.id() as libc::pid_t, stop_signal) };
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    sample
}

/// Seconds since `t0` until every port accepts a connect. A light probe, so as not to steal
/// a core from what it measures: each round resumes where the last one stopped and ends after a
/// few refused connects. Fails once no new port came up for [`STALL`].
fn wait_serving(ports: &[u16], t0: Instant) -> Result<f64> {
    const REFUSALS_PER_ROUND: usize = 4;
    let mut pending: Vec<u16> = ports.to_vec();
    let mut at = 0;
    let mut progress = Instant::now();
    loop {
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
            return Ok(t0.elapsed().as_secs_f64());
        }
        if progress.elapsed() > STALL {
            bail!(
                "only {} of {} ports accept; none more for {} s",
                ports.len() - pending.len(),
                ports.len(),
                STALL.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Fails if a port of a run is still taken after the sweep.
fn ports_free(n: usize) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    for port in ports(n) {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            if Instant::now() > end {
                bail!("port {port} still accepts after the run was cleaned up");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// pid -> parent pid of every process.
fn parents() -> HashMap<u32, u32> {
    let mut out = HashMap::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse().ok()) {
            out.insert(pid, ppid);
        }
    }
    out
}

/// `root` and every process below it.
fn descendants(root: u32) -> Vec<u32> {
    let parents = parents();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, ppid) in &parents {
        children.entry(*ppid).or_default().push(*pid);
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        out.extend(children.get(&out[i]).into_iter().flatten());
        i += 1;
    }
    out
}

/// Whether `pid` is below this process (we are a subreaper, so orphans stay below us).
fn is_ours(pid: u32) -> bool {
    let me = std::process::id();
    let mut p = pid;
    for _ in 0..64 {
        match stat_fields(p).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
            Some(pp) if pp == me => return true,
            Some(pp) if pp > 1 => p = pp,
            _ => return false,
        }
    }
    false
}

/// Kills every process started by this one (through pidfds, re-checked after opening so a
/// reused pid is left alone) and reaps them, until none is left.
fn sweep() {
    let me = std::process::id();
    for _ in 0..500 {
        let ours: Vec<u32> = descendants(me).into_iter().filter(|p| *p != me).collect();
        if ours.is_empty() {
            return;
        }
        for pid in ours {
            // SAFETY: pidfd_open(2) with a pid and no flags; returns a new descriptor or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
            if fd < 0 {
                continue;
            }
            if is_ours(pid) {
                // SAFETY: pidfd_send_signal on the descriptor just opened; no siginfo.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd,
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
            }
            // SAFETY: closing the descriptor we own.
            unsafe { libc::close(fd) };
        }
        std::thread::sleep(Duration::from_millis(10));
        // SAFETY: waitpid(-1, WNOHANG) reaps our exited children; a null status is allowed.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    }
    eprintln!("density: processes of ours keep appearing");
}

/// Fields of /proc/PID/stat from field 3 (state) on; index 1 is the parent pid.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// On-CPU time of all threads of `pid`, from schedstat (ns precision).
fn proc_cpu_s(pid: u32) -> f64 {
    let ns: u64 = fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

fn thread_cpu_s() -> f64 {
    fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

fn pss_kib(pid: u32) -> f64 {
    field_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:") as f64
}

fn mem_used_kib() -> f64 {
    let total = field_kib("/proc/meminfo", "MemTotal:");
    total.saturating_sub(field_kib("/proc/meminfo", "MemAvailable:")) as f64
}

/// Kernel memory that grows with processes and cgroups: Slab + KernelStack + PageTables +
/// Percpu, in KiB.
fn kernel_kib() -> f64 {
    ["Slab:", "KernelStack:", "PageTables:", "Percpu:"]
        .iter()
        .map(|k| field_kib("/proc/meminfo", k))
        .sum::<u64>() as f64
}

fn field_kib(path: &str, key: &str) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Raises the soft limit on open files to the hard one; returns it.
fn raise_nofile() -> Result<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        rl.rlim_cur = rl.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(rl.rlim_max)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn version(ctx: &Ctx, peer: Peer) -> String {
    let out = |cmd: &mut Command| {
        cmd.output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let deb = |pkg| out(Command::new("dpkg-query").args(["-W", "-f=${Version}", pkg]));
    match peer {
        Peer::Mesh => format!("mesh (ours, concurrency {CONCURRENCY})"),
        Peer::Bare => "bare fork+exec loop".into(),
        Peer::Supervisord => match &ctx.supervisord {
            Ok(bin) => format!("supervisord {}", out(Command::new(bin).arg("--version"))),
            Err(_) => "supervisord".into(),
        },
        Peer::S6 => format!("s6 {}", deb("s6")),
        Peer::Runit => format!("runit {}", deb("runit")),
    }
}

fn report(
    ctx: &Ctx,
    samples: &BTreeMap<(usize, Peer), Vec<Sample>>,
    failures: &BTreeMap<(usize, Peer), String>,
    sweep_rows: &[(usize, Result<Sample>)],
) -> String {
    let med = |n: usize, p: Peer, f: fn(&Sample) -> f64| {
        samples
            .get(&(n, p))
            .map(|s| median(&s.iter().map(f).collect::<Vec<_>>()))
    };
    let mode = fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .map_or("pure cgroup v2".into(), |_| {
            "hybrid host: limits in cgroup v1 cpu/memory/pids, placement in v2".to_string()
        });
    let mut r = String::new();
    let _ = writeln!(
        r,
        "# Supervisor density: N x examples/hello on 127.0.0.1\n\n\
         {} cores, shared with other work. \"All serving\" = every port accepts a connect. \
         Mesh: the real supervisor (agent/examples/density.rs), each instance in its own cgroup \
         (cpu 100 milli, memory 16 MiB, pids 8; {mode}), as uid 65534, its record fsynced to \
         {}, its output in a log file; {CONCURRENCY} starts at a time. Peers run hello as root \
         (s6 and runit through a `#!/bin/sh` run script that execs it; supervisord logs to files). \
         Supervisor CPU: schedstat of its processes (mesh: getrusage of the driver minus its \
         port-probe thread; bare: the spawning thread). Medians of the runs shown.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        ctx.dir.join("mesh-state").display(),
    );
    // A peer without figures says why in the first row only.
    let cell = |n: usize, p: Peer, f: fn(&Sample) -> f64, fmt: &dyn Fn(f64) -> String, first| match (
        med(n, p, f),
        failures.get(&(n, p)),
    ) {
        (Some(v), _) => fmt(v),
        (None, Some(e)) if first => e.replace('|', "/"),
        _ => "-".into(),
    };
    let secs = |v: f64| format!("{v:.3} s");
    let mib = |v: f64| format!("{:.1} MiB", v / 1024.0);
    let kib = |v: f64| format!("{v:.0} KiB");
    let header = |r: &mut String, n: usize| {
        let runs: Vec<String> = PEERS
            .iter()
            .map(|p| {
                let k = samples.get(&(n, *p)).map_or(0, Vec::len);
                format!(
                    "{} ({k} run{})",
                    version(ctx, *p),
                    if k == 1 { "" } else { "s" }
                )
            })
            .collect();
        let _ = writeln!(r, "| N = {n} | {} |", runs.join(" | "));
        let _ = writeln!(r, "|---|{}", "---|".repeat(PEERS.len()));
    };
    for (n, _) in SIZES {
        header(&mut r, n);
        let row =
            |r: &mut String, label: &str, f: fn(&Sample) -> f64, fmt: &dyn Fn(f64) -> String| {
                let cells: Vec<String> = PEERS
                    .iter()
                    .map(|p| cell(n, *p, f, fmt, label.starts_with("time")))
                    .collect();
                let _ = writeln!(r, "| {label} | {} |", cells.join(" | "));
            };
        row(&mut r, "time until all serve", |s| s.serve_s, &secs);
        row(&mut r, "supervisor CPU to get there", |s| s.cpu_s, &secs);
        row(
            &mut r,
            "supervisor memory (sum of PSS)",
            |s| s.pss_kib,
            &mib,
        );
        row(&mut r, "supervisor processes", |s| s.procs, &|v| {
            format!("{v:.0}")
        });
        row(
            &mut r,
            "instance PSS, each",
            |s| s.instances_pss_kib,
            &|v| kib(v / n as f64),
        );
        row(
            &mut r,
            "MemAvailable drop per instance",
            |s| s.mem_delta_kib,
            &|v| kib(v / n as f64),
        );
        row(
            &mut r,
            "of which kernel (slab, stacks, page tables, percpu)",
            |s| s.kernel_delta_kib,
            &|v| kib(v / n as f64),
        );
        // Per service: the slope of supervisor PSS from N = 100, and the machine's
        // memory per instance beyond what the bare loop's instances took.
        if n > 100 {
            let per = |p: Peer| -> String {
                match (med(n, p, |s| s.pss_kib), med(100, p, |s| s.pss_kib)) {
                    (Some(a), Some(b)) => kib((a - b) / (n - 100) as f64),
                    _ => "-".into(),
                }
            };
            let cells: Vec<String> = PEERS.iter().map(|p| per(*p)).collect();
            let _ = writeln!(
                r,
                "| supervisor PSS added per service (from N = 100) | {} |",
                cells.join(" | ")
            );
            let bare = med(n, Peer::Bare, |s| s.mem_delta_kib);
            let over = |p: Peer| match (med(n, p, |s| s.mem_delta_kib), bare) {
                (Some(a), Some(b)) if p != Peer::Bare => kib((a - b) / n as f64),
                _ => "-".into(),
            };
            let cells: Vec<String> = PEERS.iter().map(|p| over(*p)).collect();
            let _ = writeln!(
                r,
                "| whole-machine overhead per service vs bare | {} |",
                cells.join(" | ")
            );
        }
        r.push('\n');
    }
    let _ = writeln!(
        r,
        "Mesh at N = 1000 by concurrent starts (1 run each):\n\n\
         | concurrency | time until all serve | driver CPU | driver PSS |\n|---|---|---|---|"
    );
    for (c, s) in sweep_rows {
        let _ = match s {
            Ok(s) => writeln!(
                r,
                "| {c} | {} | {} | {} |",
                secs(s.serve_s),
                secs(s.cpu_s),
                mib(s.pss_kib)
            ),
            Err(e) => writeln!(r, "| {c} | {} | | |", format!("{e:#}").replace('|', "/")),
        };
    }
    let _ = writeln!(
        r,
        "\nReference, shared/baselines.md (a static C server, 2-core machine, medians of 3):\n\n\
         | N = 1000 | bare fork+exec loop | supervisord 4.3 | s6 2.11 | runit 2.1 |\n\
         |---|---|---|---|---|\n\
         | time until all 1000 serve | 0.27 s | 3.48 s | 1.37 s | 1.32 s |\n\
         | supervisor CPU to get there | 0.07 s | 1.46 s | 1.41 s | 1.44 s |\n\
         | supervisor memory (sum of PSS) | 0.7 MiB | 25.4 MiB | 123.7 MiB | 92.2 MiB |\n\
         | supervisor PSS added per service | - | 4.8 KiB | 125 KiB | 93 KiB |\n\
         | whole-machine overhead per service vs bare | - | 74 KiB | 228 KiB | 171 KiB |\n\
         | N = 100: time until all serve | 0.038 s | 1.34 s | 0.18 s | 0.29 s |"
    );
    r
}
