//! `cargo xtask bench agent`: how fast the node agent heals and rolls out, with the release
//! `mesh fabric` and `mesh agent` on this machine (root).
//!
//! - kill -9 of a Ready instance until its replacement is Ready and registered again (the
//!   endpoint's `put` event on a subscription), 50 times, warmup 0 and min healthy time 0;
//! - a plan change (new digest) until the first instance of the new version is registered.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, workspace_root};

const KILLS: usize = 50;
const ROLLOUTS: usize = 5;
const CGROUP_ROOT: &str = "mesh-bench-agent";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // Our own children, by their handles.
        // SAFETY: SIGTERM to a child we spawned and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn mesh(bin: &Path, env: &[(&str, &str)], args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .context("running mesh")?;
    if !out.status.success() {
        bail!("mesh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A line-protocol connection: commands and, on another, timestamped events.
struct Line {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Line {
    fn connect(addr: &str, token: &str) -> Result<Line> {
        let s = TcpStream::connect(addr)?;
        let mut l = Line {
            w: s.try_clone()?,
            r: BufReader::new(s),
        };
        l.read()?; // greeting
        l.call(&format!("AUTH {token}"))?;
        Ok(l)
    }

    fn read(&mut self) -> Result<String> {
        let mut s = String::new();
        if self.r.read_line(&mut s)? == 0 {
            bail!("the fabric closed the connection");
        }
        Ok(s.trim_end().to_string())
    }

    /// Sends a command; returns its `* ` items and the final line.
    fn call(&mut self, line: &str) -> Result<(Vec<String>, String)> {
        writeln!(self.w, "{line}")?;
        let mut items = Vec::new();
        loop {
            let l = self.read()?;
            if let Some(i) = l.strip_prefix("* ") {
                items.push(i.to_string());
            } else if l.starts_with('+') {
                return Ok((items, l));
            } else if l.starts_with('-') {
                bail!("{line}: {l}");
            }
        }
    }
}

fn field<'a>(fields: &'a str, key: &str) -> Option<&'a str> {
    fields
        .split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub fn run() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench agent runs the real agent: it needs root");
    }
    cargo(&[
        "build",
        "--release",
        "--locked",
        "-p",
        "mesh",
        "-p",
        "mesh-example-hello",
    ])?;
    let root = workspace_root();
    let bin = root.join("target/release/mesh");
    let dir = root.join("target/bench/agent");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let result = bench(&bin, &root, &dir);
    cleanup_cgroups();
    let report = result?;
    print!("{report}");
    std::fs::write(dir.join("report.md"), &report)?;
    eprintln!("written to {}", dir.join("report.md").display());
    Ok(())
}

fn bench(bin: &Path, root: &Path, dir: &Path) -> Result<String> {
    let line_addr = format!("127.0.0.1:{}", free_port()?);
    let http_addr = format!("127.0.0.1:{}", free_port()?);
    let log = |name: &str| -> Result<Stdio> { Ok(std::fs::File::create(dir.join(name))?.into()) };
    let _fabric = Proc(
        Command::new(bin)
            .args([
                "fabric", "--listen", &line_addr, "--http", &http_addr, "--data",
            ])
            .arg(dir.join("fabric"))
            .stdout(log("fabric.out")?)
            .stderr(log("fabric.log")?)
            .spawn()?,
    );
    let token_file = dir.join("fabric/admin.token");
    wait(Duration::from_secs(20), || {
        token_file.exists() && TcpStream::connect(&line_addr).is_ok()
    })?;
    let token = std::fs::read_to_string(&token_file)?.trim().to_string();
    let env = [
        ("MESH_FABRIC", line_addr.as_str()),
        ("MESH_TOKEN", token.as_str()),
    ];

    let keys = dir.join("keys");
    mesh(bin, &[], &["key", "gen", "--out", &s(&keys)])?;
    let mut digests = Vec::new();
    for v in 1..=(ROLLOUTS + 1) {
        let toml = dir.join(format!("v{v}.toml"));
        std::fs::write(
            &toml,
            format!(
                "name = \"hello\"\nversion = \"{v}.0.0\"\ncommand = \"hello\"\n[env]\nHELLO_VERSION = \"{v}.0.0\"\n\
                 [slo]\nhealth_path = \"/health\"\nwarmup_ms = 0\nmin_healthy_ms = 0\ninterval_ms = 10\ntimeout_ms = 500\nstop_grace_ms = 500\n\
                 [[files]]\npath = \"hello\"\nsource = \"{}\"\nmode = 0o755\n",
                root.join("target/release/hello").display()
            ),
        )?;
        let spore = dir.join(format!("v{v}.spore"));
        mesh(
            bin,
            &[],
            &[
                "spore",
                "pack",
                &s(&toml),
                "--key",
                &s(&keys.join("mesh.key")),
                "-o",
                &s(&spore),
            ],
        )?;
        digests.push(
            mesh(bin, &env, &["spore", "push", &s(&spore)])?
                .trim()
                .to_string(),
        );
    }

    let _agent = Proc(
        Command::new(bin)
            .args([
                "agent", "--fabric", &line_addr, "--token", &token, "--node", "bench", "--state",
            ])
            .arg(dir.join("agent"))
            .args([
                "--trust",
                &s(&keys.join("mesh.pub")),
                "--cgroup-root",
                CGROUP_ROOT,
            ])
            .args(["--user", "mesh-spore=65534:65534", "--stop-on-exit"])
            .stdout(log("agent.out")?)
            .stderr(log("agent.log")?)
            .spawn()?,
    );

    // Endpoint events, timestamped as they arrive.
    let mut sub = Line::connect(&line_addr, &token)?;
    sub.call("SUB endpoints app=hello")?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        while let Ok(l) = sub.read() {
            if tx.send((Instant::now(), l)).is_err() {
                return;
            }
        }
    });
    let mut cmd = Line::connect(&line_addr, &token)?;
    let deploy = |d: &str| {
        mesh(
            bin,
            &env,
            &[
                "deploy",
                "hello",
                d,
                "--min",
                "2",
                "--min-healthy-ms",
                "0",
                "--drain-ms",
                "0",
            ],
        )
    };
    deploy(&digests[0])?;
    let ready = |cmd: &mut Line| -> Result<Vec<(String, u32)>> {
        let (items, _) = cmd.call("INSTANCE.LIST hello")?;
        Ok(items
            .iter()
            .filter(|i| field(i, "state") == Some("ready"))
            .filter_map(|i| {
                Some((
                    field(i, "instance")?.to_string(),
                    field(i, "pid")?.parse().ok()?,
                ))
            })
            .collect())
    };
    wait(Duration::from_secs(60), || {
        ready(&mut cmd).is_ok_and(|r| r.len() == 2)
    })?;
    std::thread::sleep(Duration::from_millis(300));
    while rx.try_recv().is_ok() {}

    let mut heal = Vec::new();
    for k in 0..KILLS {
        let inst = ready(&mut cmd)?;
        let Some((name, pid)) = inst.get(k % inst.len()).cloned() else {
            bail!("no ready instance")
        };
        // SAFETY: kill(2) on a spore pid the fabric reports for our own agent's instance.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let t0 = Instant::now();
        let needle = format!("instance={name} ");
        let got = loop {
            let (at, l) = rx
                .recv_timeout(Duration::from_secs(30))
                .context("no re-registration within 30 s")?;
            if at >= t0 && l.contains(" op=put ") && l.contains(&needle) {
                break at;
            }
        };
        heal.push(got - t0);
        // Let it settle as Ready before the next kill.
        wait(Duration::from_secs(30), || {
            ready(&mut cmd).is_ok_and(|r| r.len() == 2)
        })?;
        std::thread::sleep(Duration::from_millis(100));
        while rx.try_recv().is_ok() {}
    }
    heal.sort();

    let mut rollout = Vec::new();
    for d in &digests[1..] {
        while rx.try_recv().is_ok() {}
        let prefix = format!("-{} ", &d["sha256:".len().."sha256:".len() + 8]);
        let t0 = Instant::now();
        deploy(d)?;
        let got = loop {
            let (at, l) = rx
                .recv_timeout(Duration::from_secs(60))
                .context("no new version registered within 60 s")?;
            if l.contains(" op=put ") && l.contains(&prefix) {
                break at;
            }
        };
        rollout.push(got - t0);
        wait(Duration::from_secs(60), || {
            ready(&mut cmd)
                .is_ok_and(|r| r.len() == 2 && r.iter().all(|(n, _)| n.ends_with(prefix.trim())))
        })?;
    }
    mesh(bin, &env, &["undeploy", "hello"])?;
    wait(Duration::from_secs(30), || {
        cmd.call("INSTANCE.LIST hello")
            .is_ok_and(|(i, _)| i.is_empty())
    })?;

    let list = |v: &[Duration]| v.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ");
    let mut sorted_roll = rollout.clone();
    sorted_roll.sort();
    Ok(format!(
        "# agent: healing and rollout, release `mesh fabric` + `mesh agent` on this machine\n\n\
         Workload: examples/hello, 2 instances, warmup 0, min healthy time 0, health checks every 10 ms;\n\
         times until the fabric publishes the endpoint (`> endpoint ... op=put`) on a subscription.\n\n\
         | measure | n | p50 | p99 | max |\n|---|---|---|---|---|\n\
         | kill -9 until the replacement is Ready and registered | {} | {} | {} | {} |\n\
         | plan change until the first new instance is registered | {} | {} | {} | {} |\n\n\
         Rollouts, each: {}\n",
        heal.len(),
        ms(percentile(&heal, 0.5)),
        ms(percentile(&heal, 0.99)),
        ms(*heal.last().context("no kills")?),
        rollout.len(),
        ms(percentile(&sorted_roll, 0.5)),
        ms(percentile(&sorted_roll, 0.99)),
        ms(*sorted_roll.last().context("no rollouts")?),
        list(&rollout),
    ))
}

fn wait(timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out after {timeout:?}")
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Removes what an interrupted run may have left in our cgroup root (ours alone).
fn cleanup_cgroups() {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for l in own.lines() {
        let mut p = l.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (p.next(), p.next(), p.next()) else {
            continue;
        };
        let path = path.trim_start_matches('/');
        let base = match ctrl {
            "" if Path::new("/sys/fs/cgroup/unified").is_dir() => {
                PathBuf::from("/sys/fs/cgroup/unified")
            }
            "" => PathBuf::from("/sys/fs/cgroup"),
            "memory" | "pids" | "cpu" => PathBuf::from("/sys/fs/cgroup").join(ctrl),
            _ => continue,
        };
        dirs.push(base.join(path).join(CGROUP_ROOT));
    }
    for d in dirs {
        remove_tree(&d);
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
