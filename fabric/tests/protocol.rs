//! The fabric over real sockets: bad input gets a precise error and the connection (and every
//! other client) keeps working; auth and roles; leases; subscriptions that resume; slow
//! consumers; many connections; the blob API.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use mesh_fabric::{Config, Fabric};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

struct TestFabric {
    fabric: Fabric,
    token: String,
    _dir: tempfile::TempDir,
}

async fn start() -> TestFabric {
    start_with(|_| {}).await
}

async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestFabric {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("data"),
    );
    tweak(&mut config);
    let fabric = Fabric::start(config).await.unwrap();
    let token = std::fs::read_to_string(&fabric.admin_token_path)
        .unwrap()
        .trim()
        .to_string();
    TestFabric {
        fabric,
        token,
        _dir: dir,
    }
}

/// A raw line client: what a script with `nc` would see.
struct Raw {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

impl Raw {
    async fn connect(f: &TestFabric) -> Raw {
        let s = TcpStream::connect(f.fabric.listen).await.unwrap();
        let (rd, wr) = s.into_split();
        let mut raw = Raw {
            rd: BufReader::new(rd),
            wr,
        };
        let greeting = raw.line().await;
        assert!(greeting.starts_with("> info proto=1 "), "{greeting}");
        assert!(
            greeting.contains(&format!("blob_url=http://{}", f.fabric.http)),
            "{greeting}"
        );
        raw
    }

    async fn authed(f: &TestFabric) -> Raw {
        let mut r = Raw::connect(f).await;
        let ok = r.cmd(&format!("AUTH {}", f.token)).await;
        assert_eq!(ok, "+OK role=admin name=admin_(first_start)");
        r
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.unwrap();
    }

    async fn line(&mut self) -> String {
        let mut s = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.rd.read_line(&mut s))
            .await
            .expect("no line within 10 s")
            .unwrap();
        assert!(n > 0, "connection closed");
        s.trim_end_matches('\n').to_string()
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\n").as_bytes()).await;
        self.line().await
    }

    /// Reads `* ` items up to the final line; returns (items, final).
    async fn list(&mut self, line: &str) -> (Vec<String>, String) {
        self.send(format!("{line}\n").as_bytes()).await;
        let mut items = Vec::new();
        loop {
            let l = self.line().await;
            match l.strip_prefix("* ") {
                Some(i) => items.push(i.to_string()),
                None => return (items, l),
            }
        }
    }

    /// Whether the server closed the connection (EOF) within 10 s, skipping other lines.
    async fn closed(&mut self) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let mut s = String::new();
            match tokio::time::timeout(Duration::from_secs(10), self.rd.read_line(&mut s)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return seen,
                Ok(Ok(_)) => seen.push(s.trim_end().to_string()),
                Err(_) => panic!("connection still open after 10 s; saw {} lines", seen.len()),
            }
        }
    }
}

fn err_code(line: &str) -> &str {
    line.strip_prefix("-ERR ")
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("not an error: {line}"))
}

#[tokio::test]
async fn bad_input_gets_precise_errors_and_the_connection_survives() {
    let f = start().await;
    let mut c = Raw::authed(&f).await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"FROBNICATE x\n".to_vec(), "UNKNOWN_VERB"),
        (b"PLAN.GET\n".to_vec(), "BAD_ARGS"),
        (b"PLAN.GET a b\n".to_vec(), "BAD_ARGS"),
        (b"PLAN.SET hello digest=sha256:xyz\n".to_vec(), "BAD_ARGS"),
        (b"PLAN.SET hello digest=md5:00\n".to_vec(), "BAD_ARGS"),
        (b"PLAN.SET hello min=-1\n".to_vec(), "BAD_ARGS"),
        (b"PLAN.SET hello min=99999999999999999999\n".to_vec(), "BAD_ARGS"),
        (b"LEASE.GRANT ttl_ms=1\n".to_vec(), "BAD_ARGS"),
        (b"PLAN.SET Hello_App\n".to_vec(), "BAD_ARGS"),
        (b"PLAN.SET hello colour=red\n".to_vec(), "BAD_ARGS"),
        (b"PLAN.GET nope\n".to_vec(), "NOT_FOUND"),
        (b"PLAN.SET hello digest=sha256:0000000000000000000000000000000000000000000000000000000000000000\n".to_vec(), "NO_BLOB"),
        (b"\x00\xff\xfe garbage \x1b[31m\n".to_vec(), "BAD_ENCODING"),
        ([vec![b'A'; 20_000], b"\n".to_vec()].concat(), "LINE_TOO_LONG"),
        (b"ENDPOINT.REG hello instance=i node=n addr=nowhere lease=1\n".to_vec(), "BAD_ARGS"),
        (b"ENDPOINT.REG hello instance=i node=n addr=127.0.0.1:1 lease=77\n".to_vec(), "NOT_FOUND"),
        (b"SUB gossip\n".to_vec(), "BAD_ARGS"),
        (b"BUDGET.SET hello max_instances=2\n".to_vec(), "BAD_ARGS"),
    ];
    for (input, code) in cases {
        c.send(&input).await;
        let reply = c.line().await;
        assert_eq!(
            err_code(&reply),
            code,
            "input {:?} -> {reply}",
            String::from_utf8_lossy(&input[..input.len().min(60)])
        );
        assert_eq!(
            c.cmd("PING still-here").await,
            "+PONG still-here",
            "after {reply}"
        );
    }
    // Empty lines are ignored; CRLF works.
    c.send(b"\n\r\nPING crlf\r\n").await;
    assert_eq!(c.line().await, "+PONG crlf");
    let (_, status) = c.list("STATUS").await;
    assert!(status.starts_with("+OK rev=0 "), "{status}");
    // Made-up verbs share one metrics label: a client cannot grow the label set.
    let metrics = http_get(&f, "/metrics", None).await;
    assert!(
        metrics.contains("mesh_fabric_commands_total{verb=\"?\",result=\"UNKNOWN_VERB\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("FROBNICATE"));
    assert!(
        metrics.contains("mesh_fabric_commands_total{verb=\"PLAN.GET\",result=\"BAD_ARGS\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn authentication_and_roles() {
    let f = start().await;
    let mut anon = Raw::connect(&f).await;
    assert_eq!(anon.cmd("PING").await, "+PONG");
    assert_eq!(err_code(&anon.cmd("PLAN.LIST").await), "NOAUTH");
    assert_eq!(err_code(&anon.cmd("AUTH mesh_0000").await), "AUTH_FAILED");
    assert_eq!(err_code(&anon.cmd("AUTH").await), "BAD_ARGS");
    // Before AUTH nothing else is even parsed: no argument details leak.
    assert_eq!(err_code(&anon.cmd("PLAN.GET").await), "NOAUTH");
    assert_eq!(err_code(&anon.cmd("FROBNICATE").await), "NOAUTH");

    let mut admin = Raw::authed(&f).await;
    let mut token_for = async |role: &str| {
        let r = admin
            .cmd(&format!("TOKEN.CREATE role={role} name=t-{role}"))
            .await;
        r.split(' ')
            .find_map(|kv| kv.strip_prefix("token="))
            .unwrap()
            .to_string()
    };
    let viewer = token_for("viewer").await;
    let agent = token_for("agent").await;
    let deployer = token_for("deployer").await;
    assert_eq!(
        err_code(&admin.cmd("TOKEN.CREATE role=king").await),
        "BAD_ARGS"
    );

    let mut v = Raw::connect(&f).await;
    assert_eq!(
        v.cmd(&format!("AUTH {viewer}")).await,
        "+OK role=viewer name=t-viewer"
    );
    assert_eq!(v.list("PLAN.LIST").await.1, "+OK count=0 rev=0");
    let denied = v.cmd("PLAN.DEL hello").await;
    assert_eq!(err_code(&denied), "DENIED");
    assert!(
        denied.contains("role viewer may not run PLAN.DEL"),
        "{denied}"
    );
    assert_eq!(err_code(&v.cmd("LEASE.GRANT ttl_ms=1000").await), "DENIED");

    let mut a = Raw::connect(&f).await;
    a.cmd(&format!("AUTH {agent}")).await;
    assert_eq!(
        err_code(
            &a.cmd("BUDGET.SET hello max_instances=1 cpu_milli=1 memory_mb=1")
                .await
        ),
        "DENIED"
    );
    assert_eq!(err_code(&a.cmd("TOKEN.CREATE role=admin").await), "DENIED");
    assert!(
        a.cmd("LEASE.GRANT ttl_ms=1000")
            .await
            .starts_with("+OK lease=1 ")
    );

    // A failed AUTH drops the role the connection had.
    assert_eq!(err_code(&a.cmd("AUTH mesh_wrong").await), "AUTH_FAILED");
    assert_eq!(err_code(&a.cmd("LEASE.GRANT ttl_ms=1000").await), "NOAUTH");

    let mut d = Raw::connect(&f).await;
    d.cmd(&format!("AUTH {deployer}")).await;
    assert_eq!(
        err_code(
            &d.cmd("BUDGET.SET hello max_instances=1 cpu_milli=1 memory_mb=1")
                .await
        ),
        "DENIED"
    );
    assert_eq!(err_code(&d.cmd("LEASE.GRANT ttl_ms=1000").await), "DENIED");
    assert_eq!(
        err_code(&d.cmd("PLAN.DEL hello").await),
        "NOT_FOUND",
        "allowed, but nothing to delete"
    );
}

#[tokio::test]
async fn expired_lease_removes_endpoint_and_publishes_it() {
    let f = start().await;
    let mut agent = Raw::authed(&f).await;
    let mut watcher = Raw::authed(&f).await;
    let sub = watcher.cmd("SUB endpoints app=hello").await;
    assert_eq!(sub, "+OK sub=1 rev=0 mode=snapshot");
    assert_eq!(watcher.line().await, "> sync sub=1 rev=0");

    // The deadline counts from the grant, so the clock starts before the command is sent.
    let t0 = Instant::now();
    assert_eq!(
        agent.cmd("LEASE.GRANT ttl_ms=300").await,
        "+OK lease=1 ttl_ms=300"
    );
    assert_eq!(
        agent
            .cmd("ENDPOINT.REG hello instance=hello-1 node=n1 addr=127.0.0.1:9001 lease=1")
            .await,
        "+OK rev=1"
    );
    let put = watcher.line().await;
    assert_eq!(
        put,
        "> endpoint sub=1 op=put app=hello rev=1 instance=hello-1 node=n1 addr=127.0.0.1:9001 lease=1"
    );
    // Nobody renews: the removal arrives after the TTL, by itself.
    let del = watcher.line().await;
    let waited = t0.elapsed();
    assert_eq!(
        del,
        "> endpoint sub=1 op=del app=hello rev=2 instance=hello-1 node=n1 addr=127.0.0.1:9001 lease=1 reason=expired"
    );
    assert!(
        waited >= Duration::from_millis(300),
        "removed before its TTL: {waited:?}"
    );
    assert_eq!(
        agent.list("ENDPOINT.LIST hello").await.1,
        "+OK count=0 rev=2"
    );
    assert_eq!(err_code(&agent.cmd("LEASE.RENEW 1").await), "NOT_FOUND");

    // A renewed lease keeps its endpoint past the TTL.
    assert_eq!(
        agent.cmd("LEASE.GRANT ttl_ms=300").await,
        "+OK lease=2 ttl_ms=300"
    );
    agent
        .cmd("ENDPOINT.REG hello instance=hello-2 node=n1 addr=127.0.0.1:9002 lease=2")
        .await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(agent.cmd("LEASE.RENEW 2").await, "+OK lease=2 ttl_ms=300");
    }
    assert_eq!(agent.list("ENDPOINT.LIST hello").await.0.len(), 1);
    // Registering the same endpoint again takes no revision and sends no event.
    assert_eq!(
        agent
            .cmd("ENDPOINT.REG hello instance=hello-2 node=n1 addr=127.0.0.1:9002 lease=2")
            .await,
        "+OK rev=3"
    );
    assert_eq!(
        agent.cmd("ENDPOINT.DEREG hello instance=hello-2").await,
        "+OK rev=4"
    );
    assert!(
        watcher
            .line()
            .await
            .starts_with("> endpoint sub=1 op=put app=hello rev=3")
    );
    assert!(watcher.line().await.ends_with("reason=deregistered"));
}

#[tokio::test]
async fn subscriptions_replay_then_stream_and_resume_from_a_revision() {
    let f = start().await;
    let mut admin = Raw::authed(&f).await;
    for (i, app) in ["a", "b", "c"].iter().enumerate() {
        assert_eq!(
            admin
                .cmd(&format!(
                    "BUDGET.SET {app} max_instances=1 cpu_milli=1 memory_mb=1"
                ))
                .await,
            format!("+OK rev={}", i + 1)
        );
    }
    let mut s = Raw::authed(&f).await;
    assert_eq!(s.cmd("SUB budgets").await, "+OK sub=1 rev=3 mode=snapshot");
    for app in ["a", "b", "c"] {
        assert!(
            s.line()
                .await
                .starts_with(&format!("> budget sub=1 op=put app={app} "))
        );
    }
    assert_eq!(s.line().await, "> sync sub=1 rev=3");
    admin.cmd("BUDGET.SET a max_instances=2").await;
    assert!(
        s.line()
            .await
            .starts_with("> budget sub=1 op=put app=a rev=4 max_instances=2")
    );
    drop(s);

    // Changes while away; a resume sees exactly them, in order.
    admin.cmd("BUDGET.DEL b").await;
    admin.cmd("BUDGET.SET c max_instances=3").await;
    let mut s = Raw::authed(&f).await;
    assert_eq!(
        s.cmd("SUB budgets from=4").await,
        "+OK sub=2 rev=6 mode=resume"
    );
    assert_eq!(s.line().await, "> budget sub=2 op=del app=b rev=5");
    assert!(
        s.line()
            .await
            .starts_with("> budget sub=2 op=put app=c rev=6 max_instances=3")
    );
    assert_eq!(s.line().await, "> sync sub=2 rev=6");
    // From the future (a fabric whose data was replaced): full replay, flagged.
    let mut s = Raw::authed(&f).await;
    assert_eq!(
        s.cmd("SUB budgets from=99").await,
        "+OK sub=3 rev=6 mode=reset"
    );
    assert_eq!(s.line().await, "> reset sub=3 rev=6");
    assert_eq!(
        s.cmd("UNSUB 3").await.split(' ').next(),
        Some(">"),
        "replay lines come first"
    );
}

#[tokio::test]
async fn a_slow_consumer_is_cut_off_and_others_are_unaffected() {
    let f = start_with(|c| {
        c.outbound_queue = 64;
        c.send_buffer = 4096;
    })
    .await;
    let mut admin = Raw::authed(&f).await;
    // The slow client's own receive buffer is small too, so that little hides in the kernel.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(f.fabric.listen).await.unwrap();
    let (rd, wr) = stream.into_split();
    let mut slow = Raw {
        rd: BufReader::with_capacity(64, rd),
        wr,
    };
    slow.line().await;
    slow.cmd(&format!("AUTH {}", f.token)).await;
    let mut good = Raw::authed(&f).await;
    assert!(slow.cmd("SUB budgets").await.starts_with("+OK sub=1"));
    assert!(good.cmd("SUB budgets").await.starts_with("+OK sub=2"));
    assert_eq!(good.line().await, "> sync sub=2 rev=0");
    // The slow one never reads again; 1000 events overflow its queue and socket buffers.
    let mut good_seen = 0;
    for i in 0..1000 {
        assert_eq!(
            admin
                .cmd(&format!(
                    "BUDGET.SET app{i} max_instances=1 cpu_milli=1 memory_mb=1"
                ))
                .await,
            format!("+OK rev={}", i + 1)
        );
        assert!(
            good.line()
                .await
                .starts_with(&format!("> budget sub=2 op=put app=app{i} "))
        );
        good_seen += 1;
    }
    assert_eq!(good_seen, 1000);
    let tail = slow.closed().await;
    assert!(
        tail.last()
            .is_some_and(|l| l.starts_with("-ERR SLOW_CONSUMER")),
        "last lines: {:?}",
        tail.iter().rev().take(2).collect::<Vec<_>>()
    );
    assert!(
        tail.len() < 1000,
        "the slow consumer was cut off, not served everything"
    );
    let metrics = http_get(&f, "/metrics", None).await;
    assert!(
        metrics.contains("mesh_fabric_slow_consumers_total 1"),
        "{metrics}"
    );
    assert_eq!(admin.cmd("PING").await, "+PONG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections() {
    let f = start().await;
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(Raw::authed(&f).await);
    }
    let mut tasks = Vec::new();
    for (i, mut c) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            assert_eq!(c.cmd(&format!("PING c{i}")).await, format!("+PONG c{i}"));
            c
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.unwrap());
    }
    let (_, status) = conns[0].list("STATUS").await;
    assert!(status.contains(" connections=1000 "), "{status}");
}

#[tokio::test]
async fn connection_limit_refuses_with_an_error() {
    let f = start_with(|c| c.max_connections = 2).await;
    let _a = Raw::connect(&f).await;
    let _b = Raw::connect(&f).await;
    let s = TcpStream::connect(f.fabric.listen).await.unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert!(
        line.starts_with("-ERR LIMIT too many connections (max 2)"),
        "{line}"
    );
}

async fn http_get(f: &TestFabric, path: &str, headers: Option<&str>) -> String {
    http(
        f,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\n{}Connection: close\r\n\r\n",
            headers.unwrap_or("")
        ),
        b"",
    )
    .await
}

async fn http(f: &TestFabric, head: &str, body: &[u8]) -> String {
    let mut s = TcpStream::connect(f.fabric.http).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn blob_api_checks_digest_token_and_serves_ranges() {
    let f = start().await;
    let data = b"0123456789abcdefghij".repeat(100);
    let digest = mesh_common::Digest::of(&data);
    let put = |token: String, d: mesh_common::Digest, body: Vec<u8>| {
        let head = format!(
            "PUT /v1/blobs/{d} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        (head, body)
    };
    let (h, b) = put("mesh_nope".into(), digest, data.clone());
    assert!(http(&f, &h, &b).await.starts_with("HTTP/1.1 401"));
    let (h, b) = put(
        f.token.clone(),
        mesh_common::Digest::of(b"other"),
        data.clone(),
    );
    let resp = http(&f, &h, &b).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("does not match its digest"), "{resp}");
    let (h, b) = put(f.token.clone(), digest, data.clone());
    assert!(http(&f, &h, &b).await.starts_with("HTTP/1.1 201"));

    let auth = format!("Authorization: Bearer {}\r\n", f.token);
    let full = http_get(&f, &format!("/v1/blobs/{digest}"), Some(&auth)).await;
    assert!(full.starts_with("HTTP/1.1 200"));
    assert!(full.ends_with(std::str::from_utf8(&data).unwrap()));
    let part = http_get(
        &f,
        &format!("/v1/blobs/{digest}"),
        Some(&format!("{auth}Range: bytes=10-19\r\n")),
    )
    .await;
    assert!(part.starts_with("HTTP/1.1 206"), "{part}");
    assert!(part.contains("content-range: bytes 10-19/2000"), "{part}");
    assert!(part.ends_with("abcdefghij"));
    let missing = http_get(
        &f,
        &format!("/v1/blobs/{}", mesh_common::Digest::of(b"x")),
        Some(&auth),
    )
    .await;
    assert!(missing.starts_with("HTTP/1.1 404"));
    let bad = http_get(&f, "/v1/blobs/sha256:XYZ", Some(&auth)).await;
    assert!(bad.starts_with("HTTP/1.1 400"));
    assert!(
        http_get(&f, &format!("/v1/blobs/{digest}"), None)
            .await
            .starts_with("HTTP/1.1 401")
    );

    // The client library round-trips through the same API, resuming a partial download.
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("blob");
    std::fs::write(dir.path().join("blob.part"), &data[..700]).unwrap();
    let url = format!("http://{}", f.fabric.http);
    let n = mesh_common::blob::pull(&url, &f.token, &digest, &dest, |_, _| {})
        .await
        .unwrap();
    assert_eq!(n, 2000);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
}
