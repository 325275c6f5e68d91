//! `mesh bench`: one report of the wave's benchmarks (spore format, density, fabric, agent,
//! edge, eBPF) with the peers side by side, from what `cargo xtask bench ...` left in
//! target/bench/<name>/report.md; `--run` runs them all first (from the source tree).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    sudo mesh bench --run           # runs every benchmark (cargo xtask bench all), then groups them\n  \
    mesh bench                      # groups the reports already in target/bench\n\n\
Benchmarks need root (cgroups, eBPF), apt packages for the peers (installed on first use:\n\
nginx, haproxy, wrk, supervisor, s6, runit) and take 20 to 40 minutes. They never run in CI.")]
pub struct BenchCmd {
    /// Where the benchmarks wrote their reports.
    #[arg(long, default_value = "target/bench", value_name = "DIR")]
    dir: PathBuf,
    /// The grouped report [default: DIR/report.md].
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Run every benchmark first (`cargo xtask bench all`, from the source tree).
    #[arg(long)]
    run: bool,
}

/// (directory under DIR, title) in report order.
const PARTS: [(&str, &str); 6] = [
    ("spore", "Spore format: size and pack/verify/extract cost"),
    (
        "density",
        "Density: N supervised instances vs supervisord, s6, runit",
    ),
    ("fabric", "Control fabric: fan-out and commands per second"),
    ("agent", "Agent: healing and rollout latency"),
    ("edge", "Edge: reverse proxy vs haproxy, nginx and direct"),
    ("ebpf", "eBPF accounting: program cost and slowdown"),
];

pub fn run(cmd: BenchCmd) -> Result<()> {
    if cmd.run {
        // `cargo xtask bench all` ends by running `mesh bench` (without --run) itself
        let status = std::process::Command::new("cargo")
            .args(["xtask", "bench", "all"])
            .status()
            .context(
                "running `cargo xtask bench all` (mesh bench --run works from the source tree)",
            )?;
        if !status.success() {
            bail!(
                "cargo xtask bench all failed ({status}); the reports that were written are in {}",
                cmd.dir.display()
            );
        }
        return Ok(());
    }
    let report = group(&cmd.dir)?;
    let out = cmd.output.unwrap_or_else(|| cmd.dir.join("report.md"));
    print!("{report}");
    std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("mesh bench: written to {}", out.display());
    Ok(())
}

/// The reports found under `dir`, headings pushed one level down, missing ones named.
pub fn group(dir: &Path) -> Result<String> {
    let mut found = 0;
    let mut body = String::new();
    let mut missing = Vec::new();
    for (name, title) in PARTS {
        let path = dir.join(name).join("report.md");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                found += 1;
                body.push_str(&format!("\n## {title}\n\n_From {}_\n\n", path.display()));
                for line in text.lines() {
                    if line.starts_with('#') {
                        body.push('#');
                    }
                    body.push_str(line);
                    body.push('\n');
                }
            }
            Err(_) => missing.push(format!("`cargo xtask bench {name}`")),
        }
    }
    if found == 0 {
        bail!(
            "no benchmark reports in {}: run `sudo mesh bench --run` (or `cargo xtask bench NAME`) from the source tree first",
            dir.display()
        );
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut head = format!(
        "# Mycelium Mesh benchmarks\n\nMachine: kernel {}, {cpus} CPUs. Each section is one benchmark's own report, peers side by side.\n",
        kernel.trim()
    );
    if !missing.is_empty() {
        head.push_str(&format!("\nNot run yet: {}.\n", missing.join(", ")));
    }
    Ok(head + &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_grouped_in_order_with_headings_demoted() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [("edge", "# edge\n\n| a | b |\n"), ("spore", "# spore\nx\n")] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("report.md"), text).unwrap();
        }
        let r = group(dir.path()).unwrap();
        let spore = r.find("## Spore format").unwrap();
        let edge = r.find("## Edge").unwrap();
        assert!(spore < edge);
        assert!(r.contains("\n## edge\n") && r.contains("\n## spore\n"));
        assert!(r.contains("| a | b |"));
        assert!(r.contains("Not run yet:") && r.contains("`cargo xtask bench ebpf`"));
    }

    #[test]
    fn no_reports_is_an_error_that_says_what_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let e = group(dir.path()).unwrap_err().to_string();
        assert!(e.contains("mesh bench --run"), "{e}");
    }
}
