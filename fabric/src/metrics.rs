//! The fabric's counters and their Prometheus text form (served on the HTTP port).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the store commit latency histogram.
const COMMIT_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0];

#[derive(Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_open: AtomicI64,
    pub connections_refused: AtomicU64,
    commands: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    pub events_fanned_out: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub blob_bytes_in: AtomicU64,
    pub blob_bytes_out: AtomicU64,
    commit_buckets: [AtomicU64; COMMIT_BUCKETS.len()],
    commit_count: AtomicU64,
    commit_sum_ns: AtomicU64,
}

impl Metrics {
    /// Counts one command by verb and result code (`ok` or the error code). Callers pass a
    /// known verb or `?`, so the label set stays bounded.
    pub fn command(&self, verb: &'static str, result: &'static str) {
        if let Ok(mut m) = self.commands.lock() {
            *m.entry((verb, result)).or_default() += 1;
        }
    }

    pub fn store_commit(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in COMMIT_BUCKETS.iter().enumerate() {
            if s <= *b {
                self.commit_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.commit_count.fetch_add(1, Relaxed);
        self.commit_sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    /// The Prometheus exposition text; `gauges` adds state-derived values.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let mut o = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            "mesh_fabric_connections_total",
            "Line-protocol connections accepted.",
            self.connections_total.load(Relaxed),
        );
        counter(
            "mesh_fabric_connections_refused_total",
            "Connections refused at the connection limit.",
            self.connections_refused.load(Relaxed),
        );
        counter(
            "mesh_fabric_events_fanned_out_total",
            "Event lines queued to subscribers.",
            self.events_fanned_out.load(Relaxed),
        );
        counter(
            "mesh_fabric_slow_consumers_total",
            "Connections closed for not reading their events.",
            self.slow_consumers.load(Relaxed),
        );
        counter(
            "mesh_fabric_blob_bytes_in_total",
            "Blob bytes uploaded.",
            self.blob_bytes_in.load(Relaxed),
        );
        counter(
            "mesh_fabric_blob_bytes_out_total",
            "Blob bytes downloaded.",
            self.blob_bytes_out.load(Relaxed),
        );
        let _ = writeln!(
            o,
            "# HELP mesh_fabric_connections_open Line-protocol connections open now.\n# TYPE mesh_fabric_connections_open gauge\nmesh_fabric_connections_open {}",
            self.connections_open.load(Relaxed)
        );
        for (name, help, v) in gauges {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP mesh_fabric_commands_total Commands by verb and result.\n# TYPE mesh_fabric_commands_total counter"
        );
        if let Ok(m) = self.commands.lock() {
            for ((verb, result), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "mesh_fabric_commands_total{{verb=\"{verb}\",result=\"{result}\"}} {n}"
                );
            }
        }
        let name = "mesh_fabric_store_commit_seconds";
        let _ = writeln!(
            o,
            "# HELP {name} Latency of durable store commits.\n# TYPE {name} histogram"
        );
        for (i, b) in COMMIT_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.commit_buckets[i].load(Relaxed)
            );
        }
        let count = self.commit_count.load(Relaxed);
        let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            o,
            "{name}_sum {}",
            self.commit_sum_ns.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(o, "{name}_count {count}");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.command("PLAN.SET", "ok");
        m.command("PLAN.SET", "ok");
        m.command("?", "UNKNOWN_VERB");
        m.store_commit(Duration::from_micros(1500));
        let text = m.render(&[("mesh_fabric_plans", "Plans.", 3)]);
        assert!(text.contains("mesh_fabric_commands_total{verb=\"PLAN.SET\",result=\"ok\"} 2"));
        assert!(text.contains("mesh_fabric_commands_total{verb=\"?\",result=\"UNKNOWN_VERB\"} 1"));
        assert!(text.contains("mesh_fabric_store_commit_seconds_bucket{le=\"0.001\"} 0"));
        assert!(text.contains("mesh_fabric_store_commit_seconds_bucket{le=\"0.002\"} 1"));
        assert!(text.contains("mesh_fabric_plans 3"));
    }
}
