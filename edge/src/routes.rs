//! Where a request goes: the route table (app -> Ready endpoints), its atomic replacement
//! when the fabric publishes endpoint changes, round robin, and outlier ejection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::metrics::{AppCounters, Metrics};

/// One Ready instance that traffic may go to. Shared by every table that lists it, so its
/// failure count and ejection survive table swaps.
#[derive(Debug)]
pub struct Endpoint {
    pub app: String,
    pub instance: String,
    pub addr: SocketAddr,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `Routes::epoch` until which the endpoint gets no new requests.
    ejected_until_ms: AtomicU64,
    /// Gone from the fabric: no new requests, and its idle upstream connections close.
    removed: AtomicBool,
}

impl Endpoint {
    pub fn new(app: &str, instance: &str, addr: SocketAddr) -> Self {
        Endpoint {
            app: app.to_string(),
            instance: instance.to_string(),
            addr,
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            removed: AtomicBool::new(false),
        }
    }

    pub fn removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }
}

/// When an endpoint that keeps failing is taken out of rotation, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct OutlierPolicy {
    pub consecutive_failures: u32,
    pub ejection: Duration,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            consecutive_failures: 3,
            ejection: Duration::from_secs(10),
        }
    }
}

/// The routes of one app.
#[derive(Debug)]
pub struct AppRoute {
    pub name: String,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub keep_prefix: bool,
    pub counters: Arc<AppCounters>,
    next: AtomicUsize,
}

/// An immutable snapshot; a request reads exactly one.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub apps: HashMap<String, Arc<AppRoute>>,
    /// Fabric revision this table reflects.
    pub rev: u64,
}

/// Route decision for a request.
pub enum Route<'a> {
    /// The app and the request target to send upstream.
    App(&'a Arc<AppRoute>, String),
    /// The request names an app the table does not know (or names none).
    Unknown(Option<String>),
}

/// Which app a request is for: `Host: <app>.<domain>` first, then `/app/<app>/...`.
pub fn resolve<'a>(
    table: &'a RouteTable,
    domain: &str,
    host: Option<&str>,
    target: &str,
) -> Route<'a> {
    if let Some(name) = host.and_then(|h| h.strip_suffix(domain)?.strip_suffix('.'))
        && !name.is_empty()
        && !name.contains('.')
    {
        return match table.apps.get(name) {
            Some(app) => Route::App(app, target.to_string()),
            None => Route::Unknown(Some(name.to_string())),
        };
    }
    let Some(rest) = target.strip_prefix("/app/") else {
        return Route::Unknown(None);
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let name = &rest[..end];
    match table.apps.get(name) {
        Some(app) if app.keep_prefix => Route::App(app, target.to_string()),
        Some(app) => {
            let tail = &rest[end..];
            let upstream = if tail.starts_with('/') {
                tail.to_string()
            } else {
                format!("/{tail}")
            };
            Route::App(app, upstream)
        }
        None => Route::Unknown(Some(name.to_string())),
    }
}

/// Shared, atomically replaced route table plus outlier state and its clock.
pub struct Routes {
    table: ArcSwap<RouteTable>,
    epoch: Instant,
    pub policy: OutlierPolicy,
}

impl Routes {
    pub fn new(policy: OutlierPolicy) -> Self {
        Routes {
            table: ArcSwap::from_pointee(RouteTable::default()),
            epoch: Instant::now(),
            policy,
        }
    }

    pub fn load(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    pub fn store(&self, table: RouteTable) {
        self.table.store(Arc::new(table));
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Round robin over the app's endpoints that are not ejected, skipping `avoid` (the one
    /// that just failed) when there is another. If every endpoint is ejected, they all take
    /// traffic again: ejecting the whole app would turn a flaky service into a dead one.
    pub fn pick(&self, app: &AppRoute, avoid: Option<SocketAddr>) -> Option<Arc<Endpoint>> {
        let n = app.endpoints.len();
        if n == 0 {
            return None;
        }
        let now = self.now_ms();
        let start = app.next.fetch_add(1, Ordering::Relaxed);
        let usable = |e: &Endpoint, allow_ejected: bool| {
            Some(e.addr) != avoid
                && (allow_ejected || e.ejected_until_ms.load(Ordering::Relaxed) <= now)
        };
        for allow_ejected in [false, true] {
            for i in 0..n {
                let e = &app.endpoints[(start + i) % n];
                if usable(e, allow_ejected) {
                    return Some(e.clone());
                }
            }
        }
        Some(app.endpoints[start % n].clone())
    }

    /// A connection to `e` failed, reset or timed out; returns true if that ejected it.
    pub fn failure(&self, e: &Endpoint) -> bool {
        let n = e.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.policy.consecutive_failures {
            let until =
                self.now_ms() + u64::try_from(self.policy.ejection.as_millis()).unwrap_or(0);
            e.ejected_until_ms.store(until, Ordering::Relaxed);
            e.consecutive_failures.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    pub fn success(&self, e: &Endpoint) {
        if e.consecutive_failures.load(Ordering::Relaxed) != 0 {
            e.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }
}

/// Builds tables from the fabric's endpoint stream (owned by the control thread).
pub struct RouteBuilder {
    /// (app, instance) -> address, as the fabric last said.
    endpoints: BTreeMap<(String, String), SocketAddr>,
    /// Apps with a plan: known even without endpoints (503 rather than 404).
    planned: HashSet<String>,
    keep_prefix: HashSet<String>,
    metrics: Arc<Metrics>,
}

impl RouteBuilder {
    pub fn new(keep_prefix: HashSet<String>, metrics: Arc<Metrics>) -> Self {
        RouteBuilder {
            endpoints: BTreeMap::new(),
            planned: HashSet::new(),
            keep_prefix,
            metrics,
        }
    }

    pub fn clear_endpoints(&mut self) {
        self.endpoints.clear();
    }

    pub fn clear_plans(&mut self) {
        self.planned.clear();
    }

    pub fn plan(&mut self, app: &str, exists: bool) {
        if exists {
            self.planned.insert(app.to_string());
        } else {
            self.planned.remove(app);
        }
    }

    pub fn put(&mut self, app: &str, instance: &str, addr: SocketAddr) {
        self.endpoints
            .insert((app.to_string(), instance.to_string()), addr);
    }

    pub fn remove(&mut self, app: &str, instance: &str) {
        self.endpoints
            .remove(&(app.to_string(), instance.to_string()));
    }

    /// A new table; endpoints unchanged since `old` keep their state (and identity), those
    /// that disappeared are marked removed so that workers drain them.
    pub fn build(&self, old: &RouteTable, rev: u64) -> RouteTable {
        let mut previous: HashMap<(&str, &str, SocketAddr), &Arc<Endpoint>> = HashMap::new();
        for app in old.apps.values() {
            for e in &app.endpoints {
                previous.insert((e.app.as_str(), e.instance.as_str(), e.addr), e);
            }
        }
        let mut grouped: BTreeMap<&str, Vec<Arc<Endpoint>>> = self
            .planned
            .iter()
            .map(|a| (a.as_str(), Vec::new()))
            .collect();
        let mut kept: HashSet<*const Endpoint> = HashSet::new();
        for ((app, instance), addr) in &self.endpoints {
            let e = match previous.get(&(app.as_str(), instance.as_str(), *addr)) {
                Some(e) => {
                    kept.insert(Arc::as_ptr(e));
                    Arc::clone(e)
                }
                None => Arc::new(Endpoint::new(app, instance, *addr)),
            };
            grouped.entry(app.as_str()).or_default().push(e);
        }
        for e in previous.values() {
            if !kept.contains(&Arc::as_ptr(e)) {
                e.removed.store(true, Ordering::Relaxed);
            }
        }
        let apps = grouped
            .into_iter()
            .map(|(name, endpoints)| {
                let next = old
                    .apps
                    .get(name)
                    .map(|a| a.next.load(Ordering::Relaxed))
                    .unwrap_or(0);
                let route = AppRoute {
                    name: name.to_string(),
                    endpoints,
                    keep_prefix: self.keep_prefix.contains(name),
                    counters: self.metrics.app(name),
                    next: AtomicUsize::new(next),
                };
                (name.to_string(), Arc::new(route))
            })
            .collect();
        RouteTable { apps, rev }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(keep: &[&str], eps: &[(&str, &str, &str)]) -> (RouteBuilder, RouteTable) {
        let mut b = RouteBuilder::new(
            keep.iter().map(|s| s.to_string()).collect(),
            Arc::new(Metrics::default()),
        );
        for (a, i, addr) in eps {
            b.put(a, i, addr.parse().unwrap());
        }
        let t = b.build(&RouteTable::default(), 1);
        (b, t)
    }

    fn target(r: Route<'_>) -> Option<(String, String)> {
        match r {
            Route::App(a, t) => Some((a.name.clone(), t)),
            Route::Unknown(_) => None,
        }
    }

    #[test]
    fn paths_and_hosts_resolve_with_prefix_rules() {
        let (_, t) = table(
            &["kept"],
            &[
                ("hello", "h1", "127.0.0.1:1"),
                ("kept", "k1", "127.0.0.1:2"),
            ],
        );
        let r = |host: Option<&str>, path: &str| target(resolve(&t, "mesh.test", host, path));
        assert_eq!(
            r(None, "/app/hello/x/y?z"),
            Some(("hello".into(), "/x/y?z".into()))
        );
        assert_eq!(r(None, "/app/hello"), Some(("hello".into(), "/".into())));
        assert_eq!(
            r(None, "/app/hello?q=1"),
            Some(("hello".into(), "/?q=1".into()))
        );
        assert_eq!(
            r(None, "/app/kept/x"),
            Some(("kept".into(), "/app/kept/x".into()))
        );
        assert_eq!(
            r(Some("hello.mesh.test"), "/app/kept/x"),
            Some(("hello".into(), "/app/kept/x".into()))
        );
        assert_eq!(
            r(Some("other.host"), "/app/hello/"),
            Some(("hello".into(), "/".into()))
        );
        assert_eq!(r(None, "/app/nope/"), None);
        assert_eq!(r(None, "/"), None);
        assert_eq!(r(Some("a.b.mesh.test"), "/x"), None);
    }

    #[test]
    fn round_robin_skips_ejected_and_avoided_endpoints() {
        let (_, t) = table(&[], &[("a", "1", "127.0.0.1:1"), ("a", "2", "127.0.0.1:2")]);
        let routes = Routes::new(OutlierPolicy {
            consecutive_failures: 2,
            ejection: Duration::from_secs(60),
        });
        let app = &t.apps["a"];
        let picks: HashSet<u16> = (0..4)
            .map(|_| routes.pick(app, None).unwrap().addr.port())
            .collect();
        assert_eq!(picks.len(), 2);
        let first = &app.endpoints[0];
        assert_eq!(
            routes.pick(app, Some(first.addr)).unwrap().addr,
            app.endpoints[1].addr
        );
        assert!(!routes.failure(first));
        assert!(routes.failure(first));
        for _ in 0..4 {
            assert_eq!(routes.pick(app, None).unwrap().addr.port(), 2);
        }
        // both ejected: traffic goes to them anyway
        routes.failure(&app.endpoints[1]);
        routes.failure(&app.endpoints[1]);
        assert!(routes.pick(app, None).is_some());
    }

    #[test]
    fn rebuilding_keeps_endpoint_state_and_marks_removed_ones() {
        let (mut b, t1) = table(&[], &[("a", "1", "127.0.0.1:1"), ("a", "2", "127.0.0.1:2")]);
        let e1 = t1.apps["a"].endpoints[0].clone();
        let e2 = t1.apps["a"].endpoints[1].clone();
        b.remove("a", "2");
        b.put("b", "1", "127.0.0.1:3".parse().unwrap());
        let t2 = b.build(&t1, 2);
        assert!(Arc::ptr_eq(&t2.apps["a"].endpoints[0], &e1));
        assert_eq!(t2.apps["a"].endpoints.len(), 1);
        assert!(e2.removed() && !e1.removed());
        assert!(t2.apps.contains_key("b"));
        // an app whose last endpoint went is unknown again, unless it has a plan
        b.remove("b", "1");
        assert!(!b.build(&t2, 3).apps.contains_key("b"));
        b.plan("b", true);
        assert!(b.build(&t2, 3).apps["b"].endpoints.is_empty());
    }
}
