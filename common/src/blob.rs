//! Client of the fabric's blob HTTP API: upload and (resumable) download by digest.
//!
//! A deliberately small HTTP/1.1 client for one server we control: one request per
//! connection, `Content-Length` bodies, `Range` to resume. Every download is hashed and only
//! renamed into place when its digest matches.

use std::path::Path;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob URL {0:?} is not http://HOST:PORT")]
    Url(String),
    #[error("cannot reach the blob service at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("blob transfer: {0}")]
    Io(#[from] std::io::Error),
    #[error("the blob service answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("malformed HTTP response: {0}")]
    Http(String),
    #[error("downloaded bytes hash to {actual}, not {expected}; the partial file was removed")]
    Mismatch { expected: Digest, actual: Digest },
}

fn host_port(url: &str) -> Result<String, BlobError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| BlobError::Url(url.to_string()))?;
    let hp = rest.trim_end_matches('/');
    if hp.is_empty() || hp.contains('/') {
        return Err(BlobError::Url(url.to_string()));
    }
    Ok(hp.to_string())
}

async fn connect(url: &str) -> Result<(TcpStream, String), BlobError> {
    let addr = host_port(url)?;
    let s = TcpStream::connect(&addr)
        .await
        .map_err(|source| BlobError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = s.set_nodelay(true);
    Ok((s, addr))
}

/// Status, headers (lower-cased names) and the reader positioned at the body.
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> Result<u64, BlobError> {
        self.header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| BlobError::Http("no Content-Length".into()))
    }
}

async fn read_head(r: &mut BufReader<TcpStream>) -> Result<Head, BlobError> {
    let mut raw = Vec::new();
    loop {
        let b = r.read_u8().await?;
        raw.push(b);
        if raw.ends_with(b"\r\n\r\n") {
            break;
        }
        if raw.len() > 16 * 1024 {
            return Err(BlobError::Http("response head over 16 KiB".into()));
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| BlobError::Http(format!("status line {status_line:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Head { status, headers })
}

async fn read_error_body(r: &mut BufReader<TcpStream>, head: &Head) -> String {
    let n = head.content_length().unwrap_or(0).min(4096);
    let mut body = vec![0u8; n as usize];
    let _ = r.read_exact(&mut body).await;
    String::from_utf8_lossy(&body).trim().to_string()
}

/// Uploads `file` as blob `digest`. `progress` gets bytes sent so far.
pub async fn push(
    url: &str,
    token: &str,
    file: &Path,
    digest: &Digest,
    mut progress: impl FnMut(u64),
) -> Result<(), BlobError> {
    let mut f = tokio::fs::File::open(file).await?;
    let len = f.metadata().await?.len();
    let (stream, addr) = connect(url).await?;
    let mut stream = BufReader::new(stream);
    let head = format!(
        "PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    stream.get_mut().write_all(head.as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        // A server that refuses early (auth, size) may close before we finish sending.
        if stream.get_mut().write_all(&buf[..n]).await.is_err() {
            break;
        }
        sent += n as u64;
        progress(sent);
    }
    let head = read_head(&mut stream).await?;
    if !(200..300).contains(&head.status) {
        let body = read_error_body(&mut stream, &head).await;
        return Err(BlobError::Status {
            status: head.status,
            body,
        });
    }
    Ok(())
}

/// Downloads blob `digest` to `dest`, resuming from `dest` + ".part" if an earlier download
/// left one. `progress` gets (bytes so far, total).
pub async fn pull(
    url: &str,
    token: &str,
    digest: &Digest,
    dest: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, BlobError> {
    let part = dest.with_extension(match dest.extension() {
        Some(e) => format!("{}.part", e.to_string_lossy()),
        None => "part".into(),
    });
    let mut have = tokio::fs::metadata(&part)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let (stream, addr) = connect(url).await?;
    let mut stream = BufReader::new(stream);
    let range = if have > 0 {
        format!("Range: bytes={have}-\r\n")
    } else {
        String::new()
    };
    let req = format!(
        "GET /v1/blobs/{digest} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n{range}Connection: close\r\n\r\n"
    );
    stream.get_mut().write_all(req.as_bytes()).await?;
    let head = read_head(&mut stream).await?;
    let mut out = match head.status {
        206 => {
            tokio::fs::OpenOptions::new()
                .append(true)
                .open(&part)
                .await?
        }
        200 => {
            have = 0;
            tokio::fs::File::create(&part).await?
        }
        416 if have > 0 => {
            // The partial file is already whole (or bogus): check it below, restart if bad.
            tokio::fs::OpenOptions::new()
                .append(true)
                .open(&part)
                .await?
        }
        status => {
            let body = read_error_body(&mut stream, &head).await;
            return Err(BlobError::Status { status, body });
        }
    };
    let n = if head.status == 416 {
        0
    } else {
        head.content_length()?
    };
    let total = have + n;
    let mut left = n;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let got = stream.read(&mut buf[..want]).await?;
        if got == 0 {
            return Err(BlobError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("connection closed {left} bytes early; run again to resume"),
            )));
        }
        out.write_all(&buf[..got]).await?;
        left -= got as u64;
        progress(total - left, total);
    }
    out.sync_all().await?;
    drop(out);
    let actual = hash_file(&part).await?;
    if actual != *digest {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(BlobError::Mismatch {
            expected: *digest,
            actual,
        });
    }
    tokio::fs::rename(&part, dest).await?;
    Ok(total)
}

async fn hash_file(path: &Path) -> Result<Digest, BlobError> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Digest::from_bytes(h.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            host_port("http://127.0.0.1:7701").unwrap(),
            "127.0.0.1:7701"
        );
        assert_eq!(host_port("http://[::1]:7701/").unwrap(), "[::1]:7701");
        assert!(host_port("https://x:1").is_err());
        assert!(host_port("http://x:1/v1").is_err());
    }
}
