//! Runs the real `hello` binary and talks raw HTTP/1.1 to it.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const VARS: [&str; 5] = [
    "PORT",
    "BIND_ADDR",
    "HELLO_VERSION",
    "HELLO_UNHEALTHY",
    "HELLO_CRASH_AFTER_MS",
];

/// Kills and reaps the child however the test ends.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `hello` with exactly `env` (none of the outer `VARS`).
    fn spawn_with(env: &[(&str, &str)], port: u16) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hello"));
        for var in VARS {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Server {
            child: cmd.spawn().unwrap(),
            port,
        }
    }

    /// Starts `hello` on a free port without waiting for it.
    fn spawn(env: &[(&str, &str)]) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let port_var = port.to_string();
        Server::spawn_with(&[&[("PORT", port_var.as_str())], env].concat(), port)
    }

    /// Starts `hello` and waits until it accepts connections.
    fn start(env: &[(&str, &str)]) -> Server {
        let mut server = Server::spawn(env);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", server.port)).is_err() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("hello exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "hello did not accept within 10 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn connect(&self) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Conn(BufReader::new(stream))
    }

    /// One request on a fresh connection that the server then closes.
    fn request(&self, method: &str, path: &str) -> Response {
        let mut conn = self.connect();
        conn.send(&format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        ));
        let resp = conn.response(method == "HEAD");
        assert_eq!(resp.header("connection"), Some("close"));
        conn.assert_closed();
        resp
    }

    fn get(&self, path: &str) -> Response {
        self.request("GET", path)
    }

    /// Waits up to 10 s for the process to exit.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "hello did not exit within 10 s");
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&mut self) -> String {
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        err
    }
}

struct Conn(BufReader<TcpStream>);

impl Conn {
    fn send(&mut self, raw: &str) {
        self.0.get_mut().write_all(raw.as_bytes()).unwrap();
    }

    fn response(&mut self, head_only: bool) -> Response {
        let mut status = String::new();
        self.0.read_line(&mut status).unwrap();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.0.read_line(&mut line).unwrap();
            let line = line.trim_end_matches("\r\n");
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut resp = Response {
            status: status.trim_end().to_owned(),
            headers,
            body: Vec::new(),
        };
        let len: usize = resp.header("content-length").unwrap().parse().unwrap();
        resp.body = vec![0; if head_only { 0 } else { len }];
        self.0.read_exact(&mut resp.body).unwrap();
        resp
    }

    fn assert_closed(&mut self) {
        let mut rest = Vec::new();
        self.0.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "unexpected bytes after the response: {rest:?}"
        );
    }
}

struct Response {
    status: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

#[test]
fn root_reports_version_and_pid() {
    let mut server = Server::start(&[]);
    let mut line = String::new();
    BufReader::new(server.child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = server.pid();
    assert_eq!(
        line,
        format!(
            "hello v1.0.0 listening on 127.0.0.1:{} (pid {pid})\n",
            server.port
        )
    );

    let resp = server.get("/");
    assert_eq!(resp.status, "HTTP/1.1 200 OK");
    assert_eq!(
        resp.text(),
        format!("hello from hello v1.0.0 (pid {pid})\n")
    );
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
}

#[test]
fn hello_version_overrides_version() {
    let server = Server::start(&[("HELLO_VERSION", "2.0.0")]);
    let resp = server.get("/");
    assert_eq!(resp.status, "HTTP/1.1 200 OK");
    assert_eq!(
        resp.text(),
        format!("hello from hello v2.0.0 (pid {})\n", server.pid())
    );
}

#[test]
fn health_is_ok_unless_told_otherwise() {
    let resp = Server::start(&[]).get("/health");
    assert_eq!(
        (resp.status.as_str(), resp.text()),
        ("HTTP/1.1 200 OK", "ok\n")
    );

    let resp = Server::start(&[("HELLO_UNHEALTHY", "1")]).get("/health");
    assert_eq!(
        (resp.status.as_str(), resp.text()),
        ("HTTP/1.1 503 Service Unavailable", "unhealthy\n")
    );
}

#[test]
fn bytes_returns_exact_pattern() {
    let server = Server::start(&[]);
    let resp = server.get("/bytes/1048576");
    assert_eq!(resp.status, "HTTP/1.1 200 OK");
    assert_eq!(
        resp.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(resp.body.len(), 1 << 20);
    assert!(
        resp.body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == b'a' + (i % 26) as u8)
    );

    assert_eq!(server.get("/bytes/0").body, b"");
    assert_eq!(
        server.get("/bytes/67108865").status,
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(server.get("/bytes/x").status, "HTTP/1.1 400 Bad Request");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start(&[]);
    let mut conn = server.connect();
    conn.send(
        "GET /health HTTP/1.1\r\nHost: t\r\n\r\n\
         GET /bytes/30 HTTP/1.1\r\nHost: t\r\n\r\n\
         GET /nope HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    let first = conn.response(false);
    assert_eq!(
        (first.status.as_str(), first.text()),
        ("HTTP/1.1 200 OK", "ok\n")
    );
    assert_eq!(first.header("connection"), None);
    assert_eq!(
        conn.response(false).text(),
        "abcdefghijklmnopqrstuvwxyzabcd"
    );
    assert_eq!(conn.response(false).status, "HTTP/1.1 404 Not Found");

    // The connection is still usable, and closes when asked to.
    conn.send("GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let last = conn.response(false);
    assert!(last.text().starts_with("hello from hello v1.0.0"));
    assert_eq!(last.header("connection"), Some("close"));
    conn.assert_closed();
}

#[test]
fn head_has_headers_but_no_body() {
    let server = Server::start(&[]);
    let get = server.get("/");
    // `request` checks that nothing follows the head before the server closes.
    let head = server.request("HEAD", "/");
    assert_eq!(head.status, "HTTP/1.1 200 OK");
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), get.header("content-length"));
    let head = server.request("HEAD", "/bytes/1000");
    assert_eq!(head.header("content-length"), Some("1000"));
}

#[test]
fn unknown_path_is_404() {
    let resp = Server::start(&[]).get("/missing");
    assert_eq!(
        (resp.status.as_str(), resp.text()),
        ("HTTP/1.1 404 Not Found", "not found\n")
    );
}

#[test]
fn post_is_405_and_its_body_is_skipped() {
    let server = Server::start(&[]);
    let resp = server.request("POST", "/");
    assert_eq!(resp.status, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(resp.header("allow"), Some("GET, HEAD"));

    let mut conn = server.connect();
    conn.send(
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhelloGET /health HTTP/1.1\r\n\r\n",
    );
    assert_eq!(
        conn.response(false).status,
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(conn.response(false).text(), "ok\n");
}

#[test]
fn bad_requests_get_an_error_and_close() {
    let server = Server::start(&[]);
    let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(17 * 1024));
    let cases = [
        ("GARBAGE\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (
            "GET / HTTP/1.1\r\nno colon\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
        ),
        (big.as_str(), "HTTP/1.1 431 Request Header Fields Too Large"),
        (
            "POST / HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n",
            "HTTP/1.1 413 Content Too Large",
        ),
        (
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 501 Not Implemented",
        ),
    ];
    for (raw, status) in cases {
        let mut conn = server.connect();
        conn.send(raw);
        let resp = conn.response(false);
        assert_eq!(resp.status, status);
        assert_eq!(resp.header("connection"), Some("close"));
        conn.assert_closed();
    }
}

#[test]
fn http10_closes_unless_keep_alive() {
    let server = Server::start(&[]);
    let mut conn = server.connect();
    conn.send("GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(
        conn.response(false).header("connection"),
        Some("keep-alive")
    );
    conn.send("GET /health HTTP/1.0\r\n\r\n");
    assert_eq!(conn.response(false).header("connection"), Some("close"));
    conn.assert_closed();
}

#[test]
fn missing_port_exits_2_naming_port() {
    let mut server = Server::spawn_with(&[], 0);
    assert_eq!(server.wait_exit().code(), Some(2));
    let err = server.stderr();
    assert!(err.contains("PORT is not set"), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
}

#[test]
fn crash_after_ms_exits_3() {
    let started = Instant::now();
    let mut server = Server::spawn(&[("HELLO_CRASH_AFTER_MS", "200")]);
    assert_eq!(server.wait_exit().code(), Some(3));
    assert!(started.elapsed() >= Duration::from_millis(200));
}
