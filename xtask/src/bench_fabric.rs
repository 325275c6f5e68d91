//! `cargo xtask bench fabric`: the release fabric over real sockets on 127.0.0.1. Fan-out
//! latency of `BUDGET.SET` events to 1,000 subscribed connections, then commands per second on
//! one connection (closed loop and pipelined) and on 64 connections at once.

use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, mpsc};

use crate::{cargo, workspace_root};

const SUBSCRIBERS: usize = 1000;
const EVENTS: usize = 200;
const PAUSE: Duration = Duration::from_millis(20);
const RUN: Duration = Duration::from_secs(3);
const WINDOW: usize = 64;
const CONNS: usize = 64;
/// Longest wait for any one line from the fabric.
const TIMEOUT: Duration = Duration::from_secs(30);

pub fn run() -> Result<()> {
    // `cargo xtask` is a debug build; as the clients of 1,000 connections it would measure
    // itself more than the fabric, so the benchmark runs from a release build of xtask.
    if let Some(result) = crate::bench::in_release("fabric") {
        return result;
    }
    // The fabric inherits the limit: 1,000 subscribers plus their peers in this process.
    raise_nofile(2 * SUBSCRIBERS as u64 + 256)?;
    cargo(&["build", "--release", "--locked", "-p", "mesh"])?;
    let root = workspace_root();
    let dir = root.join("target/bench/fabric");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (listen, http) = (free_addr()?, free_addr()?);
    let data = dir.join("data");
    let log = fs::File::create(dir.join("fabric.log")).context("creating fabric.log")?;
    let mut child = Command::new(root.join("target/release/mesh"))
        .arg("fabric")
        .args(["--listen", &listen.to_string(), "--http", &http.to_string()])
        .arg("--data")
        .arg(&data)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the release mesh fabric")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime");
    let outcome = rt.and_then(|rt| rt.block_on(bench(&mut child, listen, http, &data)));
    let _ = child.kill();
    let _ = child.wait();
    let report =
        outcome.with_context(|| format!("fabric log: {}", dir.join("fabric.log").display()))?;
    print!("{report}");
    fs::write(dir.join("report.md"), &report)?;
    eprintln!("written to {}", dir.join("report.md").display());
    Ok(())
}

async fn bench(
    child: &mut Child,
    addr: SocketAddr,
    http: SocketAddr,
    data: &Path,
) -> Result<String> {
    let token = wait_ready(child, addr, data).await?;
    let cpu = Cpu(child.id());

    let fan = fan_out(addr, http, &token, &cpu).await?;

    let mut rows = Vec::new();
    let mut c = Conn::open(addr, &token).await?;
    c.call("BUDGET.SET bench max_instances=1 cpu_milli=100 memory_mb=64")
        .await?;
    let get = |_| "BUDGET.GET bench".to_string();
    let set = |i: u64| format!("BUDGET.SET bench max_instances={}", i % 1000 + 1);
    let (lat, wall, used) = cpu.during(closed_loop(&mut c, get)).await?;
    rows.push(row("BUDGET.GET, closed loop", 1, &lat, wall, used));
    let (lat, wall, used) = cpu.during(pipelined(&mut c)).await?;
    rows.push(row(
        &format!("BUDGET.GET, pipelined {WINDOW} at a time"),
        1,
        &lat,
        wall,
        used,
    ));
    let before = commits(http).await?;
    let (lat, wall, used) = cpu.during(closed_loop(&mut c, set)).await?;
    rows.push(row("BUDGET.SET, closed loop", 1, &lat, wall, used));
    let mut notes = vec![commit_note(
        "1 connection",
        lat.len(),
        before,
        commits(http).await?,
    )];
    drop(c);

    let mut conns = Vec::with_capacity(CONNS);
    for i in 0..CONNS {
        let mut c = Conn::open(addr, &token).await?;
        c.call(&format!(
            "BUDGET.SET bench-{i} max_instances=1 cpu_milli=100 memory_mb=64"
        ))
        .await?;
        conns.push(c);
    }
    let (lat, wall, used) = cpu.during(many(&mut conns, false)).await?;
    rows.push(row("BUDGET.GET, closed loop each", CONNS, &lat, wall, used));
    let before = commits(http).await?;
    let (lat, wall, used) = cpu.during(many(&mut conns, true)).await?;
    rows.push(row("BUDGET.SET, closed loop each", CONNS, &lat, wall, used));
    let after = commits(http).await?;
    notes.push(commit_note(
        &format!("{CONNS} connections"),
        lat.len(),
        before,
        after,
    ));
    drop(conns);

    let (user, system) = cpu_times(&cpu.0.to_string())?;
    let mut r = format!(
        "# fabric: release `mesh fabric` on 127.0.0.1, a release xtask as the clients\n\n{}\n\n",
        machine(data)
    );
    r.push_str(&fan);
    let _ = write!(
        r,
        "\n## Commands per second ({} s each)\n\n\
         Latency: send to reply; pipelined, from writing the window to reading that reply. \
         CPU: seconds of CPU per second of wall time (1.0 = one core busy).\n\n\
         | test | conns | ops | ops/s | mean | p50 | p99 | max | fabric CPU | bench CPU |\n\
         |---|---|---|---|---|---|---|---|---|---|\n{}\n\n\
         Group commit, from the fabric's /metrics:\n{}\n\n\
         Fabric CPU over the whole run (start and setup included): {:.2} s user + {:.2} s \
         system = {:.2} s.\n",
        RUN.as_secs(),
        rows.join("\n"),
        notes.join("\n"),
        user,
        system,
        user + system,
    );
    Ok(r)
}

/// 1,000 connections subscribe to budgets; one more sets a budget `EVENTS` times, one at a
/// time, and every subscriber notes when each event line arrived.
async fn fan_out(addr: SocketAddr, http: SocketAddr, token: &str, cpu: &Cpu) -> Result<String> {
    let t = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<(u64, Instant), String>>();
    let gate = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::with_capacity(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        let (tx, gate, token) = (tx.clone(), gate.clone(), token.to_string());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = subscriber(addr, &token, &gate, &tx).await {
                let _ = tx.send(Err(format!("{e:#}")));
            }
        }));
    }
    drop(tx);
    // Each subscriber sends (0, _) once it has seen `> sync`.
    for _ in 0..SUBSCRIBERS {
        match recv(&mut rx).await? {
            (0, _) => {}
            (rev, _) => bail!("event rev={rev} before every subscriber was in sync"),
        }
    }
    let setup = t.elapsed();

    let mut publisher = Conn::open(addr, token).await?;
    let (mut all, mut last, mut first, mut ack) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (before, commits_before) = (cpu.sample()?, commits(http).await?);
    for i in 0..EVENTS {
        let sent = Instant::now();
        let ok = publisher
            .call(&format!(
                "BUDGET.SET fan max_instances={} cpu_milli=100 memory_mb=64",
                i + 1
            ))
            .await?;
        ack.push(sent.elapsed());
        let rev = field(&ok, "rev")?;
        let mut got = Vec::with_capacity(SUBSCRIBERS);
        while got.len() < SUBSCRIBERS {
            match recv(&mut rx).await? {
                (r, at) if r == rev => got.push(at - sent),
                (r, _) => bail!("a subscriber got rev={r} while waiting for rev={rev}"),
            }
        }
        got.sort();
        first.push(got[0]);
        last.push(got[SUBSCRIBERS - 1]);
        all.extend(got);
        tokio::time::sleep(PAUSE).await;
    }
    let (after, commits_after) = (cpu.sample()?, commits(http).await?);
    for t in &tasks {
        t.abort();
    }
    let lines = EVENTS * SUBSCRIBERS;
    let (fab, us) = (after.0 - before.0, after.1 - before.1);
    let mut r = format!(
        "## Fan-out: {EVENTS} `BUDGET.SET` to {SUBSCRIBERS} connections with `SUB budgets`\n\n\
         Setup ({SUBSCRIBERS} x connect, AUTH, SUB, wait for `> sync`, 32 at a time): {:.2} s. \
         Each event: from just before the publisher writes the command to the subscriber \
         reading the event line; the next command goes out once all {SUBSCRIBERS} have it, \
         after a {} ms pause. CPU for the {lines} event lines (commits and publisher \
         included): fabric {fab:.2} s ({:.1} us a line), this process {us:.2} s ({:.1} us a \
         line).\n\n{}\n\n\
         | measure | n | p50 | p99 | max |\n|---|---|---|---|---|\n",
        setup.as_secs_f64(),
        PAUSE.as_millis(),
        fab * 1e6 / lines as f64,
        us * 1e6 / lines as f64,
        commit_note("the publisher", EVENTS, commits_before, commits_after),
    );
    for (what, v) in [
        ("event line, every (event, subscriber) pair", &mut all),
        ("first of the 1000 to have it, per event", &mut first),
        ("last of the 1000 to have it, per event", &mut last),
        ("publisher's `+OK` (durable write), per event", &mut ack),
    ] {
        v.sort();
        let _ = writeln!(
            r,
            "| {what} | {} | {} | {} | {} |",
            v.len(),
            human(pct(v, 0.5)),
            human(pct(v, 0.99)),
            human(pct(v, 1.0)),
        );
    }
    Ok(r)
}

async fn subscriber(
    addr: SocketAddr,
    token: &str,
    gate: &Semaphore,
    tx: &mpsc::UnboundedSender<Result<(u64, Instant), String>>,
) -> Result<()> {
    let mut c = {
        let _permit = gate.acquire().await?;
        let mut c = Conn::open(addr, token).await?;
        c.send("SUB budgets\n").await?;
        let ok = c.reply().await?;
        let sub = field(&ok, "sub")?;
        let sync = format!("> sync sub={sub} ");
        while !c.line().await?.starts_with(&sync) {}
        c
    };
    tx.send(Ok((0, Instant::now())))?;
    loop {
        let line = c.line().await?;
        let at = Instant::now();
        if line.starts_with("> budget ") {
            tx.send(Ok((field(line, "rev")?, at)))?;
        }
    }
}

async fn recv(
    rx: &mut mpsc::UnboundedReceiver<Result<(u64, Instant), String>>,
) -> Result<(u64, Instant)> {
    match tokio::time::timeout(TIMEOUT, rx.recv()).await {
        Err(_) => bail!("no subscriber reported for {} s", TIMEOUT.as_secs()),
        Ok(None) => bail!("every subscriber is gone"),
        Ok(Some(Err(e))) => bail!("a subscriber failed: {e}"),
        Ok(Some(Ok(x))) => Ok(x),
    }
}

/// Send, wait for the reply, repeat, for `RUN`.
async fn closed_loop(c: &mut Conn, line: impl Fn(u64) -> String) -> Result<Vec<Duration>> {
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed() < RUN {
        let cmd = line(lat.len() as u64);
        let t = Instant::now();
        c.call(&cmd).await?;
        lat.push(t.elapsed());
    }
    Ok(lat)
}

/// Write `WINDOW` commands at once, then read their replies, for `RUN`.
async fn pipelined(c: &mut Conn) -> Result<Vec<Duration>> {
    let window = "BUDGET.GET bench\n".repeat(WINDOW);
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed() < RUN {
        let t = Instant::now();
        c.send(&window).await?;
        for _ in 0..WINDOW {
            c.reply().await?;
            lat.push(t.elapsed());
        }
    }
    Ok(lat)
}

/// Every connection in its own closed loop (reads or writes of its own app), all at once.
async fn many(conns: &mut Vec<Conn>, writes: bool) -> Result<Vec<Duration>> {
    let mut tasks = Vec::new();
    for (i, mut c) in conns.drain(..).enumerate() {
        tasks.push(tokio::spawn(async move {
            let lat = if writes {
                closed_loop(&mut c, |n| {
                    format!("BUDGET.SET bench-{i} max_instances={}", n % 1000 + 1)
                })
                .await
            } else {
                closed_loop(&mut c, |_| format!("BUDGET.GET bench-{i}")).await
            };
            lat.map(|l| (c, l))
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let (c, lat) = t.await??;
        conns.push(c);
        all.extend(lat);
    }
    Ok(all)
}

/// A raw line-protocol connection, authenticated as admin.
struct Conn {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    buf: String,
}

impl Conn {
    async fn open(addr: SocketAddr, token: &str) -> Result<Conn> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        let (rd, wr) = s.into_split();
        let mut c = Conn {
            rd: BufReader::new(rd),
            wr,
            buf: String::new(),
        };
        let greeting = c.line().await?;
        if !greeting.starts_with("> info ") {
            bail!("unexpected greeting {greeting:?}");
        }
        let ok = c.call(&format!("AUTH {token}")).await?;
        if !ok.starts_with("+OK role=admin") {
            bail!("AUTH: {ok}");
        }
        Ok(c)
    }

    async fn send(&mut self, text: &str) -> Result<()> {
        self.wr
            .write_all(text.as_bytes())
            .await
            .context("writing to the fabric")
    }

    /// The next line, without its terminator.
    async fn line(&mut self) -> Result<&str> {
        self.buf.clear();
        let n = tokio::time::timeout(TIMEOUT, self.rd.read_line(&mut self.buf))
            .await
            .context("no line from the fabric in time")?
            .context("reading from the fabric")?;
        if n == 0 {
            bail!("the fabric closed the connection");
        }
        Ok(self.buf.trim_end())
    }

    /// Reads up to the final `+OK ...` line (skipping items and events); `-ERR` is an error.
    async fn reply(&mut self) -> Result<String> {
        loop {
            let line = self.line().await?;
            if line.starts_with("+OK") {
                return Ok(line.to_string());
            }
            if line.starts_with("-ERR") {
                bail!("fabric: {line}");
            }
        }
    }

    async fn call(&mut self, cmd: &str) -> Result<String> {
        self.send(&format!("{cmd}\n")).await?;
        self.reply().await.with_context(|| format!("{cmd:?}"))
    }
}

/// The value of `key=` in a reply or event line, as a number.
fn field(line: &str, key: &str) -> Result<u64> {
    line.split(' ')
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
        .with_context(|| format!("no {key}= in {line:?}"))?
        .parse()
        .with_context(|| format!("{key}= in {line:?}"))
}

/// Waits until the fabric wrote its admin token and accepts connections; returns the token.
async fn wait_ready(child: &mut Child, addr: SocketAddr, data: &Path) -> Result<String> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the fabric exited at start ({status})");
        }
        let token = fs::read_to_string(data.join("admin.token")).unwrap_or_default();
        if !token.trim().is_empty() && TcpStream::connect(addr).await.is_ok() {
            return Ok(token.trim().to_string());
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("the fabric did not start listening on {addr} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU seconds (user + system) of the fabric (by pid) and of this process.
struct Cpu(u32);

impl Cpu {
    fn sample(&self) -> Result<(f64, f64)> {
        Ok((cpu_seconds(&self.0.to_string())?, cpu_seconds("self")?))
    }

    /// Runs `f`; returns its output, wall time and CPU seconds per wall second of both sides.
    async fn during<T>(
        &self,
        f: impl Future<Output = Result<T>>,
    ) -> Result<(T, Duration, (f64, f64))> {
        let (before, t) = (self.sample()?, Instant::now());
        let out = f.await?;
        let (wall, after) = (t.elapsed(), self.sample()?);
        let w = wall.as_secs_f64();
        Ok((
            out,
            wall,
            ((after.0 - before.0) / w, (after.1 - before.1) / w),
        ))
    }
}

fn cpu_seconds(pid: &str) -> Result<f64> {
    let (user, system) = cpu_times(pid)?;
    Ok(user + system)
}

/// User and system CPU seconds of a process, from /proc/<pid>/stat.
fn cpu_times(pid: &str) -> Result<(f64, f64)> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| path.clone())?;
    // Fields after the command name (which may hold spaces) start at field 3, the state;
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(") ").with_context(|| path.clone())?.1;
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = |i: usize| -> Result<f64> {
        let v: u64 = f.get(i).with_context(|| path.clone())?.parse()?;
        Ok(v as f64)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = hz.max(1) as f64;
    Ok((ticks(11)? / hz, ticks(12)? / hz))
}

/// CPUs, kernel and the data dir's file system; the fabric and the clients share the CPUs.
fn machine(data: &Path) -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let fs_type = Command::new("df")
        .arg("--output=fstype")
        .arg(data)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .last()
                .unwrap_or("?")
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    format!(
        "Machine: {cores} CPUs (nproc), kernel {}, data dir on {fs_type}; the fabric and the \
         clients share these CPUs.",
        kernel.trim()
    )
}

/// Commits so far and their total seconds, from the fabric's /metrics.
async fn commits(http: SocketAddr) -> Result<(f64, f64)> {
    let mut s = TcpStream::connect(http)
        .await
        .context("connecting to /metrics")?;
    // HTTP/1.0: the body is not chunked and ends when the connection does.
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
    let mut text = String::new();
    tokio::time::timeout(TIMEOUT, s.read_to_string(&mut text))
        .await
        .context("no /metrics in time")??;
    let metric = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("no {name} in /metrics"))
    };
    Ok((
        metric("mesh_fabric_store_commit_seconds_count")?,
        metric("mesh_fabric_store_commit_seconds_sum")?,
    ))
}

fn commit_note(who: &str, writes: usize, before: (f64, f64), after: (f64, f64)) -> String {
    let (n, secs) = (after.0 - before.0, after.1 - before.1);
    format!(
        "- {who}: {writes} `BUDGET.SET` in {n:.0} commits ({:.1} a commit), {} a commit (fsync included)",
        writes as f64 / n.max(1.0),
        human(Duration::from_secs_f64(secs / n.max(1.0))),
    )
}

fn row(what: &str, conns: usize, lat: &[Duration], wall: Duration, cpu: (f64, f64)) -> String {
    let mut v = lat.to_vec();
    v.sort();
    let mean = v.iter().sum::<Duration>() / (v.len().max(1) as u32);
    format!(
        "| {what} | {conns} | {} | {:.0} | {} | {} | {} | {} | {:.2} | {:.2} |",
        v.len(),
        v.len() as f64 / wall.as_secs_f64(),
        human(mean),
        human(pct(&v, 0.5)),
        human(pct(&v, 0.99)),
        human(pct(&v, 1.0)),
        cpu.0,
        cpu.1,
    )
}

/// The `p` quantile of sorted durations (nearest rank).
fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len().max(1) - 1) as f64 * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn human(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{} us", d.as_micros())
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1000.0)
    }
}

fn free_addr() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?)
}

/// Raises the soft limit on open files to at least `want` (up to the hard limit).
fn raise_nofile(want: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for the call to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(());
    }
    if lim.rlim_max < want {
        bail!(
            "open files hard limit is {} but the benchmark needs {want}: raise it (ulimit -Hn)",
            lim.rlim_max
        );
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!("setrlimit: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
