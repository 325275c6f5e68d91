//! `cargo xtask bench edge`: the release `mesh edge` as an HTTP reverse proxy on loopback, side
//! by side with haproxy (with and without `option splice-auto`), nginx as a proxy, and wrk
//! straight at the backend. The workload and the peer configs are those of
//! shared/baselines.md ("Edge: HTTP reverse proxy on loopback").
//!
//! - Backend: nginx, 1 worker, static /small (100 B) and /big (1 MiB, sendfile), keep-alive.
//! - Load: `wrk -t1 -c64 -d10s --latency`, after 2 s of warm-up on a freshly started proxy.
//! - Pinning: every proxy on CPU 1, wrk and the backend on CPU 0.
//! - Proxy CPU: the sum over the proxy's threads of /proc/PID/task/*/schedstat (on-CPU ns)
//!   across the measured run, divided by the requests wrk completed; utime+stime from
//!   /proc/PID/stat is kept as a cross-check.
//! - Every (proxy, size) pair runs 3 times, round robin over the proxies; medians reported.
//!
//! The client side is wrk, not xtask, so a debug xtask measures the same thing as a release
//! one (xtask only samples /proc between runs). Everything started here is a direct child
//! (taskset execs the program; nginx runs with `master_process off`, haproxy with `-db`) held
//! by a guard that stops it on every path out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, workspace_root};

const ROUNDS: usize = 3;
const DURATION_S: u64 = 10;
const WARMUP_S: u64 = 2;
const CONNECTIONS: u32 = 64;
/// The CPU every proxy runs on; wrk and the backend share the other one.
const PROXY_CPU: &str = "1";
const LOAD_CPU: &str = "0";
const SMALL_BYTES: usize = 100;
const BIG_BYTES: usize = 1 << 20;
/// A run where others used more of the proxy's CPU than this is marked as disturbed.
const NOISY: f64 = 0.10;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Peer {
    Direct,
    Edge,
    Haproxy,
    HaproxySplice,
    Nginx,
}

const PEERS: [Peer; 5] = [
    Peer::Direct,
    Peer::Edge,
    Peer::Haproxy,
    Peer::HaproxySplice,
    Peer::Nginx,
];

impl Peer {
    fn label(self) -> &'static str {
        match self {
            Peer::Direct => "direct (wrk -> backend)",
            Peer::Edge => "mesh edge --threads 1",
            Peer::Haproxy => "haproxy (http-reuse always)",
            Peer::HaproxySplice => "haproxy + option splice-auto",
            Peer::Nginx => "nginx (proxy_pass, keepalive 128)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Peer::Direct => "direct",
            Peer::Edge => "edge",
            Peer::Haproxy => "haproxy",
            Peer::HaproxySplice => "haproxy-splice",
            Peer::Nginx => "nginx",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Size {
    Small,
    Big,
}

const SIZES: [Size; 2] = [Size::Small, Size::Big];

impl Size {
    fn path(self) -> &'static str {
        match self {
            Size::Small => "/small",
            Size::Big => "/big",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Size::Small => "100 B",
            Size::Big => "1 MiB",
        }
    }
}

/// One measured run.
#[derive(Clone, Debug, Default)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    bytes_read: f64,
    /// Proxy on-CPU seconds over the measured run (schedstat); None for direct.
    cpu_s: Option<f64>,
    /// The same from utime+stime (clock ticks).
    cpu_stat_s: Option<f64>,
    /// Busy share of CPU 0 (wrk + backend) over the run.
    cpu0_busy: f64,
    /// Busy share of CPU 1 not spent by the proxy (others' work, interrupts).
    cpu1_other: f64,
    /// The proxy's own share of CPU 1 (1.0: saturated).
    proxy_busy: Option<f64>,
    /// wrk's error lines, empty when clean.
    errors: Vec<String>,
    /// Edge counters after the run (warm-up + measured), for the 1 MiB sanity check.
    edge_metrics: Vec<(String, f64)>,
}

impl Sample {
    fn cpu_per_req_us(&self) -> Option<f64> {
        let cpu = self.cpu_s?;
        (self.requests > 0).then(|| cpu * 1e6 / self.requests as f64)
    }
}

/// A child we spawned; stopped (SIGTERM, then SIGKILL) when dropped, unless already reaped.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // SAFETY: SIGTERM to our own child, which has not been reaped (checked above).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench edge: {} ignored SIGTERM for 15 s; SIGKILL",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Tools {
    wrk: PathBuf,
    nginx: PathBuf,
    haproxy: PathBuf,
}

struct Ctx {
    dir: PathBuf,
    mesh: PathBuf,
    tools: Tools,
    backend: SocketAddr,
    fabric: SocketAddr,
    token_file: PathBuf,
    /// Modules of this nginx build whose temp paths must be moved into our directory.
    nginx_temp_dirs: Vec<&'static str>,
}

pub fn run() -> Result<()> {
    cargo(&["build", "--release", "--locked", "-p", "mesh"])?;
    let root = workspace_root();
    let dir = root.join("target/bench/edge");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tools = install_tools()?;
    let report = bench(&root, &dir, tools)?;
    print!("{report}");
    fs::write(dir.join("report.md"), &report)?;
    eprintln!("written to {}", dir.join("report.md").display());
    Ok(())
}

/// wrk, nginx and haproxy, from Debian's packages when missing.
fn install_tools() -> Result<Tools> {
    let find = |tool: &str| {
        ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
    };
    let mut missing = Vec::new();
    for (tool, pkg) in [
        ("wrk", "wrk"),
        ("nginx", "nginx-light"),
        ("haproxy", "haproxy"),
    ] {
        if find(tool).is_none() {
            missing.push(pkg);
        }
    }
    if !missing.is_empty() {
        eprintln!(
            "bench edge: installing {} (apt-get install -y {})",
            missing.join(", "),
            missing.join(" ")
        );
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        let mut install = vec!["install", "-y", "-qq"];
        install.extend(&missing);
        let mut ok = apt(&install) || (apt(&["update", "-qq"]) && apt(&install));
        if !ok && missing.contains(&"nginx-light") {
            // Some releases have no nginx-light; plain nginx does as well.
            for p in &mut install {
                if *p == "nginx-light" {
                    *p = "nginx";
                }
            }
            eprintln!("bench edge: retrying with nginx instead of nginx-light");
            ok = apt(&install);
        }
        if !ok {
            bail!("apt-get install {} failed", missing.join(" "));
        }
    }
    let get = |tool: &str| find(tool).with_context(|| format!("{tool} is not installed"));
    Ok(Tools {
        wrk: get("wrk")?,
        nginx: get("nginx")?,
        haproxy: get("haproxy")?,
    })
}

fn bench(root: &Path, dir: &Path, tools: Tools) -> Result<String> {
    let mesh = root.join("target/release/mesh");
    let www = dir.join("www");
    fs::create_dir_all(&www)?;
    let small: Vec<u8> = (0..SMALL_BYTES).map(|i| b'a' + (i % 26) as u8).collect();
    let big: Vec<u8> = (0..BIG_BYTES).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(www.join("small"), &small)?;
    fs::write(www.join("big"), &big)?;

    let nginx_v = version(&tools.nginx, &["-V"]);
    let nginx_temp_dirs = ["fastcgi", "uwsgi", "scgi"]
        .into_iter()
        .filter(|m| !nginx_v.contains(&format!("--without-http_{m}_module")))
        .collect();

    // The backend, on the load CPU.
    let backend: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let bdir = dir.join("backend");
    fs::create_dir_all(&bdir)?;
    let mut ctx = Ctx {
        dir: dir.to_path_buf(),
        mesh,
        tools,
        backend,
        fabric: "127.0.0.1:0".parse()?,
        token_file: dir.join("fabric/admin.token"),
        nginx_temp_dirs,
    };
    fs::write(
        bdir.join("nginx.conf"),
        nginx_conf(
            &ctx,
            &bdir,
            &format!(
                "  sendfile on;\n  default_type application/octet-stream;\n  \
             server {{\n    listen {backend};\n    root {};\n    location / {{ }}\n  }}\n",
                www.display()
            ),
        ),
    )?;
    let mut backend_proc = spawn_nginx(&ctx, &bdir, LOAD_CPU, "backend nginx")?;
    wait_serving(
        &mut backend_proc,
        backend,
        "/small",
        &small,
        &bdir.join("error.log"),
    )?;
    check_body(backend, "/big", &big)?;

    // The fabric, and the route the edge will follow.
    let fabric: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let fabric_http = format!("127.0.0.1:{}", free_port()?);
    ctx.fabric = fabric;
    let mut fabric_proc = Proc {
        child: Command::new("taskset")
            .args(["-c", LOAD_CPU])
            .arg(&ctx.mesh)
            .args([
                "fabric",
                "--listen",
                &fabric.to_string(),
                "--http",
                &fabric_http,
                "--data",
            ])
            .arg(dir.join("fabric"))
            .stdout(log_file(dir, "fabric.log", "fabric")?)
            .stderr(log_file(dir, "fabric.log", "")?)
            .spawn()
            .context("starting mesh fabric")?,
        name: "mesh fabric",
    };
    wait_until(
        Duration::from_secs(30),
        &mut fabric_proc,
        &dir.join("fabric.log"),
        || ctx.token_file.exists() && TcpStream::connect(fabric).is_ok(),
    )?;
    let token = fs::read_to_string(&ctx.token_file)?.trim().to_string();
    let mut line = Line::connect(fabric, &token)?;
    let granted = line.call("LEASE.GRANT ttl_ms=3600000")?;
    let lease = field(&granted, "lease")
        .with_context(|| format!("no lease in {granted:?}"))?
        .to_string();
    line.call(&format!(
        "ENDPOINT.REG bench instance=b1 node=n1 addr={backend} lease={lease}"
    ))?;

    let versions = [
        ("kernel", version(Path::new("uname"), &["-r"])),
        ("nginx", first_line(&version(&ctx.tools.nginx, &["-v"]))),
        ("haproxy", first_line(&version(&ctx.tools.haproxy, &["-v"]))),
        ("wrk", first_line(&version(&ctx.tools.wrk, &["-v"]))),
    ];

    let mut samples: BTreeMap<(Size, Peer), Vec<Sample>> = BTreeMap::new();
    let mut runs: Vec<(usize, Size, Peer, Result<Sample, String>)> = Vec::new();
    for round in 0..ROUNDS {
        for size in SIZES {
            // Round robin, starting one further each round so no proxy always goes first.
            for k in 0..PEERS.len() {
                let peer = PEERS[(k + round) % PEERS.len()];
                eprintln!(
                    "bench edge: round {}/{ROUNDS}, {}, {}",
                    round + 1,
                    size.label(),
                    peer.short()
                );
                let tag = format!(
                    "r{}-{}-{}",
                    round + 1,
                    size.path().trim_start_matches('/'),
                    peer.short()
                );
                let body = if size == Size::Small { &small } else { &big };
                let result = run_once(&ctx, peer, size, body, &tag).map_err(|e| format!("{e:#}"));
                match &result {
                    Ok(s) => {
                        eprintln!(
                            "bench edge:   {:.0} rps, p50 {}, p99 {}, CPU/req {}{}",
                            s.rps,
                            fmt_us(s.p50_us),
                            fmt_us(s.p99_us),
                            s.cpu_per_req_us().map_or("-".into(), fmt_us),
                            if s.errors.is_empty() {
                                String::new()
                            } else {
                                format!(", ERRORS: {}", s.errors.join("; "))
                            }
                        );
                        samples.entry((size, peer)).or_default().push(s.clone());
                    }
                    Err(e) => eprintln!("bench edge:   FAILED: {e}"),
                }
                runs.push((round + 1, size, peer, result));
                // Keep the fabric connection alive (and notice if the fabric died).
                if fabric_proc.exited().is_some() {
                    bail!(
                        "the fabric exited during the bench; see {}",
                        dir.join("fabric.log").display()
                    );
                }
            }
        }
    }
    if backend_proc.exited().is_some() {
        bail!(
            "the backend nginx exited during the bench; see {}",
            bdir.join("error.log").display()
        );
    }
    let _ = line.call("PING");
    drop(line);
    drop(fabric_proc);
    drop(backend_proc);
    Ok(report(&samples, &runs, &versions))
}

/// One run: start the proxy (fresh), check it serves the right bytes, warm up, measure, stop.
fn run_once(ctx: &Ctx, peer: Peer, size: Size, body: &[u8], tag: &str) -> Result<Sample> {
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut admin = None;
    let (mut proc, url_prefix, log): (Option<Proc>, &str, PathBuf) = match peer {
        Peer::Direct => (None, "", PathBuf::new()),
        Peer::Edge => {
            let admin_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
            admin = Some(admin_addr);
            let p = Proc {
                child: Command::new("taskset")
                    .args(["-c", PROXY_CPU])
                    .arg(&ctx.mesh)
                    .args(["edge", "--fabric", &ctx.fabric.to_string(), "--token-file"])
                    .arg(&ctx.token_file)
                    .args([
                        "--listen",
                        &addr.to_string(),
                        "--admin",
                        &admin_addr.to_string(),
                    ])
                    .args(["--threads", "1"])
                    .stdout(log_file(&ctx.dir, "edge.log", tag)?)
                    .stderr(log_file(&ctx.dir, "edge.log", "")?)
                    .spawn()
                    .context("starting mesh edge")?,
                name: "mesh edge",
            };
            (Some(p), "/app/bench", ctx.dir.join("edge.log"))
        }
        Peer::Haproxy | Peer::HaproxySplice => {
            let cfg = ctx.dir.join(format!("{}.cfg", peer.short()));
            fs::write(
                &cfg,
                haproxy_cfg(addr, ctx.backend, peer == Peer::HaproxySplice),
            )?;
            let p = Proc {
                child: Command::new("taskset")
                    .args(["-c", PROXY_CPU])
                    .arg(&ctx.tools.haproxy)
                    .arg("-f")
                    .arg(&cfg)
                    .arg("-db")
                    .stdout(log_file(&ctx.dir, "haproxy.log", tag)?)
                    .stderr(log_file(&ctx.dir, "haproxy.log", "")?)
                    .spawn()
                    .context("starting haproxy")?,
                name: "haproxy",
            };
            (Some(p), "", ctx.dir.join("haproxy.log"))
        }
        Peer::Nginx => {
            let pdir = ctx.dir.join("nginx-proxy");
            fs::create_dir_all(&pdir)?;
            let backend = ctx.backend;
            fs::write(
                pdir.join("nginx.conf"),
                nginx_conf(
                    ctx,
                    &pdir,
                    &format!(
                        "  upstream be {{ server {backend}; keepalive 128; }}\n  \
                     server {{\n    listen {addr};\n    location / {{\n      \
                     proxy_pass http://be;\n      proxy_http_version 1.1;\n      \
                     proxy_set_header Connection \"\";\n      proxy_buffering on;\n      \
                     proxy_buffers 8 64k;\n    }}\n  }}\n"
                    ),
                ),
            )?;
            let p = spawn_nginx(ctx, &pdir, PROXY_CPU, "proxy nginx")?;
            (Some(p), "", pdir.join("error.log"))
        }
    };
    let target = if peer == Peer::Direct {
        ctx.backend
    } else {
        addr
    };
    let path = format!("{url_prefix}{}", size.path());
    if let Some(p) = proc.as_mut() {
        wait_serving(p, target, &path, body, &log)?;
    }
    check_body(target, &path, body)?;

    let url = format!("http://{target}{path}");
    let out = ctx.dir.join("wrk").join(format!("{tag}.txt"));
    fs::create_dir_all(out.parent().context("wrk dir")?)?;
    wrk(
        ctx,
        &url,
        WARMUP_S,
        &ctx.dir.join("wrk").join(format!("{tag}-warmup.txt")),
    )?;

    let pid = proc.as_ref().map(Proc::pid);
    let cpu0 = pid.map(|p| (sched_cpu_s(p), stat_cpu_s(p)));
    let sys0 = cpu_times();
    let t0 = Instant::now();
    let text = wrk(ctx, &url, DURATION_S, &out)?;
    let wall = t0.elapsed().as_secs_f64();
    let sys1 = cpu_times();
    let cpu1 = pid.map(|p| (sched_cpu_s(p), stat_cpu_s(p)));

    let mut s = parse_wrk(&text).with_context(|| format!("parsing {}", out.display()))?;
    if let (Some((a, b)), Some((c, d))) = (cpu0, cpu1) {
        s.cpu_s = Some(c - a);
        s.cpu_stat_s = Some(d - b);
    }
    let busy = |cpu: usize| match (sys0.get(cpu), sys1.get(cpu)) {
        (Some(a), Some(b)) => (b - a) / wall,
        _ => f64::NAN,
    };
    s.cpu0_busy = busy(0);
    s.cpu1_other = (busy(1) - s.cpu_s.unwrap_or(0.0) / wall).max(0.0);
    s.proxy_busy = s.cpu_s.map(|c| c / wall);
    if let Some(admin) = admin {
        match http_get(admin, "/metrics") {
            Ok((200, text)) => s.edge_metrics = edge_counters(&String::from_utf8_lossy(&text)),
            Ok((st, _)) => s.errors.push(format!("/metrics answered {st}")),
            Err(e) => s.errors.push(format!("/metrics: {e:#}")),
        }
    }
    if let Some(p) = proc.as_mut()
        && let Some(st) = p.exited()
    {
        bail!(
            "{} exited during the run ({st}); see {}",
            p.name,
            log.display()
        );
    }
    // The proxy still answers after the load.
    if peer != Peer::Direct {
        check_body(target, &path, body).context("after the run")?;
    }
    Ok(s)
}

fn wrk(ctx: &Ctx, url: &str, secs: u64, out: &Path) -> Result<String> {
    let mut p = Proc {
        child: Command::new("taskset")
            .args(["-c", LOAD_CPU])
            .arg(&ctx.tools.wrk)
            .args([
                "-t1",
                &format!("-c{CONNECTIONS}"),
                &format!("-d{secs}s"),
                "--latency",
                url,
            ])
            .stdout(File::create(out)?)
            .stderr(Stdio::from(File::create(out.with_extension("err"))?))
            .spawn()
            .context("starting wrk")?,
        name: "wrk",
    };
    let end = Instant::now() + Duration::from_secs(secs + 30);
    let status = loop {
        if let Some(st) = p.exited() {
            break st;
        }
        if Instant::now() > end {
            bail!(
                "wrk did not finish {secs} s of load within {} s (hang?)",
                secs + 30
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = fs::read_to_string(out)?;
    if !status.success() {
        let err = fs::read_to_string(out.with_extension("err")).unwrap_or_default();
        bail!("wrk failed ({status}): {text}{err}");
    }
    Ok(text)
}

fn parse_wrk(text: &str) -> Result<Sample> {
    let mut s = Sample::default();
    let mut in_dist = false;
    let (mut got_rps, mut got_p50, mut got_p99, mut got_n) = (false, false, false, false);
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            let mut w = t.split_whitespace();
            match (w.next(), w.next()) {
                (Some("50%"), Some(v)) => {
                    s.p50_us = duration_us(v)?;
                    got_p50 = true;
                }
                (Some("99%"), Some(v)) => {
                    s.p99_us = duration_us(v)?;
                    got_p99 = true;
                }
                (Some(p), Some(_)) if p.ends_with('%') => {}
                _ => in_dist = false,
            }
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            s.rps = v.trim().parse()?;
            got_rps = true;
        } else if t.contains(" requests in ") {
            // "123456 requests in 10.00s, 1.23GB read"
            let mut w = t.split_whitespace();
            s.requests = w.next().context("request count")?.parse()?;
            let read = t
                .rsplit(", ")
                .next()
                .unwrap_or("")
                .trim_end_matches(" read");
            s.bytes_read = size_bytes(read).unwrap_or(f64::NAN);
            got_n = true;
        } else if t.starts_with("Non-2xx or 3xx responses:") || t.starts_with("Socket errors:") {
            s.errors.push(t.to_string());
        }
    }
    if !(got_rps && got_p50 && got_p99 && got_n) {
        bail!("unexpected wrk output:\n{text}");
    }
    Ok(s)
}

/// wrk's durations: "812.00us", "1.23ms", "2.01s", "1.00m".
fn duration_us(v: &str) -> Result<f64> {
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .with_context(|| format!("duration {v:?}"))?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().with_context(|| format!("duration {v:?}"))?;
    Ok(n * match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("duration unit in {v:?}"),
    })
}

/// wrk's sizes (binary prefixes): "1.23GB", "512.00KB", "100B".
fn size_bytes(v: &str) -> Option<f64> {
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    let k = match unit {
        "B" => 0,
        "KB" => 1,
        "MB" => 2,
        "GB" => 3,
        "TB" => 4,
        _ => return None,
    };
    Some(n * 1024f64.powi(k))
}

fn haproxy_cfg(listen: SocketAddr, backend: SocketAddr, splice: bool) -> String {
    format!(
        "global\n  nbthread 1\n  maxconn 4000\n  tune.bufsize 65536\n\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  \
         option http-keep-alive\n  http-reuse always\n{}\n\
         frontend fe\n  bind {listen}\n  default_backend be\n\n\
         backend be\n  server s1 {backend}\n",
        if splice { "  option splice-auto\n" } else { "" }
    )
}

/// An nginx config confined to `dir` (pid, logs, temp files), one worker, no master.
fn nginx_conf(ctx: &Ctx, dir: &Path, http: &str) -> String {
    let d = dir.display();
    let mut temp =
        format!("  client_body_temp_path {d}/client_body;\n  proxy_temp_path {d}/proxy;\n");
    for m in &ctx.nginx_temp_dirs {
        let _ = writeln!(temp, "  {m}_temp_path {d}/{m};");
    }
    format!(
        "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  tcp_nodelay on;\n  keepalive_requests 1000000;\n  \
         keepalive_timeout 65s;\n{temp}{http}}}\n"
    )
}

fn spawn_nginx(ctx: &Ctx, dir: &Path, cpu: &str, name: &'static str) -> Result<Proc> {
    let conf = dir.join("nginx.conf");
    Ok(Proc {
        child: Command::new("taskset")
            .args(["-c", cpu])
            .arg(&ctx.tools.nginx)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdout(log_file(dir, "stdout.log", "")?)
            .stderr(log_file(dir, "error.log", "")?)
            .spawn()
            .with_context(|| format!("starting {name}"))?,
        name,
    })
}

/// A log file opened for appending, with a header line unless `header` is empty.
fn log_file(dir: &Path, name: &str, header: &str) -> Result<Stdio> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))?;
    if !header.is_empty() {
        writeln!(f, "=== {header} ===")?;
    }
    Ok(f.into())
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn wait_until(
    timeout: Duration,
    proc: &mut Proc,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let end = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(st) = proc.exited() {
            bail!("{} exited ({st}):\n{}", proc.name, tail(log, 20));
        }
        if Instant::now() > end {
            bail!(
                "{} not ready after {timeout:?}:\n{}",
                proc.name,
                tail(log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until GET `path` answers 200 with `body` (for the edge: its route has arrived).
fn wait_serving(
    proc: &mut Proc,
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    log: &Path,
) -> Result<()> {
    let mut last = String::new();
    let r = wait_until(Duration::from_secs(30), proc, log, || {
        match http_get(addr, path) {
            Ok((200, b)) if b == body => true,
            Ok((st, b)) => {
                last = format!("last answer: {st}, {} bytes", b.len());
                false
            }
            Err(e) => {
                last = format!("last error: {e:#}");
                false
            }
        }
    });
    r.with_context(|| format!("GET http://{addr}{path}; {last}"))
}

fn check_body(addr: SocketAddr, path: &str, body: &[u8]) -> Result<()> {
    let (st, got) = http_get(addr, path)?;
    if st != 200 || got != body {
        bail!(
            "GET http://{addr}{path}: {st} with {} bytes, expected 200 with the {} bytes of the file",
            got.len(),
            body.len()
        );
    }
    Ok(())
}

/// A one-shot HTTP/1.1 GET (Connection: close): status and body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no complete response head")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let mut body = buf[end + 4..].to_vec();
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size")?;
        let size_text = String::from_utf8_lossy(&b[..nl]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        b = &b[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(..size).context("short chunk")?);
        b = b.get(size + 2..).context("short chunk")?;
    }
}

fn edge_counters(metrics: &str) -> Vec<(String, f64)> {
    const NAMES: [&str; 8] = [
        "mesh_edge_body_bytes_spliced_total",
        "mesh_edge_body_bytes_copied_total",
        "mesh_edge_splice_fallbacks_total",
        "mesh_edge_upstream_connects_total",
        "mesh_edge_upstream_reused_total",
        "mesh_edge_requests_total",
        "mesh_edge_responses_total",
        "mesh_edge_upstream_errors_total",
    ];
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            let base = name.split('{').next()?;
            if !NAMES.contains(&base) {
                return None;
            }
            Some((name.to_string(), v.parse::<f64>().ok()?))
        })
        // Labelled series only when they count something (no list of zero error kinds).
        .filter(|(n, v)| *v != 0.0 || !n.contains('{'))
        .collect()
}

/// On-CPU seconds of all threads of `pid` (schedstat, ns).
fn sched_cpu_s(pid: u32) -> f64 {
    let ns: u64 = fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// utime + stime of `pid` (fields 14 and 15 of /proc/PID/stat), in seconds.
fn stat_cpu_s(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let Some(close) = stat.rfind(')') else {
        return f64::NAN;
    };
    // After "pid (comm)" come fields 3 (state) onward: utime is field 14, index 11 here.
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Busy seconds per CPU (all but idle and iowait) from /proc/stat.
fn cpu_times() -> Vec<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<f64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: f64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
            (total - idle) / hz
        })
        .collect()
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn version(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.trim().to_string()
        })
        .unwrap_or_default()
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// The fabric's line protocol, for the one lease and endpoint the edge routes to.
struct Line {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Line {
    fn connect(addr: SocketAddr, token: &str) -> Result<Line> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut l = Line {
            w: s.try_clone()?,
            r: BufReader::new(s),
        };
        let greeting = l.read()?;
        if !greeting.starts_with("> info") {
            bail!("unexpected fabric greeting {greeting:?}");
        }
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

    /// Sends a command; returns its final `+` line.
    fn call(&mut self, line: &str) -> Result<String> {
        write!(self.w, "{line}\r\n")?;
        loop {
            let l = self.read()?;
            if l.starts_with('+') {
                return Ok(l);
            } else if l.starts_with('-') {
                let shown = if line.starts_with("AUTH ") {
                    "AUTH"
                } else {
                    line
                };
                bail!("{shown}: {l}");
            }
        }
    }
}

fn field<'a>(fields: &'a str, key: &str) -> Option<&'a str> {
    fields
        .split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt_us(us: f64) -> String {
    if !us.is_finite() {
        "-".into()
    } else if us >= 1e6 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{us:.1} µs")
    }
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("-".into(), f)
}

struct Medians {
    rps: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    cpu: Option<f64>,
    n: usize,
}

fn medians(s: &[Sample]) -> Medians {
    Medians {
        rps: median(s.iter().map(|x| x.rps).collect()),
        p50: median(s.iter().map(|x| x.p50_us).collect()),
        p99: median(s.iter().map(|x| x.p99_us).collect()),
        cpu: median(s.iter().filter_map(Sample::cpu_per_req_us).collect()),
        n: s.len(),
    }
}

fn report(
    samples: &BTreeMap<(Size, Peer), Vec<Sample>>,
    runs: &[(usize, Size, Peer, Result<Sample, String>)],
    versions: &[(&str, String)],
) -> String {
    let empty = Vec::new();
    let med = |size, peer| medians(samples.get(&(size, peer)).unwrap_or(&empty));
    let mut r = String::new();
    let _ = writeln!(
        r,
        "# edge: HTTP reverse proxy on loopback, one worker each (median of {ROUNDS} runs)\n\n\
         Backend: nginx, 1 worker, static /small (100 B) and /big (1 MiB, sendfile), keep-alive.\n\
         Load: `wrk -t1 -c{CONNECTIONS} -d{DURATION_S}s --latency` after {WARMUP_S} s of warm-up on a \
         freshly started proxy; proxy on CPU {PROXY_CPU}, wrk and backend on CPU {LOAD_CPU}; runs \
         round robin over the proxies.\n\
         Proxy CPU per request: the proxy's on-CPU time over the measured run (schedstat, all \
         threads) / requests wrk completed.\n"
    );
    for (k, v) in versions {
        let _ = writeln!(r, "- {k}: {v}");
    }
    let _ = writeln!(
        r,
        "\n| proxy (1 worker) | response | rps | rps / direct | p50 | p99 | proxy CPU per request | runs ok |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for size in SIZES {
        let direct = med(size, Peer::Direct).rps;
        for peer in PEERS {
            let m = med(size, peer);
            let ratio = match (m.rps, direct) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "-".into(),
            };
            let _ = writeln!(
                r,
                "| {} | {} | {} | {ratio} | {} | {} | {} | {}/{ROUNDS} |",
                peer.label(),
                size.label(),
                fmt_opt(m.rps, |v| format!("{v:.0}")),
                fmt_opt(m.p50, fmt_us),
                fmt_opt(m.p99, fmt_us),
                fmt_opt(m.cpu, fmt_us),
                m.n
            );
        }
    }

    notes(&mut r, samples);
    let _ = writeln!(
        r,
        "\n## Goals\n\n| measure | edge | peer | edge / peer | goal |\n|---|---|---|---|---|"
    );
    let ratio_row =
        |r: &mut String, what: &str, e: Option<f64>, p: Option<f64>, goal: Option<f64>| {
            let (ratio, verdict) = match (e, p) {
                (Some(e), Some(p)) if p > 0.0 => {
                    let x = e / p;
                    let v = match goal {
                        Some(g) if x <= g => format!("<= {g}: met"),
                        Some(g) => format!("<= {g}: NOT met"),
                        None => "(lower is better)".into(),
                    };
                    (format!("{x:.2}"), v)
                }
                _ => ("-".into(), "no data".into()),
            };
            let _ = writeln!(
                r,
                "| {what} | {} | {} | {ratio} | {verdict} |",
                fmt_opt(e, fmt_us),
                fmt_opt(p, fmt_us)
            );
        };
    let (es, eb) = (med(Size::Small, Peer::Edge), med(Size::Big, Peer::Edge));
    let (hs, hb) = (
        med(Size::Small, Peer::Haproxy),
        med(Size::Big, Peer::Haproxy),
    );
    let hsb = med(Size::Big, Peer::HaproxySplice);
    ratio_row(
        &mut r,
        "CPU per 100 B request, vs haproxy",
        es.cpu,
        hs.cpu,
        Some(0.5),
    );
    ratio_row(
        &mut r,
        "CPU per 1 MiB response, vs haproxy splice-auto",
        eb.cpu,
        hsb.cpu,
        Some(0.7),
    );
    ratio_row(&mut r, "p99 100 B, vs haproxy", es.p99, hs.p99, None);
    ratio_row(
        &mut r,
        "p99 1 MiB, vs haproxy splice-auto",
        eb.p99,
        hsb.p99,
        None,
    );
    ratio_row(&mut r, "p99 1 MiB, vs haproxy", eb.p99, hb.p99, None);

    let _ = writeln!(
        r,
        "\n## Runs\n\nCPU (stat): utime+stime in clock ticks, as a cross-check of the schedstat \
         figure. Proxy busy: the proxy's own share of CPU 1. CPU0 busy: wrk + backend's CPU. \
         CPU1 other: CPU 1 busy time not spent by the proxy (other work on the machine, \
         interrupts), share of the run; `*` above {:.0} %.\n\n\
         | run | response | proxy | rps | p50 | p99 | requests | bytes/response | CPU per request | CPU (stat) per request | proxy busy | CPU0 busy | CPU1 other | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        NOISY * 100.0
    );
    let mut bad = Vec::new();
    for (round, size, peer, res) in runs {
        match res {
            Ok(s) => {
                let stat = s
                    .cpu_stat_s
                    .filter(|_| s.requests > 0)
                    .map(|c| c * 1e6 / s.requests as f64);
                let _ = writeln!(
                    r,
                    "| {round} | {} | {} | {:.0} | {} | {} | {} | {:.0} | {} | {} | {} | {:.0} % | {:.0} %{} | {} |",
                    size.label(),
                    peer.short(),
                    s.rps,
                    fmt_us(s.p50_us),
                    fmt_us(s.p99_us),
                    s.requests,
                    s.bytes_read / s.requests.max(1) as f64,
                    fmt_opt(s.cpu_per_req_us(), fmt_us),
                    fmt_opt(stat, fmt_us),
                    fmt_opt(s.proxy_busy, |b| format!("{:.0} %", b * 100.0)),
                    s.cpu0_busy * 100.0,
                    s.cpu1_other * 100.0,
                    if s.cpu1_other > NOISY { " *" } else { "" },
                    if s.errors.is_empty() {
                        "none".into()
                    } else {
                        s.errors.join("; ")
                    }
                );
                if !s.errors.is_empty() {
                    bad.push(format!(
                        "run {round}, {}, {}: {}",
                        size.label(),
                        peer.short(),
                        s.errors.join("; ")
                    ));
                }
            }
            Err(e) => {
                let _ = writeln!(
                    r,
                    "| {round} | {} | {} | - | - | - | - | - | - | - | - | - | - | FAILED: {} |",
                    size.label(),
                    peer.short(),
                    e.replace('\n', " ").replace('|', "\\|")
                );
                bad.push(format!(
                    "run {round}, {}, {}: FAILED: {e}",
                    size.label(),
                    peer.short()
                ));
            }
        }
    }

    let _ = writeln!(
        r,
        "\n## Edge counters after each 1 MiB run (warm-up + measured run, fresh edge each run)\n"
    );
    for (round, size, peer, res) in runs {
        if let (Size::Big, Peer::Edge, Ok(s)) = (size, peer, res) {
            let _ = writeln!(r, "run {round} ({} responses measured by wrk):", s.requests);
            for (name, v) in &s.edge_metrics {
                let _ = writeln!(r, "    {name} {v}");
            }
        }
    }
    if !bad.is_empty() {
        let _ = writeln!(r, "\n## Errors\n");
        for b in bad {
            let _ = writeln!(r, "- {b}");
        }
        let _ = writeln!(
            r,
            "\nwrk outputs: target/bench/edge/wrk/; edge log: target/bench/edge/edge.log."
        );
    }
    r
}

/// What limited the runs: the load side, the proxy, or other work on the machine.
fn notes(r: &mut String, samples: &BTreeMap<(Size, Peer), Vec<Sample>>) {
    let all: Vec<&Sample> = samples.values().flatten().collect();
    let noisy = all.iter().filter(|s| s.cpu1_other > NOISY).count();
    let _ = writeln!(r);
    if noisy > 0 {
        let _ = writeln!(
            r,
            "- Disturbed: in {noisy} of {} runs something else used more than {:.0} % of CPU 1 \
             (the proxy's CPU; marked `*` under Runs). Their rps and latency suffer; CPU per \
             request (the proxy's own time) much less.",
            all.len(),
            NOISY * 100.0
        );
    }
    for size in SIZES {
        let proxied: Vec<&Sample> = samples
            .iter()
            .filter(|((sz, p), _)| *sz == size && *p != Peer::Direct)
            .flat_map(|(_, v)| v)
            .collect();
        let load = median(proxied.iter().map(|s| s.cpu0_busy).collect());
        let proxy = median(proxied.iter().filter_map(|s| s.proxy_busy).collect());
        if let (Some(load), Some(proxy)) = (load, proxy) {
            let verdict = if load >= 0.95 && proxy < 0.9 {
                "the load side (wrk + backend on CPU 0) limits rps, not the proxies, which ran \
                 below saturation"
            } else if proxy >= 0.9 {
                "the proxies ran near saturation"
            } else {
                "neither side was saturated"
            };
            let _ = writeln!(
                r,
                "- {}: CPU 0 busy {:.0} % and the proxy's CPU {:.0} % in the median proxied run: {verdict}.",
                size.label(),
                load * 100.0,
                proxy * 100.0
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk() {
        let text = "Running 10s test @ http://127.0.0.1:1/small
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms  300.00us  10.00ms   90.00%
    Req/Sec    58.00k     2.00k   60.00k    80.00%
  Latency Distribution
     50%  812.00us
     75%    1.20ms
     90%    1.50ms
     99%    2.01s
  580000 requests in 10.00s, 1.23GB read
  Non-2xx or 3xx responses: 3
Requests/sec:  57999.12
Transfer/sec:    125.95MB
";
        let s = parse_wrk(text).unwrap();
        assert_eq!(s.requests, 580_000);
        assert!((s.rps - 57999.12).abs() < 1e-6);
        assert!((s.p50_us - 812.0).abs() < 1e-6);
        assert!((s.p99_us - 2.01e6).abs() < 1e-3);
        assert!((s.bytes_read - 1.23 * 1024f64.powi(3)).abs() < 1.0);
        assert_eq!(s.errors, ["Non-2xx or 3xx responses: 3"]);
    }

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
    }
}
