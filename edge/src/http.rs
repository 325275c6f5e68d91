//! HTTP/1.1 message heads: parsing with httparse, the framing rules that keep a proxy from
//! being smuggled through (RFC 9112 section 6), and the rewritten heads sent on.
//!
//! Everything here is pure: bytes in, a decision out. The forwarding loop owns the sockets.

use std::fmt::Write as _;
use std::net::IpAddr;

/// Most header lines one message may have (httparse needs the bound up front).
pub const MAX_HEADERS: usize = 64;

/// The `Via` token this proxy adds on both sides.
pub const VIA: &str = "1.1 mesh-edge";

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all (a request without length, HEAD/204/304/1xx responses).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`, forwarded verbatim while being checked.
    Chunked,
    /// A response without length: the body ends when the upstream closes.
    UntilClose,
}

/// Why a request is refused before anything reaches an upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    #[error("request head larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("Content-Length and Transfer-Encoding together")]
    LengthAndChunked,
    #[error("more than one Content-Length")]
    DuplicateLength,
    #[error("Content-Length is not a decimal number")]
    InvalidLength,
    #[error("unsupported Transfer-Encoding (only chunked is)")]
    UnsupportedEncoding,
    #[error("unsupported HTTP version")]
    Version,
    #[error("HTTP/1.1 request without Host")]
    MissingHost,
}

impl RequestError {
    /// The status a client gets for this refusal.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::HeadTooLarge(_) | RequestError::TooManyHeaders => 431,
            RequestError::UnsupportedEncoding => 501,
            RequestError::Version => 505,
            _ => 400,
        }
    }
}

/// A parsed request head, with what the proxy needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// Request target as sent (origin-form; absolute-form is reduced to its path).
    pub target: String,
    /// Authority from the Host header (or the absolute-form target), lowercase, port removed.
    pub host: Option<String>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// Header lines in order, names as sent.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Length of the head in bytes, including the empty line.
    pub len: usize,
    pub framing: Framing,
    /// The client wants the connection kept after this exchange.
    pub keep_alive: bool,
    pub expect_continue: bool,
}

impl RequestHead {
    /// GET, HEAD, PUT, DELETE, OPTIONS and TRACE may be sent twice (RFC 9110 9.2.2).
    pub fn idempotent(&self) -> bool {
        matches!(
            self.method.as_str(),
            "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "TRACE"
        )
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// Parse a request head at the start of `buf`. `Ok(None)`: not complete yet (and not over
/// `max_head` bytes).
pub fn parse_request(buf: &[u8], max_head: usize) -> Result<Option<RequestHead>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > max_head {
                Err(RequestError::HeadTooLarge(max_head))
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooManyHeaders),
        Err(httparse::Error::Version) => return Err(RequestError::Version),
        Err(e) => return Err(RequestError::Malformed(error_text(e))),
    };
    if len > max_head {
        return Err(RequestError::HeadTooLarge(max_head));
    }
    let method = req.method.unwrap_or_default().to_string();
    let minor = req.version.unwrap_or(1);
    let mut target = req.path.unwrap_or_default().to_string();
    let mut host = None;
    if let Some(rest) = target.strip_prefix("http://") {
        // absolute-form: the authority wins over Host (RFC 9112 3.2.2)
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        host = Some(normalize_host(authority));
        target = if path.is_empty() {
            "/".to_string()
        } else {
            path.to_string()
        };
    } else if !(target.starts_with('/') || (target == "*" && method == "OPTIONS")) {
        return Err(RequestError::Malformed("request target is not origin-form"));
    }
    let fields: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    let common = common_fields(&fields, minor)?;
    let mut hosts = fields
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("host"));
    let host_field = hosts.next();
    if hosts.next().is_some() {
        return Err(RequestError::Malformed("more than one Host"));
    }
    if host.is_none() {
        match host_field {
            Some((_, v)) => {
                let v = std::str::from_utf8(v)
                    .map_err(|_| RequestError::Malformed("Host is not text"))?;
                host = Some(normalize_host(v));
            }
            None if minor == 1 => return Err(RequestError::MissingHost),
            None => {}
        }
    }
    let framing = match (common.length, common.chunked) {
        (Some(_), true) => return Err(RequestError::LengthAndChunked),
        (None, true) => Framing::Chunked,
        (Some(0), false) | (None, false) => Framing::None,
        (Some(n), false) => Framing::Length(n),
    };
    let expect_continue = fields
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("expect") && v.eq_ignore_ascii_case(b"100-continue"));
    Ok(Some(RequestHead {
        method,
        target,
        host,
        minor,
        headers: fields,
        len,
        framing,
        keep_alive: common.keep_alive,
        expect_continue,
    }))
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub minor: u8,
    pub reason: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub len: usize,
    pub framing: Framing,
    /// The upstream will keep the connection after this response.
    pub keep_alive: bool,
}

/// Why an upstream's response is refused (the client gets a 502).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("malformed response head: {0}")]
    Malformed(&'static str),
    #[error("response head larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("response framing: {0}")]
    Framing(RequestError),
}

/// Parse a response head to a request (`head_request`: HEAD, whose response has no body).
pub fn parse_response(
    buf: &[u8],
    max_head: usize,
    head_request: bool,
) -> Result<Option<ResponseHead>, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > max_head {
                Err(ResponseError::HeadTooLarge(max_head))
            } else {
                Ok(None)
            };
        }
        Err(e) => return Err(ResponseError::Malformed(error_text(e))),
    };
    let status = resp.code.unwrap_or(0);
    let minor = resp.version.unwrap_or(1);
    let reason = resp.reason.unwrap_or_default().to_string();
    let fields: Vec<(String, Vec<u8>)> = resp
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    let common = common_fields(&fields, minor).map_err(ResponseError::Framing)?;
    let bodiless = head_request || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = match (common.length, common.chunked) {
        (Some(_), true) => return Err(ResponseError::Framing(RequestError::LengthAndChunked)),
        _ if bodiless => Framing::None,
        (None, true) => Framing::Chunked,
        (Some(0), false) => Framing::None,
        (Some(n), false) => Framing::Length(n),
        (None, false) => Framing::UntilClose,
    };
    Ok(Some(ResponseHead {
        status,
        minor,
        reason,
        headers: fields,
        len,
        framing,
        keep_alive: common.keep_alive && framing != Framing::UntilClose,
    }))
}

struct CommonFields {
    length: Option<u64>,
    chunked: bool,
    keep_alive: bool,
}

/// Content-Length, Transfer-Encoding and Connection, checked the strict way.
fn common_fields(fields: &[(String, Vec<u8>)], minor: u8) -> Result<CommonFields, RequestError> {
    let mut length = None;
    let mut chunked = false;
    let mut close = false;
    let mut keep = false;
    for (name, value) in fields {
        if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err(RequestError::DuplicateLength);
            }
            length = Some(parse_length(value)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only a single `chunked` is accepted: a list like `gzip, chunked` or a second
            // header line is where front and back ends disagree.
            if chunked || minor == 0 || !trim(value).eq_ignore_ascii_case(b"chunked") {
                return Err(RequestError::UnsupportedEncoding);
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|b| *b == b',') {
                let token = trim(token);
                close |= token.eq_ignore_ascii_case(b"close");
                keep |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let keep_alive = if minor == 0 { keep && !close } else { !close };
    Ok(CommonFields {
        length,
        chunked,
        keep_alive,
    })
}

fn parse_length(value: &[u8]) -> Result<u64, RequestError> {
    let v = trim(value);
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return Err(RequestError::InvalidLength);
    }
    Ok(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = v.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(s), Some(e)) => &v[s..=e],
        _ => &[],
    }
}

fn normalize_host(authority: &str) -> String {
    let a = authority.trim().to_ascii_lowercase();
    // keep [v6] literals whole; drop a trailing :port
    if let Some(end) = a.find(']') {
        return a[..=end].to_string();
    }
    match a.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
        _ => a,
    }
}

fn error_text(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name (or an obs-folded line)",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// Headers a proxy must not forward (RFC 9110 7.6.1), plus those it answers itself.
fn hop_by_hop(name: &str, listed: &[Vec<u8>]) -> bool {
    const FIXED: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "trailer",
        "expect",
        "proxy-authorization",
    ];
    FIXED.iter().any(|h| name.eq_ignore_ascii_case(h))
        || listed
            .iter()
            .any(|l| l.eq_ignore_ascii_case(name.as_bytes()))
}

/// Header names listed in Connection (they are hop-by-hop too). Never the fields that frame
/// or address the message: dropping Content-Length or Transfer-Encoding because a peer listed
/// it would make the next hop frame the bytes differently (request smuggling).
fn connection_listed(headers: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    const KEPT: [&[u8]; 3] = [b"content-length", b"transfer-encoding", b"host"];
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(|b| *b == b',').map(|t| trim(t).to_vec()))
        .filter(|t| !t.is_empty() && !KEPT.iter().any(|k| t.eq_ignore_ascii_case(k)))
        .collect()
}

/// The request head as sent upstream: HTTP/1.1, `target` (after prefix rewriting), hop-by-hop
/// fields removed, X-Forwarded-For/-Proto and Via added. Upstream connections are kept alive.
pub fn upstream_request(head: &RequestHead, target: &str, client: IpAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let listed = connection_listed(&head.headers);
    let mut xff: Option<Vec<u8>> = None;
    let mut via: Option<Vec<u8>> = None;
    let mut has_host = false;
    for (name, value) in &head.headers {
        if hop_by_hop(name, &listed) || name.eq_ignore_ascii_case("x-forwarded-proto") {
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            join_into(&mut xff, value);
            continue;
        }
        if name.eq_ignore_ascii_case("via") {
            join_into(&mut via, value);
            continue;
        }
        has_host |= name.eq_ignore_ascii_case("host");
        push_field(out, name, value);
    }
    if !has_host {
        // HTTP/1.0 clients may omit Host; HTTP/1.1 upstreams require one
        push_field(out, "Host", head.host.as_deref().unwrap_or("").as_bytes());
    }
    join_into(&mut xff, client.to_string().as_bytes());
    push_field(out, "X-Forwarded-For", xff.as_deref().unwrap_or_default());
    push_field(out, "X-Forwarded-Proto", b"http");
    join_into(&mut via, VIA.as_bytes());
    push_field(out, "Via", via.as_deref().unwrap_or_default());
    out.extend_from_slice(b"\r\n");
}

/// The response head as sent to the client; `close` adds `Connection: close`,
/// `keep_alive_10` adds `Connection: keep-alive` for HTTP/1.0 clients that asked for it.
pub fn client_response(head: &ResponseHead, close: bool, keep_alive_10: bool, out: &mut Vec<u8>) {
    let _ = write!(
        Bytes(out),
        "HTTP/1.1 {} {}\r\n",
        head.status,
        sanitize_reason(&head.reason)
    );
    let listed = connection_listed(&head.headers);
    let mut via: Option<Vec<u8>> = None;
    for (name, value) in &head.headers {
        if hop_by_hop(name, &listed) {
            continue;
        }
        if name.eq_ignore_ascii_case("via") {
            join_into(&mut via, value);
            continue;
        }
        push_field(out, name, value);
    }
    join_into(&mut via, VIA.as_bytes());
    push_field(out, "Via", via.as_deref().unwrap_or_default());
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if keep_alive_10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A response the edge makes itself (errors, 100 Continue is separate); a response to HEAD
/// (`head`) says the length but carries no body.
pub fn local_response(status: u16, body: &str, close: bool, head: bool, out: &mut Vec<u8>) {
    let _ = write!(
        Bytes(out),
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nVia: {VIA}\r\n{}\r\n{}",
        reason(status),
        body.len(),
        if close { "Connection: close\r\n" } else { "" },
        if head { "" } else { body },
    );
}

pub const CONTINUE_100: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

pub fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

fn sanitize_reason(r: &str) -> String {
    r.chars().filter(|c| !c.is_control()).collect()
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn join_into(acc: &mut Option<Vec<u8>>, value: &[u8]) {
    match acc {
        Some(a) => {
            a.extend_from_slice(b", ");
            a.extend_from_slice(value);
        }
        None => *acc = Some(value.to_vec()),
    }
}

struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Follows a chunked body byte by byte so that the proxy forwards exactly the body and
/// nothing after it, and refuses malformed sizes before forwarding them.
#[derive(Debug, Clone, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    size: u64,
    digits: u32,
    line: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size")]
    Size,
    #[error("chunk size over 2^60")]
    Overflow,
    #[error("chunk not followed by CRLF")]
    Delimiter,
    #[error("chunk extension or trailer line too long")]
    LineTooLong,
}

const MAX_CHUNK_LINE: usize = 4096;

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consume as much of `input` as belongs to the body; returns how many bytes did.
    /// Stops at the end of the body (the rest belongs to the next message).
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() && self.state != ChunkState::Done {
            if self.state == ChunkState::Data {
                let take = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = ChunkState::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = match self.state {
                ChunkState::Size => match hex(b) {
                    Some(d) => {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(ChunkError::Overflow);
                        }
                        self.size = self.size * 16 + u64::from(d);
                        ChunkState::Size
                    }
                    None if self.digits == 0 => return Err(ChunkError::Size),
                    None if b == b';' => {
                        self.line = 0;
                        ChunkState::Ext
                    }
                    None if b == b'\r' => ChunkState::SizeLf,
                    None => return Err(ChunkError::Size),
                },
                ChunkState::Ext => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err(ChunkError::LineTooLong);
                    }
                    match b {
                        b'\r' => ChunkState::SizeLf,
                        b'\n' => return Err(ChunkError::Delimiter),
                        b'\t' | b' '..=b'~' | 0x80.. => ChunkState::Ext,
                        _ => return Err(ChunkError::Size),
                    }
                }
                ChunkState::SizeLf if b == b'\n' => {
                    self.digits = 0;
                    if self.size == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data
                    }
                }
                ChunkState::DataCr if b == b'\r' => ChunkState::DataLf,
                ChunkState::DataLf if b == b'\n' => ChunkState::Size,
                ChunkState::TrailerStart if b == b'\r' => ChunkState::EndLf,
                ChunkState::TrailerStart | ChunkState::TrailerLine => {
                    self.line = if self.state == ChunkState::TrailerStart {
                        0
                    } else {
                        self.line + 1
                    };
                    if self.line > MAX_CHUNK_LINE {
                        return Err(ChunkError::LineTooLong);
                    }
                    match b {
                        b'\r' => ChunkState::TrailerLf,
                        b'\n' => return Err(ChunkError::Delimiter),
                        _ => ChunkState::TrailerLine,
                    }
                }
                ChunkState::TrailerLf if b == b'\n' => ChunkState::TrailerStart,
                ChunkState::EndLf if b == b'\n' => ChunkState::Done,
                _ => return Err(ChunkError::Delimiter),
            };
        }
        Ok(i)
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Result<Option<RequestHead>, RequestError> {
        parse_request(s.as_bytes(), 8192)
    }

    #[test]
    fn a_simple_get_parses_with_host_and_keep_alive() {
        let h = req("GET /app/hello/x?y=1 HTTP/1.1\r\nHost: Hello.Example:8080\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/app/hello/x?y=1");
        assert_eq!(h.host.as_deref(), Some("hello.example"));
        assert_eq!(h.framing, Framing::None);
        assert!(h.keep_alive);
        assert_eq!(
            h.len,
            "GET /app/hello/x?y=1 HTTP/1.1\r\nHost: Hello.Example:8080\r\n\r\n".len()
        );
    }

    #[test]
    fn partial_heads_wait_and_oversized_ones_are_431() {
        assert_eq!(req("GET / HTTP/1.1\r\nHost: a\r\n").unwrap(), None);
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000));
        assert_eq!(req(&big).unwrap_err().status(), 431);
        let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..70 {
            many.push_str(&format!("X-{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(req(&many).unwrap_err(), RequestError::TooManyHeaders);
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let cases = [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "GET x HTTP/1.1\r\nHost: a\r\n\r\n",
        ];
        for c in cases {
            assert!(req(c).is_err(), "accepted: {c:?}");
        }
    }

    #[test]
    fn lengths_and_chunked_are_recognized() {
        let h = req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(12));
        let h = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        let h = req("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
    }

    #[test]
    fn absolute_form_uses_its_authority() {
        let h = req("GET http://hello.mesh:80/x HTTP/1.1\r\nHost: other\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.host.as_deref(), Some("hello.mesh"));
        assert_eq!(h.target, "/x");
    }

    #[test]
    fn responses_without_bodies_and_until_close() {
        let r = |s: &str, head| parse_response(s.as_bytes(), 8192, head).unwrap().unwrap();
        assert_eq!(
            r("HTTP/1.1 204 No Content\r\n\r\n", false).framing,
            Framing::None
        );
        assert_eq!(
            r(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                false
            )
            .framing,
            Framing::None
        );
        assert_eq!(
            r("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).framing,
            Framing::None
        );
        let u = r("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(u.framing, Framing::UntilClose);
        assert!(!u.keep_alive);
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                8192,
                false
            )
            .is_err()
        );
    }

    #[test]
    fn upstream_head_drops_hop_by_hop_and_adds_forwarding_fields() {
        let h = req("GET /app/a/x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nExpect: 100-continue\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\nVia: 1.0 other\r\nAccept: */*\r\n\r\n")
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        upstream_request(&h, "/x", "127.0.0.9".parse().unwrap(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /x HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nX-Forwarded-For: 10.0.0.1, 127.0.0.9\r\nX-Forwarded-Proto: http\r\nVia: 1.0 other, 1.1 mesh-edge\r\n\r\n"
        );
    }

    #[test]
    fn framing_fields_listed_in_connection_are_still_forwarded() {
        let h = req("POST /x HTTP/1.1\r\nHost: a\r\nConnection: Content-Length, Host, X-A\r\nContent-Length: 3\r\nX-A: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        upstream_request(&h, "/x", "127.0.0.1".parse().unwrap(), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(text.contains("Host: a\r\n"), "{text}");
        assert!(!text.contains("X-A"), "{text}");
    }

    #[test]
    fn chunked_decoder_stops_exactly_at_the_end() {
        let body = b"5\r\nhello\r\n0;ext=1\r\nTrailer: x\r\n\r\nGET /next";
        let mut d = ChunkedDecoder::new();
        let n = d.feed(body).unwrap();
        assert!(d.done());
        assert_eq!(&body[n..], b"GET /next");
        // byte by byte gives the same answer
        let mut d = ChunkedDecoder::new();
        let mut total = 0;
        for b in body.iter() {
            if d.done() {
                break;
            }
            total += d.feed(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(total, n);
    }

    #[test]
    fn chunked_decoder_refuses_bad_sizes_and_delimiters() {
        for bad in [
            &b"x\r\n"[..],
            b"-1\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"ffffffffffffffffff\r\n",
            b"\r\n",
            b" 5\r\n",
            b"5 \r\n",
        ] {
            assert!(ChunkedDecoder::new().feed(bad).is_err(), "accepted {bad:?}");
        }
    }
}
