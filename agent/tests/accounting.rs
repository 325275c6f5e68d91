//! eBPF accounting against the real kernel (root): the programs load, count only watched
//! spores' cgroups, agree with cgroup v2's cpu.stat, count network bytes, and report exit
//! statuses, also of re-adopted spores. Runs on the host and in `cargo xtask vm-test`.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh_agent::cgroup::{CgroupRoot, Layout, Limits};
use mesh_agent::supervisor::{ExitEvent, ExitReason, StartSpec, Supervisor, SupervisorConfig};
use mesh_common::manifest::{Compression, FileEntry, Manifest, Nutrients, Security, Slo};
use tokio::sync::mpsc::UnboundedReceiver;

/// One test at a time: attaching or detaching another program on sched_switch while a spore
/// runs can drop one of its context switches (a tracepoint's probe list is swapped under
/// RCU), which showed as a 1 % under-count when the three tests loaded their own copies of
/// the programs concurrently. An agent loads them once.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

struct Fixture {
    root: CgroupRoot,
    dir: tempfile::TempDir,
    run_dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Option<Fixture> {
        if !is_root() {
            eprintln!("skipped: eBPF accounting tests need root");
            return None;
        }
        let layout = Layout::detect().unwrap();
        let root =
            CgroupRoot::new_root(&layout, &format!("mesh-test-{name}-{}", std::process::id()));
        root.create().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let run_dir = dir.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        std::fs::copy(env!("CARGO_BIN_EXE_spore-probe"), run_dir.join("probe")).unwrap();
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Some(Fixture { root, dir, run_dir })
    }

    fn supervisor(&self) -> (Supervisor, UnboundedReceiver<ExitEvent>) {
        let mut c = SupervisorConfig::new(self.dir.path().join("state"), self.root.clone());
        c.users.explicit.clear();
        c.ebpf = true;
        let (sup, rx) = Supervisor::new(c).unwrap();
        assert!(
            sup.accounting().is_some(),
            "the eBPF programs did not load (see the warning above)"
        );
        (sup, rx)
    }

    fn spec(&self, instance: &str, args: &[&str]) -> StartSpec {
        let manifest = Manifest {
            name: "probe".into(),
            version: "1.0.0".parse().unwrap(),
            command: "./probe".into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: Default::default(),
            nutrients: Nutrients::default(),
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
            port: None,
            app_budget: Limits::default(),
        }
    }

    async fn wait_log(&self, instance: &str, needle: &str) -> String {
        let path = self
            .dir
            .path()
            .join("state/logs/probe")
            .join(instance)
            .join("output.log");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < end, "{needle:?} never appeared: {log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn finish(self) {
        drop(self);
    }
}

/// Also when a test fails half-way: whatever still runs in our cgroups is killed and the
/// cgroups go.
impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.root.remove_tree();
    }
}

/// `Tcp: RetransSegs` from /proc/net/snmp (this network namespace, all sockets).
fn tcp_retransmitted_segments() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find_map(|(n, v)| (n == "RetransSegs").then(|| v.parse().ok()).flatten())
        .unwrap_or(0)
}

fn usage_usec(cg: &Path) -> u64 {
    std::fs::read_to_string(cg.join("cpu.stat"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.parse().ok())
        .unwrap()
}

async fn next_exit(rx: &mut UnboundedReceiver<ExitEvent>) -> ExitEvent {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("an exit within 30 s")
        .expect("exit stream open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_time_matches_cpu_stat_and_execs_are_seen() {
    let _serial = SERIAL.lock().await;
    let Some(fx) = Fixture::new("ebpf-cpu") else {
        return;
    };
    let (sup, _rx) = fx.supervisor();
    let info = sup.start(fx.spec("burn", &["burn", "1500"])).await.unwrap();
    fx.wait_log("burn", "burned").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let acc = sup.accounting().unwrap();
    let st = acc
        .stats(info.cgroup_id)
        .expect("the instance's cgroup is watched");
    let cg = sup.tree().instance("probe", "burn");
    let cpu_stat_ns = usage_usec(&cg.v2) * 1000;
    let diff = (st.cpu_ns as f64 - cpu_stat_ns as f64).abs() / cpu_stat_ns as f64;
    eprintln!(
        "eBPF {} ns, cpu.stat {} ns, {:.3} %",
        st.cpu_ns,
        cpu_stat_ns,
        diff * 100.0
    );
    assert!(
        cpu_stat_ns > 1_000_000_000,
        "the burn used {cpu_stat_ns} ns"
    );
    assert!(
        diff < 0.005,
        "eBPF {} ns vs cpu.stat {} ns",
        st.cpu_ns,
        cpu_stat_ns
    );
    assert!(st.execs >= 1, "the spore's exec was not seen");
    assert!(st.rq_count > 0, "no run-queue wait was recorded");
    sup.stop("probe", "burn", None).await.unwrap();
    fx.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_signals_are_seen_also_for_adopted_spores() {
    let _serial = SERIAL.lock().await;
    let Some(fx) = Fixture::new("ebpf-exit") else {
        return;
    };
    let (sup, mut rx) = fx.supervisor();
    let acc = sup.accounting().unwrap().clone();
    let a = sup
        .start(fx.spec("three", &["exit-after", "300", "3"]))
        .await
        .unwrap();
    let e = next_exit(&mut rx).await;
    assert_eq!(e.reason, ExitReason::Exited(3));
    assert_eq!(
        acc.exit_status(a.cgroup_id, a.record.pid, Duration::from_secs(2))
            .await,
        Some(3 << 8)
    );
    let b = sup.start(fx.spec("killed", &["sleep"])).await.unwrap();
    // SAFETY: kill(2) on our own child, which has not been reaped (its pidfd is watched).
    unsafe { libc::kill(b.record.pid as i32, libc::SIGKILL) };
    let e = next_exit(&mut rx).await;
    assert_eq!(e.reason, ExitReason::Signaled(libc::SIGKILL));
    assert_eq!(
        acc.exit_status(b.cgroup_id, b.record.pid, Duration::from_secs(2))
            .await,
        Some(libc::SIGKILL)
    );
    drop(acc);
    drop(sup);
    drop(rx);
    // A spore started by one supervisor (in a runtime that then goes away, like a dead
    // agent) and adopted by the next: not the new one's child, so only eBPF knows how it
    // ended.
    let c = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let (sup, _rx) = fx.supervisor();
                let c = sup
                    .start(fx.spec("adopted", &["exit-on-term", "7"]))
                    .await
                    .unwrap();
                fx.wait_log("adopted", "waiting for SIGTERM").await;
                c
            })
        })
        .join()
        .unwrap()
    });
    let (sup2, mut rx2) = fx.supervisor();
    let adopted = sup2.adopt().await;
    assert!(
        adopted
            .iter()
            .any(|i| i.record.pid == c.record.pid && i.adopted),
        "{adopted:?}"
    );
    sup2.stop("probe", "adopted", None).await.unwrap();
    let e = next_exit(&mut rx2).await;
    assert_eq!(e.instance, "adopted");
    assert_eq!(e.reason, ExitReason::Exited(7));
    fx.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_bytes_are_counted_for_spores_only() {
    let _serial = SERIAL.lock().await;
    let Some(fx) = Fixture::new("ebpf-net") else {
        return;
    };
    let (sup, _rx) = fx.supervisor();
    const N: usize = 4 << 20;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(&vec![7u8; N]).unwrap();
        }
    });
    let retrans_before = tcp_retransmitted_segments();
    let info = sup
        .start(fx.spec("fetch", &["fetch", &addr.to_string()]))
        .await
        .unwrap();
    let log = fx.wait_log("fetch", "fetched").await;
    assert!(log.contains(&format!("fetched {N}")), "{log}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let acc = sup.accounting().unwrap();
    let st = acc.stats(info.cgroup_id).unwrap();
    // Headers: at most 80 bytes a packet. A busy machine can make the kernel drop a segment
    // the slow reader had no room for; the retransmission passes the ingress program again,
    // so each retransmitted segment (host-wide count, an upper bound) may add up to 64 KiB.
    let retransmitted = tcp_retransmitted_segments().saturating_sub(retrans_before);
    let overhead = st.rx_packets * 80 + 1024 + retransmitted * 65_536;
    eprintln!(
        "rx {} bytes in {} packets, tx {} bytes in {} packets, {retransmitted} TCP segments retransmitted host-wide",
        st.rx_bytes, st.rx_packets, st.tx_bytes, st.tx_packets
    );
    assert!(st.rx_bytes >= N as u64, "rx {} < {N}", st.rx_bytes);
    assert!(
        st.rx_bytes <= N as u64 + overhead,
        "rx {} > {N} + {overhead}",
        st.rx_bytes
    );
    assert!(st.tx_packets > 0);

    // The same download from a process in an unwatched cgroup beside the spores: not
    // counted anywhere, and the spore's numbers do not move.
    let other = sup.tree().spores().child("not-a-spore");
    other.create().unwrap();
    let mut child = std::process::Command::new(fx.run_dir.join("probe"))
        .args(["fetch", &addr.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // placed after start: its exec is not in the cgroup, its download is
    std::fs::write(other.v2.join("cgroup.procs"), child.id().to_string()).unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), format!("fetched {N}"));
    server.join().unwrap();
    assert_eq!(acc.stats(other.id().unwrap()), None);
    let after = acc.stats(info.cgroup_id).unwrap();
    assert_eq!(after.rx_bytes, st.rx_bytes);
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = other.wait_empty(Duration::from_secs(5));
    other.remove().unwrap();
    sup.stop("probe", "fetch", None).await.unwrap();
    fx.finish();
}
