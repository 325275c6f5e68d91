//! `mesh agent`: the node agent daemon.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use mesh_agent::cgroup::{CgroupRoot, Layout};
use mesh_agent::node::{self, AgentConfig};
use mesh_common::trust::TrustStore;

use crate::fabric_client::FabricArgs;

#[derive(Args)]
pub struct AgentCmd {
    #[command(flatten)]
    fabric: FabricArgs,
    /// This node's id [default: the host name].
    #[arg(long)]
    node: Option<String>,
    /// State directory: instance records, logs, spore cache, run dirs.
    #[arg(long, default_value = crate::logs_cmd::DEFAULT_STATE, value_name = "DIR")]
    state: PathBuf,
    /// Trusted-keys file (a mesh.pub is one); repeat to merge several. Spores signed by other
    /// keys are refused.
    #[arg(long = "trust", value_name = "FILE", required = true)]
    trust: Vec<PathBuf>,
    /// Build the cgroup tree in a new cgroup NAME beside or below the agent's own, instead of
    /// moving the agent into `<own cgroup>/mycelium/agent` (several agents on one host).
    #[arg(long, value_name = "NAME")]
    cgroup_root: Option<String>,
    /// Address the edge and other hosts reach this node's spores at.
    #[arg(long, default_value = "127.0.0.1")]
    advertise_ip: IpAddr,
    /// Ports for apps deployed without a base port, as LOW-HIGH.
    #[arg(long, default_value = "20000-29999", value_parser = parse_range)]
    port_range: (u16, u16),
    /// Most instances this node runs.
    #[arg(long, default_value_t = 1000)]
    max_instances: u32,
    /// The node's lease: if the agent is silent this long, its instances move elsewhere.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    lease_ttl_ms: u64,
    /// Stop every instance when the agent stops (default: they keep running and the next
    /// agent re-adopts them).
    #[arg(long)]
    stop_on_exit: bool,
    /// Run spores that ask for user NAME as UID:GID (repeatable), e.g.
    /// `--user mesh-spore=65534:65534`.
    #[arg(long = "user", value_name = "NAME=UID:GID")]
    users: Vec<String>,
    /// Create users that spores ask for and that do not exist (useradd --system).
    #[arg(long)]
    create_users: bool,
    /// Serve Prometheus /metrics and /v1/instances (for `mesh top`) here.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9181")]
    metrics: std::net::SocketAddr,
    /// Do not serve metrics at all.
    #[arg(long, conflicts_with = "metrics")]
    no_metrics: bool,
    /// Do not load the eBPF accounting programs (network bytes, run-queue latency and exit
    /// codes of re-adopted spores are then not available).
    #[arg(long)]
    no_ebpf: bool,
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: want LOW-HIGH"))?;
    let (a, b): (u16, u16) = (
        a.parse().map_err(|_| format!("{a:?} is not a port"))?,
        b.parse().map_err(|_| format!("{b:?} is not a port"))?,
    );
    if a == 0 || a > b {
        return Err(format!("{s:?}: want 1 <= LOW <= HIGH"));
    }
    Ok((a, b))
}

pub(crate) fn user_map(
    specs: &[String],
    create_missing: bool,
) -> Result<mesh_agent::users::UserMap> {
    let mut map = mesh_agent::users::UserMap {
        create_missing,
        ..Default::default()
    };
    for s in specs {
        let (name, id) = s
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--user {s:?}: want NAME=UID:GID"))?;
        let id =
            mesh_agent::users::parse_identity(id).map_err(|e| anyhow::anyhow!("--user {e}"))?;
        map.explicit.insert(name.to_string(), id);
    }
    Ok(map)
}

pub(crate) fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "node".into());
    let h: String = h
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if h.is_empty() { "node".into() } else { h }
}

pub fn build_config(cmd: &AgentCmd) -> Result<AgentConfig> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "mesh agent needs root: it creates cgroups, drops spores to unprivileged users and manages their capabilities"
        );
    }
    let node = cmd.node.clone().unwrap_or_else(hostname);
    mesh_common::model::check_name("node", &node).map_err(anyhow::Error::msg)?;
    let mut trust = TrustStore::new();
    for t in &cmd.trust {
        trust.merge_file(t)?;
    }
    let layout = Layout::detect().context("finding the cgroup hierarchies")?;
    let own = CgroupRoot::own(&layout);
    let (cgroup_root, move_self) = match &cmd.cgroup_root {
        None => (own, true),
        Some(name) => {
            mesh_common::model::check_name("cgroup root", name).map_err(anyhow::Error::msg)?;
            let root = CgroupRoot::new_root(&layout, name);
            root.create()
                .with_context(|| format!("creating cgroup {}", root.v2.display()))?;
            (root, false)
        }
    };
    Ok(AgentConfig {
        fabric: cmd.fabric.resolve()?,
        node,
        state_dir: cmd.state.clone(),
        trust,
        cgroup_root,
        move_self,
        advertise_ip: cmd.advertise_ip,
        port_range: cmd.port_range,
        max_instances: cmd.max_instances,
        lease_ttl: Duration::from_millis(cmd.lease_ttl_ms.max(500)),
        stop_on_exit: cmd.stop_on_exit,
        users: user_map(&cmd.users, cmd.create_users)?,
        metrics: (!cmd.no_metrics).then_some(cmd.metrics),
        ebpf: !cmd.no_ebpf,
    })
}

/// Makes sure descriptors 0-2 are open (on /dev/null if the agent was started without them), so
/// that no descriptor the agent opens later lands there and reaches a spore as its stdout.
fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries a descriptor number.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // open(2) returns the lowest free descriptor: this one. It stays open for good.
            let _ = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(std::mem::forget);
        }
    }
}

pub fn run(cmd: AgentCmd) -> Result<()> {
    ensure_std_fds();
    crate::init_logging();
    let cfg = build_config(&cmd)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("agent")
        .build()
        .context("starting the async runtime")?;
    println!(
        "mesh agent: node {} on fabric {}, state in {}, cgroups under {} ({})",
        cfg.node,
        cfg.fabric.fabric,
        cfg.state_dir.display(),
        cfg.cgroup_root.v2.display(),
        cfg.cgroup_root.mode
    );
    rt.block_on(node::run(cfg, crate::fabric_cmd::wait_for_shutdown()))?;
    println!("mesh agent: stopped");
    Ok(())
}
