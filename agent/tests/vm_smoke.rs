//! Smoke test of the test VM (`cargo xtask vm-test`): the pure cgroup v2 features the agent
//! relies on work there. Outside the VM (MESH_VM_TEST unset) every test returns at once and
//! passes: the development and CI machines are cgroup-hybrid.
//!
//! Processes that must start inside a cgroup re-run this executable with `ROLE` set, so that
//! the `helper` test plays them; it does nothing otherwise.

#![allow(clippy::unwrap_used)]

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const ROLE: &str = "MESH_VM_SMOKE_ROLE";
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

fn in_vm() -> bool {
    let yes = std::env::var_os("MESH_VM_TEST").is_some_and(|v| v == "1");
    if !yes && std::env::var_os(ROLE).is_none() {
        eprintln!("not in the test VM (MESH_VM_TEST unset): skipped");
    }
    yes
}

/// A child cgroup of ours, killed and removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(name: &str) -> Cgroup {
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        let parent = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
        let path = parent.join(format!("vm-smoke-{name}-{}", std::process::id()));
        fs::create_dir(&path).unwrap();
        Cgroup(path)
    }

    fn set(&self, file: &str, value: &str) {
        fs::write(self.0.join(file), value).unwrap_or_else(|e| panic!("{file} = {value}: {e}"));
    }

    fn get(&self, file: &str) -> String {
        fs::read_to_string(self.0.join(file)).unwrap()
    }

    /// The value of `key` in a flat-keyed file such as memory.events.
    fn key(&self, file: &str, key: &str) -> u64 {
        let text = self.get(file);
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '));
        value
            .unwrap_or_else(|| panic!("no {key} in {file}: {text}"))
            .parse()
            .unwrap()
    }

    fn wait_populated(&self, populated: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.key("cgroup.events", "populated") != populated {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Starts `cmd` inside this cgroup: it moves itself in between fork and exec.
    fn spawn(&self, cmd: &mut Command) -> Child {
        let procs = CString::new(self.0.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
        let join = move || -> io::Result<()> {
            // SAFETY: open, write and close are async-signal-safe and use memory made before fork.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, c"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: `join` only makes async-signal-safe calls, as pre_exec requires.
        unsafe { cmd.pre_exec(join) };
        cmd.spawn().unwrap()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("cgroup.kill"), "1");
        let _ = self.wait_populated(0);
        let _ = fs::remove_dir(&self.0);
    }
}

/// This test executable again, playing `role` in `helper`.
fn helper_cmd(role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "helper", "--nocapture", "--test-threads=1"])
        .env(ROLE, role);
    cmd
}

#[test]
fn helper() {
    match std::env::var(ROLE).as_deref() {
        Ok("alloc") => {
            // 200 MB, every page touched.
            let big = vec![1u8; 200 << 20];
            std::hint::black_box(&big);
            eprintln!("allocated 200 MB and was not killed");
        }
        Ok("forkbomb") => {
            for forked in 0..100 {
                // SAFETY: the child only calls pause and _exit, which are async-signal-safe.
                match unsafe { libc::fork() } {
                    0 => loop {
                        // SAFETY: as above.
                        unsafe { libc::pause() };
                    },
                    -1 => {
                        let err = io::Error::last_os_error();
                        assert_eq!(err.raw_os_error(), Some(libc::EAGAIN), "{err}");
                        eprintln!("fork failed with EAGAIN after {forked} forks");
                        std::process::exit(if forked < 5 { 42 } else { 1 });
                    }
                    _ => {}
                }
            }
            std::process::exit(1);
        }
        _ => {}
    }
}

#[test]
fn controllers_are_there() {
    if !in_vm() {
        return;
    }
    let controllers = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap();
    let enabled = fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control").unwrap();
    for c in ["cpu", "memory", "pids"] {
        assert!(
            controllers.split_whitespace().any(|x| x == c),
            "{c}: {controllers}"
        );
        assert!(
            enabled.split_whitespace().any(|x| x == c),
            "{c} not enabled: {enabled}"
        );
    }
}

#[test]
fn memory_max_oom_kills() {
    if !in_vm() {
        return;
    }
    let cg = Cgroup::new("oom");
    cg.set("memory.max", "50M");
    if cg.0.join("memory.swap.max").exists() {
        cg.set("memory.swap.max", "0");
    }
    let status = cg.spawn(&mut helper_cmd("alloc")).wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    assert!(
        cg.key("memory.events", "oom_kill") >= 1,
        "{}",
        cg.get("memory.events")
    );
}

#[test]
fn pids_max_stops_a_fork_bomb() {
    if !in_vm() {
        return;
    }
    let cg = Cgroup::new("pids");
    cg.set("pids.max", "5");
    let status = cg.spawn(&mut helper_cmd("forkbomb")).wait().unwrap();
    assert_eq!(status.code(), Some(42), "{status}");
    assert!(
        cg.key("pids.events", "max") >= 1,
        "{}",
        cg.get("pids.events")
    );
}

#[test]
fn clone3_into_cgroup() {
    if !in_vm() {
        return;
    }
    let cg = Cgroup::new("clone3");
    let dir = fs::File::open(&cg.0).unwrap();
    let args = libc::clone_args {
        flags: CLONE_INTO_CGROUP,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: dir.as_raw_fd() as u64,
    };
    // SAFETY: a fork-like clone3 (no CLONE_VM); `args` outlives the call and its size is given.
    let pid = unsafe { libc::syscall(libc::SYS_clone3, &args, size_of::<libc::clone_args>()) };
    if pid == 0 {
        loop {
            // SAFETY: the child only calls pause, which is async-signal-safe, until killed.
            unsafe { libc::pause() };
        }
    }
    assert!(pid > 0, "clone3: {}", io::Error::last_os_error());
    let pid = pid as libc::pid_t;
    let placed = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let procs = cg.get("cgroup.procs");
    // SAFETY: kill and waitpid on our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    let name = cg.0.file_name().unwrap().to_str().unwrap();
    assert!(placed.trim_end().ends_with(&format!("/{name}")), "{placed}");
    assert_eq!(procs.trim(), pid.to_string());
}

#[test]
fn cgroup_kill_empties_a_cgroup() {
    if !in_vm() {
        return;
    }
    let cg = Cgroup::new("kill");
    let mut sleepers: Vec<Child> = (0..3)
        .map(|_| cg.spawn(Command::new("sleep").arg("600")))
        .collect();
    assert!(cg.wait_populated(1));
    assert_eq!(cg.get("cgroup.procs").lines().count(), 3);
    cg.set("cgroup.kill", "1");
    assert!(
        cg.wait_populated(0),
        "still populated: {}",
        cg.get("cgroup.procs")
    );
    for sleeper in &mut sleepers {
        assert_eq!(sleeper.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
