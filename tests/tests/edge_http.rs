//! The edge against a raw TCP backend over real loopback sockets, routes from a real
//! `mesh fabric`: what bytes reach the backend and the client for each HTTP/1.1 rule,
//! each hardening rule and each failure case.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_tests::edge::{EdgeFixture, RawBackend, RawClient, find, get};
use mesh_tests::wait_until;

/// The backend's /chunked body, as it travels (the edge forwards chunked bodies verbatim).
const CHUNKED_HELLO: &str = "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";

fn fixture() -> (EdgeFixture, RawBackend) {
    fixture_with(|_| {})
}

fn fixture_with(tune: impl FnOnce(&mut mesh_edge::Config)) -> (EdgeFixture, RawBackend) {
    let mut fx = EdgeFixture::start(tune);
    let be = RawBackend::start();
    fx.register("app", "a1", be.addr);
    (fx, be)
}

fn req(c: &mut RawClient, raw: &str) -> mesh_tests::edge::Response {
    c.send(raw.as_bytes());
    c.response(raw.starts_with("HEAD "))
        .unwrap_or_else(|| panic!("no response to {raw:?}"))
}

/// A port nothing listens on.
fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Packs examples/hello as app `name` with the real `mesh` and pushes it; returns the digest.
fn push_spore(fx: &EdgeFixture, name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mesh = |args: &[&str]| {
        let out = std::process::Command::new(mesh_tests::bin("mesh"))
            .args(args)
            .env("MESH_FABRIC", fx.fabric.line.to_string())
            .env("MESH_TOKEN", fx.fabric.token())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mesh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let keys = dir.path().join("keys");
    let spore = dir.path().join("x.spore");
    mesh(&["key", "gen", "--out", keys.to_str().unwrap()]);
    mesh(&[
        "spore",
        "pack",
        mesh_tests::bin("hello").to_str().unwrap(),
        "--name",
        name,
        "--version",
        "1.0.0",
        "--key",
        keys.join("mesh.key").to_str().unwrap(),
        "-o",
        spore.to_str().unwrap(),
    ]);
    mesh(&["spore", "push", spore.to_str().unwrap()])
}

// ---- routing -------------------------------------------------------------------------------

#[test]
fn routes_by_path_prefix_and_by_host_with_404_and_503() {
    let (mut fx, be) = fixture_with(|c| {
        c.domain = "mesh.test".into();
        c.keep_prefix.insert("kept".into());
    });
    fx.register("kept", "k1", be.addr);
    let mut c = RawClient::connect(fx.addr());
    let r = req(&mut c, "GET /app/app/x?y=1 HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    let r = req(&mut c, "GET /app/kept/x HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    let r = req(
        &mut c,
        "GET /by-host HTTP/1.1\r\nHost: app.mesh.test:8080\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let got: Vec<String> = be
        .received()
        .iter()
        .map(|r| r.text().lines().next().unwrap().to_string())
        .collect();
    assert_eq!(
        got,
        [
            "GET /x?y=1 HTTP/1.1",
            "GET /app/kept/x HTTP/1.1",
            "GET /by-host HTTP/1.1"
        ]
    );
    let r = req(&mut c, "GET /app/nope/ HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 404);
    assert!(r.body_text().contains("nope"));
    let r = req(&mut c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 404);
    // an app with a plan but no Ready endpoint: 503 (and the connection stays usable)
    let digest = push_spore(&fx, "empty");
    let plan = fx.line.call(&format!(
        "PLAN.SET empty digest={digest} min=0 max=1 port=9"
    ));
    assert!(plan.starts_with("+OK"), "{plan}");
    let rev: u64 = plan
        .split("rev=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    fx.wait_rev(rev);
    let r = req(&mut c, "GET /app/empty/ HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 503);
    let r = req(&mut c, "GET /app/app/after HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(be.received().len(), 4);
}

#[test]
fn round_robin_over_ready_endpoints() {
    let (mut fx, be1) = fixture();
    let be2 = RawBackend::start();
    fx.register("app", "a2", be2.addr);
    for _ in 0..10 {
        assert_eq!(get(fx.addr(), "/app/app/").unwrap().status, 200);
    }
    assert_eq!(be1.received().len(), 5);
    assert_eq!(be2.received().len(), 5);
}

// ---- HTTP/1.1 ------------------------------------------------------------------------------

#[test]
fn keep_alive_reuses_both_connections() {
    let (fx, be) = fixture_with(|c| c.threads = 1);
    let mut c = RawClient::connect(fx.addr());
    for i in 0..5 {
        let r = req(
            &mut c,
            &format!("GET /app/app/{i} HTTP/1.1\r\nHost: t\r\n\r\n"),
        );
        assert_eq!((r.status, r.body_text().as_str()), (200, "ok"));
        assert_eq!(r.header("connection"), None);
    }
    let rs = be.received();
    assert_eq!(rs.len(), 5);
    assert!(
        rs.iter().all(|r| r.conn == rs[0].conn),
        "one upstream connection"
    );
    assert_eq!(be.connection_count(), 1);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (fx, be) = fixture();
    let mut c = RawClient::connect(fx.addr());
    c.send(b"GET /app/app/len/3 HTTP/1.1\r\nHost: t\r\n\r\nGET /app/app/chunked HTTP/1.1\r\nHost: t\r\n\r\nHEAD /app/app/len/9 HTTP/1.1\r\nHost: t\r\n\r\nGET /app/app/len/1 HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.response(false).unwrap().body_text(), "abc");
    assert_eq!(c.response(false).unwrap().body_text(), CHUNKED_HELLO);
    let h = c.response(true).unwrap();
    assert_eq!(h.header("content-length").as_deref(), Some("9"));
    assert_eq!(c.response(false).unwrap().body_text(), "a");
    let paths: Vec<String> = be
        .received()
        .iter()
        .map(|r| r.text().lines().next().unwrap().to_string())
        .collect();
    assert_eq!(
        paths,
        [
            "GET /len/3 HTTP/1.1",
            "GET /chunked HTTP/1.1",
            "HEAD /len/9 HTTP/1.1",
            "GET /len/1 HTTP/1.1"
        ]
    );
}

#[test]
fn content_length_and_chunked_bodies_both_ways() {
    let (fx, be) = fixture();
    let mut c = RawClient::connect(fx.addr());
    let r = req(
        &mut c,
        "POST /app/app/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world",
    );
    assert_eq!(r.body_text(), "hello world");
    let chunked = "4\r\nwiki\r\n5;x=y\r\npedia\r\n0\r\nT: 1\r\n\r\n";
    let r = req(
        &mut c,
        &format!(
            "POST /app/app/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}"
        ),
    );
    assert_eq!(r.status, 200);
    // the chunked body reached the backend verbatim, framed as chunked
    assert_eq!(r.body_text(), chunked);
    let rs = be.received();
    assert!(rs[1].text().contains("Transfer-Encoding: chunked\r\n"));
    assert!(rs[1].text().ends_with(chunked));
    assert!(!rs[1].text().to_ascii_lowercase().contains("content-length"));
    let r = req(&mut c, "GET /app/app/chunked HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.header("transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(r.body_text(), CHUNKED_HELLO);
    // a body large enough to be spliced arrives intact
    let big = 3 * 1024 * 1024 + 7;
    let r = req(
        &mut c,
        &format!("GET /app/app/len/{big} HTTP/1.1\r\nHost: t\r\n\r\n"),
    );
    assert_eq!(r.body.len(), big);
    assert!(
        r.body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == b'a' + (i % 26) as u8)
    );
    assert!(fx.metric("mesh_edge_body_bytes_spliced_total") > 3_000_000);
    // and the connection still works after it
    let r = req(&mut c, "GET /app/app/len/2 HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.body_text(), "ab");
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let (fx, be) = fixture();
    let mut c = RawClient::connect(fx.addr());
    c.send(b"POST /app/app/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n");
    let interim = c.response(false).unwrap();
    assert_eq!(interim.status, 100);
    c.send(b"data");
    let r = c.response(false).unwrap();
    assert_eq!((r.status, r.body_text().as_str()), (200, "data"));
    // the backend got no Expect (the edge answered it)
    assert!(
        !be.received()[0]
            .text()
            .to_ascii_lowercase()
            .contains("expect")
    );
    // an interim 100 from the app itself is passed through
    let r = req(&mut c, "GET /app/app/continue HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 100);
    assert_eq!(c.response(false).unwrap().body_text(), "ok");
}

#[test]
fn head_204_and_304_carry_no_body_and_the_connection_stays_in_step() {
    let (fx, _be) = fixture();
    let mut c = RawClient::connect(fx.addr());
    for (raw, status) in [
        ("HEAD /app/app/len/100 HTTP/1.1\r\nHost: t\r\n\r\n", 200),
        ("GET /app/app/204 HTTP/1.1\r\nHost: t\r\n\r\n", 204),
        ("GET /app/app/304 HTTP/1.1\r\nHost: t\r\n\r\n", 304),
    ] {
        let r = req(&mut c, raw);
        assert_eq!(r.status, status);
        // the next response on the connection is read right after the head: any stray
        // body byte would corrupt it
        let next = req(&mut c, "GET /app/app/len/4 HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!((next.status, next.body_text().as_str()), (200, "abcd"));
    }
}

#[test]
fn connection_close_and_bodies_delimited_by_close() {
    let (fx, _be) = fixture();
    let mut c = RawClient::connect(fx.addr());
    let r = req(
        &mut c,
        "GET /app/app/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(c.closed());
    let mut c = RawClient::connect(fx.addr());
    let r = req(&mut c, "GET /app/app/close HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.body_text(), "until close");
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    // HTTP/1.0: closed unless it asks for keep-alive
    let mut c = RawClient::connect(fx.addr());
    let r = req(&mut c, "GET /app/app/ HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(c.closed());
    let mut c = RawClient::connect(fx.addr());
    let r = req(
        &mut c,
        "GET /app/app/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    );
    assert_eq!(r.header("connection").as_deref(), Some("keep-alive"));
    assert_eq!(
        req(
            &mut c,
            "GET /app/app/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        )
        .status,
        200
    );
}

#[test]
fn forwarding_headers_are_added_and_hop_by_hop_ones_removed() {
    let (fx, be) = fixture();
    let mut c = RawClient::connect(fx.addr());
    let r = req(
        &mut c,
        "GET /app/app/ HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.9\r\nVia: 1.0 corp\r\nConnection: X-Private\r\nX-Private: secret\r\nKeep-Alive: 5\r\n\r\n",
    );
    assert_eq!(r.header("via").as_deref(), Some("1.1 mesh-edge"));
    let got = be.received()[0].text();
    assert!(
        got.contains("X-Forwarded-For: 203.0.113.9, 127.0.0.1\r\n"),
        "{got}"
    );
    assert!(got.contains("X-Forwarded-Proto: http\r\n"), "{got}");
    assert!(got.contains("Via: 1.0 corp, 1.1 mesh-edge\r\n"), "{got}");
    for gone in ["X-Private", "Keep-Alive", "Connection"] {
        assert!(!got.contains(gone), "{gone} forwarded: {got}");
    }
}

// ---- hardening -----------------------------------------------------------------------------

/// Sends `raw`, expects `status` and a closed connection, and nothing at the backend.
fn refused(fx: &EdgeFixture, be: &RawBackend, raw: &str, status: u16) {
    let mut c = RawClient::connect(fx.addr());
    c.send(raw.as_bytes());
    let r = c
        .response(false)
        .unwrap_or_else(|| panic!("no answer to {raw:?}"));
    assert_eq!(r.status, status, "{raw:?}");
    assert_eq!(r.header("connection").as_deref(), Some("close"), "{raw:?}");
    assert!(c.closed(), "connection left open after {raw:?}");
    assert!(
        be.received().is_empty(),
        "backend got bytes for {raw:?}: {:?}",
        be.received()
    );
}

#[test]
fn smuggling_shapes_never_reach_the_backend() {
    let (fx, be) = fixture();
    let smuggled = "GET /app/app/admin HTTP/1.1\r\nHost: t\r\n\r\n";
    for raw in [
        format!(
            "POST /app/app/ HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        format!(
            "POST /app/app/ HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        format!(
            "POST /app/app/ HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd{smuggled}"
        ),
        format!(
            "POST /app/app/ HTTP/1.1\r\nHost: t\r\nContent-Length: 4, 40\r\n\r\nabcd{smuggled}"
        ),
        format!("POST /app/app/ HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n{smuggled}"),
        format!(
            "POST /app/app/ HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        format!(
            "POST /app/app/ HTTP/1.1\r\nHost: t\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\n{smuggled}"
        ),
        format!("GET /app/app/ HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n{smuggled}"),
    ] {
        let mut c = RawClient::connect(fx.addr());
        c.send(raw.as_bytes());
        let r = c.response(false).unwrap();
        assert!(matches!(r.status, 400 | 501), "{} for {raw:?}", r.status);
        assert!(c.closed());
    }
    assert!(be.received().is_empty(), "{:?}", be.received());
}

#[test]
fn an_invalid_chunk_size_stops_the_body_before_anything_after_it() {
    let (fx, be) = fixture();
    let mut c = RawClient::connect(fx.addr());
    c.send(b"POST /app/app/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\nGET /app/app/smuggled HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.response(false).unwrap();
    assert_eq!(r.status, 400);
    assert!(c.closed());
    std::thread::sleep(Duration::from_millis(200));
    for r in be.received() {
        assert!(
            !r.text().contains("smuggled"),
            "smuggled request reached the backend: {r:?}"
        );
    }
}

#[test]
fn oversized_heads_and_too_many_headers_get_431() {
    let (fx, be) = fixture_with(|c| c.max_head_bytes = 4096);
    refused(
        &fx,
        &be,
        &format!(
            "GET /app/app/ HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
            "a".repeat(5000)
        ),
        431,
    );
    // no end of head at all, just bytes
    refused(&fx, &be, &format!("GET /app/app/{}", "a".repeat(6000)), 431);
    let mut many = String::from("GET /app/app/ HTTP/1.1\r\nHost: t\r\n");
    for i in 0..80 {
        many.push_str(&format!("X-{i}: 1\r\n"));
    }
    many.push_str("\r\n");
    refused(&fx, &be, &many, 431);
    refused(
        &fx,
        &be,
        "GET /app/app/ HTTP/1.1\r\nHost: t\r\nX: a\r\n folded\r\n\r\n",
        400,
    );
    refused(&fx, &be, "GARBAGE\r\n\r\n", 400);
}

#[test]
fn slow_request_heads_get_408() {
    let (fx, be) = fixture_with(|c| c.head_timeout_ms = 300);
    let mut c = RawClient::connect(fx.addr());
    let start = Instant::now();
    c.send(b"GET /app/app/ HTTP/1.1\r\nHost: t\r\n");
    std::thread::sleep(Duration::from_millis(100));
    c.send(b"X-Slow: 1\r\n");
    let r = c.response(false).unwrap();
    assert_eq!(r.status, 408);
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(c.closed());
    assert!(be.received().is_empty());
    assert_eq!(fx.metric("mesh_edge_rejected_408_total"), 1);
}

#[test]
fn idle_connections_are_closed_on_both_sides() {
    let (fx, be) = fixture_with(|c| {
        c.client_idle_ms = 400;
        c.upstream_idle_ms = 300;
    });
    let mut c = RawClient::connect(fx.addr());
    assert_eq!(
        req(&mut c, "GET /app/app/ HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );
    let start = Instant::now();
    assert!(c.closed(), "idle client connection stays open");
    assert!(start.elapsed() >= Duration::from_millis(300));
    // the pooled upstream connection was closed too: the backend saw EOF on it
    assert!(wait_until(Duration::from_secs(5), || be.closed_count() == 1));
}

#[test]
fn connections_over_the_limit_are_closed_at_once() {
    let (fx, _be) = fixture_with(|c| {
        c.threads = 1;
        c.max_connections = 2;
    });
    let mut a = RawClient::connect(fx.addr());
    let mut b = RawClient::connect(fx.addr());
    assert_eq!(
        req(&mut a, "GET /app/app/ HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );
    assert_eq!(
        req(&mut b, "GET /app/app/ HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );
    let mut c = RawClient::connect(fx.addr());
    assert!(c.closed(), "third connection accepted over the limit");
    assert_eq!(fx.metric("mesh_edge_connections_refused_total"), 1);
    drop(a);
    // a slot frees when a connection ends
    assert!(wait_until(Duration::from_secs(5), || {
        let mut d = RawClient::connect(fx.addr());
        d.send(b"GET /app/app/ HTTP/1.1\r\nHost: t\r\n\r\n");
        d.response(false).is_some_and(|r| r.status == 200)
    }));
}

// ---- failures ------------------------------------------------------------------------------

#[test]
fn connect_failure_is_retried_on_another_endpoint_and_then_ejected() {
    let (mut fx, be) = fixture_with(|c| {
        c.threads = 1;
        c.outlier.consecutive_failures = 2;
        c.outlier.ejection = Duration::from_secs(60);
    });
    fx.register("app", "dead", dead_addr());
    for _ in 0..10 {
        let r = get(fx.addr(), "/app/app/").unwrap();
        assert_eq!(r.status, 200);
    }
    assert_eq!(be.received().len(), 10);
    // two connect failures ejected the dead endpoint; after that no retries were needed
    assert_eq!(fx.metric("mesh_edge_retries_total{app=\"app\"}"), 2);
    assert_eq!(fx.metric("mesh_edge_ejections_total"), 1);
    assert_eq!(
        fx.metric("mesh_edge_upstream_errors_total{app=\"app\",kind=\"connect\"}"),
        2
    );
}

#[test]
fn non_idempotent_requests_are_not_retried() {
    let (mut fx, be) = fixture_with(|c| c.threads = 1);
    fx.deregister("app", "a1");
    fx.register("app", "dead", dead_addr());
    fx.register("app", "a1", be.addr);
    // round robin starts on "a1" then "dead": send two POSTs, one of them hits the dead one
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let mut c = RawClient::connect(fx.addr());
        c.send(b"POST /app/app/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx");
        statuses.push(c.response(false).unwrap().status);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 502]);
    assert_eq!(be.received().len(), 1);
}

#[test]
fn a_reset_before_the_response_is_retried_for_get_and_502_for_post() {
    let (mut fx, be) = fixture_with(|c| c.threads = 1);
    let be2 = RawBackend::start();
    fx.register("app", "a2", be2.addr);
    // GET /reset: the first backend closes without answering, the retry goes to the other,
    // which closes too: then 502 (one retry only)
    let r = get(fx.addr(), "/app/app/reset").unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(be.received().len() + be2.received().len(), 2);
    assert_eq!(fx.metric("mesh_edge_retries_total{app=\"app\"}"), 1);
    let mut c = RawClient::connect(fx.addr());
    c.send(b"POST /app/app/reset HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(c.response(false).unwrap().status, 502);
    assert_eq!(be.received().len() + be2.received().len(), 3);
    // a bad response head is a 502 as well
    assert_eq!(get(fx.addr(), "/app/app/bad").unwrap().status, 502);
}

#[test]
fn a_slow_upstream_gets_504() {
    let (fx, _be) = fixture_with(|c| c.upstream_timeout_ms = 300);
    let start = Instant::now();
    let r = get(fx.addr(), "/app/app/sleep/3000").unwrap();
    assert_eq!(r.status, 504);
    assert!(start.elapsed() < Duration::from_millis(2500));
    assert_eq!(
        fx.metric("mesh_edge_upstream_errors_total{app=\"app\",kind=\"timeout\"}"),
        1
    );
}

#[test]
fn a_removed_endpoint_drains_its_request_in_flight() {
    let (mut fx, be) = fixture_with(|c| c.threads = 1);
    let be2 = RawBackend::start();
    let addr = fx.addr();
    let slow = std::thread::spawn(move || get(addr, "/app/app/sleep/600"));
    assert!(wait_until(Duration::from_secs(5), || !be
        .received()
        .is_empty()));
    fx.register("app", "a2", be2.addr);
    fx.deregister("app", "a1");
    // the request already at a1 completes
    let r = slow.join().unwrap().unwrap();
    assert_eq!((r.status, r.body_text().as_str()), (200, "slept"));
    // new requests go to a2 only
    for _ in 0..4 {
        assert_eq!(get(fx.addr(), "/app/app/").unwrap().status, 200);
    }
    assert_eq!(be.received().len(), 1);
    assert_eq!(be2.received().len(), 4);
    // the drained endpoint's pooled connection is closed
    assert!(wait_until(Duration::from_secs(5), || be.closed_count() == 1));
}

#[test]
fn route_changes_under_load_fail_no_request() {
    let (mut fx, be1) = fixture();
    let be2 = RawBackend::start();
    let addr = fx.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut c = RawClient::connect(addr);
                while !stop.load(Ordering::Relaxed) {
                    c.send(b"GET /app/app/ HTTP/1.1\r\nHost: t\r\n\r\n");
                    match c.response(false) {
                        Some(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("failed: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                            c = RawClient::connect(addr);
                            0
                        }
                    };
                }
            })
        })
        .collect();
    let wait_more = |n: u64| {
        let target = ok.load(Ordering::Relaxed) + n;
        assert!(wait_until(Duration::from_secs(10), || ok
            .load(Ordering::Relaxed)
            >= target));
    };
    wait_more(200);
    fx.register("app", "a2", be2.addr);
    wait_more(200);
    fx.deregister("app", "a1");
    wait_more(200);
    fx.register("app", "a1", be1.addr);
    wait_more(200);
    fx.deregister("app", "a2");
    wait_more(200);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(!be2.received().is_empty());
    let total = be1.received().len() + be2.received().len();
    assert_eq!(total as u64, ok.load(Ordering::Relaxed));
    assert!(find(&be1.received()[0].bytes, b"X-Forwarded-For").is_some());
}

// ---- found in review ------------------------------------------------------------------------

#[test]
fn connection_cannot_hide_the_framing_of_a_request() {
    let (fx, be) = fixture_with(|c| c.threads = 1);
    let mut c = RawClient::connect(fx.addr());
    let inner = "GET /app/app/admin HTTP/1.1\r\nHost: t\r\n\r\n";
    let r = req(
        &mut c,
        &format!(
            "POST /app/app/echo HTTP/1.1\r\nHost: t\r\nConnection: Content-Length\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        ),
    );
    assert_eq!((r.status, r.body_text()), (200, inner.to_string()));
    // another client on the (pooled) upstream connection gets its own answer
    let r = get(fx.addr(), "/app/app/len/3").unwrap();
    assert_eq!(r.body_text(), "abc");
    let got = be.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got[0]
            .text()
            .contains(&format!("Content-Length: {}\r\n", inner.len()))
    );
    assert!(got[1].text().starts_with("GET /len/3 "));
}

#[test]
fn a_half_closed_client_still_gets_its_answers() {
    let (fx, _be) = fixture();
    for (path, status) in [("/app/nope/", 404), ("/app/app/", 200)] {
        for _ in 0..20 {
            let mut c = RawClient::connect(fx.addr());
            c.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
            c.s.shutdown(std::net::Shutdown::Write).unwrap();
            let r = c
                .response(false)
                .unwrap_or_else(|| panic!("no answer to {path} after FIN"));
            assert_eq!(r.status, status);
        }
    }
}

#[test]
fn responses_the_edge_makes_to_head_have_no_body() {
    let (fx, _be) = fixture();
    let mut c = RawClient::connect(fx.addr());
    let r = req(&mut c, "HEAD /app/nope/ HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 404);
    let next = req(&mut c, "GET /app/app/len/4 HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((next.status, next.body_text().as_str()), (200, "abcd"));
}
