//! `mesh top`: a live view of every spore on a node or on the whole mesh.
//!
//! Each node agent serves `GET /v1/instances` (see `mesh_agent::metrics::Sample`): cumulative
//! counters stamped with the agent's monotonic clock. `mesh top` samples every agent in
//! parallel, and turns two consecutive samples of an agent into CPU % and network rates.
//! Which agents: `--agent`, else every node the fabric lists (its `metrics=` address), else
//! the local agent. The pure parts (HTTP response and sample parsing, rates, sorting,
//! formatting) are plain functions tested below; the terminal view is a thin layer on top.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{cursor, execute, terminal};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table, TableState};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::fabric_client::{FabricArgs, block_on};
use crate::output::human_bytes;

/// Where `mesh agent` serves metrics unless told otherwise.
pub const DEFAULT_AGENT: &str = "127.0.0.1:9181";
/// How long one agent may take to answer (connect, request and the whole response).
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the TUI asks the fabric again which nodes there are.
const REDISCOVER: Duration = Duration::from_secs(15);
/// Responses larger than this are refused (a sample is a few hundred bytes per instance).
const MAX_RESPONSE: usize = 64 << 20;

#[derive(Args)]
#[command(after_help = "\
Examples:
  mesh top                          every node the fabric lists, else the local agent
  mesh top --agent 10.0.0.12:9181 --agent 10.0.0.13:9181
  mesh top --app hello --interval 2000
  mesh top --costs                  also what the eBPF programs cost per run
  mesh top --once                   the table once, as plain text
  mesh top --once --json | jq '.instances[] | {app, instance, cpu_percent}'

Keys: c CPU%, m memory, r RX/s, t TX/s, p run-queue p99, n name, s restarts (the same key
again reverses the order); Up/Down, PgUp/PgDn, Home/End select a row; q, Esc or Ctrl-C quit.

CPU% (100 = one core), RX/s and TX/s are differences between two samples of an agent; they
show '-' until the second sample. RQ p99 is the 99th percentile of the time the spore's
threads waited to run, since the instance started (eBPF). Columns that need eBPF show '-'
on agents without it (`mesh agent --no-ebpf`, or a kernel without BTF).")]
pub struct TopCmd {
    /// An agent's metrics address HOST:PORT (`mesh agent --metrics`); repeat for several
    /// [default: every node the fabric lists, else 127.0.0.1:9181].
    #[arg(long = "agent", value_name = "ADDR")]
    agents: Vec<String>,
    /// Show only this app's instances.
    #[arg(long, value_name = "NAME")]
    app: Option<String>,
    /// Milliseconds between samples [default: 1000; 500 with --once].
    #[arg(long, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    interval: Option<u64>,
    /// Take two samples --interval apart, print the table once as plain text and exit.
    #[arg(long)]
    once: bool,
    /// With --once: print one JSON document instead (implies --once): {"agents": [{addr,
    /// node, ebpf, error}], "instances": [each sample as the agent sent it, plus
    /// cpu_percent, rx_bytes_per_s and tx_bytes_per_s]}.
    #[arg(long)]
    json: bool,
    /// Also show what each eBPF program costs (runs, ns per run). This turns on the kernel's
    /// run statistics on the agents, which stay on for about 30 s after the last request.
    #[arg(long)]
    costs: bool,
    /// The column to sort by first (in the view, keys change it).
    #[arg(long, value_enum, default_value_t = SortKey::Cpu)]
    sort: SortKey,
    #[command(flatten)]
    fabric: FabricArgs,
}

pub fn run(cmd: TopCmd) -> Result<()> {
    let once = cmd.once || cmd.json;
    let interval = Duration::from_millis(cmd.interval.unwrap_or(if once { 500 } else { 1000 }));
    let source = if cmd.agents.is_empty() {
        Source::Fabric(Box::new(cmd.fabric.clone()))
    } else {
        let mut addrs: Vec<String> = Vec::new();
        for a in &cmd.agents {
            let a = normalize_addr(a)?;
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        Source::Fixed(addrs)
    };
    let opts = Options {
        app: cmd.app.clone(),
        interval,
        costs: cmd.costs,
        sort: Sort::new(cmd.sort),
    };
    if once {
        run_once(&source, &opts, cmd.json)
    } else {
        run_tui(source, &opts)
    }
}

struct Options {
    app: Option<String>,
    interval: Duration,
    costs: bool,
    sort: Sort,
}

// ---------------------------------------------------------------------------------------------
// Samples as the agent sends them

/// The numbers of one instance that `mesh top` computes with (the JSON keeps the rest).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
struct Inst {
    #[serde(default)]
    node: String,
    app: String,
    instance: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    pid: u32,
    #[serde(default)]
    restarts: u32,
    #[serde(default)]
    last_exit: String,
    cpu_ns_ebpf: Option<u64>,
    cpu_usec_cgroup: Option<u64>,
    memory_bytes: Option<u64>,
    rx_bytes: Option<u64>,
    tx_bytes: Option<u64>,
    runqueue_p99_us: Option<u64>,
}

/// One instance: the parsed numbers and the object exactly as received.
#[derive(Debug, Clone)]
struct Instance {
    s: Inst,
    raw: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
struct Program {
    name: String,
    #[serde(default)]
    run_count: u64,
    #[serde(default)]
    run_time_ns: u64,
}

/// One agent's `/v1/instances` answer.
#[derive(Debug, Clone)]
struct AgentSample {
    node: String,
    at_ms: u64,
    ebpf: bool,
    instances: Vec<Instance>,
    programs: Vec<Program>,
}

fn parse_sample(body: &[u8]) -> Result<AgentSample> {
    #[derive(Deserialize)]
    struct Head {
        node: String,
        at_ms: u64,
        #[serde(default)]
        ebpf: bool,
        #[serde(default)]
        instances: Vec<Map<String, Value>>,
        #[serde(default)]
        programs: Vec<Program>,
    }
    let head: Head =
        serde_json::from_slice(body).context("the answer is not a /v1/instances sample")?;
    let mut instances = Vec::with_capacity(head.instances.len());
    for (k, raw) in head.instances.into_iter().enumerate() {
        let s: Inst = serde_json::from_value(Value::Object(raw.clone()))
            .with_context(|| format!("instance {k} of the sample"))?;
        instances.push(Instance { s, raw });
    }
    Ok(AgentSample {
        node: head.node,
        at_ms: head.at_ms,
        ebpf: head.ebpf,
        instances,
        programs: head.programs,
    })
}

// ---------------------------------------------------------------------------------------------
// A small blocking HTTP/1.1 client: one GET, `Connection: close`

/// `HOST:PORT` from what a user may type: a bare host gets the default port, a pasted URL
/// loses its scheme and path.
fn normalize_addr(input: &str) -> Result<String> {
    let s = input.trim();
    if s.to_ascii_lowercase().starts_with("https://") {
        bail!("--agent {input:?}: the agent serves plain HTTP; pass HOST:PORT");
    }
    let s = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("HTTP://"))
        .unwrap_or(s);
    let s = s.split('/').next().unwrap_or_default();
    if s.is_empty() {
        bail!("--agent {input:?} is empty: pass HOST:PORT, e.g. --agent {DEFAULT_AGENT}");
    }
    let has_port = if let Some(rest) = s.strip_prefix('[') {
        // [v6]:port
        rest.split_once(']')
            .is_some_and(|(_, after)| after.starts_with(':'))
    } else {
        // a bare IPv6 address has several colons and no port
        s.matches(':').count() == 1
    };
    let port = DEFAULT_AGENT.rsplit(':').next().unwrap_or("9181");
    Ok(if has_port {
        s.to_string()
    } else if s.contains(':') && !s.starts_with('[') {
        format!("[{s}]:{port}")
    } else {
        format!("{s}:{port}")
    })
}

/// GETs `path` from `addr`; the status and the body.
fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr} (expected HOST:PORT)"))?
        .collect();
    let mut last_err = None;
    let mut stream = None;
    for sa in &addrs {
        match TcpStream::connect_timeout(sa, timeout.min(Duration::from_secs(2))) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let Some(mut stream) = stream else {
        let why = last_err.map_or_else(|| "no address".to_string(), |e| e.to_string());
        bail!(
            "cannot connect: {why} (is `mesh agent` running there, with --metrics on this \
             address?)"
        );
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: mesh-top\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .context("sending the request")?;
    let mut buf = Vec::with_capacity(16 << 10);
    let mut chunk = [0u8; 16 << 10];
    loop {
        if let Some(want) = complete_length(&buf)
            && buf.len() >= want
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("no complete answer within {} ms", timeout.as_millis());
        }
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("no complete answer within {} ms", timeout.as_millis())
            }
            Err(e) => return Err(e).context("reading the answer"),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            bail!("the answer is larger than {} MiB", MAX_RESPONSE >> 20);
        }
    }
    parse_http_response(&buf)
}

/// Where the header block ends (after the blank line).
fn header_end(raw: &[u8]) -> Option<usize> {
    raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The full length of a response with a Content-Length, once its headers are in.
fn complete_length(raw: &[u8]) -> Option<usize> {
    let end = header_end(raw)?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let len: usize = header_value(head, "content-length")?.parse().ok()?;
    Some(end + len)
}

/// Status and body of a complete HTTP/1.x response (Content-Length, chunked, or to EOF).
fn parse_http_response(raw: &[u8]) -> Result<(u16, Vec<u8>)> {
    if raw.is_empty() {
        bail!("the connection closed without an answer");
    }
    let end = header_end(raw).ok_or_else(|| anyhow!("the answer is not HTTP (no header end)"))?;
    let head = std::str::from_utf8(&raw[..end]).context("the answer's headers are not text")?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("the answer is not HTTP/1.x: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line {status_line:?}"))?;
    let rest = &raw[end..];
    let chunked = header_value(head, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(len) = header_value(head, "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| anyhow!("bad Content-Length {len:?}"))?;
        if rest.len() < len {
            bail!("the answer was cut short: {} of {len} bytes", rest.len());
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok((status, body))
}

fn decode_chunked(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunked encoding: missing chunk size"))?;
        let size_text = std::str::from_utf8(&b[..eol]).unwrap_or_default();
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| anyhow!("bad chunked encoding: chunk size {size_text:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size {
            bail!("the answer was cut short inside a chunk");
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).unwrap_or_default();
    }
}

/// One agent's sample, or why not.
fn fetch_sample(addr: &str, costs: bool, timeout: Duration) -> Result<AgentSample> {
    let path = if costs {
        "/v1/instances?costs=1"
    } else {
        "/v1/instances"
    };
    let (status, body) = http_get(addr, path, timeout)?;
    if status == 404 {
        bail!(
            "HTTP 404 for {path}: this agent is too old for `mesh top` or this is not an agent's \
             metrics address (upgrade the agent; check `mesh agent --metrics`)"
        );
    }
    if status != 200 {
        let text = String::from_utf8_lossy(&body);
        let first = text.lines().next().unwrap_or_default();
        bail!("HTTP {status} for {path}: {first}");
    }
    parse_sample(&body)
}

// ---------------------------------------------------------------------------------------------
// Which agents

/// An agent to sample: its address, or why it has none (a node without `metrics=`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    node: Option<String>,
    addr: std::result::Result<String, String>,
}

enum Source {
    Fixed(Vec<String>),
    Fabric(Box<FabricArgs>),
}

/// The agents of the nodes in a NODE.LIST answer, and notes on lines that have none.
fn targets_from_node_list(items: &[String]) -> (Vec<Target>, Vec<String>) {
    let mut targets = Vec::new();
    let mut notes = Vec::new();
    for item in items {
        let fields = mesh_common::proto::parse_fields(item);
        let Some(node) = mesh_common::proto::field(&fields, "node") else {
            notes.push(format!("the fabric listed a node without a name: {item:?}"));
            continue;
        };
        let addr = match mesh_common::proto::field(&fields, "metrics") {
            Some(m) if !m.is_empty() => normalize_addr(m).map_err(|e| e.to_string()),
            _ => Err(
                "no metrics address registered (its agent predates `mesh top` or runs \
                      with --no-metrics); skipped"
                    .to_string(),
            ),
        };
        targets.push(Target {
            node: Some(node.to_string()),
            addr,
        });
    }
    (targets, notes)
}

fn local_target() -> Target {
    Target {
        node: None,
        addr: Ok(DEFAULT_AGENT.to_string()),
    }
}

/// NODE.LIST from the fabric.
fn fabric_node_list(args: &FabricArgs) -> Result<Vec<String>> {
    let args = args.clone();
    block_on(async move {
        let mut c = args.connect().await?;
        let r = tokio::time::timeout(Duration::from_secs(5), c.call("NODE.LIST"))
            .await
            .map_err(|_| anyhow!("the fabric did not answer NODE.LIST within 5 s"))??;
        Ok::<_, anyhow::Error>(r.items)
    })?
}

/// The agents to sample, and notes on how they were found.
fn discover(source: &Source) -> (Vec<Target>, Vec<String>) {
    let args = match source {
        Source::Fixed(addrs) => {
            let t = addrs
                .iter()
                .map(|a| Target {
                    node: None,
                    addr: Ok(a.clone()),
                })
                .collect();
            return (t, Vec::new());
        }
        Source::Fabric(args) => args,
    };
    let fabric = match args.resolve() {
        Ok(cfg) => cfg.fabric,
        Err(e) => {
            return (
                vec![local_target()],
                vec![format!(
                    "no fabric configured ({}); showing the local agent {DEFAULT_AGENT} \
                     (or pass --agent ADDR)",
                    crate::output::render_error(&e)
                )],
            );
        }
    };
    match fabric_node_list(args) {
        Ok(items) => {
            let (targets, mut notes) = targets_from_node_list(&items);
            if targets.iter().any(|t| t.addr.is_ok()) {
                (targets, notes)
            } else {
                notes.push(format!(
                    "the fabric at {fabric} lists no node with a metrics address; \
                     showing the local agent {DEFAULT_AGENT}"
                ));
                let mut t = targets;
                t.push(local_target());
                (t, notes)
            }
        }
        Err(e) => (
            vec![local_target()],
            vec![format!(
                "fabric at {fabric} unreachable ({}); showing the local agent {DEFAULT_AGENT}",
                crate::output::render_error(&e)
            )],
        ),
    }
}

/// One target's answer in one round.
#[derive(Debug)]
struct AgentResult {
    target: Target,
    sample: std::result::Result<AgentSample, String>,
}

/// Samples every target in parallel.
fn fetch_all(targets: &[Target], costs: bool, timeout: Duration) -> Vec<AgentResult> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| {
                scope.spawn(move || match &t.addr {
                    Ok(addr) => fetch_sample(addr, costs, timeout)
                        .map_err(|e| crate::output::render_error(&e)),
                    Err(why) => Err(why.clone()),
                })
            })
            .collect();
        targets
            .iter()
            .zip(handles)
            .map(|(t, h)| AgentResult {
                target: t.clone(),
                sample: h
                    .join()
                    .unwrap_or_else(|_| Err("sampling this agent panicked".to_string())),
            })
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------
// Rates

/// Per second, from two readings of a counter `dt_ms` apart; None when a reading is missing,
/// no time passed, or the counter went back (the instance or the agent restarted).
fn per_second(prev: Option<u64>, cur: Option<u64>, dt_ms: u64) -> Option<f64> {
    let (p, c) = (prev?, cur?);
    if dt_ms == 0 || c < p {
        return None;
    }
    Some((c - p) as f64 * 1000.0 / dt_ms as f64)
}

/// CPU % (100 = one core busy) between two samples; eBPF's nanoseconds when both samples
/// have them, else the cgroup's microseconds.
fn cpu_percent(prev: &Inst, cur: &Inst, dt_ms: u64) -> Option<f64> {
    let ns = match (prev.cpu_ns_ebpf, cur.cpu_ns_ebpf) {
        (Some(p), Some(c)) => (p, c),
        _ => (
            prev.cpu_usec_cgroup?.saturating_mul(1000),
            cur.cpu_usec_cgroup?.saturating_mul(1000),
        ),
    };
    let ns_per_s = per_second(Some(ns.0), Some(ns.1), dt_ms)?;
    Some(ns_per_s / 1e9 * 100.0)
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Rates {
    cpu_percent: Option<f64>,
    rx_per_s: Option<f64>,
    tx_per_s: Option<f64>,
}

/// The rates of `cur` given the same instance in the agent's previous sample.
fn rates(prev: Option<(&Inst, u64)>, cur: &Inst, cur_at_ms: u64) -> Rates {
    let Some((p, p_at)) = prev else {
        return Rates::default();
    };
    let Some(dt) = cur_at_ms.checked_sub(p_at) else {
        return Rates::default();
    };
    Rates {
        cpu_percent: cpu_percent(p, cur, dt),
        rx_per_s: per_second(p.rx_bytes, cur.rx_bytes, dt),
        tx_per_s: per_second(p.tx_bytes, cur.tx_bytes, dt),
    }
}

/// One line of the spore table.
#[derive(Debug, Clone)]
struct SporeRow {
    inst: Instance,
    rates: Rates,
}

/// One line of the program table.
#[derive(Debug, Clone, PartialEq)]
struct ProgRow {
    node: String,
    name: String,
    runs: u64,
    runs_per_s: Option<f64>,
    ns_per_run: Option<f64>,
    /// Whether ns_per_run is over the last interval (else since statistics were turned on).
    recent: bool,
}

fn program_row(node: &str, prev: Option<(&Program, u64)>, cur: &Program, at_ms: u64) -> ProgRow {
    let cumulative = (cur.run_count > 0).then(|| cur.run_time_ns as f64 / cur.run_count as f64);
    let mut row = ProgRow {
        node: node.to_string(),
        name: cur.name.clone(),
        runs: cur.run_count,
        runs_per_s: None,
        ns_per_run: cumulative,
        recent: false,
    };
    if let Some((p, p_at)) = prev
        && let Some(dt) = at_ms.checked_sub(p_at)
    {
        row.runs_per_s = per_second(Some(p.run_count), Some(cur.run_count), dt);
        if cur.run_count > p.run_count && cur.run_time_ns >= p.run_time_ns {
            row.ns_per_run = Some(
                (cur.run_time_ns - p.run_time_ns) as f64 / (cur.run_count - p.run_count) as f64,
            );
            row.recent = true;
        }
    }
    row
}

/// How one agent fared in a round.
#[derive(Debug, Clone, PartialEq)]
struct AgentStatus {
    addr: Option<String>,
    node: Option<String>,
    ebpf: Option<bool>,
    error: Option<String>,
}

impl AgentStatus {
    /// "node n1 at 10.0.0.12:9181: unreachable: ..."
    fn problem_line(&self) -> Option<String> {
        let err = self.error.as_ref()?;
        let who = match (&self.node, &self.addr) {
            (Some(n), Some(a)) => format!("node {n} at {a}"),
            (Some(n), None) => format!("node {n}"),
            (None, Some(a)) => format!("agent at {a}"),
            (None, None) => "an agent".to_string(),
        };
        Some(if self.addr.is_some() {
            format!("{who}: unreachable: {err}")
        } else {
            format!("{who}: {err}")
        })
    }
}

/// Everything one screen (or one `--once` print) shows.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    agents: Vec<AgentStatus>,
    rows: Vec<SporeRow>,
    programs: Vec<ProgRow>,
    notes: Vec<String>,
}

impl Snapshot {
    fn reachable(&self) -> usize {
        self.agents.iter().filter(|a| a.error.is_none()).count()
    }

    fn ebpf_text(&self) -> String {
        let ok: Vec<bool> = self.agents.iter().filter_map(|a| a.ebpf).collect();
        let on = ok.iter().filter(|e| **e).count();
        if ok.is_empty() {
            "eBPF ?".into()
        } else if on == ok.len() {
            "eBPF on".into()
        } else if on == 0 {
            "eBPF off".into()
        } else {
            format!("eBPF on {on}/{}", ok.len())
        }
    }
}

/// Previous samples, by agent address.
type Previous = HashMap<String, AgentSample>;

/// The snapshot of a round given the previous samples; then remembers this round's samples.
fn build_snapshot(
    prev: &mut Previous,
    results: Vec<AgentResult>,
    notes: &[String],
    app: Option<&str>,
) -> Snapshot {
    let mut snap = Snapshot {
        notes: notes.to_vec(),
        ..Snapshot::default()
    };
    for r in results {
        let addr = r.target.addr.as_ref().ok().cloned();
        let before = addr.as_ref().and_then(|a| prev.get(a));
        match r.sample {
            Err(e) => snap.agents.push(AgentStatus {
                node: r.target.node.or_else(|| before.map(|b| b.node.clone())),
                addr,
                ebpf: None,
                error: Some(e),
            }),
            Ok(cur) => {
                let by_name: HashMap<&str, &Inst> = before
                    .map(|b| {
                        b.instances
                            .iter()
                            .map(|i| (i.s.instance.as_str(), &i.s))
                            .collect()
                    })
                    .unwrap_or_default();
                for i in &cur.instances {
                    if app.is_some_and(|a| a != i.s.app) {
                        continue;
                    }
                    let p = by_name
                        .get(i.s.instance.as_str())
                        .map(|p| (*p, before.map_or(0, |b| b.at_ms)));
                    let mut inst = i.clone();
                    if inst.s.node.is_empty() {
                        inst.s.node = cur.node.clone();
                    }
                    snap.rows.push(SporeRow {
                        rates: rates(p, &i.s, cur.at_ms),
                        inst,
                    });
                }
                for pr in &cur.programs {
                    let p = before.and_then(|b| {
                        b.programs
                            .iter()
                            .find(|x| x.name == pr.name)
                            .map(|x| (x, b.at_ms))
                    });
                    snap.programs.push(program_row(&cur.node, p, pr, cur.at_ms));
                }
                snap.agents.push(AgentStatus {
                    addr: addr.clone(),
                    node: Some(cur.node.clone()),
                    ebpf: Some(cur.ebpf),
                    error: None,
                });
                if let Some(a) = addr {
                    prev.insert(a, cur);
                }
            }
        }
    }
    snap
}

// ---------------------------------------------------------------------------------------------
// Sorting

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SortKey {
    /// CPU %, busiest first.
    Cpu,
    /// Memory in use, largest first.
    Mem,
    /// Bytes received per second.
    Rx,
    /// Bytes sent per second.
    Tx,
    /// Run-queue wait p99.
    Rq,
    /// Node, app and instance name, A to Z.
    Name,
    /// Restarts, most first.
    Restarts,
}

impl SortKey {
    fn from_key(c: char) -> Option<SortKey> {
        Some(match c {
            'c' => SortKey::Cpu,
            'm' => SortKey::Mem,
            'r' => SortKey::Rx,
            't' => SortKey::Tx,
            'p' => SortKey::Rq,
            'n' => SortKey::Name,
            's' => SortKey::Restarts,
            _ => return None,
        })
    }

    fn label(self) -> &'static str {
        match self {
            SortKey::Cpu => "CPU%",
            SortKey::Mem => "MEM",
            SortKey::Rx => "RX/s",
            SortKey::Tx => "TX/s",
            SortKey::Rq => "RQ p99",
            SortKey::Name => "name",
            SortKey::Restarts => "RESTARTS",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sort {
    key: SortKey,
    /// Against the key's natural order (largest first for numbers, A to Z for names).
    reverse: bool,
}

impl Sort {
    fn new(key: SortKey) -> Sort {
        Sort {
            key,
            reverse: false,
        }
    }

    /// A key press: another column sorts in its natural order, the same one reverses.
    fn press(self, key: SortKey) -> Sort {
        if key == self.key {
            Sort {
                key,
                reverse: !self.reverse,
            }
        } else {
            Sort::new(key)
        }
    }

    /// Whether the rows go up (smallest or A first).
    fn ascending(self) -> bool {
        (self.key == SortKey::Name) != self.reverse
    }
}

fn metric(r: &SporeRow, key: SortKey) -> Option<f64> {
    let s = &r.inst.s;
    match key {
        SortKey::Cpu => r.rates.cpu_percent,
        SortKey::Mem => s.memory_bytes.map(|v| v as f64),
        SortKey::Rx => r.rates.rx_per_s,
        SortKey::Tx => r.rates.tx_per_s,
        SortKey::Rq => s.runqueue_p99_us.map(|v| v as f64),
        SortKey::Restarts => Some(f64::from(s.restarts)),
        SortKey::Name => None,
    }
}

fn name_key(r: &SporeRow) -> (&str, &str, &str) {
    (&r.inst.s.node, &r.inst.s.app, &r.inst.s.instance)
}

/// Sorts rows; rows without the value come last either way, ties go by name.
fn sort_rows(rows: &mut [SporeRow], sort: Sort) {
    use std::cmp::Ordering;
    rows.sort_by(|a, b| {
        let by_name = name_key(a).cmp(&name_key(b));
        let primary = if sort.key == SortKey::Name {
            by_name
        } else {
            match (metric(a, sort.key), metric(b, sort.key)) {
                (Some(x), Some(y)) => y.total_cmp(&x),
                (Some(_), None) => return Ordering::Less,
                (None, Some(_)) => return Ordering::Greater,
                (None, None) => Ordering::Equal,
            }
        };
        let primary = if sort.reverse {
            primary.reverse()
        } else {
            primary
        };
        primary.then(by_name)
    });
}

// ---------------------------------------------------------------------------------------------
// Formatting

fn fmt_percent(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn fmt_bytes(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), human_bytes)
}

fn fmt_rate(v: Option<f64>) -> String {
    v.map_or_else(
        || "-".into(),
        |v| format!("{}/s", human_bytes(v.max(0.0).round() as u64)),
    )
}

fn fmt_us(v: Option<u64>) -> String {
    match v {
        None => "-".into(),
        Some(us) if us < 1000 => format!("{us}µs"),
        Some(us) if us < 1_000_000 => format!("{:.1}ms", us as f64 / 1e3),
        Some(us) => format!("{:.2}s", us as f64 / 1e6),
    }
}

fn fmt_ns(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

/// (title, right-aligned, the sort key it shows, widest it gets in the view)
const COLUMNS: [(&str, bool, Option<SortKey>, usize); 12] = [
    ("NODE", false, Some(SortKey::Name), 16),
    ("APP", false, None, 20),
    ("INSTANCE", false, None, 32),
    ("STATE", false, None, 10),
    ("PID", true, None, 8),
    ("CPU%", true, Some(SortKey::Cpu), 7),
    ("RQ p99", true, Some(SortKey::Rq), 8),
    ("MEM", true, Some(SortKey::Mem), 10),
    ("RX/s", true, Some(SortKey::Rx), 12),
    ("TX/s", true, Some(SortKey::Tx), 12),
    ("RESTARTS", true, Some(SortKey::Restarts), 8),
    ("LAST EXIT", false, None, 40),
];

/// The LAST EXIT column may shrink to this many characters.
const LAST_MIN: usize = 9;
/// Columns the view drops first when the terminal is too narrow (INSTANCE, CPU% and MEM stay).
const DROP_ORDER: [usize; 9] = [11, 4, 10, 9, 3, 0, 6, 8, 1];

/// Which columns fit in `width` characters, and the space between them: all columns two
/// apart when they fit, else one apart, dropping columns in DROP_ORDER until they fit.
fn fit_columns(lengths: &[usize], width: usize) -> (Vec<usize>, u16) {
    let last = lengths.len().saturating_sub(1);
    let need = |vis: &[usize], spacing: usize| {
        vis.iter()
            .map(|&k| {
                if k == last {
                    lengths[k].min(LAST_MIN)
                } else {
                    lengths[k]
                }
            })
            .sum::<usize>()
            + spacing * vis.len().saturating_sub(1)
    };
    let mut visible: Vec<usize> = (0..lengths.len()).collect();
    if need(&visible, 2) <= width {
        return (visible, 2);
    }
    for drop in DROP_ORDER {
        if need(&visible, 1) <= width {
            break;
        }
        visible.retain(|&k| k != drop);
    }
    (visible, 1)
}

fn cells(r: &SporeRow) -> [String; 12] {
    let s = &r.inst.s;
    [
        s.node.clone(),
        s.app.clone(),
        s.instance.clone(),
        if s.state.is_empty() {
            "-".into()
        } else {
            s.state.clone()
        },
        if s.pid == 0 {
            "-".into()
        } else {
            s.pid.to_string()
        },
        fmt_percent(r.rates.cpu_percent),
        fmt_us(s.runqueue_p99_us),
        fmt_bytes(s.memory_bytes),
        fmt_rate(r.rates.rx_per_s),
        fmt_rate(r.rates.tx_per_s),
        s.restarts.to_string(),
        if s.last_exit.is_empty() {
            "-".into()
        } else {
            s.last_exit.clone()
        },
    ]
}

fn sort_arrow(sort: Sort) -> &'static str {
    if sort.ascending() { "↑" } else { "↓" }
}

fn column_titles(sort: Sort) -> Vec<String> {
    COLUMNS
        .iter()
        .map(|(t, _, k, _)| {
            if *k == Some(sort.key) {
                format!("{t}{}", sort_arrow(sort))
            } else {
                (*t).to_string()
            }
        })
        .collect()
}

fn header_line(snap: &Snapshot, interval: Duration, sort: Sort, app: Option<&str>) -> String {
    let filter = app.map(|a| format!(", app {a}")).unwrap_or_default();
    format!(
        "mesh top: {}/{} agents reachable, {} spores{filter}, {}, every {} ms, sorted by {} {}",
        snap.reachable(),
        snap.agents.len(),
        snap.rows.len(),
        snap.ebpf_text(),
        interval.as_millis(),
        sort.key.label(),
        sort_arrow(sort),
    )
}

/// The width of each column: its widest cell or title (in characters).
fn content_widths(titles: &[String], rows: &[Vec<String>]) -> Vec<usize> {
    let mut widths: Vec<usize> = titles.iter().map(|t| t.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    widths
}

/// Pads cells into aligned plain-text lines (the last column is not padded).
fn text_table(titles: &[String], rows: &[Vec<String>], right: &[bool]) -> Vec<String> {
    let width = |s: &str| s.chars().count();
    let widths = content_widths(titles, rows);
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (k, c) in cells.iter().enumerate() {
            let last = k + 1 == cells.len();
            let pad = widths.get(k).copied().unwrap_or(0).saturating_sub(width(c));
            if k > 0 {
                out.push_str("  ");
            }
            if right.get(k).copied().unwrap_or(false) {
                out.push_str(&" ".repeat(pad));
                out.push_str(c);
            } else {
                out.push_str(c);
                if !last {
                    out.push_str(&" ".repeat(pad));
                }
            }
        }
        out.trim_end().to_string()
    };
    let mut out = vec![line(titles)];
    out.extend(rows.iter().map(|r| line(r)));
    out
}

const PROGRAM_TITLES: [&str; 5] = ["NODE", "PROGRAM", "RUNS", "RUNS/s", "NS/RUN"];

fn program_cells(p: &ProgRow) -> Vec<String> {
    vec![
        p.node.clone(),
        p.name.clone(),
        p.runs.to_string(),
        p.runs_per_s
            .map_or_else(|| "-".into(), |v| format!("{v:.0}")),
        if p.recent || p.ns_per_run.is_none() {
            fmt_ns(p.ns_per_run)
        } else {
            format!("{} (total)", fmt_ns(p.ns_per_run))
        },
    ]
}

fn empty_message(app: Option<&str>) -> &'static str {
    if app.is_some() {
        "(no instances of this app on the reachable agents)"
    } else {
        "(no spores on the reachable agents)"
    }
}

/// The `--once` text: header, problems, the table and (with --costs) the programs.
fn render_text(snap: &Snapshot, opts: &Options) -> String {
    let mut out = vec![header_line(
        snap,
        opts.interval,
        opts.sort,
        opts.app.as_deref(),
    )];
    out.extend(snap.notes.iter().map(|n| format!("note: {n}")));
    out.extend(snap.agents.iter().filter_map(AgentStatus::problem_line));
    out.push(String::new());
    let rows: Vec<Vec<String>> = snap.rows.iter().map(|r| cells(r).to_vec()).collect();
    let right: Vec<bool> = COLUMNS.iter().map(|c| c.1).collect();
    out.extend(text_table(&column_titles(opts.sort), &rows, &right));
    if rows.is_empty() {
        out.push(empty_message(opts.app.as_deref()).to_string());
    }
    if opts.costs {
        out.push(String::new());
        if snap.programs.is_empty() {
            out.push("no eBPF programs (no reachable agent has eBPF on)".into());
        } else {
            let titles: Vec<String> = PROGRAM_TITLES.iter().map(|t| (*t).to_string()).collect();
            let rows: Vec<Vec<String>> = snap.programs.iter().map(program_cells).collect();
            out.extend(text_table(
                &titles,
                &rows,
                &[false, false, true, true, true],
            ));
        }
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
}

fn round3(v: Option<f64>) -> Value {
    match v {
        Some(v) if v.is_finite() => Value::from((v * 1000.0).round() / 1000.0),
        _ => Value::Null,
    }
}

/// The `--once --json` document.
fn json_document(snap: &Snapshot, costs: bool) -> Value {
    let agents: Vec<Value> = snap
        .agents
        .iter()
        .map(|a| {
            serde_json::json!({
                "addr": a.addr, "node": a.node, "ebpf": a.ebpf, "error": a.error,
            })
        })
        .collect();
    let instances: Vec<Value> = snap
        .rows
        .iter()
        .map(|r| {
            let mut o = r.inst.raw.clone();
            o.insert("cpu_percent".into(), round3(r.rates.cpu_percent));
            o.insert("rx_bytes_per_s".into(), round3(r.rates.rx_per_s));
            o.insert("tx_bytes_per_s".into(), round3(r.rates.tx_per_s));
            Value::Object(o)
        })
        .collect();
    let mut doc = serde_json::json!({ "agents": agents, "instances": instances });
    if costs && let Value::Object(m) = &mut doc {
        let programs: Vec<Value> = snap
            .programs
            .iter()
            .map(|p| {
                serde_json::json!({
                    "node": p.node, "name": p.name, "run_count": p.runs,
                    "runs_per_s": round3(p.runs_per_s), "ns_per_run": round3(p.ns_per_run),
                    "ns_per_run_recent": p.recent,
                })
            })
            .collect();
        m.insert("programs".into(), Value::Array(programs));
    }
    if !snap.notes.is_empty()
        && let Value::Object(m) = &mut doc
    {
        m.insert(
            "notes".into(),
            Value::Array(snap.notes.iter().cloned().map(Value::from).collect()),
        );
    }
    doc
}

// ---------------------------------------------------------------------------------------------
// --once

fn run_once(source: &Source, opts: &Options, json: bool) -> Result<()> {
    let (targets, notes) = discover(source);
    let mut prev = Previous::new();
    let first = fetch_all(&targets, opts.costs, FETCH_TIMEOUT);
    let started = Instant::now();
    build_snapshot(&mut prev, first, &notes, opts.app.as_deref());
    std::thread::sleep(opts.interval.saturating_sub(started.elapsed()));
    let second = fetch_all(&targets, opts.costs, FETCH_TIMEOUT);
    let mut snap = build_snapshot(&mut prev, second, &notes, opts.app.as_deref());
    sort_rows(&mut snap.rows, opts.sort);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json_document(&snap, opts.costs))?
        );
    } else {
        print!("{}", render_text(&snap, opts));
    }
    if snap.reachable() == 0 {
        let tried: Vec<&str> = targets
            .iter()
            .filter_map(|t| t.addr.as_ref().ok().map(String::as_str))
            .collect();
        bail!(
            "no agent reachable (tried {}): start `mesh agent` (it serves metrics on \
             {DEFAULT_AGENT} by default) or pass --agent HOST:PORT",
            if tried.is_empty() {
                "none".to_string()
            } else {
                tried.join(", ")
            }
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The terminal view

/// Whether the terminal is in raw mode on the alternate screen (restored once only).
static TERMINAL_TAKEN: AtomicBool = AtomicBool::new(false);

fn restore_terminal() {
    if TERMINAL_TAKEN.swap(false, Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(
            std::io::stdout(),
            terminal::LeaveAlternateScreen,
            cursor::Show
        );
    }
}

/// Set by SIGTERM or SIGHUP: the view ends as if q was pressed, so the terminal is restored.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn stop_on_signals() {
    for sig in [libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Raw mode and the alternate screen while alive; the terminal is restored when dropped,
/// on errors, and on panics (before the panic message prints).
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> Result<TerminalGuard> {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            prev(info);
        }));
        terminal::enable_raw_mode()
            .context("cannot switch the terminal to raw mode (use --once for plain output)")?;
        TERMINAL_TAKEN.store(true, Ordering::SeqCst);
        let guard = TerminalGuard;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            terminal::Clear(terminal::ClearType::All),
            cursor::Hide
        )
        .context("cannot switch to the alternate screen")?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

struct Round {
    results: Vec<AgentResult>,
    notes: Vec<String>,
}

/// Samples all agents every interval and sends each round, until the receiver is gone.
fn sampler(source: Source, costs: bool, interval: Duration, tx: mpsc::Sender<Round>) {
    let mut targets = Vec::new();
    let mut notes = Vec::new();
    let mut discovered: Option<Instant> = None;
    loop {
        let start = Instant::now();
        if discovered.is_none_or(|t| t.elapsed() >= REDISCOVER) {
            (targets, notes) = discover(&source);
            discovered = Some(Instant::now());
        }
        let results = fetch_all(&targets, costs, FETCH_TIMEOUT);
        if tx
            .send(Round {
                results,
                notes: notes.clone(),
            })
            .is_err()
        {
            return;
        }
        std::thread::sleep(interval.saturating_sub(start.elapsed()));
    }
}

struct App<'o> {
    opts: &'o Options,
    sort: Sort,
    prev: Previous,
    snap: Option<Snapshot>,
    rounds: u64,
    /// The selected row, by (node, instance), so it stays put when rows move.
    selected: Option<(String, String)>,
    table: TableState,
    /// Rows the table showed last time (for PgUp/PgDn).
    page: usize,
}

enum Step {
    Continue,
    Quit,
}

impl App<'_> {
    fn on_round(&mut self, round: Round) {
        let mut snap = build_snapshot(
            &mut self.prev,
            round.results,
            &round.notes,
            self.opts.app.as_deref(),
        );
        sort_rows(&mut snap.rows, self.sort);
        self.snap = Some(snap);
        self.rounds += 1;
    }

    fn selected_index(&self) -> Option<usize> {
        let (node, inst) = self.selected.as_ref()?;
        self.snap
            .as_ref()?
            .rows
            .iter()
            .position(|r| &r.inst.s.node == node && &r.inst.s.instance == inst)
    }

    fn select(&mut self, index: usize) {
        let Some(snap) = &self.snap else { return };
        if snap.rows.is_empty() {
            self.selected = None;
            return;
        }
        let r = &snap.rows[index.min(snap.rows.len() - 1)];
        self.selected = Some((r.inst.s.node.clone(), r.inst.s.instance.clone()));
    }

    fn on_key(&mut self, code: KeyCode, mods: KeyModifiers) -> Step {
        let rows = self.snap.as_ref().map_or(0, |s| s.rows.len());
        let cur = self.selected_index();
        let page = self.page.max(1);
        match code {
            KeyCode::Char('c') if mods.contains(KeyModifiers::CONTROL) => return Step::Quit,
            KeyCode::Char('q') | KeyCode::Esc => return Step::Quit,
            KeyCode::Char(ch) => {
                if let Some(key) = SortKey::from_key(ch.to_ascii_lowercase()) {
                    self.sort = self.sort.press(key);
                    if let Some(s) = &mut self.snap {
                        sort_rows(&mut s.rows, self.sort);
                    }
                } else {
                    match ch {
                        'j' => self.select(cur.map_or(0, |c| c + 1)),
                        'k' => self.select(cur.map_or(0, |c| c.saturating_sub(1))),
                        'g' => self.select(0),
                        'G' => self.select(rows.saturating_sub(1)),
                        _ => {}
                    }
                }
            }
            KeyCode::Down => self.select(cur.map_or(0, |c| c + 1)),
            KeyCode::Up => self.select(cur.map_or(0, |c| c.saturating_sub(1))),
            KeyCode::PageDown => self.select(cur.map_or(0, |c| c + page)),
            KeyCode::PageUp => self.select(cur.map_or(0, |c| c.saturating_sub(page))),
            KeyCode::Home => self.select(0),
            KeyCode::End => self.select(rows.saturating_sub(1)),
            _ => {}
        }
        Step::Continue
    }

    fn draw(&mut self, f: &mut ratatui::Frame) {
        let area = f.area();
        let Some(snap) = &self.snap else {
            let p = Paragraph::new(vec![
                Line::from("mesh top: waiting for the first sample…"),
                Line::from(""),
                Line::from("q, Esc or Ctrl-C quits"),
            ]);
            f.render_widget(p, area);
            return;
        };
        let mut top: Vec<Line> = vec![Line::from(Span::styled(
            header_line(
                snap,
                self.opts.interval,
                self.sort,
                self.opts.app.as_deref(),
            ),
            Style::default().add_modifier(Modifier::BOLD),
        ))];
        if self.rounds < 2 {
            top.push(Line::from(Span::styled(
                "CPU% and rates appear with the second sample",
                Style::default().fg(Color::DarkGray),
            )));
        }
        for n in &snap.notes {
            top.push(Line::from(Span::styled(
                format!("note: {n}"),
                Style::default().fg(Color::Yellow),
            )));
        }
        for a in &snap.agents {
            if let Some(line) = a.problem_line() {
                top.push(Line::from(Span::styled(
                    line,
                    Style::default().fg(Color::Red),
                )));
            }
        }
        let max_top = usize::from(area.height / 3).max(1);
        if top.len() > max_top {
            let hidden = top.len() - max_top + 1;
            top.truncate(max_top - 1);
            top.push(Line::from(format!("… and {hidden} more lines")));
        }
        // long problem lines wrap (up to a third of the screen)
        let screen_lines = |l: &Line| l.width().max(1).div_ceil(usize::from(area.width.max(1)));
        let top_lines = top
            .iter()
            .map(screen_lines)
            .sum::<usize>()
            .min(max_top.max(top.len()));
        let prog_height = if self.opts.costs {
            let n = snap.programs.len().max(1);
            // a blank line, the title, the column titles, the rows
            u16::try_from(n + 3)
                .unwrap_or(u16::MAX)
                .min(area.height / 3)
        } else {
            0
        };
        let top_height = u16::try_from(top_lines).unwrap_or(u16::MAX);
        let [top_area, table_area, prog_area, help_area] = Layout::vertical([
            Constraint::Length(top_height),
            Constraint::Min(3),
            Constraint::Length(prog_height),
            Constraint::Length(1),
        ])
        .areas(area);
        f.render_widget(
            Paragraph::new(top).wrap(ratatui::widgets::Wrap { trim: false }),
            top_area,
        );

        // the spore table
        let data: Vec<[String; 12]> = snap.rows.iter().map(cells).collect();
        let titles = column_titles(self.sort);
        let lengths: Vec<usize> = COLUMNS
            .iter()
            .enumerate()
            .map(|(k, (_, _, _, max))| {
                data.iter()
                    .map(|r| r[k].chars().count())
                    .chain(std::iter::once(titles[k].chars().count()))
                    .max()
                    .unwrap_or(4)
                    .min(*max)
            })
            .collect();
        let (visible, spacing) = fit_columns(&lengths, usize::from(area.width));
        let widths: Vec<Constraint> = visible
            .iter()
            .map(|&k| {
                let w = u16::try_from(lengths[k]).unwrap_or(u16::MAX);
                if k + 1 == COLUMNS.len() {
                    Constraint::Min(w.min(LAST_MIN as u16))
                } else {
                    Constraint::Length(w)
                }
            })
            .collect();
        let header = Row::new(visible.iter().map(|&k| {
            let line = Line::from(titles[k].clone());
            Cell::from(if COLUMNS[k].1 {
                line.right_aligned()
            } else {
                line
            })
        }))
        .style(
            Style::default()
                .add_modifier(Modifier::BOLD)
                .add_modifier(Modifier::REVERSED),
        );
        let rows: Vec<Row> = data
            .iter()
            .map(|r| {
                let state_style = match r[3].as_str() {
                    "ready" | "running" => Style::default().fg(Color::Green),
                    "launching" | "starting" => Style::default().fg(Color::Yellow),
                    "failed" | "crashed" => Style::default().fg(Color::Red),
                    "draining" | "stopping" => Style::default().fg(Color::Magenta),
                    _ => Style::default(),
                };
                Row::new(visible.iter().map(|&k| {
                    let line = Line::from(r[k].clone());
                    let line = if COLUMNS[k].1 {
                        line.right_aligned()
                    } else {
                        line
                    };
                    let cell = Cell::from(line);
                    if k == 3 {
                        cell.style(state_style)
                    } else {
                        cell
                    }
                }))
            })
            .collect();
        let empty = rows.is_empty();
        let table = Table::new(rows, widths)
            .header(header)
            .column_spacing(spacing)
            .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED));
        self.table.select(self.selected_index());
        f.render_stateful_widget(table, table_area, &mut self.table);
        self.page = usize::from(table_area.height.saturating_sub(1));
        if empty && table_area.height > 1 {
            let msg = empty_message(self.opts.app.as_deref());
            let mut a = table_area;
            a.y += 1;
            a.height = 1;
            f.render_widget(
                Paragraph::new(Span::styled(msg, Style::default().fg(Color::DarkGray))),
                a,
            );
        }

        // the program table
        if self.opts.costs && prog_area.height > 0 {
            if snap.programs.is_empty() {
                f.render_widget(
                    Paragraph::new(vec![
                        Line::from(""),
                        Line::from("no eBPF programs (no reachable agent has eBPF on)"),
                    ]),
                    prog_area,
                );
            } else {
                let header = Row::new(PROGRAM_TITLES.iter().enumerate().map(|(k, t)| {
                    let l = Line::from(*t);
                    Cell::from(if k >= 2 { l.right_aligned() } else { l })
                }))
                .style(Style::default().add_modifier(Modifier::BOLD));
                let data: Vec<Vec<String>> = snap.programs.iter().map(program_cells).collect();
                let titles: Vec<String> = PROGRAM_TITLES.iter().map(|t| (*t).to_string()).collect();
                let widths: Vec<Constraint> = content_widths(&titles, &data)
                    .into_iter()
                    .map(|w| Constraint::Length(u16::try_from(w).unwrap_or(u16::MAX)))
                    .collect();
                let rows: Vec<Row> = data
                    .into_iter()
                    .map(|r| {
                        Row::new(r.into_iter().enumerate().map(|(k, c)| {
                            let l = Line::from(c);
                            Cell::from(if k >= 2 { l.right_aligned() } else { l })
                        }))
                    })
                    .collect();
                let table = Table::new(rows, widths)
                    .header(header)
                    .column_spacing(2)
                    .block(
                        ratatui::widgets::Block::default().title(Line::from(Span::styled(
                            "eBPF program costs",
                            Style::default().add_modifier(Modifier::BOLD),
                        ))),
                    );
                let mut a = prog_area;
                a.y += 1;
                a.height = a.height.saturating_sub(1);
                f.render_widget(table, a);
            }
        }

        let help = "sort: c CPU  m MEM  r RX  t TX  p RQ  n name  s restarts (again: reverse)  \
                    ↑↓ select  q quit";
        f.render_widget(
            Paragraph::new(Span::styled(help, Style::default().fg(Color::DarkGray))),
            help_area,
        );
    }
}

fn run_tui(source: Source, opts: &Options) -> Result<()> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        bail!(
            "`mesh top` needs a terminal for its live view; use `mesh top --once` (or \
             --once --json) when piping or scripting"
        );
    }
    let (tx, rx) = mpsc::channel();
    let (costs, interval) = (opts.costs, opts.interval);
    std::thread::Builder::new()
        .name("mesh-top-sampler".into())
        .spawn(move || sampler(source, costs, interval, tx))
        .context("starting the sampling thread")?;

    stop_on_signals();
    let _guard = TerminalGuard::enter()?;
    let mut term = Terminal::new(CrosstermBackend::new(std::io::stdout()))
        .context("setting up the terminal view")?;
    let mut app = App {
        opts,
        sort: opts.sort,
        prev: Previous::new(),
        snap: None,
        rounds: 0,
        selected: None,
        table: TableState::default(),
        page: 10,
    };
    let mut dirty = true;
    while !STOP.load(Ordering::SeqCst) {
        loop {
            match rx.try_recv() {
                Ok(round) => {
                    app.on_round(round);
                    dirty = true;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    bail!("the sampling thread stopped unexpectedly")
                }
            }
        }
        if dirty {
            term.draw(|f| app.draw(f)).context("drawing the view")?;
            dirty = false;
        }
        let ready = match event::poll(Duration::from_millis(50)) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the keyboard"),
        };
        if ready {
            match event::read().context("reading the keyboard")? {
                Event::Key(k) if k.kind == KeyEventKind::Press => {
                    if let Step::Quit = app.on_key(k.code, k.modifiers) {
                        return Ok(());
                    }
                    dirty = true;
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"node":"n1","at_ms":10000,"ebpf":true,"instances":[
        {"node":"n1","app":"hello","instance":"hello-0-a","state":"ready","pid":42,"port":8080,
         "restarts":1,"last_exit":"exited_1","cpu_ns_ebpf":1000000000,"cpu_usec_cgroup":1100000,
         "memory_bytes":2097152,"memory_peak_bytes":4194304,"oom_kills":0,"pids":3,
         "rx_bytes":1000,"tx_bytes":500,"rx_packets":10,"tx_packets":5,"runqueue_waits":7,
         "runqueue_p50_us":3,"runqueue_p99_us":1024,"execs":1,"future_field":"kept"},
        {"node":"n1","app":"other","instance":"other-0-b","state":"launching","pid":0,"port":0,
         "restarts":0,"last_exit":"","cpu_ns_ebpf":null,"cpu_usec_cgroup":null,
         "memory_bytes":null,"memory_peak_bytes":null,"oom_kills":0,"pids":null,
         "rx_bytes":null,"tx_bytes":null,"rx_packets":null,"tx_packets":null,
         "runqueue_waits":null,"runqueue_p50_us":null,"runqueue_p99_us":null,"execs":null}],
        "programs":[{"name":"sched_switch","run_count":100,"run_time_ns":20000}]}"#;

    fn inst(name: &str) -> Inst {
        Inst {
            node: "n1".into(),
            app: "a".into(),
            instance: name.into(),
            ..Inst::default()
        }
    }

    fn row(node: &str, name: &str, cpu: Option<f64>, mem: Option<u64>) -> SporeRow {
        let mut s = inst(name);
        s.node = node.into();
        s.memory_bytes = mem;
        SporeRow {
            inst: Instance { s, raw: Map::new() },
            rates: Rates {
                cpu_percent: cpu,
                ..Rates::default()
            },
        }
    }

    fn names(rows: &[SporeRow]) -> Vec<&str> {
        rows.iter().map(|r| r.inst.s.instance.as_str()).collect()
    }

    #[test]
    fn samples_parse_and_keep_unknown_fields() {
        let s = parse_sample(SAMPLE.as_bytes()).unwrap();
        assert_eq!(s.node, "n1");
        assert_eq!(s.at_ms, 10000);
        assert!(s.ebpf);
        assert_eq!(s.instances.len(), 2);
        assert_eq!(s.instances[0].s.runqueue_p99_us, Some(1024));
        assert_eq!(s.instances[0].raw["future_field"], "kept");
        assert_eq!(s.instances[1].s.memory_bytes, None);
        assert_eq!(s.programs[0].run_count, 100);
        assert!(parse_sample(b"<html>").is_err());
        assert!(parse_sample(br#"{"node":"n","at_ms":1,"instances":[{"app":1}]}"#).is_err());
    }

    #[test]
    fn rates_from_two_samples() {
        let mut a = inst("x");
        a.cpu_ns_ebpf = Some(1_000_000_000);
        a.cpu_usec_cgroup = Some(1_000_000);
        a.rx_bytes = Some(1000);
        a.tx_bytes = Some(0);
        let mut b = a.clone();
        b.cpu_ns_ebpf = Some(1_500_000_000); // 0.5 s of CPU in 1 s: 50 %
        b.cpu_usec_cgroup = Some(1_250_000); // 0.25 s
        b.rx_bytes = Some(3048);
        b.tx_bytes = Some(512);
        let r = rates(Some((&a, 1000)), &b, 2000);
        assert_eq!(r.cpu_percent, Some(50.0));
        assert_eq!(r.rx_per_s, Some(2048.0));
        assert_eq!(r.tx_per_s, Some(512.0));
        // over half a second the rates double
        let r = rates(Some((&a, 1000)), &b, 1500);
        assert_eq!(r.cpu_percent, Some(100.0));
        assert_eq!(r.rx_per_s, Some(4096.0));

        // without eBPF on both sides: the cgroup's microseconds
        b.cpu_ns_ebpf = None;
        assert_eq!(rates(Some((&a, 1000)), &b, 2000).cpu_percent, Some(25.0));
        // no previous sample, no time passed, the agent restarted, a counter went back
        assert_eq!(rates(None, &b, 2000), Rates::default());
        assert_eq!(rates(Some((&a, 2000)), &b, 2000).cpu_percent, None);
        assert_eq!(rates(Some((&a, 5000)), &b, 2000), Rates::default());
        b.rx_bytes = Some(10);
        assert_eq!(rates(Some((&a, 1000)), &b, 2000).rx_per_s, None);
        assert_eq!(per_second(None, Some(1), 1000), None);
    }

    #[test]
    fn snapshots_match_instances_across_rounds() {
        let mut prev = Previous::new();
        let target = Target {
            node: None,
            addr: Ok("127.0.0.1:1".into()),
        };
        let s1 = parse_sample(SAMPLE.as_bytes()).unwrap();
        let mut s2 = s1.clone();
        s2.at_ms += 1000;
        s2.instances[0].s.cpu_ns_ebpf = Some(1_250_000_000);
        s2.instances[0].s.rx_bytes = Some(2024);
        s2.programs[0] = Program {
            name: "sched_switch".into(),
            run_count: 300,
            run_time_ns: 60_000,
        };
        let round = |s: AgentSample| {
            vec![AgentResult {
                target: target.clone(),
                sample: Ok(s),
            }]
        };
        let first = build_snapshot(&mut prev, round(s1), &[], None);
        assert_eq!(first.rows.len(), 2);
        assert_eq!(first.rows[0].rates.cpu_percent, None);
        assert_eq!(first.programs[0].ns_per_run, Some(200.0));
        assert!(!first.programs[0].recent);
        let second = build_snapshot(&mut prev, round(s2), &[], Some("hello"));
        assert_eq!(second.rows.len(), 1, "--app filters");
        assert_eq!(second.rows[0].rates.cpu_percent, Some(25.0));
        assert_eq!(second.rows[0].rates.rx_per_s, Some(1024.0));
        assert_eq!(second.programs[0].ns_per_run, Some(200.0));
        assert!(second.programs[0].recent);
        assert_eq!(second.programs[0].runs_per_s, Some(200.0));

        // a failed agent is named after what it said before
        let third = build_snapshot(
            &mut prev,
            vec![AgentResult {
                target: target.clone(),
                sample: Err("connection refused".into()),
            }],
            &[],
            None,
        );
        assert_eq!(third.reachable(), 0);
        assert_eq!(
            third.agents[0].problem_line().unwrap(),
            "node n1 at 127.0.0.1:1: unreachable: connection refused"
        );
    }

    #[test]
    fn program_costs_prefer_the_last_interval() {
        let p0 = Program {
            name: "p".into(),
            run_count: 10,
            run_time_ns: 1000,
        };
        let p1 = Program {
            name: "p".into(),
            run_count: 20,
            run_time_ns: 3000,
        };
        let r = program_row("n", Some((&p0, 0)), &p1, 1000);
        assert_eq!(
            (r.ns_per_run, r.recent, r.runs_per_s),
            (Some(200.0), true, Some(10.0))
        );
        // no new runs: the cumulative figure
        let r = program_row("n", Some((&p1, 0)), &p1, 1000);
        assert_eq!((r.ns_per_run, r.recent), (Some(150.0), false));
        assert_eq!(program_cells(&r)[4], "150 (total)");
        let idle = Program {
            name: "p".into(),
            run_count: 0,
            run_time_ns: 0,
        };
        assert_eq!(program_row("n", None, &idle, 0).ns_per_run, None);
    }

    #[test]
    fn sorting_and_keys() {
        let mut rows = vec![
            row("n1", "b", Some(5.0), Some(10)),
            row("n1", "a", None, Some(30)),
            row("n1", "c", Some(50.0), None),
            row("n0", "d", Some(5.0), Some(20)),
        ];
        let cpu = Sort::new(SortKey::Cpu);
        sort_rows(&mut rows, cpu);
        assert_eq!(
            names(&rows),
            ["c", "d", "b", "a"],
            "busiest first, ties by name"
        );
        sort_rows(&mut rows, cpu.press(SortKey::Cpu));
        assert_eq!(
            names(&rows),
            ["d", "b", "c", "a"],
            "reversed; missing still last"
        );
        sort_rows(&mut rows, Sort::new(SortKey::Mem));
        assert_eq!(names(&rows), ["a", "d", "b", "c"]);
        sort_rows(&mut rows, Sort::new(SortKey::Name));
        assert_eq!(names(&rows), ["d", "a", "b", "c"], "node first");
        sort_rows(&mut rows, Sort::new(SortKey::Name).press(SortKey::Name));
        assert_eq!(names(&rows), ["c", "b", "a", "d"]);

        assert_eq!(cpu.press(SortKey::Cpu).press(SortKey::Cpu), cpu);
        assert_eq!(
            cpu.press(SortKey::Cpu).press(SortKey::Mem),
            Sort::new(SortKey::Mem)
        );
        assert!(Sort::new(SortKey::Name).ascending());
        assert!(!cpu.ascending());
        assert_eq!(SortKey::from_key('p'), Some(SortKey::Rq));
        assert_eq!(SortKey::from_key('q'), None, "q quits");
    }

    #[test]
    fn narrow_terminals_drop_columns() {
        let lengths = [4, 5, 11, 9, 4, 5, 7, 8, 11, 11, 8, 30];
        let all: Vec<usize> = (0..12).collect();
        let wide: usize = 4 + 5 + 11 + 9 + 4 + 5 + 7 + 8 + 11 + 11 + 8 + 9;
        assert_eq!(fit_columns(&lengths, wide + 22), (all.clone(), 2));
        assert_eq!(fit_columns(&lengths, wide + 11), (all, 1));
        let (vis, sp) = fit_columns(&lengths, wide + 10);
        assert_eq!((vis.len(), sp), (11, 1));
        assert!(!vis.contains(&11), "LAST EXIT goes first");
        let (vis, _) = fit_columns(&lengths, 10);
        assert_eq!(vis, [2, 5, 7], "INSTANCE, CPU% and MEM stay");
    }

    #[test]
    fn human_formats() {
        assert_eq!(fmt_percent(Some(12.345)), "12.3");
        assert_eq!(fmt_percent(None), "-");
        assert_eq!(fmt_bytes(Some(2 << 20)), "2.0 MiB");
        assert_eq!(fmt_bytes(Some(3 << 30)), "3.0 GiB");
        assert_eq!(fmt_bytes(Some(1536)), "1.5 KiB");
        assert_eq!(fmt_rate(Some(0.0)), "0 B/s");
        assert_eq!(fmt_rate(Some(1536.4)), "1.5 KiB/s");
        assert_eq!(fmt_rate(None), "-");
        assert_eq!(fmt_us(Some(512)), "512µs");
        assert_eq!(fmt_us(Some(1024)), "1.0ms");
        assert_eq!(fmt_us(Some(2_500_000)), "2.50s");
        assert_eq!(fmt_us(None), "-");
    }

    #[test]
    fn node_list_lines_become_targets() {
        let items = vec![
            "node=n1 rev=4 cpus=8 memory_mb=16000 max_instances=50 lease=1 metrics=127.0.0.1:9181"
                .to_string(),
            "* node=n2 rev=5 cpus=8 memory_mb=16000 max_instances=50 lease=2".to_string(),
            "rev=6 cpus=1".to_string(),
        ];
        let (t, notes) = targets_from_node_list(&items);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].node.as_deref(), Some("n1"));
        assert_eq!(t[0].addr, Ok("127.0.0.1:9181".to_string()));
        assert_eq!(t[1].node.as_deref(), Some("n2"));
        assert!(
            t[1].addr
                .as_ref()
                .unwrap_err()
                .contains("no metrics address")
        );
        assert_eq!(notes.len(), 1);
        let status = AgentStatus {
            addr: None,
            node: Some("n2".into()),
            ebpf: None,
            error: t[1].addr.clone().err(),
        };
        assert!(
            status
                .problem_line()
                .unwrap()
                .starts_with("node n2: no metrics address")
        );
    }

    #[test]
    fn agent_addresses() {
        assert_eq!(normalize_addr("10.0.0.1:9181").unwrap(), "10.0.0.1:9181");
        assert_eq!(normalize_addr("node7").unwrap(), "node7:9181");
        assert_eq!(normalize_addr("http://h:1/v1/instances").unwrap(), "h:1");
        assert_eq!(normalize_addr("[::1]:9000").unwrap(), "[::1]:9000");
        assert_eq!(normalize_addr("[::1]").unwrap(), "[::1]:9181");
        assert_eq!(normalize_addr("::1").unwrap(), "[::1]:9181");
        assert!(normalize_addr(" ").is_err());
        assert!(normalize_addr("https://h:1").is_err());
    }

    #[test]
    fn http_responses() {
        let (s, b) =
            parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello-extra")
                .unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"hello"[..]));
        let (s, b) = parse_http_response(b"HTTP/1.0 404 Not Found\r\nX: y\r\n\r\nnope").unwrap();
        assert_eq!((s, b.as_slice()), (404, &b"nope"[..]));
        let (_, b) = parse_http_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(b, b"hello world");
        assert!(parse_http_response(b"").is_err());
        assert!(parse_http_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert_eq!(
            complete_length(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"),
            Some(40)
        );
        assert_eq!(complete_length(b"HTTP/1.1 200 OK\r\n"), None);
    }

    /// Serves one canned answer per connection, `n` times.
    fn serve(answers: Vec<String>) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for a in answers {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = [0u8; 4096];
                let mut req = Vec::new();
                while header_end(&req).is_none() {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                assert!(req.starts_with(b"GET /v1/instances"));
                s.write_all(a.as_bytes()).unwrap();
            }
        });
        addr
    }

    #[test]
    fn fetch_over_tcp() {
        let ok = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{SAMPLE}",
            SAMPLE.len()
        );
        let addr = serve(vec![ok, "HTTP/1.1 404 Not Found\r\n\r\nnope".into()]);
        let s = fetch_sample(&addr, false, Duration::from_secs(5)).unwrap();
        assert_eq!(s.instances.len(), 2);
        let e = fetch_sample(&addr, false, Duration::from_secs(5)).unwrap_err();
        assert!(format!("{e:#}").contains("too old"), "{e:#}");

        // a port nobody listens on
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap().to_string();
        drop(closed);
        let results = fetch_all(
            &[Target {
                node: Some("n9".into()),
                addr: Ok(dead.clone()),
            }],
            false,
            Duration::from_secs(2),
        );
        let mut prev = Previous::new();
        let snap = build_snapshot(&mut prev, results, &[], None);
        let line = snap.agents[0].problem_line().unwrap();
        assert!(
            line.starts_with(&format!("node n9 at {dead}: unreachable: cannot connect")),
            "{line}"
        );
    }

    #[test]
    fn once_outputs() {
        let mut prev = Previous::new();
        let s = parse_sample(SAMPLE.as_bytes()).unwrap();
        let results = vec![
            AgentResult {
                target: Target {
                    node: None,
                    addr: Ok("127.0.0.1:9181".into()),
                },
                sample: Ok(s),
            },
            AgentResult {
                target: Target {
                    node: Some("n2".into()),
                    addr: Ok("10.0.0.2:9181".into()),
                },
                sample: Err("timed out".into()),
            },
        ];
        let mut snap = build_snapshot(&mut prev, results, &[], None);
        let opts = Options {
            app: None,
            interval: Duration::from_millis(500),
            costs: true,
            sort: Sort::new(SortKey::Mem),
        };
        sort_rows(&mut snap.rows, opts.sort);
        let text = render_text(&snap, &opts);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("1/2 agents reachable, 2 spores, eBPF on, every 500 ms"));
        assert_eq!(lines[1], "node n2 at 10.0.0.2:9181: unreachable: timed out");
        assert!(
            lines[3].starts_with("NODE  APP    INSTANCE   STATE"),
            "{}",
            lines[3]
        );
        assert!(lines[3].contains("MEM↓"));
        assert!(lines[4].contains("hello-0-a") && lines[4].contains("2.0 MiB"));
        assert!(lines[4].contains("1.0ms") && lines[4].ends_with("exited_1"));
        assert!(text.contains("sched_switch"));

        let doc = json_document(&snap, false);
        assert_eq!(doc["agents"][0]["node"], "n1");
        assert_eq!(doc["agents"][0]["error"], Value::Null);
        assert_eq!(doc["agents"][1]["error"], "timed out");
        let i = &doc["instances"][0];
        assert_eq!(i["instance"], "hello-0-a");
        assert_eq!(i["future_field"], "kept");
        assert_eq!(i["memory_peak_bytes"], 4194304);
        assert_eq!(i["cpu_percent"], Value::Null);
        assert!(i.get("rx_bytes_per_s").is_some());
        assert!(doc.get("programs").is_none());
        assert!(json_document(&snap, true)["programs"].is_array());
    }
}
