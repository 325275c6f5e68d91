//! `hello`: the example spore of Mycelium Mesh.
//!
//! A tiny HTTP/1.1 service built on the standard library alone. `mesh up`
//! deploys it, and the tests and benchmarks use it as a known workload.
//!
//! Environment:
//! - `PORT` (required): TCP port to listen on, 1..=65535.
//! - `BIND_ADDR`: IP address to bind; default `127.0.0.1`.
//! - `HELLO_VERSION`: version to report; default the crate version.
//! - `HELLO_UNHEALTHY=1`: `/health` answers 503 (failed-rollout tests).
//! - `HELLO_CRASH_AFTER_MS=N`: exit with code 3 after N ms (crash-loop tests).
//!
//! Routes (GET and HEAD): `/`, `/health`, `/bytes/<n>`; anything else is 404.

use std::env;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const MAX_HEAD: u64 = 16 * 1024;
const MAX_BODY: u64 = 1024 * 1024;
const MAX_BYTES: u64 = 64 * 1024 * 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const LINGER: Duration = Duration::from_secs(2);
const USAGE: &str = "run it as `PORT=8080 hello`";

/// Largest multiple of 26 within 64 KiB, so every chunk starts the pattern at `a`.
const CHUNK: usize = 26 * 2520;
static PATTERN: [u8; CHUNK] = pattern();

const fn pattern() -> [u8; CHUNK] {
    let mut buf = [0; CHUNK];
    let mut i = 0;
    while i < CHUNK {
        buf[i] = b'a' + (i % 26) as u8;
        i += 1;
    }
    buf
}

struct Config {
    addr: SocketAddr,
    version: String,
    pid: u32,
    unhealthy: bool,
    crash_after: Option<Duration>,
}

fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => Arc::new(config),
        Err(msg) => {
            eprintln!("hello: {msg}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(config.addr) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("hello: cannot listen on {}: {e}", config.addr);
            return ExitCode::from(1);
        }
    };
    let local = listener.local_addr().unwrap_or(config.addr);
    let mut out = io::stdout().lock();
    // why: a closed stdout must not stop the service (println! would panic)
    let _ = writeln!(
        out,
        "hello v{} listening on {local} (pid {})",
        config.version, config.pid
    )
    .and_then(|()| out.flush());
    drop(out);

    if let Some(delay) = config.crash_after {
        thread::spawn(move || {
            thread::sleep(delay);
            let _ = writeln!(
                io::stderr(),
                "hello: crashing on purpose (HELLO_CRASH_AFTER_MS)"
            );
            std::process::exit(3);
        });
    }

    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let config = Arc::clone(&config);
                // why: if no thread can be made, only this connection is dropped
                let _ = thread::Builder::new().spawn(move || serve(stream, &config));
            }
            Err(e) => {
                let _ = writeln!(io::stderr(), "hello: accept failed: {e}");
                // why: e.g. out of file descriptors; do not spin
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    ExitCode::SUCCESS
}

impl Config {
    fn from_env() -> Result<Config, String> {
        let Some(raw) = env::var_os("PORT") else {
            return Err(format!("PORT is not set; {USAGE}"));
        };
        let port = match parse_var::<u16>(&raw) {
            Some(port) if port > 0 => port,
            _ => {
                return Err(format!(
                    "PORT={raw:?} is not a port from 1 to 65535; {USAGE}"
                ));
            }
        };
        let ip = match env::var_os("BIND_ADDR") {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(raw) => parse_var(&raw).ok_or_else(|| {
                format!("BIND_ADDR={raw:?} is not an IP address; use e.g. 0.0.0.0 or unset it")
            })?,
        };
        let crash_after = match env::var_os("HELLO_CRASH_AFTER_MS") {
            None => None,
            Some(raw) => Some(parse_var(&raw).map(Duration::from_millis).ok_or_else(|| {
                format!("HELLO_CRASH_AFTER_MS={raw:?} is not a number of milliseconds")
            })?),
        };
        let version = env::var("HELLO_VERSION")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned());
        Ok(Config {
            addr: SocketAddr::new(ip, port),
            version,
            pid: std::process::id(),
            unhealthy: env::var_os("HELLO_UNHEALTHY").is_some_and(|v| v == "1"),
            crash_after,
        })
    }
}

fn parse_var<T: std::str::FromStr>(raw: &OsString) -> Option<T> {
    raw.to_str()?.parse().ok()
}

/// What to do with the connection after one request.
enum Next {
    KeepAlive,
    Close,
    Gone,
}

/// Serves requests on one connection, in order, until either side closes.
fn serve(stream: TcpStream, config: &Config) {
    // why: header and body go out as separate writes; Nagle would delay them
    let _ = stream.set_nodelay(true);
    if stream.set_read_timeout(Some(IDLE_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(IDLE_TIMEOUT)).is_err()
    {
        return;
    }
    let mut reader = BufReader::new(stream);
    loop {
        match handle_one(&mut reader, config) {
            Next::KeepAlive => continue,
            Next::Close => return linger_close(reader.get_ref()),
            Next::Gone => return,
        }
    }
}

fn handle_one(reader: &mut BufReader<TcpStream>, config: &Config) -> Next {
    let head = match read_head(reader) {
        Ok(head) => head,
        Err(HeadError::Gone) => return Next::Gone,
        Err(HeadError::TooLarge) => {
            return fail(
                reader.get_ref(),
                Response::text(431, "request head too large\n"),
            );
        }
    };
    let req = match parse(&head) {
        Ok(req) => req,
        Err(resp) => return fail(reader.get_ref(), resp),
    };
    // why: skip the body so the next pipelined request starts at the right byte
    let body = io::copy(&mut reader.by_ref().take(req.body_len), &mut io::sink());
    if !matches!(body, Ok(n) if n == req.body_len) {
        return Next::Gone;
    }
    let connection = match (req.keep_alive, req.http10) {
        (false, _) => Some("close"),
        (true, true) => Some("keep-alive"),
        (true, false) => None,
    };
    let resp = route(&req, config);
    match resp.write(reader.get_ref(), req.method == "HEAD", connection) {
        Ok(()) if req.keep_alive => Next::KeepAlive,
        Ok(()) => Next::Close,
        Err(_) => Next::Gone,
    }
}

/// Sends a final error response; the connection is closed after it.
fn fail(stream: &TcpStream, resp: Response) -> Next {
    match resp.write(stream, false, Some("close")) {
        Ok(()) => Next::Close,
        Err(_) => Next::Gone,
    }
}

/// Closes without resetting: unread request bytes at close() make the kernel
/// send RST, which can destroy the response before the client reads it.
fn linger_close(mut stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut buf = [0; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now())
        && stream.set_read_timeout(Some(left)).is_ok()
    {
        if !matches!(stream.read(&mut buf), Ok(n) if n > 0) {
            break;
        }
    }
}

enum HeadError {
    TooLarge,
    Gone,
}

/// Reads the request line and headers, up to and including the blank line.
fn read_head(reader: &mut impl BufRead) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::new();
    let mut used = 0;
    loop {
        let start = head.len();
        let n = reader
            .take(MAX_HEAD - used)
            .read_until(b'\n', &mut head)
            .map_err(|_| HeadError::Gone)?;
        used += n as u64;
        let line = &head[start..];
        if !line.ends_with(b"\n") {
            // why: a cut-off line means either the size limit or the peer left
            return Err(if used >= MAX_HEAD {
                HeadError::TooLarge
            } else {
                HeadError::Gone
            });
        }
        if line == b"\r\n" || line == b"\n" {
            if start == 0 {
                // why: RFC 9112 2.2: ignore blank lines before the request line
                head.clear();
                continue;
            }
            return Ok(head);
        }
    }
}

struct Request<'a> {
    method: &'a str,
    target: &'a str,
    http10: bool,
    keep_alive: bool,
    body_len: u64,
}

/// Parses a request head; on error returns the response to send before closing.
fn parse(head: &[u8]) -> Result<Request<'_>, Response> {
    let bad = |why: &str| Response::text(400, format!("bad request: {why}\n"));
    let head = std::str::from_utf8(head).map_err(|_| bad("head is not UTF-8"))?;
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !token(method) || !token(target) {
        return Err(bad("malformed request line"));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(bad("only HTTP/1.0 and HTTP/1.1 are supported")),
    };

    let (mut close, mut keep_alive, mut chunked) = (false, false, false);
    let mut body_len = None;
    for line in lines.take_while(|line| !line.is_empty()) {
        let Some((name, value)) = line.split_once(':').filter(|(name, _)| token(name)) else {
            return Err(bad("malformed header"));
        };
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            let len = Some(value)
                .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| bad("invalid Content-Length"))?;
            if body_len.is_some_and(|prev| prev != len) {
                return Err(bad("conflicting Content-Length"));
            }
            body_len = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                close |= option.eq_ignore_ascii_case("close");
                keep_alive |= option.eq_ignore_ascii_case("keep-alive");
            }
        }
    }
    if chunked {
        return Err(Response::text(501, "Transfer-Encoding is not supported\n"));
    }
    let body_len = body_len.unwrap_or(0);
    if body_len > MAX_BODY {
        return Err(Response::text(413, "request body too large\n"));
    }
    Ok(Request {
        method,
        target,
        http10,
        keep_alive: !close && (!http10 || keep_alive),
        body_len,
    })
}

fn route(req: &Request, config: &Config) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return Response {
            extra: "Allow: GET, HEAD\r\n",
            ..Response::text(405, "method not allowed\n")
        };
    }
    let path = req
        .target
        .split_once('?')
        .map_or(req.target, |(path, _)| path);
    match path {
        "/" => Response::text(
            200,
            format!(
                "hello from hello v{} (pid {})\n",
                config.version, config.pid
            ),
        ),
        "/health" if config.unhealthy => Response::text(503, "unhealthy\n"),
        "/health" => Response::text(200, "ok\n"),
        _ => match path.strip_prefix("/bytes/") {
            Some(count) => bytes(count),
            None => Response::text(404, "not found\n"),
        },
    }
}

fn bytes(count: &str) -> Response {
    match count.parse::<u64>() {
        Ok(n) if n <= MAX_BYTES && count.bytes().all(|b| b.is_ascii_digit()) => Response {
            content_type: "application/octet-stream",
            body: Body::Pattern(n),
            ..Response::text(200, "")
        },
        _ => Response::text(400, format!("/bytes/<n> needs n from 0 to {MAX_BYTES}\n")),
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    /// Extra header lines, each ending in CRLF.
    extra: &'static str,
    body: Body,
}

enum Body {
    Text(String),
    /// `n` bytes of `a..z` repeated.
    Pattern(u64),
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra: "",
            body: Body::Text(body.into()),
        }
    }

    fn write(
        &self,
        mut out: &TcpStream,
        head_only: bool,
        connection: Option<&str>,
    ) -> io::Result<()> {
        let len = match &self.body {
            Body::Text(text) => text.len() as u64,
            Body::Pattern(n) => *n,
        };
        let mut buf = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {len}\r\n{}",
            self.status,
            reason(self.status),
            self.content_type,
            self.extra,
        );
        if let Some(connection) = connection {
            buf += &format!("Connection: {connection}\r\n");
        }
        buf += "\r\n";
        match &self.body {
            _ if head_only => out.write_all(buf.as_bytes()),
            Body::Text(text) => out.write_all((buf + text).as_bytes()),
            Body::Pattern(n) => {
                out.write_all(buf.as_bytes())?;
                let mut left = *n;
                while left > 0 {
                    let chunk = left.min(CHUNK as u64) as usize;
                    out.write_all(&PATTERN[..chunk])?;
                    left -= chunk as u64;
                }
                Ok(())
            }
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}
