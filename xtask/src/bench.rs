//! `cargo xtask bench`: measurements that never run in CI.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, workspace_root};

pub fn run(args: &[&str]) -> Result<()> {
    match args {
        ["spore"] | [] => spore(),
        ["fabric"] => crate::bench_fabric::run(),
        ["density"] => crate::bench_density::run(),
        ["agent"] => crate::bench_agent::run(),
        ["edge"] => crate::bench_edge::run(),
        ["ebpf"] => crate::bench_ebpf::run(),
        ["all"] => all(),
        other => bail!(
            "unknown benchmark {other:?}; known: spore, fabric, density, agent, edge, ebpf, all"
        ),
    }
}

type Bench = fn() -> Result<()>;

/// The wave's benchmarks one after the other (a failure is reported, the others still run),
/// then `mesh bench` groups their reports into target/bench/report.md.
fn all() -> Result<()> {
    let benches: [(&str, Bench); 6] = [
        ("spore", spore),
        ("density", crate::bench_density::run),
        ("fabric", crate::bench_fabric::run),
        ("agent", crate::bench_agent::run),
        ("edge", crate::bench_edge::run),
        ("ebpf", crate::bench_ebpf::run),
    ];
    let mut failed = Vec::new();
    for (name, run) in benches {
        eprintln!("xtask: bench {name}");
        // a stale report must not pass for this run's
        let _ = fs::remove_file(
            workspace_root()
                .join("target/bench")
                .join(name)
                .join("report.md"),
        );
        if let Err(e) = run() {
            eprintln!("xtask: bench {name} failed: {e:#}");
            failed.push(name);
        }
    }
    cargo(&["build", "--release", "--locked", "-p", "mesh"])?;
    let mesh = workspace_root().join("target/release/mesh");
    let status = Command::new(&mesh)
        .args(["bench", "--dir"])
        .arg(workspace_root().join("target/bench"))
        .status()
        .context("running mesh bench")?;
    if !status.success() {
        bail!("mesh bench failed ({status})");
    }
    if !failed.is_empty() {
        bail!("benchmarks failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Runs `cargo xtask bench NAME` again from a release build of xtask when this one is a debug
/// build (benchmarks whose client side is xtask itself would measure themselves); `None` when
/// this already is the release build.
pub fn in_release(name: &str) -> Option<Result<()>> {
    cfg!(debug_assertions).then(|| {
        cargo(&[
            "run",
            "--release",
            "--locked",
            "--quiet",
            "-p",
            "xtask",
            "--",
            "bench",
            name,
        ])
    })
}

const SIZE: usize = 20 << 20;
const RUNS: usize = 5;

/// Pack, verify and extract a 20 MiB binary with the release `mesh`, as a user would.
fn spore() -> Result<()> {
    cargo(&["build", "--release", "--locked", "-p", "mesh"])?;
    let root = workspace_root();
    let mesh = root.join("target/release/mesh");
    let dir = root.join("target/bench/spore");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    run_ok(&mesh, &["key", "gen", "--out", &s(&dir.join("keys"))])?;

    // A real binary's bytes (the release mesh itself, repeated to 20 MiB) compress like real
    // spores do; random bytes show the incompressible worst case.
    let seed = fs::read(&mesh)?;
    let real: Vec<u8> = seed.iter().copied().cycle().take(SIZE).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let random: Vec<u8> = (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();

    let mut rows = Vec::new();
    for (label, data) in [("binary", &real), ("random", &random)] {
        let bin = dir.join(format!("{label}.bin"));
        fs::write(&bin, data)?;
        for compression in ["zstd", "none"] {
            let out = dir.join(format!("{label}-{compression}.spore"));
            let key = dir.join("keys/mesh.key");
            let pack = median(|| {
                run_ok(
                    &mesh,
                    &[
                        "spore",
                        "pack",
                        &s(&bin),
                        "--name",
                        "bench",
                        "--version",
                        "1.0.0",
                        "--key",
                        &s(&key),
                        "--compression",
                        compression,
                        "-o",
                        &s(&out),
                    ],
                )
            })?;
            let trust = dir.join("keys/mesh.pub");
            let verify =
                median(|| run_ok(&mesh, &["spore", "verify", &s(&out), "--trust", &s(&trust)]))?;
            let into = dir.join("run");
            let extract = median(|| {
                let _ = fs::remove_dir_all(&into);
                run_ok(
                    &mesh,
                    &[
                        "spore",
                        "extract",
                        &s(&out),
                        "--trust",
                        &s(&trust),
                        "--into",
                        &s(&into),
                    ],
                )
            })?;
            let size = fs::metadata(&out)?.len() as i64;
            rows.push(format!(
                "| {label} 20 MiB | {compression} | {size} | {:+} | {:.1} % | {:.0} ms | {:.0} ms | {:.0} ms |",
                size - SIZE as i64,
                100.0 * size as f64 / SIZE as f64,
                ms(pack),
                ms(verify),
                ms(extract)
            ));
        }
    }
    let sha = median(|| run_ok(Path::new("sha256sum"), &[&s(&dir.join("binary.bin"))]))?;
    let report = format!(
        "# spore format: 20 MiB input, release `mesh`, median of {RUNS} runs (whole command, process start included)\n\n\
         | input | payload | spore bytes | bytes added | size vs input | pack | verify | extract |\n\
         |---|---|---|---|---|---|---|---|\n{}\n\n\
         For scale: `sha256sum` of the same 20 MiB takes {:.0} ms here.\n",
        rows.join("\n"),
        ms(sha)
    );
    print!("{report}");
    fs::write(dir.join("report.md"), &report)?;
    eprintln!("written to {}", dir.join("report.md").display());
    Ok(())
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run_ok(bin: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("{}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn median(mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[RUNS / 2])
}
