//! Health checks: HTTP GET on the spore's health path (hyper client, 2xx passes) or, without
//! a path, a TCP connect.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use tokio::net::TcpStream;

/// Checks `addr` once; `Err` says why it failed.
pub async fn check(addr: SocketAddr, path: Option<&str>, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, check_inner(addr, path)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

async fn check_inner(addr: SocketAddr, path: Option<&str>) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let Some(path) = path else {
        return Ok(());
    };
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "mesh-agent-health")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("GET {path}: {e}"));
    driver.abort();
    let status = resp?.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("GET {path}: HTTP {}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(status: &'static str) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok").as_bytes(),
                    )
                    .await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_and_tcp_checks() {
        let good = server("200 OK").await;
        let bad = server("503 Service Unavailable").await;
        let t = Duration::from_secs(2);
        assert_eq!(check(good, Some("/health"), t).await, Ok(()));
        assert_eq!(
            check(bad, Some("/health"), t).await,
            Err("GET /health: HTTP 503".into())
        );
        assert_eq!(check(bad, None, t).await, Ok(()), "TCP check only connects");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(
            check(closed, None, t)
                .await
                .unwrap_err()
                .contains("connect")
        );
    }
}
