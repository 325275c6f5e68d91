//! Chores of Mycelium Mesh, so that the README stays two commands and CI calls the same entry
//! points a developer does.
//!
//! - `cargo xtask test`: formatting, clippy, every test of the workspace, then `vm-test`.
//! - `cargo xtask vm-test`: the root-only agent tests in a VM with a pure cgroup v2 kernel.
//! - `cargo xtask bench spore`: pack/verify/extract cost and size overhead of the spore format.
//! - `cargo xtask bench fabric`: fan-out latency to 1,000 subscribers, commands per second.
//! - `cargo xtask bench density`: N supervised instances vs supervisord, s6, runit (root).
//! - `cargo xtask bench edge`: `mesh edge` vs haproxy and nginx as reverse proxies, CPU per request.
//! - `cargo xtask bench ebpf`: ns per eBPF program run, slowdown of a context-switch-heavy load.
//! - `cargo xtask bench all`: all of them, grouped by `mesh bench` into target/bench/report.md.

mod bench;
mod bench_agent;
mod bench_density;
mod bench_ebpf;
mod bench_edge;
mod bench_fabric;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  test           cargo fmt --check, cargo clippy -D warnings, cargo test --workspace
  bench spore    pack / verify / extract a 20 MiB binary with the release `mesh`
  bench fabric   fan-out latency to 1,000 subscribers, commands/s on 1 and 64 connections
  bench agent    kill -9 until healed and registered, plan change until the new version serves (root)
  bench density  time and cost to bring up 100 to 5,000 instances vs supervisord, s6, runit (root)
  bench edge     mesh edge vs haproxy and nginx on loopback: rps, p50/p99, proxy CPU per request
  bench ebpf     ns per eBPF program run, slowdown of a context-switch-heavy load (root)
  bench all      every benchmark above, grouped into target/bench/report.md by `mesh bench`
  vm-test [-p P] [-- ARGS]
                 the root-only agent tests (vm_*, supervise, accounting) in a qemu VM with pure cgroup v2
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["test"] => test(),
        ["bench", rest @ ..] => bench::run(rest),
        ["vm-test", rest @ ..] => vm::run(rest),
        ["help" | "--help" | "-h"] | [] => {
            print!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn test() -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])
        .context("formatting differs: run `cargo fmt --all`")?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["test", "--workspace", "--locked"])?;
    // The root-only supervisor tests again, on a pure cgroup v2 kernel.
    vm::run(&[])?;
    Ok(())
}

/// Runs cargo with `args` in the workspace root; fails if it fails.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
