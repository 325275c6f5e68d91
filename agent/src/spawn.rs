//! Starting a spore process: clone3(CLONE_PIDFD | CLONE_INTO_CGROUP) where the kernel has it
//! (5.7+), fork + cgroup.procs + pidfd_open otherwise.
//!
//! Everything the child needs (paths, argv, envp, descriptors, masks) is prepared before the
//! clone: the child of a multi-threaded process may only make raw system calls, so it never
//! allocates, never takes a lock, and calls the kernel directly for credentials (glibc's
//! setresuid would try to reach threads that do not exist in the child). The child waits on a
//! pipe until the parent has placed it in every cgroup, then drops privileges and execs; a
//! failure is reported through a close-on-exec pipe as (step, errno).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::cgroup::CgroupRoot;
use crate::pidfd;

/// How to start processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnMethod {
    /// clone3 when it works, else the fallback.
    Auto,
    /// fork + cgroup.procs + pidfd_open (old kernels; also testable on new ones).
    Fork,
}

/// Everything needed to start one process.
pub struct SpawnSpec {
    pub program: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub cwd: CString,
    pub uid: u32,
    pub gid: u32,
    /// Capabilities kept (as ambient capabilities) after dropping to `uid`; bit n = cap n.
    pub keep_caps: u64,
    /// Receives stdout and stderr (a log file opened O_APPEND).
    pub output: OwnedFd,
}

/// A started process.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub pidfd: OwnedFd,
    /// clone3 placed it (true) or the fork fallback did.
    pub cloned: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{0}: {1}")]
    Setup(&'static str, #[source] io::Error),
    #[error("placing the process in cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("in the new process, {step} failed: {source}")]
    Child {
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Steps of the child, reported on failure.
const STEPS: [&str; 12] = [
    "waiting for the parent",
    "setsid",
    "redirecting stdin/stdout/stderr",
    "chdir to the run dir",
    "dropping the capability bounding set",
    "keeping capabilities across setuid",
    "setgroups",
    "setresgid",
    "setresuid",
    "setting capabilities",
    "setting no_new_privs",
    "execve",
];

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const CAP_LAST_CAP_GUESS: u32 = 63;

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just created both; we own them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Raw pointers the child uses; built before the clone and alive until it execs.
struct ChildPlan<'a> {
    spec: &'a SpawnSpec,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    devnull: OwnedFd,
    go_read: RawFd,
    err_write: RawFd,
    /// The descriptor limit, for the per-fd close-on-exec fallback.
    max_fd: RawFd,
}

/// Starts `spec` in `cgroup`.
pub fn spawn(
    spec: &SpawnSpec,
    cgroup: &CgroupRoot,
    method: SpawnMethod,
) -> Result<Spawned, SpawnError> {
    let setup = |what| move |e| SpawnError::Setup(what, e);
    let devnull: OwnedFd = std::fs::File::open("/dev/null")
        .map_err(setup("opening /dev/null"))?
        .into();
    let (go_read, go_write) = pipe().map_err(setup("creating a pipe"))?;
    let (err_read, err_write) = pipe().map_err(setup("creating a pipe"))?;
    let cgroup_fd = cgroup.open_v2().map_err(|source| SpawnError::Cgroup {
        path: cgroup.v2.display().to_string(),
        source,
    })?;
    let mut argv: Vec<*const libc::c_char> = spec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = spec.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let plan = ChildPlan {
        spec,
        argv,
        envp,
        devnull,
        go_read: go_read.as_raw_fd(),
        err_write: err_write.as_raw_fd(),
        max_fd: fd_limit(),
    };

    let (pid, pidfd, cloned) = match method {
        SpawnMethod::Auto => match clone3_into(&cgroup_fd, &plan) {
            Ok((pid, fd)) => (pid, fd, true),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL)
                ) =>
            {
                tracing::debug!("clone3 unavailable ({e}); using fork + cgroup.procs");
                fork_fallback(&plan, cgroup)?
            }
            Err(e) => return Err(SpawnError::Setup("clone3", e)),
        },
        SpawnMethod::Fork => fork_fallback(&plan, cgroup)?,
    };
    drop(go_read);
    drop(err_write);

    // Hybrid hosts: the v1 controllers enforce the limits, so the child must be in them
    // before it runs anything of its own.
    if let Err(e) = place_v1(pid, cgroup) {
        let _ = pidfd::send_signal(&pidfd, libc::SIGKILL);
        let _ = pidfd::wait(&pidfd, false);
        return Err(e);
    }
    // Release the child.
    // SAFETY: writing one byte from a live buffer to the pipe's write end we own.
    unsafe { libc::write(go_write.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    drop(go_write);

    // EOF on the error pipe means execve succeeded (the pipe was close-on-exec).
    let mut report = [0u8; 5];
    let n = read_all(&err_read, &mut report);
    if n == 5 {
        let _ = pidfd::wait(&pidfd, false);
        let step = STEPS
            .get(report[0] as usize)
            .copied()
            .unwrap_or("an unknown step");
        let errno = i32::from_ne_bytes([report[1], report[2], report[3], report[4]]);
        return Err(SpawnError::Child {
            step,
            source: io::Error::from_raw_os_error(errno),
        });
    }
    Ok(Spawned { pid, pidfd, cloned })
}

/// The soft RLIMIT_NOFILE, capped: no descriptor of ours is at or above it.
fn fd_limit() -> RawFd {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0;
    if ok {
        rl.rlim_cur.min(1 << 20) as RawFd
    } else {
        1 << 16
    }
}

fn read_all(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into the unfilled tail of a live buffer.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            )
        };
        if n > 0 {
            got += n as usize;
        } else if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    got
}

fn place_v1(pid: u32, cgroup: &CgroupRoot) -> Result<(), SpawnError> {
    for f in cgroup.v1_procs_files() {
        std::fs::write(&f, pid.to_string()).map_err(|source| SpawnError::Cgroup {
            path: f.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

fn clone3_into(cgroup_fd: &OwnedFd, plan: &ChildPlan<'_>) -> io::Result<(u32, OwnedFd)> {
    let mut pidfd: RawFd = -1;
    let args = CloneArgs {
        flags: CLONE_PIDFD | CLONE_INTO_CGROUP,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup_fd.as_raw_fd() as u64,
        ..Default::default()
    };
    // SAFETY: clone3 with a fully initialised CloneArgs of the size we pass; without
    // CLONE_VM the child gets a copy of our memory, like fork. The child branch only runs
    // `child_main`, which never returns.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if rc == 0 {
        // SAFETY: we are the new child; child_main only makes raw system calls.
        unsafe { child_main(plan) }
    }
    // SAFETY: CLONE_PIDFD stored a new descriptor that we now own.
    Ok((rc as u32, unsafe { OwnedFd::from_raw_fd(pidfd) }))
}

fn fork_fallback(
    plan: &ChildPlan<'_>,
    cgroup: &CgroupRoot,
) -> Result<(u32, OwnedFd, bool), SpawnError> {
    // SAFETY: fork; the child branch only runs child_main (raw system calls, no allocation).
    let rc = unsafe { libc::fork() };
    if rc < 0 {
        return Err(SpawnError::Setup("fork", io::Error::last_os_error()));
    }
    if rc == 0 {
        // SAFETY: we are the forked child.
        unsafe { child_main(plan) }
    }
    let pid = rc as u32;
    // The child waits for us, so it cannot exit (and its pid cannot be reused) before this.
    let fd = match pidfd::open(pid) {
        Ok(fd) => fd,
        Err(e) => return Err(SpawnError::Setup("pidfd_open", e)),
    };
    let v2 = cgroup.v2.join("cgroup.procs");
    if let Err(source) = std::fs::write(&v2, pid.to_string()) {
        let _ = pidfd::send_signal(&fd, libc::SIGKILL);
        let _ = pidfd::wait(&fd, false);
        return Err(SpawnError::Cgroup {
            path: v2.display().to_string(),
            source,
        });
    }
    Ok((pid, fd, false))
}

/// The new process: wait for the parent, detach, redirect, drop privileges, exec.
///
/// # Safety
/// Must only run in a freshly cloned or forked child. Only raw system calls follow.
unsafe fn child_main(plan: &ChildPlan<'_>) -> ! {
    let spec = plan.spec;
    let fail = |step: u8| -> ! {
        // SAFETY: errno location of this (only) thread; write and _exit are raw syscalls.
        unsafe {
            let errno = *libc::__errno_location();
            let mut msg = [step, 0, 0, 0, 0];
            msg[1..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(plan.err_write, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    // SAFETY (whole block): raw system calls on descriptors and memory prepared before the
    // clone; nothing allocates, locks or unwinds.
    unsafe {
        let mut byte = 0u8;
        if libc::read(plan.go_read, (&mut byte as *mut u8).cast(), 1) != 1 {
            fail(0);
        }
        // Rust ignores SIGPIPE in its own processes; a spore starts with the defaults.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        if libc::setsid() < 0 {
            fail(1);
        }
        let out = spec.output.as_raw_fd();
        if libc::dup2(plan.devnull.as_raw_fd(), 0) < 0
            || libc::dup2(out, 1) < 0
            || libc::dup2(out, 2) < 0
        {
            fail(2);
        }
        // Nothing else of the agent leaks into the spore: close_range(CLOEXEC) where the
        // kernel has it (5.11+), else every descriptor up to the limit one by one.
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            for fd in 3..plan.max_fd {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        if libc::chdir(spec.cwd.as_ptr()) != 0 {
            fail(3);
        }
        for cap in 0..=CAP_LAST_CAP_GUESS {
            if spec.keep_caps & (1 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                && *libc::__errno_location() != libc::EINVAL
            {
                fail(4);
            }
        }
        if spec.keep_caps != 0 && libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            fail(5);
        }
        if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0 {
            fail(6);
        }
        if libc::syscall(libc::SYS_setresgid, spec.gid, spec.gid, spec.gid) != 0 {
            fail(7);
        }
        if libc::syscall(libc::SYS_setresuid, spec.uid, spec.uid, spec.uid) != 0 {
            fail(8);
        }
        if spec.keep_caps != 0 {
            let header = CapHeader {
                version: 0x2008_0522,
                pid: 0,
            };
            let lo = spec.keep_caps as u32;
            let hi = (spec.keep_caps >> 32) as u32;
            let data = [
                CapData {
                    effective: lo,
                    permitted: lo,
                    inheritable: lo,
                },
                CapData {
                    effective: hi,
                    permitted: hi,
                    inheritable: hi,
                },
            ];
            if libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) != 0 {
                fail(9);
            }
            for cap in 0..=CAP_LAST_CAP_GUESS {
                if spec.keep_caps & (1 << cap) != 0
                    && libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE,
                        cap as libc::c_ulong,
                        0,
                        0,
                    ) != 0
                {
                    fail(9);
                }
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(10);
        }
        libc::execve(
            spec.program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        );
        fail(11)
    }
}
