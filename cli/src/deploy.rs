//! `mesh deploy`, `mesh scale`, `mesh undeploy`, `mesh budget`, `mesh ps`, `mesh endpoints`.

use anyhow::{Result, bail};
use clap::Args;
use mesh_common::Digest;
use mesh_common::model::{Budget, Endpoint, InstanceStatus, Plan};

use crate::fabric_client::{FabricArgs, block_on};

#[derive(Args)]
pub struct DeployCmd {
    /// App name (must match the spore's name).
    app: String,
    /// Spore digest, as `mesh spore push` printed it.
    digest: Digest,
    /// Instances that must run.
    #[arg(long, default_value_t = 1)]
    min: u32,
    /// Instances that may run [default: min].
    #[arg(long)]
    max: Option<u32>,
    /// First port of the instances (0: agents pick).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// HTTP health path, overriding the spore's.
    #[arg(long)]
    health: Option<String>,
    /// How long checks must pass before an instance is Ready.
    #[arg(long, value_name = "MS")]
    min_healthy_ms: Option<u64>,
    /// Instances replaced at a time during a rollout.
    #[arg(long)]
    max_parallel: Option<u32>,
    /// How long a drained instance keeps serving after deregistration.
    #[arg(long, value_name = "MS")]
    drain_ms: Option<u64>,
    /// A new version not Ready within this time is rolled back.
    #[arg(long, value_name = "MS")]
    deadline_ms: Option<u64>,
    #[command(flatten)]
    fabric: FabricArgs,
}

pub fn deploy(cmd: DeployCmd) -> Result<()> {
    let mut line = format!(
        "PLAN.SET {} digest={} min={} max={} port={}",
        cmd.app,
        cmd.digest,
        cmd.min,
        cmd.max.unwrap_or(cmd.min),
        cmd.port
    );
    let opt = |k: &str, v: Option<String>| v.map(|v| format!(" {k}={v}")).unwrap_or_default();
    line.push_str(&opt("health", cmd.health));
    line.push_str(&opt(
        "min_healthy_ms",
        cmd.min_healthy_ms.map(|v| v.to_string()),
    ));
    line.push_str(&opt(
        "max_parallel",
        cmd.max_parallel.map(|v| v.to_string()),
    ));
    line.push_str(&opt("drain_ms", cmd.drain_ms.map(|v| v.to_string())));
    line.push_str(&opt("deadline_ms", cmd.deadline_ms.map(|v| v.to_string())));
    let app = cmd.app.clone();
    block_on(async move {
        let mut c = cmd.fabric.connect().await?;
        let r = c.call(&line).await?;
        println!(
            "deployed {app} {} (rev {})",
            cmd.digest,
            r.get("rev").unwrap_or("?")
        );
        Ok(())
    })?
}

#[derive(Args)]
pub struct ScaleCmd {
    app: String,
    #[arg(long)]
    min: u32,
    /// [default: min, or the plan's max if higher]
    #[arg(long)]
    max: Option<u32>,
    #[command(flatten)]
    fabric: FabricArgs,
}

pub fn scale(cmd: ScaleCmd) -> Result<()> {
    let max = cmd
        .max
        .map(|m| format!(" max={m}"))
        .unwrap_or_else(|| format!(" max={}", cmd.min));
    let line = format!("PLAN.SET {} min={}{max}", cmd.app, cmd.min);
    block_on(async move {
        let mut c = cmd.fabric.connect().await?;
        let r = c.call(&line).await?;
        println!(
            "scaled {} to min {} (rev {})",
            cmd.app,
            cmd.min,
            r.get("rev").unwrap_or("?")
        );
        Ok(())
    })?
}

#[derive(Args)]
pub struct UndeployCmd {
    app: String,
    #[command(flatten)]
    fabric: FabricArgs,
}

pub fn undeploy(cmd: UndeployCmd) -> Result<()> {
    block_on(async move {
        let mut c = cmd.fabric.connect().await?;
        let r = c.call(&format!("PLAN.DEL {}", cmd.app)).await?;
        println!(
            "removed the plan of {} (rev {}); its instances drain",
            cmd.app,
            r.get("rev").unwrap_or("?")
        );
        Ok(())
    })?
}

#[derive(Args)]
pub struct BudgetCmd {
    app: String,
    /// Most instances of the app.
    #[arg(long)]
    max_instances: Option<u32>,
    /// CPU for all instances: `1500m` (milli-cores) or `2` (cores).
    #[arg(long, value_parser = parse_cpu)]
    cpu: Option<u64>,
    /// Memory for all instances: `512M`, `2G` (MiB and GiB), or plain MiB.
    #[arg(long, value_parser = parse_memory)]
    memory: Option<u64>,
    #[command(flatten)]
    fabric: FabricArgs,
}

fn parse_cpu(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a CPU amount (e.g. 1500m or 2)");
    if let Some(m) = s.strip_suffix('m') {
        return m.parse().map_err(|_| bad());
    }
    let cores: f64 = s.parse().map_err(|_| bad())?;
    if !(0.0..=100_000.0).contains(&cores) {
        return Err(bad());
    }
    Ok((cores * 1000.0).round() as u64)
}

fn parse_memory(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a memory amount (e.g. 512M or 2G)");
    let t = s.trim_end_matches('i').trim_end_matches('B');
    let (num, mult) = match t.chars().last() {
        Some('M' | 'm') => (&t[..t.len() - 1], 1),
        Some('G' | 'g') => (&t[..t.len() - 1], 1024),
        Some('T' | 't') => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1),
    };
    num.parse::<u64>().map(|n| n * mult).map_err(|_| bad())
}

pub fn budget(cmd: BudgetCmd) -> Result<()> {
    block_on(async move {
        let mut c = cmd.fabric.connect().await?;
        if cmd.max_instances.is_none() && cmd.cpu.is_none() && cmd.memory.is_none() {
            let r = c.call(&format!("BUDGET.GET {}", cmd.app)).await?;
            let b = Budget::from_fields(r.items.first().map(String::as_str).unwrap_or_default())
                .map_err(anyhow::Error::msg)?;
            println!(
                "{}: max {} instances, {}m CPU, {} MiB memory (rev {})",
                b.app, b.max_instances, b.cpu_milli, b.memory_mb, b.rev
            );
            return Ok(());
        }
        let mut line = format!("BUDGET.SET {}", cmd.app);
        if let Some(v) = cmd.max_instances {
            line.push_str(&format!(" max_instances={v}"));
        }
        if let Some(v) = cmd.cpu {
            line.push_str(&format!(" cpu_milli={v}"));
        }
        if let Some(v) = cmd.memory {
            line.push_str(&format!(" memory_mb={v}"));
        }
        let r = c.call(&line).await?;
        println!(
            "budget of {} set (rev {})",
            cmd.app,
            r.get("rev").unwrap_or("?")
        );
        Ok(())
    })?
}

#[derive(Args)]
pub struct PsCmd {
    /// One JSON array of instance objects (app, instance, node, state, pid, port, restarts,
    /// digest, slot, reason, message, age_s, registered).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    fabric: FabricArgs,
}

pub fn ps(cmd: PsCmd) -> Result<()> {
    block_on(async move {
        let mut c = cmd.fabric.connect().await?;
        let plans: Vec<Plan> = parse_items(&c.call("PLAN.LIST").await?.items, Plan::from_fields)?;
        let insts: Vec<InstanceStatus> = parse_items(
            &c.call("INSTANCE.LIST").await?.items,
            InstanceStatus::from_fields,
        )?;
        let eps: Vec<Endpoint> =
            parse_items(&c.call("ENDPOINT.LIST").await?.items, Endpoint::from_fields)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if cmd.json {
            let rows: Vec<serde_json::Value> = insts
                .iter()
                .map(|i| {
                    let registered = eps.iter().any(|e| e.app == i.app && e.instance == i.instance);
                    serde_json::json!({
                        "app": i.app, "instance": i.instance, "node": i.node, "state": i.state,
                        "pid": (i.pid != 0).then_some(i.pid), "port": i.port, "restarts": i.restarts,
                        "digest": i.digest.to_string(), "slot": i.slot, "reason": i.reason,
                        "message": i.message, "age_s": now.saturating_sub(i.since), "registered": registered,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
            return Ok(());
        }
        println!(
            "{:<16} {:<14} {:>4} {:>4} {:>6} {:>6} {:>6}",
            "APP", "DIGEST", "MIN", "MAX", "PORT", "READY", "REV"
        );
        for p in &plans {
            let ready = eps.iter().filter(|e| e.app == p.app).count();
            println!(
                "{:<16} {:<14} {:>4} {:>4} {:>6} {:>6} {:>6}",
                p.app,
                p.digest.short(),
                p.min,
                p.max,
                p.port,
                ready,
                p.rev
            );
        }
        if !insts.is_empty() {
            println!();
            println!(
                "{:<26} {:<12} {:<10} {:>7} {:>6} {:>8} {:<10} {:>6}  MESSAGE",
                "INSTANCE", "NODE", "STATE", "PID", "PORT", "RESTARTS", "LAST EXIT", "AGE"
            );
            for i in &insts {
                let pid = if i.pid == 0 {
                    "-".to_string()
                } else {
                    i.pid.to_string()
                };
                println!(
                    "{:<26} {:<12} {:<10} {:>7} {:>6} {:>8} {:<10} {:>6}  {}",
                    i.instance,
                    i.node,
                    i.state,
                    pid,
                    i.port,
                    i.restarts,
                    i.reason,
                    age(now.saturating_sub(i.since)),
                    i.message
                );
            }
        }
        Ok(())
    })?
}

fn age(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[derive(Args)]
pub struct EndpointsCmd {
    app: Option<String>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    fabric: FabricArgs,
}

pub fn endpoints(cmd: EndpointsCmd) -> Result<()> {
    block_on(async move {
        let mut c = cmd.fabric.connect().await?;
        let line = match &cmd.app {
            Some(a) => format!("ENDPOINT.LIST {a}"),
            None => "ENDPOINT.LIST".into(),
        };
        let eps: Vec<Endpoint> = parse_items(&c.call(&line).await?.items, Endpoint::from_fields)?;
        if cmd.json {
            println!("{}", serde_json::to_string_pretty(&eps)?);
        } else {
            print_endpoints(&eps);
        }
        Ok(())
    })?
}

fn print_endpoints(eps: &[Endpoint]) {
    println!(
        "{:<20} {:<24} {:<16} {:<22} {:>6}",
        "APP", "INSTANCE", "NODE", "ADDR", "REV"
    );
    for e in eps {
        println!(
            "{:<20} {:<24} {:<16} {:<22} {:>6}",
            e.app, e.instance, e.node, e.addr, e.rev
        );
    }
}

fn parse_items<T>(items: &[String], f: fn(&str) -> Result<T, String>) -> Result<Vec<T>> {
    items
        .iter()
        .map(|i| f(i).map_err(|e| anyhow::anyhow!("unexpected item from the fabric ({e}): {i}")))
        .collect::<Result<Vec<T>>>()
        .or_else(|e| bail!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_memory_units() {
        assert_eq!(parse_cpu("1500m"), Ok(1500));
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert_eq!(parse_cpu("0.25"), Ok(250));
        assert!(parse_cpu("two").is_err());
        assert_eq!(parse_memory("512M"), Ok(512));
        assert_eq!(parse_memory("2G"), Ok(2048));
        assert_eq!(parse_memory("1Gi"), Ok(1024));
        assert_eq!(parse_memory("300"), Ok(300));
        assert!(parse_memory("lots").is_err());
    }
}
