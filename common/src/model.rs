//! Domain types of the control plane: plans, budgets, endpoints, nodes, leases.
//!
//! Each type knows its `key=value` form on the line protocol (`to_fields`) and how to read it
//! back from a reply, item or event (`from_fields`), so fabric and clients share one spelling.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::proto::{Fields, field, parse_fields};

/// What should run: an app's spore digest, instance counts and rollout knobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub app: String,
    pub digest: Digest,
    pub min: u32,
    pub max: u32,
    /// First port of the app's instances; 0 lets agents pick from their own range.
    pub port: u16,
    /// HTTP health path overriding the manifest's; `None` keeps the manifest's.
    pub health: Option<String>,
    pub min_healthy_ms: u64,
    pub max_parallel: u32,
    pub drain_ms: u64,
    /// A new version that is not Ready within this time is rolled back.
    pub deadline_ms: u64,
    /// Per-instance CPU of the spore (from its manifest), for the budget.
    pub cpu_milli: u32,
    /// Per-instance memory of the spore (from its manifest), for the budget.
    pub memory_mb: u32,
    /// Revision of the last change.
    pub rev: u64,
}

/// Defaults of the rollout knobs.
pub const PLAN_DEFAULT_MIN_HEALTHY_MS: u64 = 1000;
pub const PLAN_DEFAULT_MAX_PARALLEL: u32 = 1;
pub const PLAN_DEFAULT_DRAIN_MS: u64 = 2000;
pub const PLAN_DEFAULT_DEADLINE_MS: u64 = 60_000;

impl Plan {
    pub fn to_fields(&self) -> Fields {
        Fields::new()
            .add("app", &self.app)
            .add("rev", self.rev)
            .add("digest", self.digest)
            .add("min", self.min)
            .add("max", self.max)
            .add("port", self.port)
            .add_opt("health", self.health.as_ref())
            .add("min_healthy_ms", self.min_healthy_ms)
            .add("max_parallel", self.max_parallel)
            .add("drain_ms", self.drain_ms)
            .add("deadline_ms", self.deadline_ms)
            .add("cpu_milli", self.cpu_milli)
            .add("memory_mb", self.memory_mb)
    }

    pub fn from_fields(s: &str) -> Result<Self, String> {
        let f = parse_fields(s);
        Ok(Plan {
            app: req(&f, "app")?.to_string(),
            digest: req(&f, "digest")?.parse().map_err(|e| format!("{e}"))?,
            min: num(&f, "min")?,
            max: num(&f, "max")?,
            port: num(&f, "port")?,
            health: field(&f, "health").map(str::to_string),
            min_healthy_ms: num(&f, "min_healthy_ms")?,
            max_parallel: num(&f, "max_parallel")?,
            drain_ms: num(&f, "drain_ms")?,
            deadline_ms: num(&f, "deadline_ms")?,
            cpu_milli: num(&f, "cpu_milli")?,
            memory_mb: num(&f, "memory_mb")?,
            rev: num(&f, "rev")?,
        })
    }
}

/// An app's share of the mesh (the nutrient ledger): limits over all its instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    pub app: String,
    pub max_instances: u32,
    pub cpu_milli: u64,
    pub memory_mb: u64,
    pub rev: u64,
}

impl Budget {
    pub fn to_fields(&self) -> Fields {
        Fields::new()
            .add("app", &self.app)
            .add("rev", self.rev)
            .add("max_instances", self.max_instances)
            .add("cpu_milli", self.cpu_milli)
            .add("memory_mb", self.memory_mb)
    }

    pub fn from_fields(s: &str) -> Result<Self, String> {
        let f = parse_fields(s);
        Ok(Budget {
            app: req(&f, "app")?.to_string(),
            max_instances: num(&f, "max_instances")?,
            cpu_milli: num(&f, "cpu_milli")?,
            memory_mb: num(&f, "memory_mb")?,
            rev: num(&f, "rev")?,
        })
    }
}

/// A Ready instance that traffic may go to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub app: String,
    pub instance: String,
    pub node: String,
    pub addr: SocketAddr,
    pub lease: u64,
    pub rev: u64,
}

impl Endpoint {
    pub fn to_fields(&self) -> Fields {
        Fields::new()
            .add("app", &self.app)
            .add("rev", self.rev)
            .add("instance", &self.instance)
            .add("node", &self.node)
            .add("addr", self.addr)
            .add("lease", self.lease)
    }

    pub fn from_fields(s: &str) -> Result<Self, String> {
        let f = parse_fields(s);
        Ok(Endpoint {
            app: req(&f, "app")?.to_string(),
            instance: req(&f, "instance")?.to_string(),
            node: req(&f, "node")?.to_string(),
            addr: req(&f, "addr")?
                .parse()
                .map_err(|_| "addr= is not host:port".to_string())?,
            lease: num(&f, "lease")?,
            rev: num(&f, "rev")?,
        })
    }
}

/// A node agent and what it offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub cpus: u32,
    pub memory_mb: u64,
    pub max_instances: u32,
    pub lease: u64,
    pub rev: u64,
    /// Where the node's agent serves /metrics and /v1/instances (`mesh top` reads it).
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

impl Node {
    pub fn to_fields(&self) -> Fields {
        Fields::new()
            .add("node", &self.id)
            .add("rev", self.rev)
            .add("cpus", self.cpus)
            .add("memory_mb", self.memory_mb)
            .add("max_instances", self.max_instances)
            .add("lease", self.lease)
            .add_opt("metrics", self.metrics)
    }

    pub fn from_fields(s: &str) -> Result<Self, String> {
        let f = parse_fields(s);
        Ok(Node {
            id: req(&f, "node")?.to_string(),
            cpus: num(&f, "cpus")?,
            memory_mb: num(&f, "memory_mb")?,
            max_instances: num(&f, "max_instances")?,
            lease: num(&f, "lease")?,
            rev: num(&f, "rev")?,
            metrics: match field(&f, "metrics") {
                Some(m) => Some(
                    m.parse()
                        .map_err(|_| "metrics= is not host:port".to_string())?,
                ),
                None => None,
            },
        })
    }
}

/// A slot of an app's plan placed on a node: the fabric assigns, the node runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub app: String,
    pub slot: u32,
    pub node: String,
    pub rev: u64,
}

impl Assignment {
    pub fn to_fields(&self) -> Fields {
        Fields::new()
            .add("app", &self.app)
            .add("rev", self.rev)
            .add("slot", self.slot)
            .add("node", &self.node)
    }

    pub fn from_fields(s: &str) -> Result<Self, String> {
        let f = parse_fields(s);
        Ok(Assignment {
            app: req(&f, "app")?.to_string(),
            slot: num(&f, "slot")?,
            node: req(&f, "node")?.to_string(),
            rev: num(&f, "rev")?,
        })
    }
}

/// What an agent reports about one instance (soft state: it goes with the node's lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub app: String,
    pub instance: String,
    pub node: String,
    pub slot: u32,
    pub digest: Digest,
    /// launching, ready, unhealthy, draining, failed, crashloop, backoff.
    pub state: String,
    /// 0 when no process runs.
    pub pid: u32,
    pub port: u16,
    pub restarts: u32,
    /// Last exit or failure, short and machine-readable: `-`, `exit:3`, `signal:9`, `oom`,
    /// `unhealthy`, `deadline`, `start`, `lost`. On the wire `last=` (a deletion event's own
    /// `reason=` is about the deletion).
    pub reason: String,
    /// Free text for humans (percent-encoded on the wire).
    pub message: String,
    /// Unix seconds when the instance entered its current process lifetime.
    pub since: u64,
    pub lease: u64,
    pub rev: u64,
}

impl InstanceStatus {
    pub fn to_fields(&self) -> Fields {
        Fields::new()
            .add("app", &self.app)
            .add("rev", self.rev)
            .add("instance", &self.instance)
            .add("node", &self.node)
            .add("slot", self.slot)
            .add("digest", self.digest)
            .add("state", &self.state)
            .add("pid", self.pid)
            .add("port", self.port)
            .add("restarts", self.restarts)
            .add("last", &self.reason)
            .add("msg", crate::proto::encode_text(&self.message))
            .add("since", self.since)
            .add("lease", self.lease)
    }

    pub fn from_fields(s: &str) -> Result<Self, String> {
        let f = parse_fields(s);
        Ok(InstanceStatus {
            app: req(&f, "app")?.to_string(),
            instance: req(&f, "instance")?.to_string(),
            node: req(&f, "node")?.to_string(),
            slot: num(&f, "slot")?,
            digest: req(&f, "digest")?.parse().map_err(|e| format!("{e}"))?,
            state: req(&f, "state")?.to_string(),
            pid: num(&f, "pid")?,
            port: num(&f, "port")?,
            restarts: num(&f, "restarts")?,
            reason: req(&f, "last")?.to_string(),
            message: crate::proto::decode_text(field(&f, "msg").unwrap_or("")),
            since: num(&f, "since")?,
            lease: num(&f, "lease")?,
            rev: num(&f, "rev")?,
        })
    }
}

/// Names of things (apps, nodes, instances) on the wire: 1..=63 bytes of a-z, 0-9, '-', '_',
/// '.', starting with a letter or digit.
pub fn check_name(kind: &str, s: &str) -> Result<(), String> {
    // Instance names carry their app's name plus a slot and a digest prefix.
    let max = if kind == "instance" { 127 } else { 63 };
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} {s:?} is not a name (1-{max} of a-z, 0-9, '-', '_', '.')"
        ))
    }
}

fn req<'a>(f: &[(&'a str, &'a str)], key: &str) -> Result<&'a str, String> {
    field(f, key).ok_or_else(|| format!("missing {key}="))
}

fn num<T: std::str::FromStr>(f: &[(&str, &str)], key: &str) -> Result<T, String> {
    req(f, key)?
        .parse()
        .map_err(|_| format!("{key}= is not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let p = Plan {
            app: "hello".into(),
            digest: Digest::of(b"x"),
            min: 2,
            max: 4,
            port: 8081,
            health: Some("/health".into()),
            min_healthy_ms: 1000,
            max_parallel: 1,
            drain_ms: 2000,
            deadline_ms: 60000,
            cpu_milli: 250,
            memory_mb: 32,
            rev: 7,
        };
        assert_eq!(Plan::from_fields(p.to_fields().as_str()).unwrap(), p);
        let b = Budget {
            app: "hello".into(),
            max_instances: 4,
            cpu_milli: 2000,
            memory_mb: 512,
            rev: 3,
        };
        assert_eq!(Budget::from_fields(b.to_fields().as_str()).unwrap(), b);
        let e = Endpoint {
            app: "hello".into(),
            instance: "hello-1".into(),
            node: "n1".into(),
            addr: "[::1]:8081".parse().unwrap(),
            lease: 9,
            rev: 4,
        };
        assert_eq!(Endpoint::from_fields(e.to_fields().as_str()).unwrap(), e);
        let n = Node {
            id: "n1".into(),
            cpus: 2,
            memory_mb: 24000,
            max_instances: 100,
            lease: 1,
            rev: 2,
            metrics: None,
        };
        assert_eq!(Node::from_fields(n.to_fields().as_str()).unwrap(), n);
    }

    #[test]
    fn placement_types_round_trip() {
        let a = Assignment {
            app: "hello".into(),
            slot: 1,
            node: "n1".into(),
            rev: 5,
        };
        assert_eq!(Assignment::from_fields(a.to_fields().as_str()).unwrap(), a);
        let i = InstanceStatus {
            app: "hello".into(),
            instance: "hello-s1-75a06912".into(),
            node: "n1".into(),
            slot: 1,
            digest: Digest::of(b"x"),
            state: "failed".into(),
            pid: 0,
            port: 20001,
            restarts: 2,
            reason: "verify".into(),
            message: "signature by key 3f2a is not trusted (100% sure)".into(),
            since: 1_700_000_000,
            lease: 3,
            rev: 9,
        };
        let line = i.to_fields();
        assert!(
            !line.as_str().contains("key 3f2a"),
            "spaces are encoded: {line}"
        );
        assert_eq!(InstanceStatus::from_fields(line.as_str()).unwrap(), i);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("node", "node-1.rack_a").is_ok());
        for bad in ["", "-a", "A", "a b", &"a".repeat(64)] {
            assert!(check_name("node", bad).is_err(), "{bad}");
        }
    }
}
