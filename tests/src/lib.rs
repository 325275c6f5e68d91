//! End-to-end tests of Mycelium Mesh: they run the real `mesh` and example binaries built by
//! the same `cargo test --workspace` invocation, with real processes, files and sockets.
//!
//! This library holds what the tests share: finding the binaries, free ports, and a guard
//! that never leaves a child process behind.

pub mod edge;

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

/// A `mesh agent` process (it must run as root) with its output appended to
/// `<state dir>.log`; dropping it SIGKILLs the agent (its spores keep running: clean them up
/// with [`CgroupRootGuard`]). When dropped during a panic it prints the end of its log.
pub struct AgentProcess {
    pub child: ChildGuard,
    pub node: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl AgentProcess {
    /// Starts `mesh agent --node NODE --state STATE --trust TRUST --cgroup-root CGROUP_ROOT`
    /// with a 1.5 s lease and the spores' user `mesh-spore` mapped to nobody, and waits until
    /// it has registered its node with the fabric.
    pub fn start(
        fabric: &FabricProcess,
        node: &str,
        state_dir: &std::path::Path,
        trust_file: &std::path::Path,
        cgroup_root: &str,
    ) -> AgentProcess {
        Self::start_with(fabric, node, state_dir, trust_file, cgroup_root, &[])
    }

    /// [`AgentProcess::start`] with more flags (e.g. `--port-range`).
    pub fn start_with(
        fabric: &FabricProcess,
        node: &str,
        state_dir: &std::path::Path,
        trust_file: &std::path::Path,
        cgroup_root: &str,
        extra: &[&str],
    ) -> AgentProcess {
        let mut name = state_dir.as_os_str().to_os_string();
        name.push(".log");
        let log = PathBuf::from(name);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("agent log file");
        // A restarted agent appends: only what this one writes counts.
        let from = out.metadata().map(|m| m.len()).unwrap_or(0);
        let child = ChildGuard::spawn(
            Command::new(bin("mesh"))
                .arg("agent")
                .args(["--fabric", &fabric.line.to_string()])
                .args(["--token", &fabric.token()])
                .args(["--node", node])
                .arg("--state")
                .arg(state_dir)
                .arg("--trust")
                .arg(trust_file)
                .args(["--cgroup-root", cgroup_root])
                .args(["--user", "mesh-spore=65534:65534"])
                .args(["--lease-ttl-ms", "1500"])
                .args(["--metrics", "127.0.0.1:0"])
                .args(extra)
                .env("MESH_LOG", "info")
                .env_remove("MESH_FABRIC")
                .env_remove("MESH_TOKEN")
                .env_remove("MESH_CONFIG")
                .stdin(std::process::Stdio::null())
                .stdout(out.try_clone().expect("dup agent log"))
                .stderr(out),
        );
        let mut agent = AgentProcess {
            child,
            node: node.to_string(),
            log,
        };
        let mut exited = None;
        let up = wait_until(Duration::from_secs(30), || {
            if let Ok(Some(status)) = agent.child.0.try_wait() {
                exited = Some(status);
                return true;
            }
            agent.log_since(from).contains("node registered")
        });
        if let Some(status) = exited {
            panic!(
                "mesh agent {node} exited ({status}) before registering:\n{}",
                agent.log_text()
            );
        }
        assert!(
            up,
            "mesh agent {node} did not register with the fabric in 30 s:\n{}",
            agent.log_text()
        );
        agent
    }

    /// The whole log (of every run that appended to it).
    pub fn log_text(&self) -> String {
        self.log_since(0)
    }

    /// The log from byte `offset` on.
    pub fn log_since(&self, offset: u64) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        let start = (offset as usize).min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// The log's current length, to read only what comes after with [`AgentProcess::log_since`].
    pub fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// SIGKILL, as a crash: the agent's spores keep running.
    pub fn kill9(&mut self) {
        // SAFETY: kill(2) on our own child, not reaped yet (so the pid is still ours).
        unsafe { libc::kill(self.child.0.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.0.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(300)..];
            eprintln!(
                "---- log of mesh agent {} ({}), last {} lines ----\n{}\n---- end of the log of {} ----",
                self.node,
                self.log.display(),
                tail.len(),
                tail.join("\n"),
                self.node
            );
        }
    }
}

/// The cgroup root that `mesh agent --cgroup-root NAME` started by this process creates (its
/// children inherit our cgroups): in a pure v2 system beside our own cgroup, on a hybrid host
/// below our own cgroup in the v2 and in each v1 (cpu, memory, pids) hierarchy. The same
/// computation as the agent's.
pub fn agent_cgroup_root(name: &str) -> std::io::Result<mesh_agent::cgroup::CgroupRoot> {
    use mesh_agent::cgroup::{CgroupRoot, Layout, Mode};
    let layout = Layout::detect().map_err(std::io::Error::other)?;
    let own = CgroupRoot::own(&layout);
    Ok(match (layout.mode, own.parent()) {
        (Mode::Unified, Some(parent)) => parent.child(name),
        _ => own.child(name),
    })
}

/// Kills every process in the agent cgroup root `name` (see [`agent_cgroup_root`]) and removes
/// its directories in every hierarchy ([`CgroupRoot::remove_tree`]). Fine if the root does not
/// exist.
///
/// [`CgroupRoot::remove_tree`]: mesh_agent::cgroup::CgroupRoot::remove_tree
pub fn cleanup_cgroup_root(name: &str) -> std::io::Result<()> {
    mesh_common::model::check_name("cgroup root", name).map_err(std::io::Error::other)?;
    agent_cgroup_root(name)?.remove_tree()
}

/// Runs [`cleanup_cgroup_root`] when dropped (also when a test fails), unless
/// [`CgroupRootGuard::finish`] already did. Declare it before the agents that use the root, so
/// that they are killed (dropped) first.
pub struct CgroupRootGuard {
    name: String,
    done: bool,
}

impl CgroupRootGuard {
    /// A guard for the cgroup root `mesh-e2e-<pid>-<tag>` (unique per test process and tag).
    pub fn new(tag: &str) -> CgroupRootGuard {
        CgroupRootGuard {
            name: format!("mesh-e2e-{}-{tag}", std::process::id()),
            done: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Cleans up now and reports whether it worked.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.done = true;
        cleanup_cgroup_root(&self.name)
    }
}

impl Drop for CgroupRootGuard {
    fn drop(&mut self) {
        if !self.done
            && let Err(e) = cleanup_cgroup_root(&self.name)
        {
            eprintln!("cleaning up cgroup root {}: {e}", self.name);
        }
    }
}
