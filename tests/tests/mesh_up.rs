//! `mesh up` end to end, as a newcomer runs it: the real binary brings up fabric, agent and
//! edge; hello answers through the edge; then, under a constant request loop: a blue/green
//! rollout v1 -> v2, a kill -9 of an instance, a kill -9 of the agent (restarted by `mesh up`,
//! no spore restarted); zero failed requests throughout; Ctrl-C leaves nothing running.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_tests::edge::RawClient;
use mesh_tests::{ChildGuard, bin, free_port, wait_until};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

struct Up {
    child: ChildGuard,
    out: Arc<Mutex<String>>,
    data: PathBuf,
    home: PathBuf,
    edge: u16,
}

impl Up {
    fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.data.join("agent.log")).unwrap_or_default()
    }

    fn wait(&self, what: &str, timeout: Duration, f: impl FnMut() -> bool) {
        assert!(
            wait_until(timeout, f),
            "{what}: timed out\n--- mesh up ---\n{}\n--- agent.log (end) ---\n{}",
            self.output(),
            tail(&self.agent_log(), 40)
        );
    }

    /// A client command run the way a user would, with no flags: `mesh up` left the config.
    fn mesh(&self, args: &[&str]) -> String {
        let out = Command::new(bin("mesh"))
            .args(args)
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env_remove("MESH_FABRIC")
            .env_remove("MESH_TOKEN")
            .env_remove("MESH_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mesh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// (instance, state, pid, digest) of every instance.
    fn ps(&self) -> Vec<(String, String, u32, String, u64)> {
        let v: serde_json::Value = serde_json::from_str(&self.mesh(&["ps", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["instance"].is_string())
            .map(|r| {
                (
                    r["instance"].as_str().unwrap().to_string(),
                    r["state"].as_str().unwrap_or_default().to_string(),
                    r["pid"].as_u64().unwrap_or(0) as u32,
                    r["digest"].as_str().unwrap_or_default().to_string(),
                    r["restarts"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Running, not a zombie waiting for its parent (spores adopted by a restarted agent are
/// children of init, which reaps them in its own time).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// Keep-alive GET loops through the edge, counting answers and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    last: Arc<Mutex<String>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let last = Arc::new(Mutex::new(String::new()));
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let threads = (0..3)
            .map(|_| {
                let (stop, ok, failed, last) =
                    (stop.clone(), ok.clone(), failed.clone(), last.clone());
                std::thread::spawn(move || {
                    let mut c = RawClient::connect(addr);
                    while !stop.load(Ordering::Relaxed) {
                        c.send(b"GET /app/hello/ HTTP/1.1\r\nHost: t\r\n\r\n");
                        match c.response(false) {
                            Some(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                *last.lock().unwrap() = r.body_text();
                            }
                            other => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                eprintln!("failed request: {other:?}");
                                c = RawClient::connect(addr);
                            }
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            last,
            threads,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[test]
fn mesh_up_serves_hello_through_rollouts_and_crashes_and_stops_clean() {
    if !is_root() {
        eprintln!("skipped: mesh up runs spores, which needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let (fl, fh, edge, admin, metrics) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let cgroup_name = format!("mesh-test-up-{}", std::process::id());
    let mut child = ChildGuard::spawn(
        Command::new(bin("mesh"))
            .arg("up")
            .arg("--data")
            .arg(&data)
            .args(["--fabric-listen", &format!("127.0.0.1:{fl}")])
            .args(["--fabric-http", &format!("127.0.0.1:{fh}")])
            .args(["--listen", &format!("127.0.0.1:{edge}")])
            .args(["--edge-admin", &format!("127.0.0.1:{admin}")])
            .args(["--agent-metrics", &format!("127.0.0.1:{metrics}")])
            .args(["--cgroup-name", &cgroup_name])
            .arg("--example")
            .arg(bin("hello"))
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env_remove("MESH_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    );
    let out = Arc::new(Mutex::new(String::new()));
    let stdout = child.0.stdout.take().unwrap();
    let o = out.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut o = o.lock().unwrap();
            o.push_str(&line);
            o.push('\n');
        }
    });
    let up = Up {
        child,
        out,
        data: data.clone(),
        home,
        edge,
    };
    up.wait(
        "hello answering through the edge",
        Duration::from_secs(120),
        || up.output().contains("hello answers through the edge"),
    );
    let screen = up.output();
    assert!(
        screen.contains(&format!("curl http://127.0.0.1:{edge}/app/hello/")),
        "{screen}"
    );
    assert!(screen.contains("hello from hello"), "{screen}");
    eprintln!("--- first screen ---\n{screen}");

    // other commands work without flags
    let ps = up.ps();
    assert_eq!(ps.iter().filter(|r| r.1 == "ready").count(), 2, "{ps:?}");
    let v1 = ps[0].3.clone();

    let load = Load::start(up.edge);
    up.wait("the load loop running", Duration::from_secs(10), || {
        load.ok() > 100
    });

    // mesh top finds the node through the fabric (NODE.LIST metrics=) and samples it
    let top: serde_json::Value =
        serde_json::from_str(&up.mesh(&["top", "--once", "--json"])).unwrap();
    let rows = top["instances"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{top}");
    for r in rows {
        assert_eq!(r["app"], "hello");
        assert!(r["cpu_percent"].is_number(), "no CPU % in {r}");
        assert!(
            r["rx_bytes_per_s"].as_f64().is_some_and(|x| x > 0.0),
            "no rx rate under load in {r}"
        );
    }

    // blue/green v1 -> v2
    let spore = dir.path().join("hello-2.0.0.spore");
    let key = data.join("keys/mesh.key");
    up.mesh(&[
        "spore",
        "pack",
        bin("hello").to_str().unwrap(),
        "--name",
        "hello",
        "--version",
        "2.0.0",
        "--key",
        key.to_str().unwrap(),
        "--user",
        "mesh-spore",
        "--health-path",
        "/health",
        "--env",
        "HELLO_VERSION=2.0.0",
        "-o",
        spore.to_str().unwrap(),
    ]);
    let v2 = up
        .mesh(&["spore", "push", spore.to_str().unwrap()])
        .trim()
        .to_string();
    up.mesh(&[
        "deploy",
        "hello",
        &v2,
        "--min",
        "2",
        "--min-healthy-ms",
        "300",
        "--drain-ms",
        "1000",
    ]);
    up.wait(
        "v2 serving on both instances, v1 gone",
        Duration::from_secs(90),
        || {
            let ps = up.ps();
            ps.iter().filter(|r| r.1 == "ready" && r.3 == v2).count() == 2
                && !ps.iter().any(|r| r.3 == v1)
                && load.last.lock().unwrap().contains("v2.0.0")
        },
    );
    assert_eq!(load.failed(), 0, "requests failed during the rollout");

    // kill -9 one instance under load: the edge retries idempotent GETs elsewhere
    let victim = up.ps().into_iter().find(|r| r.1 == "ready").unwrap();
    // SAFETY: kill(2) of a spore this test's `mesh up` started.
    unsafe { libc::kill(victim.2 as i32, libc::SIGKILL) };
    up.wait(
        "the killed instance restarted and Ready",
        Duration::from_secs(60),
        || {
            up.ps()
                .iter()
                .any(|r| r.0 == victim.0 && r.1 == "ready" && r.2 != victim.2 && r.4 >= 1)
        },
    );
    let before_agent = load.ok();
    up.wait("more requests served", Duration::from_secs(10), || {
        load.ok() > before_agent + 100
    });
    assert_eq!(
        load.failed(),
        0,
        "requests failed around the instance crash"
    );

    // kill -9 the agent: `mesh up` restarts it, it re-adopts, no spore restarts
    let pids: Vec<(String, u32)> = up.ps().into_iter().map(|r| (r.0, r.2)).collect();
    let agent_pid: i32 = std::fs::read_to_string(data.join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) of the agent this test's `mesh up` started.
    unsafe { libc::kill(agent_pid, libc::SIGKILL) };
    up.wait(
        "a new agent re-adopted both instances",
        Duration::from_secs(60),
        || {
            let new_pid = std::fs::read_to_string(data.join("agent.pid")).unwrap_or_default();
            new_pid.trim().parse::<i32>().is_ok_and(|p| p != agent_pid)
                && up
                    .agent_log()
                    .matches("re-adopted a running instance")
                    .count()
                    >= 2
        },
    );
    let served = load.ok();
    up.wait(
        "more requests served after the agent restart",
        Duration::from_secs(10),
        || load.ok() > served + 200,
    );
    let after: Vec<(String, u32)> = up.ps().into_iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(after, pids, "a spore was restarted with the agent");
    let (ok, failed) = load.finish();
    assert_eq!(failed, 0, "requests failed around the agent restart");
    eprintln!("{ok} requests, none failed");

    // Ctrl-C: everything stops, nothing is left
    let Up { mut child, out, .. } = up;
    // SAFETY: SIGINT to our own child, not yet reaped.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    let stopped = wait_until(Duration::from_secs(90), || {
        child.0.try_wait().unwrap().is_some()
    });
    assert!(stopped, "mesh up did not stop:\n{}", out.lock().unwrap());
    assert!(child.0.wait().unwrap().success());
    for (_, pid) in &after {
        assert!(
            !alive(*pid),
            "spore {pid} still running after mesh up stopped"
        );
    }
    let layout = mesh_agent::cgroup::Layout::detect().unwrap();
    let root = mesh_agent::cgroup::CgroupRoot::new_root(&layout, &cgroup_name);
    assert!(!root.v2.exists(), "{} left behind", root.v2.display());
    for d in root.v1.values() {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    // Nothing accepts on the edge's port any more. (A connect may "succeed" by connecting to
    // itself when the kernel picks the same port as the source: that is not the edge.)
    for _ in 0..5 {
        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", edge)) {
            assert_eq!(
                s.local_addr().ok(),
                s.peer_addr().ok(),
                "something still accepts on the edge port {edge}"
            );
        }
    }
}
