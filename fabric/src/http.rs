//! The fabric's HTTP side (hyper): the blob API and Prometheus metrics.
//!
//! - `PUT /v1/blobs/sha256:<hex>`: upload; the bytes must hash to the digest in the path.
//! - `GET|HEAD /v1/blobs/sha256:<hex>`: download, with `Range: bytes=` for resuming; a full
//!   download is hashed while it streams and aborted if the stored bytes are corrupt.
//! - `GET /metrics`, `GET /healthz`: no token needed.
//!
//! Blob requests need `Authorization: Bearer <token>`: uploads a deployer or admin token,
//! downloads any role.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use mesh_common::Digest;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncSeekExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;

use crate::Shared;
use crate::auth::{self, Access};

type RespBody = BoxBody<Bytes, io::Error>;

/// Largest blob accepted: the biggest spore the format allows, plus its header room.
const MAX_BLOB: u64 = mesh_common::manifest::MAX_TOTAL_BYTES + (2 << 20);

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("http accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<RespBody> {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => metrics(&shared).await,
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
        (_, p) if p.starts_with("/v1/blobs/") => blob(&shared, req, &p["/v1/blobs/".len()..]).await,
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; the fabric serves /v1/blobs/sha256:<hex>, /metrics and /healthz",
        ),
    };
    Ok(resp)
}

async fn metrics(shared: &Shared) -> Response<RespBody> {
    let st = shared.state.read().await;
    let subs = st.subscribers.lock().map(|s| s.count()).unwrap_or(0) as u64;
    let gauges = [
        (
            "mesh_fabric_revision",
            "Current revision of the fabric's state.",
            st.rev,
        ),
        ("mesh_fabric_plans", "Plans stored.", st.plans.len() as u64),
        (
            "mesh_fabric_budgets",
            "Budgets stored.",
            st.budgets.len() as u64,
        ),
        (
            "mesh_fabric_endpoints",
            "Endpoints registered.",
            st.endpoints.len() as u64,
        ),
        (
            "mesh_fabric_nodes",
            "Nodes registered.",
            st.nodes.len() as u64,
        ),
        ("mesh_fabric_leases", "Live leases.", st.leases.len() as u64),
        ("mesh_fabric_subscriptions", "Live subscriptions.", subs),
    ];
    drop(st);
    let mut r = text(StatusCode::OK, shared.metrics.render(&gauges));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

async fn blob(shared: &Arc<Shared>, req: Request<Incoming>, name: &str) -> Response<RespBody> {
    let digest: Digest = match name.parse() {
        Ok(d) => d,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let access = if req.method() == Method::PUT {
        Access::Deploy
    } else {
        Access::Read
    };
    if let Err(resp) = authorize(shared, &req, access).await {
        return resp;
    }
    match *req.method() {
        Method::PUT => upload(shared, req, digest).await,
        Method::GET | Method::HEAD => download(shared, &req, digest).await,
        _ => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "blobs take GET, HEAD and PUT",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, PUT"));
            r
        }
    }
}

async fn authorize(
    shared: &Shared,
    req: &Request<Incoming>,
    access: Access,
) -> Result<(), Response<RespBody>> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <token>",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Err(r);
    };
    let role = shared
        .state
        .read()
        .await
        .tokens
        .get(&auth::token_hash(token))
        .map(|r| r.role);
    match role {
        None => Err(text(StatusCode::UNAUTHORIZED, "token not valid")),
        Some(role) if !auth::allows(role, access) => Err(text(
            StatusCode::FORBIDDEN,
            format!("role {role} may not upload blobs; use a deployer or admin token"),
        )),
        Some(_) => Ok(()),
    }
}

async fn upload(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    digest: Digest,
) -> Response<RespBody> {
    if shared.content.contains(&digest) {
        // Drain nothing: the client may stop sending; the blob is already here.
        return text(StatusCode::OK, digest.to_string());
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BLOB) {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("blobs are at most {MAX_BLOB} bytes"),
        );
    }
    let (std_file, temp) = match shared.content.begin_ingest() {
        Ok(x) => x,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let result = receive(shared, req.into_body(), std_file, &temp, digest).await;
    match result {
        Ok(size) => {
            tracing::info!(%digest, size, "blob stored");
            let mut r = text(StatusCode::CREATED, digest.to_string());
            if let Ok(v) = HeaderValue::from_str(&format!("/v1/blobs/{digest}")) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Err((status, msg)) => {
            let _ = tokio::fs::remove_file(&temp).await;
            tracing::info!(%digest, "blob upload refused: {msg}");
            text(status, msg)
        }
    }
}

async fn receive(
    shared: &Arc<Shared>,
    mut body: Incoming,
    std_file: std::fs::File,
    temp: &std::path::Path,
    digest: Digest,
) -> Result<u64, (StatusCode, String)> {
    let internal = |e: String| (StatusCode::INTERNAL_SERVER_ERROR, e);
    let mut file = tokio::fs::File::from_std(std_file);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| (StatusCode::BAD_REQUEST, format!("upload interrupted: {e}")))?;
        if let Ok(data) = frame.into_data() {
            size += data.len() as u64;
            if size > MAX_BLOB {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("blobs are at most {MAX_BLOB} bytes"),
                ));
            }
            hasher.update(&data);
            file.write_all(&data)
                .await
                .map_err(|e| internal(e.to_string()))?;
        }
    }
    let actual = Digest::from_bytes(hasher.finalize().into());
    if actual != digest {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "upload does not match its digest: the path says {digest}, the {size} bytes hash to {actual}"
            ),
        ));
    }
    file.flush().await.map_err(|e| internal(e.to_string()))?;
    let std_file = file.into_std().await;
    let content = shared.content.clone();
    let temp = temp.to_path_buf();
    tokio::task::spawn_blocking(move || content.finish_ingest(std_file, &temp, &digest))
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(|e| internal(e.to_string()))?;
    shared.metrics.blob_bytes_in.fetch_add(size, Relaxed);
    Ok(size)
}

/// A requested byte range, inclusive.
#[derive(Debug, PartialEq, Eq)]
enum Range {
    Full,
    Part(u64, u64),
    Unsatisfiable,
}

/// Parses a single `bytes=` range against a blob of `len` bytes; anything else is served whole.
fn parse_range(header: Option<&str>, len: u64) -> Range {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Range::Full;
    };
    if spec.contains(',') {
        return Range::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Range::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let r = match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(start), Ok(end)) if start <= end => Some((start, end.min(len.saturating_sub(1)))),
        (Ok(start), Err(_)) if b.is_empty() => Some((start, len.saturating_sub(1))),
        (Err(_), Ok(suffix)) if a.is_empty() && suffix > 0 => {
            Some((len.saturating_sub(suffix), len.saturating_sub(1)))
        }
        _ => return Range::Full,
    };
    match r {
        Some((start, end)) if start < len && start <= end => Range::Part(start, end),
        _ => Range::Unsatisfiable,
    }
}

async fn download(
    shared: &Arc<Shared>,
    req: &Request<Incoming>,
    digest: Digest,
) -> Response<RespBody> {
    let path = shared.content.path(&digest);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return text(
                StatusCode::NOT_FOUND,
                format!("blob {digest} is not in the content repository"),
            );
        }
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let range = parse_range(
        req.headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok()),
        len,
    );
    let (status, start, count) = match range {
        Range::Full => (StatusCode::OK, 0, len),
        Range::Part(s, e) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
        Range::Unsatisfiable => {
            let mut r = text(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the blob has {len} bytes"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    if start > 0 && file.seek(io::SeekFrom::Start(start)).await.is_err() {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "seek failed");
    }
    let body: RespBody = if req.method() == Method::HEAD {
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed()
    } else {
        shared.metrics.blob_bytes_out.fetch_add(count, Relaxed);
        FileBody {
            file,
            remaining: count,
            buf: vec![0u8; 64 * 1024],
            // Only a whole-blob read can be checked against the digest.
            check: (status == StatusCode::OK).then(|| (Sha256::new(), digest)),
        }
        .boxed()
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&count.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    r
}

/// Streams `remaining` bytes of a file, hashing a whole-blob read as it goes.
struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    buf: Vec<u8>,
    check: Option<(Sha256, Digest)>,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = this.remaining.min(this.buf.len() as u64) as usize;
        let mut rb = ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob shrank while sending",
                    ))));
                }
                let data = Bytes::copy_from_slice(rb.filled());
                this.remaining -= n as u64;
                if let Some((hasher, _)) = &mut this.check {
                    hasher.update(&data);
                }
                if this.remaining == 0
                    && let Some((hasher, digest)) = this.check.take()
                {
                    let actual = Digest::from_bytes(hasher.finalize().into());
                    if actual != digest {
                        tracing::error!(%digest, %actual, "blob is corrupt on disk; aborting the download");
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "blob is corrupt on disk",
                        ))));
                    }
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 100), Range::Full);
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Range::Part(0, 9));
        assert_eq!(parse_range(Some("bytes=90-"), 100), Range::Part(90, 99));
        assert_eq!(parse_range(Some("bytes=-10"), 100), Range::Part(90, 99));
        assert_eq!(parse_range(Some("bytes=50-500"), 100), Range::Part(50, 99));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Range::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Range::Full);
        assert_eq!(parse_range(Some("items=0-1"), 100), Range::Full);
        assert_eq!(parse_range(Some("bytes=9-1"), 100), Range::Full);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Range::Unsatisfiable);
    }
}
