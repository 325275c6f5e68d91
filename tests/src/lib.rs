//! End-to-end tests of Mycelium Mesh: they run the real `mesh` and example binaries built by
//! the same `cargo test --workspace` invocation, with real processes, files and sockets.
//!
//! This library holds what the tests share: finding the binaries, free ports, and a guard
//! that never leaves a child process behind.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Path of a binary built into the same target directory as the running test.
///
/// `cargo test --workspace` builds every package's binaries before running any test
/// (packages with integration tests get their binaries built), so they are found next to
/// the test's own `deps/` directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo build --workspace --bins`; `cargo xtask test` does)",
        path.display()
    );
    path
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A child process that is killed and reaped when the guard drops.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> Self {
        ChildGuard(cmd.spawn().expect("spawn child"))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Only our own child, by its handle: std's kill uses the pid we hold as its parent,
        // and reaping it right after means the pid cannot have been reused.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends one HTTP/1.1 GET with `Connection: close` and returns (status code, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {raw:?}")))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A `mesh fabric` process on free loopback ports with its own data dir.
pub struct FabricProcess {
    pub child: ChildGuard,
    pub line: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
    pub data: PathBuf,
}

impl FabricProcess {
    /// Starts a fabric and waits until it accepts connections.
    pub fn start(data: &std::path::Path) -> FabricProcess {
        let line = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let http = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Self::start_on(data, line, http)
    }

    pub fn start_on(
        data: &std::path::Path,
        line: std::net::SocketAddr,
        http: std::net::SocketAddr,
    ) -> FabricProcess {
        let child = ChildGuard::spawn(
            Command::new(bin("mesh"))
                .args([
                    "fabric",
                    "--listen",
                    &line.to_string(),
                    "--http",
                    &http.to_string(),
                    "--data",
                ])
                .arg(data)
                .env("MESH_LOG", "warn")
                .stdout(std::process::Stdio::null()),
        );
        let up = wait_until(Duration::from_secs(20), || TcpStream::connect(line).is_ok());
        assert!(up, "mesh fabric did not start listening on {line}");
        FabricProcess {
            child,
            line,
            http,
            data: data.to_path_buf(),
        }
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_string()
    }

    pub fn client_config(&self) -> mesh_common::client::ClientConfig {
        mesh_common::client::ClientConfig {
            fabric: self.line.to_string(),
            token: self.token(),
        }
    }

    /// SIGKILL, as a crash: no shutdown code runs.
    pub fn kill9(mut self) -> (std::net::SocketAddr, std::net::SocketAddr) {
        let pid = self.child.0.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child, which we have not reaped yet (so the pid is
        // still ours); std's Child::kill sends SIGKILL too, but this spells the intent.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = self.child.0.wait();
        (self.line, self.http)
    }
}
