//! `vm-init`: PID 1 of the test VM that `cargo xtask vm-test` boots.
//!
//! Why: the development and CI machines have a hybrid cgroup layout, so what needs a pure cgroup
//! v2 system (OOM kills under memory.max, pids.max, cgroup.kill, CLONE_INTO_CGROUP) is tested in
//! a qemu VM running the Debian cloud kernel, with the host's root file system shared read-only
//! over virtiofs. No distribution init runs in there, only this program: it makes the few mounts
//! and the cgroup tree a test needs, runs one command, hands its exit code back and powers off.
//! It is an ordinary dynamically linked host binary: the shared root has its libraries.
//!
//! Protocol with the host (xtask/src/vm.rs):
//! - kernel command line `vm.share=SHARE vm.out=DIR` (absolute, no spaces): the virtiofs share
//!   tagged `out` (the workspace, read-write) is mounted at SHARE, the same path as on the host,
//!   after /tmp got its tmpfs (the workspace may live under /tmp, and the test executables live
//!   in SHARE); DIR (inside SHARE) holds this run's files.
//! - `DIR/argv`: the command, NUL-separated, program first. `DIR/cwd` (optional, default `/`):
//!   its working directory. `DIR/env` (optional): NUL-separated `KEY=VALUE`, added to PATH,
//!   HOME=/root, TMPDIR=/tmp and MESH_VM_TEST=1.
//! - its stdout and stderr, merged, go to the console (ttyS0) and to `DIR/output.log`;
//!   `DIR/exit-code` gets its exit code (128 + signal if killed, 125 if it could not be run).
//!
//! The command runs in the root cgroup, whose subtree has cpu, memory, pids and io enabled, so a
//! test can make child cgroups with limits right away. When it exits, every process left over is
//! killed before power-off.

use std::ffi::{CString, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

const CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "io"];
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Exit code handed back when the VM could not run the command at all.
const SETUP_FAILED: i32 = 125;

fn main() {
    if std::process::id() != 1 {
        // Run anywhere else, it would mount over the host's /dev, /sys/fs/cgroup and more.
        eprintln!("vm-init: refusing to run: not PID 1 (it is the init of the vm-test VM)");
        std::process::exit(2);
    }
    let mut out = None;
    let code = boot(&mut out).unwrap_or_else(|e| {
        say(&format!("vm-init: {e}"));
        SETUP_FAILED
    });
    if let Some(dir) = out
        && let Err(e) = fs::write(dir.join("exit-code"), format!("{code}\n"))
    {
        say(&format!("vm-init: writing exit-code: {e}"));
    }
    power_off()
}

/// Sets the VM up and runs the command; `out` is set once the results share is mounted.
fn boot(out: &mut Option<PathBuf>) -> Result<i32, String> {
    mount_basics()?;
    let dir = cmdline_dir("vm.out")?;
    let share = cmdline_dir("vm.share").unwrap_or_else(|_| dir.clone());
    // On a tmpfs (/tmp) the mount point must be made; on the read-only root it exists.
    if !share.is_dir() {
        fs::create_dir_all(&share).map_err(|e| format!("mkdir {}: {e}", share.display()))?;
    }
    mount("out", &share, "virtiofs", 0, "")?;
    *out = Some(dir.clone());
    loopback_up()?;
    enable_controllers()?;
    run(&dir)
}

fn mount_basics() -> Result<(), String> {
    use libc::{MS_NODEV, MS_NOEXEC, MS_NOSUID};
    let plain = MS_NOSUID | MS_NODEV | MS_NOEXEC;
    mount("proc", Path::new("/proc"), "proc", plain, "")?;
    mount("sysfs", Path::new("/sys"), "sysfs", plain, "")?;
    mount(
        "devtmpfs",
        Path::new("/dev"),
        "devtmpfs",
        MS_NOSUID,
        "mode=0755",
    )?;
    console_on_std_fds()?;
    for dir in ["/dev/pts", "/dev/shm"] {
        fs::create_dir_all(dir).map_err(|e| format!("mkdir {dir}: {e}"))?;
    }
    for (target, link) in [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        std::os::unix::fs::symlink(target, link).map_err(|e| format!("symlink {link}: {e}"))?;
    }
    let devpts = "gid=5,mode=0620,ptmxmode=0666";
    mount(
        "devpts",
        Path::new("/dev/pts"),
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        devpts,
    )?;
    for dir in ["/dev/shm", "/tmp"] {
        mount(
            "tmpfs",
            Path::new(dir),
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            "mode=1777",
        )?;
    }
    mount(
        "tmpfs",
        Path::new("/run"),
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        "mode=0755",
    )?;
    let cgroup_opts = "nsdelegate,memory_recursiveprot";
    mount(
        "cgroup2",
        Path::new("/sys/fs/cgroup"),
        "cgroup2",
        plain,
        cgroup_opts,
    )?;
    mount("bpf", Path::new("/sys/fs/bpf"), "bpf", plain, "mode=0700")?;
    if let Err(e) = mount(
        "tracefs",
        Path::new("/sys/kernel/tracing"),
        "tracefs",
        plain,
        "",
    ) {
        say(&format!("vm-init: no tracefs ({e})"));
    }
    Ok(())
}

fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let what = || format!("mount {fstype} on {}", target.display());
    let c = |bytes: &[u8]| CString::new(bytes).map_err(|_| format!("{}: NUL byte", what()));
    let (src, dst) = (c(source.as_bytes())?, c(target.as_os_str().as_bytes())?);
    let (kind, opts) = (c(fstype.as_bytes())?, c(data.as_bytes())?);
    // SAFETY: every pointer is a NUL-terminated string that lives until the call returns.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            kind.as_ptr(),
            flags,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!("{}: {}", what(), io::Error::last_os_error()));
    }
    Ok(())
}

/// The kernel hands init the root file system's /dev/console, if it could open one; use the
/// VM's own console from devtmpfs for stdin, stdout and stderr instead.
fn console_on_std_fds() -> Result<(), String> {
    let console = File::options()
        .read(true)
        .write(true)
        .open("/dev/console")
        .map_err(|e| format!("open /dev/console: {e}"))?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors; `console` stays open during the call.
        if unsafe { libc::dup2(console.as_raw_fd(), fd) } < 0 {
            return Err(format!("dup2 console: {}", io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The absolute directory `KEY=DIR` on the kernel command line.
fn cmdline_dir(key: &str) -> Result<PathBuf, String> {
    let cmdline =
        fs::read_to_string("/proc/cmdline").map_err(|e| format!("read /proc/cmdline: {e}"))?;
    let prefix = format!("{key}=");
    cmdline
        .split_whitespace()
        .find_map(|word| word.strip_prefix(prefix.as_str()))
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
        .ok_or_else(|| format!("no absolute {key}=DIR on the kernel command line: {cmdline}"))
}

/// `ip link set lo up`, with the ioctl that does it; the kernel then adds 127.0.0.1 and ::1.
fn loopback_up() -> Result<(), String> {
    let fail = |what: &str| format!("bringing lo up: {what}: {}", io::Error::last_os_error());
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail("socket"));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data, for which all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads ifr_name and writes ifru_flags of `req`, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(fail("SIOCGIFFLAGS"));
    }
    // SAFETY: ifru_flags is the union member SIOCGIFFLAGS just filled in.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS only reads `req`, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(fail("SIOCSIFFLAGS"));
    }
    Ok(())
}

/// Enables the controllers for the children of our cgroup (the root one at boot). A non-root
/// cgroup that holds processes cannot do that, so in one we first move into a leaf child.
fn enable_controllers() -> Result<(), String> {
    let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("cgroup: {e}"))?;
    let rel = own
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| format!("not in a cgroup v2 hierarchy: {own:?}"))?;
    let base = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    if rel != "/" {
        let leaf = base.join("vm-init");
        fs::create_dir_all(&leaf).map_err(|e| format!("mkdir {}: {e}", leaf.display()))?;
        fs::write(leaf.join("cgroup.procs"), "0").map_err(|e| format!("moving to leaf: {e}"))?;
    }
    for controller in CONTROLLERS {
        fs::write(
            base.join("cgroup.subtree_control"),
            format!("+{controller}"),
        )
        .map_err(|e| format!("enabling the {controller} controller: {e}"))?;
    }
    Ok(())
}

/// Runs the command of `dir/argv`, copies its output, returns its exit code.
fn run(dir: &Path) -> Result<i32, String> {
    let argv = nul_list(&dir.join("argv"))?.ok_or("no argv file in the results dir")?;
    let (program, args) = argv.split_first().ok_or("argv is empty")?;
    let cwd = match fs::read(dir.join("cwd")) {
        Ok(bytes) => PathBuf::from(OsString::from_vec(bytes.trim_ascii_end().to_vec())),
        Err(_) => PathBuf::from("/"),
    };
    let log = File::create(dir.join("output.log")).map_err(|e| format!("output.log: {e}"))?;
    let (reader, writer) = io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let writer2 = writer.try_clone().map_err(|e| format!("pipe: {e}"))?;

    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("TMPDIR", "/tmp")
        .env("MESH_VM_TEST", "1")
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2);
    for pair in nul_list(&dir.join("env"))?.unwrap_or_default() {
        let pair = pair.as_bytes();
        if let Some(eq) = pair.iter().position(|b| *b == b'=') {
            cmd.env(
                OsString::from_vec(pair[..eq].to_vec()),
                OsString::from_vec(pair[eq + 1..].to_vec()),
            );
        }
    }
    say(&format!("vm-init: running {argv:?} in {}", cwd.display()));
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", Path::new(program).display()))?;
    drop(cmd); // closes our copies of the pipe's write end, so the copier sees EOF at the end
    let copier = std::thread::spawn(move || copy_output(reader, log));

    let status = reap_until(child.id())?;
    // Whatever the command left behind would hold the pipe open (and is of no use now).
    // SAFETY: kill(-1) from PID 1 signals every process but init itself.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    while reap_one().is_ok() {}
    if copier.join().is_err() {
        say("vm-init: the output copier panicked");
    }
    let code = status
        .code()
        .or_else(|| status.signal().map(|sig| 128 + sig))
        .unwrap_or(SETUP_FAILED);
    say(&format!("vm-init: exit code {code}"));
    Ok(code)
}

/// A file of NUL-separated items; None if it does not exist.
fn nul_list(path: &Path) -> Result<Option<Vec<OsString>>, String> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(
            bytes
                .split(|b| *b == 0)
                .filter(|item| !item.is_empty())
                .map(|item| OsString::from_vec(item.to_vec()))
                .collect(),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Reaps children (PID 1 inherits every orphan) until `pid` exits; returns its status.
fn reap_until(pid: u32) -> Result<ExitStatus, String> {
    loop {
        let (reaped, status) = reap_one().map_err(|e| format!("waitpid: {e}"))?;
        if u32::try_from(reaped) == Ok(pid) {
            return Ok(status);
        }
    }
}

fn reap_one() -> io::Result<(libc::pid_t, ExitStatus)> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid only writes to `status`.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            return Ok((pid, ExitStatus::from_raw(status)));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Copies the command's output to the console and the log until every writer is gone.
fn copy_output(mut reader: io::PipeReader, mut log: File) {
    let mut buf = [0u8; 8192];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Best effort: a full log must not stop the console copy, nor the reverse.
                let _ = io::stderr().write_all(&buf[..n]);
                let _ = log.write_all(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                say(&format!("vm-init: reading the command's output: {e}"));
                break;
            }
        }
    }
    let _ = log.sync_all();
}

fn say(line: &str) {
    let _ = writeln!(io::stderr(), "{line}");
}

fn power_off() -> ! {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with a valid command; on success it does not return.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    // SAFETY: as above; qemu runs with -no-reboot, so a reboot ends it too.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    say(&format!("vm-init: reboot: {}", io::Error::last_os_error()));
    loop {
        // SAFETY: pause(2) takes no arguments; PID 1 must never exit.
        unsafe { libc::pause() };
    }
}
