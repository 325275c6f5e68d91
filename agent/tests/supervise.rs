//! The supervisor on a real kernel, as root: real processes, real cgroups (v1 controllers on
//! a hybrid host, pure v2 in `cargo xtask vm-test`), real users and capabilities.
//! Each test builds its own cgroup tree beside (or under) the test's own cgroup and removes
//! it at the end; every process it starts is ended through the supervisor.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mesh_agent::cgroup::{CgroupRoot, Layout, Limits, Mode};
use mesh_agent::spawn::SpawnMethod;
use mesh_agent::supervisor::{ExitEvent, ExitReason, StartSpec, Supervisor, SupervisorConfig};
use mesh_common::manifest::{Compression, FileEntry, Manifest, Nutrients, Security, Slo};
use tokio::sync::mpsc::UnboundedReceiver;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A cgroup root of this test's own, removed on drop; with a state dir and a run dir holding
/// the probe binary.
struct Fixture {
    root: CgroupRoot,
    dir: tempfile::TempDir,
    run_dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Option<Fixture> {
        if !is_root() {
            eprintln!("skipped: the supervisor tests need root");
            return None;
        }
        let layout = Layout::detect().unwrap();
        let unique = format!("mesh-test-{name}-{}", std::process::id());
        let root = CgroupRoot::new_root(&layout, &unique);
        root.create().unwrap();
        let dir = tempfile::tempdir().unwrap();
        // The spore runs as nobody: it must be able to reach its run dir.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let run_dir = dir.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        std::fs::copy(env!("CARGO_BIN_EXE_spore-probe"), run_dir.join("probe")).unwrap();
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Some(Fixture { root, dir, run_dir })
    }

    fn config(&self) -> SupervisorConfig {
        let mut c = SupervisorConfig::new(self.dir.path().join("state"), self.root.clone());
        c.users.explicit.clear();
        c
    }

    fn supervisor(&self) -> (Supervisor, UnboundedReceiver<ExitEvent>) {
        Supervisor::new(self.config()).unwrap()
    }

    fn spec(&self, instance: &str, args: &[&str], nutrients: Nutrients) -> StartSpec {
        let manifest = Manifest {
            name: "probe".into(),
            version: "1.0.0".parse().unwrap(),
            command: "./probe".into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: [("GREETING".to_string(), "hi".to_string())].into(),
            nutrients,
            slo: Slo {
                stop_grace_ms: 500,
                ..Slo::default()
            },
            security: Security {
                user: "nobody".into(),
                capabilities: vec![],
            },
            created_at: "2026-11-23T00:00:00Z".into(),
            compression: Compression::None,
            files: vec![FileEntry {
                path: "probe".into(),
                size: 0,
                mode: 0o755,
                sha256: mesh_common::Digest::of(b""),
            }],
        };
        StartSpec {
            app: "probe".into(),
            instance: instance.into(),
            digest: "sha256:0123456789abcdef".into(),
            manifest,
            run_dir: self.run_dir.clone(),
            port: Some(18123),
            app_budget: Limits::default(),
        }
    }

    fn log(&self, instance: &str) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join("state/logs/probe")
                .join(instance)
                .join("output.log"),
        )
        .unwrap_or_default()
    }

    async fn wait_log(&self, instance: &str, needle: &str) -> String {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log(instance);
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < end,
                "{needle:?} never appeared in the log: {log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Whatever a failed test left: kill it, then remove the tree bottom-up.
        let _ = self.root.remove_tree();
    }
}

async fn next_exit(rx: &mut UnboundedReceiver<ExitEvent>) -> ExitEvent {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("no exit within 30 s")
        .unwrap()
}

fn small() -> Nutrients {
    Nutrients {
        cpu_milli: 500,
        memory_mb: 64,
        pids: 32,
    }
}

/// Each live pid's pidfd; after the test all must have exited.
fn pidfds(pids: &[u32]) -> Vec<std::os::fd::OwnedFd> {
    pids.iter()
        .filter_map(|p| mesh_agent::pidfd::open(*p).ok())
        .collect()
}

#[tokio::test]
async fn exit_codes_are_reported_and_everything_is_cleaned_up() {
    let Some(fx) = Fixture::new("exit") else {
        return;
    };
    for method in [SpawnMethod::Auto, SpawnMethod::Fork] {
        let mut cfg = fx.config();
        cfg.spawn_method = method;
        let (sup, mut rx) = Supervisor::new(cfg).unwrap();
        let info = sup
            .start(fx.spec("exit-3", &["exit", "3"], small()))
            .await
            .unwrap();
        let ev = next_exit(&mut rx).await;
        assert_eq!(
            (ev.instance.as_str(), ev.reason, ev.stopped),
            ("exit-3", ExitReason::Exited(3), false),
            "{method:?}"
        );
        assert_eq!(ev.pid, info.record.pid);
        assert!(!info.record.cgroup.exists(), "instance cgroup removed");
        assert!(sup.list().is_empty());
        assert!(
            std::fs::read_dir(fx.dir.path().join("state/instances"))
                .unwrap()
                .next()
                .is_none(),
            "record removed"
        );
    }
}

#[tokio::test]
async fn a_spore_runs_unprivileged_in_a_clean_environment() {
    let Some(fx) = Fixture::new("identity") else {
        return;
    };
    let (sup, mut rx) = fx.supervisor();
    let info = sup
        .start(fx.spec("report-1", &["report"], small()))
        .await
        .unwrap();
    let log = fx.wait_log("report-1", "report done").await;
    assert!(log.contains("Uid:\t65534\t65534\t65534\t65534"), "{log}");
    assert!(log.contains("Gid:\t65534\t65534\t65534\t65534"), "{log}");
    assert!(log.contains("CapEff:\t0000000000000000"), "{log}");
    assert!(log.contains("CapPrm:\t0000000000000000"), "{log}");
    assert!(log.contains("CapBnd:\t0000000000000000"), "{log}");
    assert!(log.contains("NoNewPrivs:\t1"), "{log}");
    assert!(log.contains("session_leader: true"), "{log}");
    assert!(
        log.contains(&format!("cwd: {}", fx.run_dir.display())),
        "{log}"
    );
    let env: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("env: "))
        .collect();
    assert_eq!(
        env,
        vec!["GREETING=hi", "PORT=18123"],
        "manifest env + PORT, nothing of the agent's"
    );
    // It sits in its own cgroup, with the manifest's nutrients as limits.
    let cg = sup.tree().instance("probe", "report-1");
    assert_eq!(
        std::fs::read_to_string(cg.v2.join("cgroup.procs"))
            .unwrap()
            .trim(),
        info.record.pid.to_string()
    );
    match cg.mode {
        Mode::Unified => {
            assert_eq!(
                std::fs::read_to_string(cg.v2.join("memory.max"))
                    .unwrap()
                    .trim(),
                (64u64 << 20).to_string()
            );
            assert_eq!(
                std::fs::read_to_string(cg.v2.join("pids.max"))
                    .unwrap()
                    .trim(),
                "32"
            );
            assert_eq!(
                std::fs::read_to_string(cg.v2.join("cpu.max"))
                    .unwrap()
                    .trim(),
                "50000 100000"
            );
        }
        Mode::Hybrid => {
            let mem = &cg.v1["memory"];
            assert_eq!(
                std::fs::read_to_string(mem.join("memory.limit_in_bytes"))
                    .unwrap()
                    .trim(),
                (64u64 << 20).to_string()
            );
            assert!(
                std::fs::read_to_string(mem.join("cgroup.procs"))
                    .unwrap()
                    .contains(&info.record.pid.to_string())
            );
            assert_eq!(
                std::fs::read_to_string(cg.v1["pids"].join("pids.max"))
                    .unwrap()
                    .trim(),
                "32"
            );
            assert_eq!(
                std::fs::read_to_string(cg.v1["cpu"].join("cpu.cfs_quota_us"))
                    .unwrap()
                    .trim(),
                "50000"
            );
        }
    }
    assert_eq!(
        info.cgroup_id,
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&cg.v2).unwrap())
    );
    sup.stop("probe", "report-1", None).await.unwrap();
    assert!(next_exit(&mut rx).await.stopped);
}

#[tokio::test]
async fn stop_kills_what_ignores_sigterm_children_and_grandchildren_included() {
    let Some(fx) = Fixture::new("stubborn") else {
        return;
    };
    let (sup, mut rx) = fx.supervisor();
    sup.start(fx.spec("stubborn-1", &["stubborn"], small()))
        .await
        .unwrap();
    fx.wait_log("stubborn-1", "stubborn ready").await;
    let cg = sup.tree().instance("probe", "stubborn-1");
    // The main process, two children, two grandchildren.
    let end = Instant::now() + Duration::from_secs(10);
    let pids = loop {
        let p = cg.procs().unwrap();
        if p.len() >= 5 || Instant::now() > end {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(pids.len(), 5, "{pids:?}");
    let fds = pidfds(&pids);
    let t = Instant::now();
    let reason = sup
        .stop("probe", "stubborn-1", Some(Duration::from_millis(300)))
        .await
        .unwrap();
    assert_eq!(reason, ExitReason::Signaled(libc::SIGKILL));
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "the grace period was honoured"
    );
    for fd in &fds {
        assert!(
            mesh_agent::pidfd::has_exited(fd),
            "a process of the spore survived"
        );
    }
    assert!(!cg.v2.exists());
    let ev = next_exit(&mut rx).await;
    assert!(ev.stopped);
}

#[tokio::test]
async fn a_restarted_supervisor_re_adopts_running_instances() {
    let Some(fx) = Fixture::new("adopt") else {
        return;
    };
    // The first "agent" runs in its own runtime, which then dies without stopping anything.
    let first = {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let cfg = fx.config();
        let spec = fx.spec("sleeper-1", &["sleep"], small());
        // Dropping the runtime at the end of the thread cancels the first supervisor's tasks.
        std::thread::spawn(move || {
            rt.block_on(async move {
                let (sup, _rx) = Supervisor::new(cfg).unwrap();
                let info = sup.start(spec).await.unwrap();
                std::mem::forget(sup);
                info
            })
        })
        .join()
        .unwrap()
    };
    let pid = first.record.pid;
    let fd = mesh_agent::pidfd::open(pid).unwrap();
    assert!(
        !mesh_agent::pidfd::has_exited(&fd),
        "the spore outlived its agent"
    );

    let (sup, mut rx) = fx.supervisor();
    let adopted = sup.adopt().await;
    assert_eq!(adopted.len(), 1);
    assert_eq!(
        adopted[0].record.pid, pid,
        "the same process, not a new one"
    );
    assert!(adopted[0].adopted);
    // Still supervised: stopping works through the new supervisor.
    let reason = sup
        .stop("probe", "sleeper-1", Some(Duration::from_millis(500)))
        .await
        .unwrap();
    assert_eq!(
        reason,
        ExitReason::Vanished,
        "an adopted process's exit code is not ours to read"
    );
    assert!(mesh_agent::pidfd::has_exited(&fd));
    assert!(next_exit(&mut rx).await.stopped);
    // It was this test process's child: reap it.
    let _ = mesh_agent::pidfd::wait(&fd, true);
}

#[tokio::test]
async fn a_reused_pid_is_neither_adopted_nor_killed() {
    let Some(fx) = Fixture::new("reuse") else {
        return;
    };
    // An unrelated process, outside our cgroups, holds the pid a stale record names.
    let mut stranger = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let cfg = fx.config();
    let record = mesh_agent::record::InstanceRecord {
        app: "probe".into(),
        instance: "gone-1".into(),
        digest: "sha256:00".into(),
        pid: stranger.id(),
        start_time: 12345,
        cgroup: fx.root.v2.join("mycelium/spores/probe/gone-1"),
        cgroup_rel: "/nowhere".into(),
        port: None,
        run_dir: fx.run_dir.clone(),
        log_dir: fx.dir.path().join("logs"),
        started_at: 0,
        stop_grace_ms: 100,
    };
    record.save(&cfg.state_dir).unwrap();
    let (sup, mut rx) = Supervisor::new(cfg).unwrap();
    assert!(sup.adopt().await.is_empty());
    let ev = next_exit(&mut rx).await;
    assert_eq!(
        (ev.instance.as_str(), ev.reason),
        ("gone-1", ExitReason::Vanished)
    );
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "the unrelated process must live on"
    );
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}

#[tokio::test]
async fn memory_bomb_is_oom_killed_and_its_neighbour_lives() {
    let Some(fx) = Fixture::new("oom") else {
        return;
    };
    let (sup, mut rx) = fx.supervisor();
    sup.start(fx.spec("neighbour", &["sleep"], small()))
        .await
        .unwrap();
    let bomb = Nutrients {
        cpu_milli: 1000,
        memory_mb: 32,
        pids: 16,
    };
    sup.start(fx.spec("bomb", &["alloc", "200"], bomb))
        .await
        .unwrap();
    let ev = next_exit(&mut rx).await;
    assert_eq!(
        (ev.instance.as_str(), ev.reason),
        ("bomb", ExitReason::OomKilled)
    );
    assert!(
        !fx.log("bomb").contains("allocated"),
        "it never got its memory"
    );
    assert_eq!(sup.list().len(), 1, "the neighbour still runs");
    sup.stop("probe", "neighbour", None).await.unwrap();
}

#[tokio::test]
async fn fork_bomb_is_held_by_pids_max() {
    let Some(fx) = Fixture::new("forkbomb") else {
        return;
    };
    let (sup, _rx) = fx.supervisor();
    let n = Nutrients {
        cpu_milli: 1000,
        memory_mb: 128,
        pids: 8,
    };
    sup.start(fx.spec("bomb", &["forkbomb"], n)).await.unwrap();
    let log = fx.wait_log("bomb", "forks").await;
    // 8 pids: the main process and 7 children; the 8th fork fails with EAGAIN (11).
    assert!(log.contains("forks 7 stopped by 11"), "{log}");
    let cg = sup.tree().instance("probe", "bomb");
    assert_eq!(cg.procs().unwrap().len(), 8);
    sup.stop("probe", "bomb", Some(Duration::from_millis(100)))
        .await
        .unwrap();
    assert!(!cg.v2.exists());
}

#[tokio::test]
async fn cpu_max_throttles() {
    let Some(fx) = Fixture::new("cpu") else {
        return;
    };
    let (sup, _rx) = fx.supervisor();
    let n = Nutrients {
        cpu_milli: 100,
        memory_mb: 64,
        pids: 8,
    };
    sup.start(fx.spec("spin", &["spin"], n)).await.unwrap();
    let cg = sup.tree().instance("probe", "spin");
    let end = Instant::now() + Duration::from_secs(20);
    while cg.cpu_throttled() == 0 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        cg.cpu_throttled() > 0,
        "a spinning spore at 100 milli-CPU was never throttled"
    );
    sup.stop("probe", "spin", Some(Duration::from_millis(100)))
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_starts_are_refused_and_leave_nothing() {
    let Some(fx) = Fixture::new("refuse") else {
        return;
    };
    let (sup, _rx) = fx.supervisor();
    let mut spec = fx.spec("root-1", &["sleep"], small());
    spec.manifest.security.user = "root".into();
    let e = sup.start(spec).await.unwrap_err();
    assert!(e.to_string().contains("never run as root"), "{e}");
    let mut spec = fx.spec("caps-1", &["sleep"], small());
    spec.manifest.security.capabilities = vec!["CAP_SYS_ADMIN".into()];
    assert!(
        sup.start(spec)
            .await
            .unwrap_err()
            .to_string()
            .contains("not allowed")
    );
    let mut spec = fx.spec("missing-1", &["sleep"], small());
    spec.manifest.command = "./nope".into();
    let e = sup.start(spec).await.unwrap_err();
    assert!(e.to_string().contains("execve failed"), "{e}");
    assert!(
        !sup.tree().instance("probe", "missing-1").v2.exists(),
        "no cgroup left behind"
    );
    assert!(sup.list().is_empty());
}
