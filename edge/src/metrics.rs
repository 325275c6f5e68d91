//! Accounting: per-app and edge-wide counters (relaxed atomics, written by the workers) and
//! their Prometheus text rendering (read by the admin port on scrape).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds.
const LATENCY_BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Why an upstream exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    Connect,
    Reset,
    Timeout,
    BadResponse,
}

impl UpstreamError {
    const ALL: [UpstreamError; 4] = [
        UpstreamError::Connect,
        UpstreamError::Reset,
        UpstreamError::Timeout,
        UpstreamError::BadResponse,
    ];

    pub fn label(self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::Reset => "reset",
            UpstreamError::Timeout => "timeout",
            UpstreamError::BadResponse => "bad_response",
        }
    }
}

#[derive(Debug, Default)]
pub struct AppCounters {
    pub requests: AtomicU64,
    /// Responses by class: 1xx (unused), 2xx, 3xx, 4xx, 5xx.
    responses: [AtomicU64; 5],
    upstream_errors: [AtomicU64; 4],
    pub retries: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
}

impl AppCounters {
    pub fn response(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn upstream_error(&self, kind: UpstreamError) {
        let i = UpstreamError::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        self.upstream_errors[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn responses(&self, class: u16) -> u64 {
        let i = usize::from(class).clamp(1, 5) - 1;
        self.responses[i].load(Ordering::Relaxed)
    }

    pub fn upstream_errors(&self, kind: UpstreamError) -> u64 {
        let i = UpstreamError::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        self.upstream_errors[i].load(Ordering::Relaxed)
    }
}

/// Edge-wide counters.
#[derive(Debug, Default)]
pub struct EdgeCounters {
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub connections_open: AtomicU64,
    /// Requests refused before routing (malformed, too large, timeouts), by status.
    pub rejected_400: AtomicU64,
    pub rejected_408: AtomicU64,
    pub rejected_431: AtomicU64,
    pub rejected_other: AtomicU64,
    pub unknown_app: AtomicU64,
    pub upstream_connects: AtomicU64,
    pub upstream_reused: AtomicU64,
    pub ejections: AtomicU64,
    pub body_bytes_spliced: AtomicU64,
    pub body_bytes_copied: AtomicU64,
    pub splice_fallbacks: AtomicU64,
}

/// Every counter of the edge; apps are added as routes appear and never removed (their
/// counters must not go backwards for Prometheus).
#[derive(Debug, Default)]
pub struct Metrics {
    apps: Mutex<BTreeMap<String, Arc<AppCounters>>>,
    pub edge: EdgeCounters,
}

impl Metrics {
    pub fn app(&self, name: &str) -> Arc<AppCounters> {
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.entry(name.to_string()).or_default().clone()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let apps = self.apps.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            &mut out,
            "mesh_edge_requests_total",
            "counter",
            "Requests routed to an app.",
        );
        for (app, c) in &apps {
            let _ = writeln!(
                out,
                "mesh_edge_requests_total{{app=\"{app}\"}} {}",
                l(&c.requests)
            );
        }
        family(
            &mut out,
            "mesh_edge_responses_total",
            "counter",
            "Responses sent, by status class.",
        );
        for (app, c) in &apps {
            for class in 1..=5u16 {
                let _ = writeln!(
                    out,
                    "mesh_edge_responses_total{{app=\"{app}\",class=\"{class}xx\"}} {}",
                    c.responses(class)
                );
            }
        }
        family(
            &mut out,
            "mesh_edge_upstream_errors_total",
            "counter",
            "Failed upstream exchanges, by kind.",
        );
        for (app, c) in &apps {
            for kind in UpstreamError::ALL {
                let _ = writeln!(
                    out,
                    "mesh_edge_upstream_errors_total{{app=\"{app}\",kind=\"{}\"}} {}",
                    kind.label(),
                    c.upstream_errors(kind)
                );
            }
        }
        family(
            &mut out,
            "mesh_edge_retries_total",
            "counter",
            "Requests sent to a second endpoint after the first failed.",
        );
        for (app, c) in &apps {
            let _ = writeln!(
                out,
                "mesh_edge_retries_total{{app=\"{app}\"}} {}",
                l(&c.retries)
            );
        }
        family(
            &mut out,
            "mesh_edge_bytes_total",
            "counter",
            "Bytes of requests received (in) and responses sent (out).",
        );
        for (app, c) in &apps {
            let _ = writeln!(
                out,
                "mesh_edge_bytes_total{{app=\"{app}\",direction=\"in\"}} {}",
                l(&c.bytes_in)
            );
            let _ = writeln!(
                out,
                "mesh_edge_bytes_total{{app=\"{app}\",direction=\"out\"}} {}",
                l(&c.bytes_out)
            );
        }
        family(
            &mut out,
            "mesh_edge_request_duration_seconds",
            "histogram",
            "From a complete request head to the last response byte queued.",
        );
        for (app, c) in &apps {
            let mut cumulative = 0;
            for (i, bound) in LATENCY_BUCKETS_US.iter().enumerate() {
                cumulative += l(&c.latency[i]);
                let _ = writeln!(
                    out,
                    "mesh_edge_request_duration_seconds_bucket{{app=\"{app}\",le=\"{}\"}} {cumulative}",
                    *bound as f64 / 1e6
                );
            }
            cumulative += l(&c.latency[LATENCY_BUCKETS_US.len()]);
            let _ = writeln!(
                out,
                "mesh_edge_request_duration_seconds_bucket{{app=\"{app}\",le=\"+Inf\"}} {cumulative}"
            );
            let _ = writeln!(
                out,
                "mesh_edge_request_duration_seconds_sum{{app=\"{app}\"}} {}",
                l(&c.latency_sum_us) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "mesh_edge_request_duration_seconds_count{{app=\"{app}\"}} {cumulative}"
            );
        }
        let e = &self.edge;
        let scalars: [(&str, &str, &str, &AtomicU64); 12] = [
            (
                "mesh_edge_connections_accepted_total",
                "counter",
                "Client connections accepted.",
                &e.connections_accepted,
            ),
            (
                "mesh_edge_connections_refused_total",
                "counter",
                "Client connections closed at once: over the connection limit.",
                &e.connections_refused,
            ),
            (
                "mesh_edge_connections_open",
                "gauge",
                "Client connections open now.",
                &e.connections_open,
            ),
            (
                "mesh_edge_unknown_app_total",
                "counter",
                "Requests for no known app (404).",
                &e.unknown_app,
            ),
            (
                "mesh_edge_upstream_connects_total",
                "counter",
                "Upstream connections opened.",
                &e.upstream_connects,
            ),
            (
                "mesh_edge_upstream_reused_total",
                "counter",
                "Requests sent on a pooled upstream connection.",
                &e.upstream_reused,
            ),
            (
                "mesh_edge_ejections_total",
                "counter",
                "Endpoints taken out of rotation after repeated failures.",
                &e.ejections,
            ),
            (
                "mesh_edge_body_bytes_spliced_total",
                "counter",
                "Response body bytes moved with splice(2).",
                &e.body_bytes_spliced,
            ),
            (
                "mesh_edge_body_bytes_copied_total",
                "counter",
                "Body bytes moved through user space.",
                &e.body_bytes_copied,
            ),
            (
                "mesh_edge_splice_fallbacks_total",
                "counter",
                "Large bodies copied because no pipe was free.",
                &e.splice_fallbacks,
            ),
            (
                "mesh_edge_rejected_408_total",
                "counter",
                "Requests whose head did not arrive in time.",
                &e.rejected_408,
            ),
            (
                "mesh_edge_rejected_431_total",
                "counter",
                "Requests with too large or too many header fields.",
                &e.rejected_431,
            ),
        ];
        for (name, kind, help, v) in scalars {
            family(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {}", l(v));
        }
        family(
            &mut out,
            "mesh_edge_rejected_total",
            "counter",
            "Requests refused before routing, by status.",
        );
        for (status, v) in [
            ("400", &e.rejected_400),
            ("408", &e.rejected_408),
            ("431", &e.rejected_431),
            ("other", &e.rejected_other),
        ] {
            let _ = writeln!(
                out,
                "mesh_edge_rejected_total{{status=\"{status}\"}} {}",
                l(v)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_classes_are_counted() {
        let m = Metrics::default();
        let a = m.app("hello");
        a.requests.fetch_add(3, Ordering::Relaxed);
        a.response(200, Duration::from_micros(300));
        a.response(503, Duration::from_millis(30));
        a.response(204, Duration::from_secs(60));
        a.upstream_error(UpstreamError::Timeout);
        let text = m.render();
        assert!(text.contains("mesh_edge_requests_total{app=\"hello\"} 3"));
        assert!(text.contains("mesh_edge_responses_total{app=\"hello\",class=\"2xx\"} 2"));
        assert!(text.contains("mesh_edge_responses_total{app=\"hello\",class=\"5xx\"} 1"));
        assert!(
            text.contains(
                "mesh_edge_request_duration_seconds_bucket{app=\"hello\",le=\"0.0005\"} 1"
            )
        );
        assert!(
            text.contains("mesh_edge_request_duration_seconds_bucket{app=\"hello\",le=\"0.05\"} 2")
        );
        assert!(
            text.contains("mesh_edge_request_duration_seconds_bucket{app=\"hello\",le=\"+Inf\"} 3")
        );
        assert!(text.contains("mesh_edge_upstream_errors_total{app=\"hello\",kind=\"timeout\"} 1"));
    }
}
