//! `mesh up`: the whole mesh on one machine in one process (fabric with its embedded store,
//! an agent, the edge), with the example spore deployed behind the edge.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use mesh_agent::cgroup::{CgroupRoot, Layout};
use mesh_common::client::{Client, ClientConfig};
use mesh_common::keys::SecretKey;
use mesh_common::trust::TrustStore;

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    sudo mesh up                       # everything on this machine, hello deployed twice\n  \
    sudo mesh up --data /srv/mesh      # keep the state elsewhere\n  \
    mesh up --no-example               # fabric, agent and edge only\n\n\
Ctrl-C stops everything: every spore, the agent's cgroups, the edge and the fabric. Running it\n\
again reuses the data directory (keys, spores, plans).")]
pub struct UpCmd {
    /// Data directory: fabric/, agent/, keys/, spores/ [default: /var/lib/mesh as root,
    /// else ~/.local/share/mesh].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Fabric line protocol.
    #[arg(long, default_value = "127.0.0.1:7700", value_name = "ADDR")]
    fabric_listen: SocketAddr,
    /// Fabric HTTP (blobs, /metrics).
    #[arg(long, default_value = "127.0.0.1:7701", value_name = "ADDR")]
    fabric_http: SocketAddr,
    /// Edge traffic address.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    listen: SocketAddr,
    /// Edge admin address (/metrics, /routes).
    #[arg(long, default_value = "127.0.0.1:9180", value_name = "ADDR")]
    edge_admin: SocketAddr,
    /// Agent metrics address (/metrics, /v1/instances for `mesh top`).
    #[arg(long, default_value = "127.0.0.1:9181", value_name = "ADDR")]
    agent_metrics: SocketAddr,
    /// Instances of the example app.
    #[arg(long, default_value_t = 2)]
    instances: u32,
    /// The example binary to pack and deploy as app `hello` [default: `hello` next to this
    /// mesh binary, as `cargo build --release -p mesh -p mesh-example-hello` leaves it].
    #[arg(long, value_name = "BINARY")]
    example: Option<PathBuf>,
    /// Start the mesh without deploying the example.
    #[arg(long)]
    no_example: bool,
    /// Do not load the eBPF accounting programs.
    #[arg(long)]
    no_ebpf: bool,
    /// Edge worker threads [default: one per core].
    #[arg(long)]
    threads: Option<usize>,
    /// Name of the cgroup the agent builds its tree in (beside `mesh up`'s own).
    #[arg(long, default_value = "mesh-up", hide = true)]
    cgroup_name: String,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn default_data() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/mesh");
    }
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("mesh")
}

pub fn run(cmd: UpCmd) -> Result<()> {
    if std::env::var_os("MESH_LOG").is_none() {
        // the first screen is for the newcomer; daemon chatter goes to MESH_LOG=info
        // SAFETY: set before any other thread exists.
        unsafe { std::env::set_var("MESH_LOG", "warn") };
    }
    crate::init_logging();
    let data = cmd.data.clone().unwrap_or_else(default_data);
    std::fs::create_dir_all(&data)
        .with_context(|| format!("creating the data directory {}", data.display()))?;
    let data = std::fs::canonicalize(&data)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mesh-up")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(up(cmd, data))
}

async fn up(cmd: UpCmd, data: PathBuf) -> Result<()> {
    let root = is_root();
    let started = Instant::now();
    // 1. fabric
    let mut fcfg =
        mesh_fabric::Config::new(cmd.fabric_listen, cmd.fabric_http, data.join("fabric"));
    fcfg.blob_url = None;
    let fabric = mesh_fabric::Fabric::start(fcfg).await.with_context(|| {
        format!(
            "starting the fabric on {} (is a mesh already up? stop it or pass --fabric-listen)",
            cmd.fabric_listen
        )
    })?;
    let token_path = fabric.admin_token_path.clone();
    let token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("reading {}", token_path.display()))?
        .trim()
        .to_string();
    let client_cfg = ClientConfig {
        fabric: fabric.listen.to_string(),
        token,
    };

    // 2. key and trust
    let keys = data.join("keys");
    let key_path = keys.join("mesh.key");
    if !key_path.exists() {
        SecretKey::generate()
            .write_pair(&keys, "mesh up", false)
            .context("creating the signing key")?;
    }
    let trust_path = keys.join("mesh.pub");
    // checked here so that a broken key dir is reported before anything starts
    TrustStore::new().merge_file(&trust_path)?;

    // 3. edge
    let mut ecfg = mesh_edge::Config::new(client_cfg.clone(), vec![cmd.listen]);
    ecfg.admin = Some(cmd.edge_admin);
    if let Some(t) = cmd.threads {
        ecfg.threads = t;
    }
    let edge = mesh_edge::Edge::start(ecfg).context("starting the edge")?;

    // 4. agent (root only), a supervised child process: a crashed agent is restarted and
    // re-adopts its spores while the fabric and the edge keep serving
    let (agent_stop, agent_task, cgroup_root) = if root {
        let layout = Layout::detect().context("finding the cgroup hierarchies")?;
        let cgroup_root = CgroupRoot::new_root(&layout, &cmd.cgroup_name);
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--fabric".into(),
            client_cfg.fabric.clone(),
            "--token-file".into(),
            s(&token_path),
            "--state".into(),
            s(&data.join("agent")),
            "--trust".into(),
            s(&trust_path),
            "--cgroup-root".into(),
            cmd.cgroup_name.clone(),
            "--user".into(),
            "mesh-spore=65534:65534".into(),
            "--metrics".into(),
            cmd.agent_metrics.to_string(),
            "--lease-ttl-ms".into(),
            "3000".into(),
            "--stop-on-exit".into(),
        ];
        if cmd.no_ebpf {
            args.push("--no-ebpf".into());
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(supervise_agent(args, data.clone(), rx));
        (Some(tx), Some(task), Some(cgroup_root))
    } else {
        (None, None, None)
    };

    // 5. client config for `mesh ps`, `mesh top`, `mesh logs` in other terminals
    let client_note = write_client_config(&client_cfg.fabric, &token_path);

    // 6. the example
    let mut answer = None;
    if root && !cmd.no_example {
        match deploy_example(&cmd, &data, &key_path, &client_cfg).await {
            Ok(()) => {
                let url_port = edge.listen[0].port();
                answer =
                    Some(wait_for_hello(url_port, cmd.instances, Duration::from_secs(90)).await);
            }
            Err(e) => eprintln!("mesh up: the example was not deployed: {e:#}"),
        }
    }

    print_screen(
        &cmd,
        &data,
        &edge,
        root,
        &answer,
        &client_note,
        started.elapsed(),
    );

    crate::fabric_cmd::wait_for_shutdown().await;
    println!("\nmesh up: stopping spores, agent, edge and fabric ...");
    if let (Some(tx), Some(task)) = (agent_stop, agent_task) {
        let _ = tx.send(true);
        let _ = task.await;
    }
    if let Some(cg) = cgroup_root {
        // normally already empty and gone (the agent removed its tree); kills stragglers
        if let Err(e) = cg.remove_tree() {
            eprintln!("mesh up: {e}");
        }
    }
    let stop = tokio::task::spawn_blocking(move || edge.stop());
    let _ = stop.await;
    drop(fabric);
    println!("mesh up: stopped; state kept in {}", data.display());
    Ok(())
}

/// Runs `mesh agent ARGS` as a child in its own process group (a terminal's Ctrl-C reaches
/// only `mesh up`, which then stops the agent in order), restarts it if it dies, and on stop
/// sends it SIGTERM: with --stop-on-exit it stops every spore and removes its cgroups.
async fn supervise_agent(
    args: Vec<String>,
    data: PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("mesh up: cannot find this binary to start the agent: {e}");
            return;
        }
    };
    let log_path = data.join("agent.log");
    let pid_path = data.join("agent.pid");
    loop {
        let log = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("mesh up: agent log {}: {e}", log_path.display());
                return;
            }
        };
        let err = match log.try_clone() {
            Ok(f) => f,
            Err(e) => {
                eprintln!("mesh up: agent log: {e}");
                return;
            }
        };
        let mut command = tokio::process::Command::new(&exe);
        command
            .args(&args)
            .env(
                "MESH_LOG",
                std::env::var("MESH_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(false);
        // If `mesh up` itself dies (kill -9), the agent gets SIGTERM and, with
        // --stop-on-exit, stops the spores and removes its cgroups: nothing is left behind.
        // SAFETY: prctl in the forked child before exec is async-signal-safe.
        let spawned = unsafe {
            command.pre_exec(|| {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                Ok(())
            })
        }
        .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                eprintln!("mesh up: cannot start the agent: {e}");
                return;
            }
        };
        let pid = child.id();
        if let Some(pid) = pid {
            let _ = std::fs::write(&pid_path, format!("{pid}\n"));
        }
        tokio::select! {
            status = child.wait() => {
                if *stop.borrow() {
                    return;
                }
                let why = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                eprintln!("mesh up: the agent ended ({why}); restarting it (its spores keep running and are re-adopted; log: {})", log_path.display());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ = stop.changed() => {
                if let Some(pid) = pid {
                    // SAFETY: kill(2) on our own child, not yet reaped (we still hold it).
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
                match tokio::time::timeout(Duration::from_secs(60), child.wait()).await {
                    Ok(_) => {}
                    Err(_) => {
                        eprintln!("mesh up: the agent did not stop within 60 s; killing it");
                        let _ = child.kill().await;
                    }
                }
                let _ = std::fs::remove_file(&pid_path);
                return;
            }
        }
    }
}

/// Packs the example (once per data dir), pushes it, and sets the plan if it differs.
async fn deploy_example(cmd: &UpCmd, data: &Path, key: &Path, cfg: &ClientConfig) -> Result<()> {
    let exe = std::env::current_exe().context("finding this mesh binary")?;
    let binary = match &cmd.example {
        Some(b) => b.clone(),
        None => exe
            .parent()
            .map(|d| d.join("hello"))
            .filter(|p| p.is_file())
            .context("no `hello` binary next to mesh: build it with `cargo build --release -p mesh -p mesh-example-hello`, or pass --example BINARY (or --no-example)")?,
    };
    let spores = data.join("spores");
    std::fs::create_dir_all(&spores)?;
    let spore = spores.join("hello-1.0.0.spore");
    // a new pack each run would be a new digest, and a new digest is a rollout
    if !spore.exists() {
        run_mesh(
            &exe,
            cfg,
            &[
                "spore",
                "pack",
                &s(&binary),
                "--name",
                "hello",
                "--version",
                "1.0.0",
                "--key",
                &s(key),
                "--user",
                "mesh-spore",
                "--health-path",
                "/health",
                "--cpu-milli",
                "250",
                "--memory-mb",
                "64",
                "--pids",
                "32",
                "-o",
                &s(&spore),
            ],
        )?;
    }
    let digest = run_mesh(&exe, cfg, &["spore", "push", &s(&spore)])?
        .trim()
        .to_string();
    if !digest.starts_with("sha256:") {
        bail!("mesh spore push printed {digest:?}, not a digest");
    }
    let mut c = Client::connect(cfg).await?;
    let current = c.call("PLAN.GET hello").await.ok();
    let same = current.as_ref().is_some_and(|r| {
        r.get("digest") == Some(digest.as_str()) && r.get("min") == Some(&cmd.instances.to_string())
    });
    if !same {
        let n = cmd.instances;
        c.call(&format!(
            "PLAN.SET hello digest={digest} min={n} max={n} min_healthy_ms=500 drain_ms=1000"
        ))
        .await
        .context("deploying hello")?;
    }
    Ok(())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn run_mesh(exe: &Path, cfg: &ClientConfig, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(exe)
        .args(args)
        .env("MESH_FABRIC", &cfg.fabric)
        .env("MESH_TOKEN", &cfg.token)
        .env_remove("MESH_CONFIG")
        .output()
        .with_context(|| format!("running mesh {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "mesh {}: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// GET /app/hello/ through the edge until `instances` different instances answered (their
/// answers name their pid); the last answer or what went wrong.
async fn wait_for_hello(port: u16, instances: u32, timeout: Duration) -> Result<String, String> {
    let end = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    let mut seen = std::collections::BTreeSet::new();
    while Instant::now() < end {
        match tokio::task::spawn_blocking(move || http_get(port, "/app/hello/")).await {
            Ok(Ok((200, body))) => {
                seen.insert(body.clone());
                if seen.len() >= instances as usize {
                    return Ok(body);
                }
                continue;
            }
            Ok(Ok((status, body))) => last = format!("{status}: {}", body.trim()),
            Ok(Err(e)) => last = e.to_string(),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last)
}

fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Leaves ~/.config/mesh/client.toml behind (unless the user has a different one); returns a
/// note for the screen.
fn write_client_config(fabric: &str, token_file: &Path) -> String {
    let Some(path) = crate::fabric_client::default_config_path() else {
        return "no HOME: pass --fabric and --token-file to other commands".into();
    };
    let text = format!(
        "# written by `mesh up`\nfabric = \"{fabric}\"\ntoken_file = \"{}\"\n",
        token_file.display()
    );
    match std::fs::read_to_string(&path) {
        Ok(existing) if existing == text => return format!("client config: {}", path.display()),
        Ok(existing) if !existing.starts_with("# written by `mesh up`") => {
            return format!(
                "{} exists and is yours, so it was left alone: use --fabric {fabric} --token-file {}",
                path.display(),
                token_file.display()
            );
        }
        _ => {}
    }
    let written = path
        .parent()
        .map(std::fs::create_dir_all)
        .transpose()
        .and_then(|_| mesh_common::fsutil::write_atomic(&path, text.as_bytes(), 0o600));
    match written {
        Ok(_) => format!("client config: {}", path.display()),
        Err(e) => format!("could not write {}: {e}", path.display()),
    }
}

fn print_screen(
    cmd: &UpCmd,
    data: &Path,
    edge: &mesh_edge::Edge,
    root: bool,
    answer: &Option<Result<String, String>>,
    client_note: &str,
    took: Duration,
) {
    let port = edge.listen[0].port();
    println!(
        "mesh up: the mesh runs on this machine ({:.1} s)",
        took.as_secs_f64()
    );
    println!();
    println!(
        "  fabric   {} (line protocol), http://{} (blobs, /metrics)",
        cmd.fabric_listen, cmd.fabric_http
    );
    if root {
        println!(
            "  agent    node {}, metrics http://{}/metrics",
            crate::agent_cmd::hostname(),
            cmd.agent_metrics
        );
    } else {
        println!(
            "  agent    NOT STARTED: the agent needs root to create cgroups and to run spores as an"
        );
        println!(
            "           unprivileged user. Run `sudo mesh up` to run spores; the fabric and the edge run."
        );
    }
    println!(
        "  edge     http://{} (traffic), http://{}/metrics",
        edge.listen[0], cmd.edge_admin
    );
    println!("  data     {}", data.display());
    println!("  {client_note}");
    println!();
    match answer {
        Some(Ok(body)) => {
            println!("  hello answers through the edge:");
            println!("  $ curl http://127.0.0.1:{port}/app/hello/");
            println!("  {}", body.trim());
        }
        Some(Err(e)) => {
            println!("  hello did not answer through the edge yet ({e}); see `mesh ps`")
        }
        None => {}
    }
    println!();
    println!("Try next (in another terminal):");
    println!("  curl http://127.0.0.1:{port}/app/hello/       # round robin over the instances");
    println!("  mesh ps                                       # plans and instances");
    println!(
        "  mesh top                                      # live CPU, memory, network per spore"
    );
    if data == Path::new("/var/lib/mesh") {
        println!("  mesh logs hello -f                            # the instances' output");
    } else {
        println!("  mesh logs hello -f --state {}/agent", data.display());
    }
    println!("  mesh scale hello --min 3                      # one more instance");
    if let Some(exe) = not_on_path() {
        println!("  (`mesh` is not on your PATH: alias mesh={exe})");
    }
    println!();
    println!("Ctrl-C stops everything (spores, cgroups, edge, fabric); the data directory stays.");
}

/// This binary's path if `mesh` on PATH is not this binary.
fn not_on_path() -> Option<String> {
    let exe = std::env::current_exe().ok()?.canonicalize().ok()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .filter_map(|d| d.join("mesh").canonicalize().ok())
        .any(|p| p == exe);
    (!found).then(|| exe.display().to_string())
}
