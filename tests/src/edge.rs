//! Fixtures for the edge tests: a fabric the routes come from, an in-process edge, a raw TCP
//! backend that records the exact bytes it receives, and a raw HTTP client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{FabricProcess, wait_until};

/// A line-protocol connection to the fabric (admin token), for registering endpoints.
pub struct FabricLine {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    lease: u64,
}

impl FabricLine {
    pub fn connect(fabric: &FabricProcess) -> FabricLine {
        let s = TcpStream::connect(fabric.line).expect("connect fabric");
        let writer = s.try_clone().expect("clone");
        let mut line = FabricLine {
            reader: BufReader::new(s),
            writer,
            lease: 0,
        };
        let info = line.read();
        assert!(info.starts_with("> info"), "{info}");
        let ok = line.call(&format!("AUTH {}", fabric.token()));
        assert!(ok.starts_with("+OK"), "{ok}");
        let lease = line.call("LEASE.GRANT ttl_ms=3600000");
        line.lease = lease
            .split_whitespace()
            .find_map(|f| f.strip_prefix("lease="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no lease in {lease}"));
        line
    }

    fn read(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("read fabric line");
        l.trim_end().to_string()
    }

    pub fn call(&mut self, cmd: &str) -> String {
        write!(self.writer, "{cmd}\r\n").expect("write fabric line");
        loop {
            let l = self.read();
            if !l.starts_with('>') {
                return l;
            }
        }
    }

    fn rev(reply: &str) -> u64 {
        reply
            .split_whitespace()
            .find_map(|f| f.strip_prefix("rev="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no rev in {reply}"))
    }

    /// Registers a Ready endpoint; returns the fabric revision.
    pub fn register(&mut self, app: &str, instance: &str, addr: SocketAddr) -> u64 {
        let r = self.call(&format!(
            "ENDPOINT.REG {app} instance={instance} node=n1 addr={addr} lease={}",
            self.lease
        ));
        assert!(r.starts_with("+OK"), "{r}");
        Self::rev(&r)
    }

    pub fn deregister(&mut self, app: &str, instance: &str) -> u64 {
        let r = self.call(&format!("ENDPOINT.DEREG {app} instance={instance}"));
        assert!(r.starts_with("+OK"), "{r}");
        Self::rev(&r)
    }
}

/// An edge running in this process, its routes fed by a real fabric.
pub struct EdgeFixture {
    pub edge: mesh_edge::Edge,
    pub fabric: FabricProcess,
    pub line: FabricLine,
    _dir: tempfile::TempDir,
}

impl EdgeFixture {
    /// `tune` adjusts the edge config (timeouts, limits) before start.
    pub fn start(tune: impl FnOnce(&mut mesh_edge::Config)) -> EdgeFixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let fabric = FabricProcess::start(&dir.path().join("fabric"));
        let line = FabricLine::connect(&fabric);
        let mut cfg = mesh_edge::Config::new(
            fabric.client_config(),
            vec!["127.0.0.1:0".parse().expect("addr")],
        );
        cfg.threads = 2;
        cfg.admin = Some("127.0.0.1:0".parse().expect("addr"));
        tune(&mut cfg);
        let edge = mesh_edge::Edge::start(cfg).expect("edge starts");
        EdgeFixture {
            edge,
            fabric,
            line,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.edge.listen[0]
    }

    /// Waits until the edge's table reflects fabric revision `rev`.
    pub fn wait_rev(&self, rev: u64) {
        assert!(
            wait_until(Duration::from_secs(10), || self.edge.routes_rev() >= rev),
            "edge never reached route revision {rev} (at {})",
            self.edge.routes_rev()
        );
    }

    pub fn register(&mut self, app: &str, instance: &str, addr: SocketAddr) {
        let rev = self.line.register(app, instance, addr);
        self.wait_rev(rev);
    }

    pub fn deregister(&mut self, app: &str, instance: &str) {
        let rev = self.line.deregister(app, instance);
        self.wait_rev(rev);
    }

    pub fn metrics(&self) -> String {
        self.edge.metrics.render()
    }

    /// Value of one metric line (`name{labels}` exactly as rendered).
    pub fn metric(&self, series: &str) -> u64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// One request as the backend received it: the exact bytes.
#[derive(Debug, Clone)]
pub struct Received {
    pub conn: usize,
    pub bytes: Vec<u8>,
}

impl Received {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// A raw TCP HTTP/1.1 backend. It frames requests itself (Content-Length or chunked, read
/// verbatim), records each one, and answers by path:
/// `/len/N` N bytes, `/chunked` a chunked body, `/204`, `/304`, `/close` (no length, body
/// until close), `/reset` (closes without answering), `/sleep/MS`, `/echo` (the body back),
/// `/bad` (garbage), `/continue` (a 100 first), `/keepalive-off` (Connection: close),
/// anything else 200 "ok".
pub struct RawBackend {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Received>>>,
    pub connections: Arc<Mutex<usize>>,
    /// Connections the backend saw closed by the peer (EOF).
    pub closed: Arc<Mutex<usize>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl RawBackend {
    pub fn start() -> RawBackend {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let addr = l.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let closed = Arc::new(Mutex::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, c, cl, st) = (
            requests.clone(),
            connections.clone(),
            closed.clone(),
            stop.clone(),
        );
        l.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let conn = {
                            let mut n = c.lock().expect("lock");
                            *n += 1;
                            *n
                        };
                        let (r, cl) = (r.clone(), cl.clone());
                        std::thread::spawn(move || serve(s, conn, r, cl));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        RawBackend {
            addr,
            requests,
            connections,
            closed,
            stop,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.requests.lock().expect("lock").clone()
    }

    pub fn connection_count(&self) -> usize {
        *self.connections.lock().expect("lock")
    }

    pub fn closed_count(&self) -> usize {
        *self.closed.lock().expect("lock")
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn serve(mut s: TcpStream, conn: usize, log: Arc<Mutex<Vec<Received>>>, closed: Arc<Mutex<usize>>) {
    let _ = s.set_nonblocking(false);
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_request(&mut s, &mut buf) else {
            *closed.lock().expect("lock") += 1;
            return;
        };
        let head = String::from_utf8_lossy(&req.bytes[..req.head_len]).into_owned();
        log.lock().expect("lock").push(Received {
            conn,
            bytes: req.bytes.clone(),
        });
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let is_head = head.starts_with("HEAD ");
        let reply: Vec<u8> = if let Some(n) = path.strip_prefix("/len/") {
            let n: usize = n.parse().unwrap_or(0);
            let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").into_bytes();
            if !is_head {
                r.extend((0..n).map(|i| b'a' + (i % 26) as u8));
            }
            r
        } else if path == "/chunked" {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_vec()
        } else if path == "/204" {
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()
        } else if path == "/304" {
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n".to_vec()
        } else if path == "/close" {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil close");
            *closed.lock().expect("lock") += 1;
            return;
        } else if path == "/reset" {
            *closed.lock().expect("lock") += 1;
            return;
        } else if let Some(ms) = path.strip_prefix("/sleep/") {
            std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nslept".to_vec()
        } else if path == "/echo" {
            let body = &req.bytes[req.head_len..];
            let mut r =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            r.extend_from_slice(body);
            r
        } else if path == "/bad" {
            b"HTTP/1.1 2x0 Nope\r\n\r\n".to_vec()
        } else if path == "/continue" {
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()
        } else if path == "/keepalive-off" {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".to_vec()
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()
        };
        if s.write_all(&reply).is_err() {
            return;
        }
        if path == "/keepalive-off" {
            return;
        }
    }
}

struct RawRequest {
    bytes: Vec<u8>,
    head_len: usize,
}

/// Reads one request (head + body framed by Content-Length or chunked) from `s`, keeping
/// extra bytes in `buf`. None at EOF or on garbage.
fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<RawRequest> {
    let head_len = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if !fill(s, buf) {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).to_ascii_lowercase();
    let length: Option<usize> = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    let chunked = head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    let total = if chunked {
        let mut dec = mesh_edge::http::ChunkedDecoder::new();
        loop {
            let n = dec.feed(&buf[head_len..]).ok()?;
            if dec.done() {
                break head_len + n;
            }
            // feed is incremental; restart from scratch on the whole body each time
            dec = mesh_edge::http::ChunkedDecoder::new();
            if !fill(s, buf) {
                return None;
            }
        }
    } else {
        let total = head_len + length.unwrap_or(0);
        while buf.len() < total {
            if !fill(s, buf) {
                return None;
            }
        }
        total
    };
    let bytes: Vec<u8> = buf.drain(..total).collect();
    Some(RawRequest { bytes, head_len })
}

fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16384];
    match s.read(&mut chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A response as the client received it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.head.lines().find_map(|l| {
            let lower = l.to_ascii_lowercase();
            lower
                .strip_prefix(&prefix)
                .map(|_| l[prefix.len()..].trim().to_string())
        })
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw client connection to the edge.
pub struct RawClient {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        let s = TcpStream::connect(addr).expect("connect edge");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        RawClient { s, buf: Vec::new() }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to edge");
    }

    /// Reads one response; `head_request` for responses to HEAD (no body).
    pub fn response(&mut self, head_request: bool) -> Option<Response> {
        let head_len = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !fill(&mut self.s, &mut self.buf) {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_len]).into_owned();
        let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
        let lower = head.to_ascii_lowercase();
        let length: Option<usize> = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok());
        let chunked = lower.lines().any(|l| l.starts_with("transfer-encoding:"));
        self.buf.drain(..head_len);
        let body = if head_request || status == 204 || status == 304 || (100..200).contains(&status)
        {
            Vec::new()
        } else if chunked {
            loop {
                let mut dec = mesh_edge::http::ChunkedDecoder::new();
                let n = dec.feed(&self.buf).ok()?;
                if dec.done() {
                    break self.buf.drain(..n).collect();
                }
                if !fill(&mut self.s, &mut self.buf) {
                    return None;
                }
            }
        } else if let Some(n) = length {
            while self.buf.len() < n {
                if !fill(&mut self.s, &mut self.buf) {
                    return None;
                }
            }
            self.buf.drain(..n).collect()
        } else {
            while fill(&mut self.s, &mut self.buf) {}
            std::mem::take(&mut self.buf)
        };
        Some(Response { status, head, body })
    }

    /// True if the edge closed the connection (EOF) within the read timeout.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0))
            || matches!(self.s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }
}

/// One GET on a fresh connection (Connection: close).
pub fn get(addr: SocketAddr, path: &str) -> Option<Response> {
    let mut c = RawClient::connect(addr);
    c.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes());
    c.response(false)
}
