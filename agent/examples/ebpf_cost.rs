//! What the eBPF accounting costs, for `cargo xtask bench ebpf` (root):
//!
//! - ns per run of each program, from the kernel's own statistics (BPF_ENABLE_STATS);
//! - the slowdown of a context-switch-heavy load (a pipe ping-pong between two threads pinned
//!   to one CPU: every round trip is two wakeups and two switches) without the programs, with
//!   them loaded but the load in an unwatched cgroup (what every non-spore task pays), and with
//!   the load in a watched spore cgroup. Modes are interleaved; medians are reported.
//!
//! ```text
//! ebpf_cost [ROUND_TRIPS [RUNS]]        # prints a markdown report
//! ebpf_cost --pingpong ROUND_TRIPS      # (internal) the load itself
//! ```

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use mesh_agent::accounting::Accounting;
use mesh_agent::cgroup::{CgroupRoot, CgroupTree, Layout};

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [flag, n] if flag == "--pingpong" => n.parse().map_err(Error::from).and_then(pingpong),
        _ => {
            let trips = args.first().and_then(|a| a.parse().ok()).unwrap_or(200_000);
            let runs = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(Error::from)
                .and_then(|rt| rt.block_on(bench(trips, runs)))
        }
    };
    if let Err(e) = result {
        eprintln!("ebpf_cost: {e}");
        std::process::exit(1);
    }
}

/// Two threads on one CPU passing a byte back and forth; prints ns per round trip.
fn pingpong(trips: u64) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    // wait for the parent to place us in a cgroup
    let mut go = [0u8; 1];
    std::io::stdin().read_exact(&mut go)?;
    let (a_r, a_w) = pipe()?;
    let (b_r, b_w) = pipe()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut r, mut w) = (std::fs::File::from(a_r), std::fs::File::from(b_w));
        let mut b = [0u8; 1];
        for _ in 0..trips {
            r.read_exact(&mut b)?;
            w.write_all(&b)?;
        }
        Ok(())
    });
    let (mut w, mut r) = (std::fs::File::from(a_w), std::fs::File::from(b_r));
    let mut b = [1u8; 1];
    let start = Instant::now();
    for _ in 0..trips {
        w.write_all(&b)?;
        r.read_exact(&mut b)?;
    }
    let ns = start.elapsed().as_nanos() as f64 / trips as f64;
    echo.join().map_err(|_| "echo thread panicked")??;
    println!("{ns:.1}");
    Ok(())
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors, which we own from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Runs the ping-pong in cgroup `cg` (v2 dir); ns per round trip.
fn run_load(trips: u64, cg: &Path) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["--pingpong", &trips.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::fs::write(cg.join("cgroup.procs"), child.id().to_string())?;
    child.stdin.take().ok_or("no stdin")?.write_all(b"g")?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!("ping-pong failed: {}", out.status).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn bench(trips: u64, runs: usize) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (cgroups, eBPF)".into());
    }
    let layout = Layout::detect()?;
    let root = CgroupRoot::new_root(&layout, &format!("mesh-bench-ebpf-{}", std::process::id()));
    root.create()?;
    let result = measure(&root, trips, runs).await;
    let _ = root.remove_tree();
    result
}

async fn measure(root: &CgroupRoot, trips: u64, runs: usize) -> Result<()> {
    let tree = CgroupTree::setup(root.clone(), false)?;
    let spores = tree.spores();
    let watched = spores.child("watched");
    let other = spores.child("other");
    watched.create()?;
    other.create()?;
    let (mut off, mut miss, mut hit) = (Vec::new(), Vec::new(), Vec::new());
    let mut costs: Vec<(String, u64, u64)> = Vec::new();
    let mut rq = None;
    let mut cpu = None;
    for _ in 0..runs {
        off.push(run_load(trips, &other.v2)?);
        let acc = Accounting::load(&spores.v2)?;
        acc.watch(watched.id()?)?;
        miss.push(run_load(trips, &other.v2)?);
        acc.set_cost_stats(true)?;
        let before = acc.costs();
        hit.push(run_load(trips, &watched.v2)?);
        let after = acc.costs();
        acc.set_cost_stats(false)?;
        for a in &after {
            let b = before.iter().find(|b| b.name == a.name);
            let (runs_d, ns_d) = match b {
                Some(b) => (a.run_count - b.run_count, a.run_time_ns - b.run_time_ns),
                None => (a.run_count, a.run_time_ns),
            };
            match costs.iter_mut().find(|c| c.0 == a.name) {
                Some(c) => {
                    c.1 += runs_d;
                    c.2 += ns_d;
                }
                None => costs.push((a.name.clone(), runs_d, ns_d)),
            }
        }
        let st = acc.stats(watched.id()?);
        rq = st.and_then(|s| s.rq_quantile_us(0.99));
        cpu = st.map(|s| s.cpu_ns);
        drop(acc);
    }
    let (m_off, m_miss, m_hit) = (median(&mut off), median(&mut miss), median(&mut hit));
    let pct = |x: f64| (x - m_off) / m_off * 100.0;
    println!("# eBPF accounting cost\n");
    println!(
        "Load: pipe ping-pong between two threads pinned to CPU 0, {trips} round trips per run \
         (each: 2 wakeups, 2 context switches), {runs} runs per mode, interleaved, medians.\n"
    );
    println!("| mode | ns per round trip | vs no programs |");
    println!("|---|---|---|");
    println!("| no programs loaded | {m_off:.0} | - |");
    println!(
        "| loaded, load in an unwatched cgroup (any non-spore task) | {m_miss:.0} | {:+.1} % |",
        pct(m_miss)
    );
    println!(
        "| loaded, load in a watched spore cgroup | {m_hit:.0} | {:+.1} % |",
        pct(m_hit)
    );
    println!("\nPer-run cost of each program during the watched runs (kernel run statistics):\n");
    println!("| program | runs | ns per run |");
    println!("|---|---|---|");
    let mut switch_ns = 0.0;
    let mut wakeup_ns = 0.0;
    for (name, n, ns) in &costs {
        let per = if *n > 0 { *ns as f64 / *n as f64 } else { 0.0 };
        if name == "mesh_sched_switch" {
            switch_ns = per;
        }
        if name == "mesh_sched_wakeup" {
            wakeup_ns = per;
        }
        println!(
            "| {name} | {n} | {} |",
            if *n > 0 {
                format!("{per:.0}")
            } else {
                "-".into()
            }
        );
    }
    // every switch is preceded by about one wakeup in a switch-heavy load
    let per_switch = switch_ns + wakeup_ns;
    println!(
        "\nAt 10,000 context switches per second on a core: {:.0} ns x 10,000 = {:.3} % of that core \
         (sched_switch {switch_ns:.0} ns + sched_wakeup {wakeup_ns:.0} ns per switch).",
        per_switch,
        per_switch * 10_000.0 / 1e9 * 100.0
    );
    if let (Some(rq), Some(cpu)) = (rq, cpu) {
        println!(
            "Last watched run: {:.3} s on-CPU counted, run-queue p99 {rq} us.",
            cpu as f64 / 1e9
        );
    }
    Ok(())
}
