//! `cargo xtask bench ebpf`: what the eBPF accounting costs (agent/examples/ebpf_cost.rs: the
//! real programs loaded by the agent's loader): ns per run of each program from the kernel's
//! statistics, and the slowdown of a context-switch-heavy load without the programs, with
//! them and the load unwatched, and with the load in a watched spore cgroup. Root only.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, workspace_root};

pub fn run() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench ebpf needs root (it loads eBPF programs and makes cgroups)");
    }
    cargo(&[
        "build",
        "--release",
        "--locked",
        "-p",
        "mesh-agent",
        "--example",
        "ebpf_cost",
    ])?;
    let root = workspace_root();
    let exe = root.join("target/release/examples/ebpf_cost");
    let out = Command::new(&exe)
        .args(["200000", "7"])
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        bail!(
            "ebpf_cost failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let body = String::from_utf8_lossy(&out.stdout);
    let report = format!(
        "{}\n- kernel: {}\n- goal: <= 100 ns per sched_switch run, < 1 % of a core at 10,000 switches/s\n",
        body.trim_end(),
        kernel.trim()
    );
    let dir = root.join("target/bench/ebpf");
    std::fs::create_dir_all(&dir)?;
    print!("{report}");
    std::fs::write(dir.join("report.md"), &report)?;
    eprintln!("written to {}", dir.join("report.md").display());
    Ok(())
}
