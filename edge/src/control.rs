//! The edge's control side, on one tokio thread: follows the fabric's endpoint and plan
//! streams into route tables, and serves the admin port (/metrics, /healthz, /routes).

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use mesh_common::client::{SubEvent, Subscription};

use crate::metrics::Metrics;
use crate::routes::{RouteBuilder, Routes};
use crate::{Config, EdgeError, Shutdown};

pub(crate) fn start(
    cfg: Arc<Config>,
    routes: Arc<Routes>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Result<(Option<SocketAddr>, JoinHandle<()>), EdgeError> {
    let admin = match cfg.admin {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| EdgeError::Admin { addr, source })?;
            let bound = l.local_addr().unwrap_or(addr);
            Some((l, bound))
        }
        None => None,
    };
    let admin_addr = admin.as_ref().map(|(_, a)| *a);
    let handle = std::thread::Builder::new()
        .name("edge-control".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("edge control thread: cannot start a runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                if let Some((l, _)) = admin {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            tokio::spawn(serve_admin(l, routes.clone(), metrics.clone()));
                        }
                        Err(e) => tracing::error!("admin port: {e}"),
                    }
                }
                tokio::spawn(follow_fabric(cfg, routes, metrics));
                while !shutdown.requested() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        })
        .map_err(EdgeError::Thread)?;
    Ok((admin_addr, handle))
}

/// Keep the route table equal to the fabric's endpoints (and plans, so that an app with a
/// plan but no Ready instance answers 503, not 404). Tables are published only once both
/// streams have replayed, then after every change.
async fn follow_fabric(cfg: Arc<Config>, routes: Arc<Routes>, metrics: Arc<Metrics>) {
    let keep: HashSet<String> = cfg.keep_prefix.clone();
    let mut builder = RouteBuilder::new(keep, metrics);
    let mut endpoints = Subscription::new(cfg.fabric.clone(), "endpoints", None);
    let mut plans = Subscription::new(cfg.fabric.clone(), "plans", None);
    let (mut ep_synced, mut plans_synced) = (false, false);
    let mut rev = 0u64;
    loop {
        let (ev, is_endpoints) = tokio::select! {
            ev = endpoints.next() => (ev, true),
            ev = plans.next() => (ev, false),
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::error!(
                    "edge cannot follow the fabric's {}: {e}",
                    if is_endpoints { "endpoints" } else { "plans" }
                );
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        match ev {
            SubEvent::Reset if is_endpoints => {
                builder.clear_endpoints();
                ep_synced = false;
            }
            SubEvent::Reset => {
                builder.clear_plans();
                plans_synced = false;
            }
            SubEvent::Sync { rev: r } => {
                rev = rev.max(r);
                if is_endpoints {
                    ep_synced = true;
                } else {
                    plans_synced = true;
                }
            }
            SubEvent::Put(e) | SubEvent::Del(e) if e.kind == "endpoint" => {
                let put = e.get("op") == Some("put");
                rev = rev.max(event_rev(&e));
                let (Some(app), Some(instance)) = (e.get("app"), e.get("instance")) else {
                    continue;
                };
                if put {
                    match e.get("addr").and_then(|a| a.parse().ok()) {
                        Some(addr) => builder.put(app, instance, addr),
                        None => tracing::warn!("endpoint {app}/{instance} without a usable addr="),
                    }
                } else {
                    builder.remove(app, instance);
                }
            }
            SubEvent::Put(e) | SubEvent::Del(e) if e.kind == "plan" => {
                rev = rev.max(event_rev(&e));
                if let Some(app) = e.get("app") {
                    builder.plan(app, e.get("op") == Some("put"));
                }
            }
            SubEvent::Put(_) | SubEvent::Del(_) => continue,
        }
        if ep_synced && plans_synced {
            let old = routes.load();
            let table = builder.build(&old, rev);
            let changed = table.apps.len() != old.apps.len()
                || table
                    .apps
                    .values()
                    .map(|a| a.endpoints.len())
                    .sum::<usize>()
                    != old.apps.values().map(|a| a.endpoints.len()).sum::<usize>();
            if changed {
                tracing::info!(
                    rev,
                    apps = table.apps.len(),
                    endpoints = table
                        .apps
                        .values()
                        .map(|a| a.endpoints.len())
                        .sum::<usize>(),
                    "routes updated"
                );
            }
            routes.store(table);
        }
    }
}

fn event_rev(e: &mesh_common::client::Event) -> u64 {
    e.get("rev").and_then(|r| r.parse().ok()).unwrap_or(0)
}

async fn serve_admin(
    listener: tokio::net::TcpListener,
    routes: Arc<Routes>,
    metrics: Arc<Metrics>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (routes, metrics) = (routes.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (routes, metrics) = (routes.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(admin_response(&req, &routes, &metrics)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

fn admin_response<B>(
    req: &Request<B>,
    routes: &Routes,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/routes" => {
            let t = routes.load();
            let mut s = format!("rev {}\n", t.rev);
            let mut apps: Vec<_> = t.apps.values().collect();
            apps.sort_by(|a, b| a.name.cmp(&b.name));
            for a in apps {
                let _ = write!(
                    s,
                    "{}{}:",
                    a.name,
                    if a.keep_prefix { " (prefix kept)" } else { "" }
                );
                for e in &a.endpoints {
                    let _ = write!(s, " {}={}", e.instance, e.addr);
                }
                s.push('\n');
            }
            (StatusCode::OK, "text/plain", s)
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz or /routes\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
