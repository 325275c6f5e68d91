//! What the agent tells SREs: Prometheus `/metrics` with per app and instance labels, and a
//! JSON sample (`/v1/instances`) for `mesh top`. Everything is read on request: cgroup files,
//! the in-kernel eBPF counters, the instance states the agent loop publishes here.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

use crate::accounting::ProgramCost;
use crate::supervisor::{ExitReason, Supervisor};

/// An instance as the agent loop last reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceView {
    pub app: String,
    pub state: String,
    pub restarts: u32,
    pub last: String,
    pub digest: String,
    pub port: u16,
}

/// Shared between the agent loop (writes) and the metrics server (reads).
#[derive(Default)]
pub struct AgentMetrics {
    instances: Mutex<BTreeMap<String, InstanceView>>,
    exits: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// When someone last asked for program costs (they stay on a while after).
    costs_asked: Mutex<Option<Instant>>,
    pub node: String,
}

/// How long program run statistics stay on after the last request for them.
const COSTS_LINGER: Duration = Duration::from_secs(30);

impl AgentMetrics {
    pub fn new(node: &str) -> AgentMetrics {
        AgentMetrics {
            node: node.to_string(),
            ..Default::default()
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_instance(&self, name: &str, view: InstanceView) {
        Self::lock(&self.instances).insert(name.to_string(), view);
    }

    pub fn remove_instance(&self, name: &str) {
        Self::lock(&self.instances).remove(name);
    }

    pub fn exited(&self, app: &str, reason: &ExitReason) {
        let label = match reason {
            ExitReason::Exited(0) => "exited_0",
            ExitReason::Exited(_) => "exited_nonzero",
            ExitReason::Signaled(_) => "signaled",
            ExitReason::OomKilled => "oom_killed",
            ExitReason::Vanished => "unknown",
        };
        *Self::lock(&self.exits)
            .entry((app.to_string(), label))
            .or_default() += 1;
    }
}

/// One instance's numbers at one moment (`mesh top --json` prints these).
#[derive(Debug, Clone, Serialize)]
pub struct InstanceSample {
    pub node: String,
    pub app: String,
    pub instance: String,
    pub state: String,
    pub pid: u32,
    pub port: u16,
    pub restarts: u32,
    pub last_exit: String,
    pub cpu_ns_ebpf: Option<u64>,
    pub cpu_usec_cgroup: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    pub oom_kills: u64,
    pub pids: Option<u64>,
    pub rx_bytes: Option<u64>,
    pub tx_bytes: Option<u64>,
    pub rx_packets: Option<u64>,
    pub tx_packets: Option<u64>,
    pub runqueue_waits: Option<u64>,
    pub runqueue_p50_us: Option<u64>,
    pub runqueue_p99_us: Option<u64>,
    pub execs: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub node: String,
    /// Monotonic milliseconds of the agent when taken (rates are differences over this).
    pub at_ms: u64,
    pub ebpf: bool,
    pub instances: Vec<InstanceSample>,
    pub programs: Vec<ProgramCost>,
}

struct Snapshot {
    sample: Sample,
    hist: Vec<(String, String, mesh_ebpf::CgroupStats)>,
    exits: BTreeMap<(String, &'static str), u64>,
}

fn snapshot(sup: &Supervisor, m: &AgentMetrics, epoch: Instant) -> Snapshot {
    let views = AgentMetrics::lock(&m.instances).clone();
    let acc = sup.accounting();
    let mut instances = Vec::new();
    let mut hist = Vec::new();
    for info in sup.list() {
        let rec = &info.record;
        let cg = sup.tree().instance(&rec.app, &rec.instance);
        let usage = cg.usage();
        let st = acc.and_then(|a| a.stats(info.cgroup_id));
        let view = views.get(&rec.instance).cloned().unwrap_or_default();
        if let Some(st) = st {
            hist.push((rec.app.clone(), rec.instance.clone(), st));
        }
        instances.push(InstanceSample {
            node: m.node.clone(),
            app: rec.app.clone(),
            instance: rec.instance.clone(),
            state: if view.state.is_empty() {
                "running".into()
            } else {
                view.state.clone()
            },
            pid: rec.pid,
            port: rec.port.unwrap_or(view.port),
            restarts: view.restarts,
            last_exit: view.last.clone(),
            cpu_ns_ebpf: st.map(|s| s.cpu_ns),
            cpu_usec_cgroup: usage.cpu_usec,
            memory_bytes: usage.memory,
            memory_peak_bytes: usage.memory_peak,
            oom_kills: usage.oom_kills,
            pids: usage.pids,
            rx_bytes: st.map(|s| s.rx_bytes),
            tx_bytes: st.map(|s| s.tx_bytes),
            rx_packets: st.map(|s| s.rx_packets),
            tx_packets: st.map(|s| s.tx_packets),
            runqueue_waits: st.map(|s| s.rq_count),
            runqueue_p50_us: st.and_then(|s| s.rq_quantile_us(0.5)),
            runqueue_p99_us: st.and_then(|s| s.rq_quantile_us(0.99)),
            execs: st.map(|s| s.execs),
        });
    }
    let programs = acc.map(|a| a.costs()).unwrap_or_default();
    Snapshot {
        sample: Sample {
            node: m.node.clone(),
            at_ms: u64::try_from(epoch.elapsed().as_millis()).unwrap_or(0),
            ebpf: acc.is_some(),
            instances,
            programs,
        },
        hist,
        exits: AgentMetrics::lock(&m.exits).clone(),
    }
}

type Getter = fn(&InstanceSample) -> Option<u64>;

fn render(s: &Snapshot, views: &BTreeMap<String, InstanceView>) -> String {
    let mut out = String::new();
    let fam = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    let lbl = |i: &InstanceSample| format!("app=\"{}\",instance=\"{}\"", i.app, i.instance);
    let ins = &s.sample.instances;
    fam(
        &mut out,
        "mesh_agent_ebpf_loaded",
        "gauge",
        "1 when the eBPF accounting programs are loaded.",
    );
    let _ = writeln!(out, "mesh_agent_ebpf_loaded {}", u8::from(s.sample.ebpf));
    fam(
        &mut out,
        "mesh_spore_info",
        "gauge",
        "One series per running instance, with its state.",
    );
    for i in ins {
        let digest = views
            .get(&i.instance)
            .map(|v| v.digest.as_str())
            .unwrap_or("");
        let _ = writeln!(
            out,
            "mesh_spore_info{{{},state=\"{}\",digest=\"{digest}\"}} 1",
            lbl(i),
            i.state
        );
    }
    fam(
        &mut out,
        "mesh_spore_cpu_seconds_total",
        "counter",
        "CPU time, from eBPF (sched_switch) and from the cgroup's cpu.stat.",
    );
    for i in ins {
        if let Some(ns) = i.cpu_ns_ebpf {
            let _ = writeln!(
                out,
                "mesh_spore_cpu_seconds_total{{{},source=\"ebpf\"}} {}",
                lbl(i),
                ns as f64 / 1e9
            );
        }
        if let Some(us) = i.cpu_usec_cgroup {
            let _ = writeln!(
                out,
                "mesh_spore_cpu_seconds_total{{{},source=\"cgroup\"}} {}",
                lbl(i),
                us as f64 / 1e6
            );
        }
    }
    fam(
        &mut out,
        "mesh_spore_runqueue_latency_seconds",
        "histogram",
        "Time from becoming runnable to running (eBPF, log2 buckets).",
    );
    for (app, instance, st) in &s.hist {
        let mut cum = 0;
        for (k, n) in st.rq_hist.iter().enumerate() {
            cum += n;
            // skip the empty tail to keep the exposition short
            if cum == st.rq_count
                && k + 1 < st.rq_hist.len()
                && st.rq_hist[k + 1..].iter().all(|x| *x == 0)
                && k > 20
            {
                break;
            }
            let _ = writeln!(
                out,
                "mesh_spore_runqueue_latency_seconds_bucket{{app=\"{app}\",instance=\"{instance}\",le=\"{}\"}} {cum}",
                mesh_ebpf::CgroupStats::rq_slot_le_seconds(k)
            );
        }
        let _ = writeln!(
            out,
            "mesh_spore_runqueue_latency_seconds_bucket{{app=\"{app}\",instance=\"{instance}\",le=\"+Inf\"}} {}",
            st.rq_count
        );
        let _ = writeln!(
            out,
            "mesh_spore_runqueue_latency_seconds_sum{{app=\"{app}\",instance=\"{instance}\"}} {}",
            st.rq_sum_ns as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "mesh_spore_runqueue_latency_seconds_count{{app=\"{app}\",instance=\"{instance}\"}} {}",
            st.rq_count
        );
    }
    fam(
        &mut out,
        "mesh_spore_network_bytes_total",
        "counter",
        "Bytes through the spore's sockets (eBPF cgroup_skb, IP headers included).",
    );
    for i in ins {
        if let (Some(rx), Some(tx)) = (i.rx_bytes, i.tx_bytes) {
            let _ = writeln!(
                out,
                "mesh_spore_network_bytes_total{{{},direction=\"rx\"}} {rx}",
                lbl(i)
            );
            let _ = writeln!(
                out,
                "mesh_spore_network_bytes_total{{{},direction=\"tx\"}} {tx}",
                lbl(i)
            );
        }
    }
    fam(
        &mut out,
        "mesh_spore_network_packets_total",
        "counter",
        "Packets through the spore's sockets (eBPF cgroup_skb).",
    );
    for i in ins {
        if let (Some(rx), Some(tx)) = (i.rx_packets, i.tx_packets) {
            let _ = writeln!(
                out,
                "mesh_spore_network_packets_total{{{},direction=\"rx\"}} {rx}",
                lbl(i)
            );
            let _ = writeln!(
                out,
                "mesh_spore_network_packets_total{{{},direction=\"tx\"}} {tx}",
                lbl(i)
            );
        }
    }
    fam(
        &mut out,
        "mesh_spore_execs_total",
        "counter",
        "exec calls inside the spore's cgroup (eBPF).",
    );
    for i in ins {
        if let Some(n) = i.execs {
            let _ = writeln!(out, "mesh_spore_execs_total{{{}}} {n}", lbl(i));
        }
    }
    let gauges: [(&str, &str, Getter); 3] = [
        (
            "mesh_spore_memory_bytes",
            "Memory in use (memory.current, or v1 usage_in_bytes).",
            |i| i.memory_bytes,
        ),
        (
            "mesh_spore_memory_peak_bytes",
            "Highest memory use (memory.peak, or v1 max_usage_in_bytes).",
            |i| i.memory_peak_bytes,
        ),
        (
            "mesh_spore_pids",
            "Processes and threads in the spore's cgroup.",
            |i| i.pids,
        ),
    ];
    for (name, help, get) in gauges {
        fam(&mut out, name, "gauge", help);
        for i in ins {
            if let Some(v) = get(i) {
                let _ = writeln!(out, "{name}{{{}}} {v}", lbl(i));
            }
        }
    }
    fam(
        &mut out,
        "mesh_spore_oom_kills_total",
        "counter",
        "OOM kills in the spore's cgroup (memory.events).",
    );
    for i in ins {
        let _ = writeln!(
            out,
            "mesh_spore_oom_kills_total{{{}}} {}",
            lbl(i),
            i.oom_kills
        );
    }
    fam(
        &mut out,
        "mesh_spore_restarts_total",
        "counter",
        "Restarts of the instance after it exited.",
    );
    for i in ins {
        let _ = writeln!(
            out,
            "mesh_spore_restarts_total{{{}}} {}",
            lbl(i),
            i.restarts
        );
    }
    fam(
        &mut out,
        "mesh_spore_exits_total",
        "counter",
        "Instance exits on this node, by reason.",
    );
    for ((app, reason), n) in &s.exits {
        let _ = writeln!(
            out,
            "mesh_spore_exits_total{{app=\"{app}\",reason=\"{reason}\"}} {n}"
        );
    }
    fam(
        &mut out,
        "mesh_ebpf_program_runs_total",
        "counter",
        "Runs of each eBPF program while run statistics were on.",
    );
    for p in &s.sample.programs {
        let _ = writeln!(
            out,
            "mesh_ebpf_program_runs_total{{program=\"{}\"}} {}",
            p.name, p.run_count
        );
    }
    fam(
        &mut out,
        "mesh_ebpf_program_run_seconds_total",
        "counter",
        "Time spent in each eBPF program while run statistics were on.",
    );
    for p in &s.sample.programs {
        let _ = writeln!(
            out,
            "mesh_ebpf_program_run_seconds_total{{program=\"{}\"}} {}",
            p.name,
            p.run_time_ns as f64 / 1e9
        );
    }
    out
}

/// Serves `/metrics`, `/v1/instances` (JSON; `?costs=1` also turns on eBPF run statistics
/// for a while) and `/healthz` until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, sup: Supervisor, m: Arc<AgentMetrics>) {
    let epoch = Instant::now();
    tokio::spawn(costs_off_when_unused(sup.clone(), m.clone()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (sup, m) = (sup.clone(), m.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (sup, m) = (sup.clone(), m.clone());
                async move {
                    let r = tokio::task::spawn_blocking(move || respond(&req, &sup, &m, epoch))
                        .await
                        .unwrap_or_else(|_| {
                            text(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "failed\n".into(),
                                "text/plain",
                            )
                        });
                    Ok::<_, Infallible>(r)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

fn respond<B>(
    req: &Request<B>,
    sup: &Supervisor,
    m: &AgentMetrics,
    epoch: Instant,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let snap = snapshot(sup, m, epoch);
            let views = AgentMetrics::lock(&m.instances).clone();
            text(
                StatusCode::OK,
                render(&snap, &views),
                "text/plain; version=0.0.4",
            )
        }
        "/v1/instances" => {
            if req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "costs=1"))
                && let Some(acc) = sup.accounting()
            {
                *AgentMetrics::lock(&m.costs_asked) = Some(Instant::now());
                if let Err(e) = acc.set_cost_stats(true) {
                    tracing::warn!("{e}");
                }
            }
            let snap = snapshot(sup, m, epoch);
            match serde_json::to_string(&snap.sample) {
                Ok(j) => text(StatusCode::OK, j, "application/json"),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    e.to_string(),
                    "text/plain",
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /v1/instances or /healthz\n".into(),
            "text/plain",
        ),
    }
}

fn text(status: StatusCode, body: String, ctype: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Run statistics cost a little on every program run: off again once nobody asked for a while.
async fn costs_off_when_unused(sup: Supervisor, m: Arc<AgentMetrics>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let Some(acc) = sup.accounting() else { return };
        let stale = AgentMetrics::lock(&m.costs_asked).is_none_or(|t| t.elapsed() > COSTS_LINGER);
        if stale && acc.cost_stats_enabled() {
            let _ = acc.set_cost_stats(false);
        }
    }
}
