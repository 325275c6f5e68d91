//! `spore-probe`: a test workload for the supervisor's integration tests. It is what a spore
//! would be, misbehaving on purpose.
//!
//! Modes (first argument):
//! - `report`: print uid, gid, capabilities, no_new_privs, cwd and environment, then sleep.
//! - `exit N`: exit with code N.
//! - `sleep`: sleep until killed.
//! - `stubborn`: ignore SIGTERM, start two children and a grandchild that ignore it too, sleep.
//! - `alloc MB`: allocate and touch MB mebibytes, print "allocated", sleep.
//! - `forkbomb`: fork until the kernel refuses; print how many forks worked and why it stopped.
//! - `spin`: burn CPU until killed.

use std::io::Write;
use std::time::Duration;

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn ignore_term() {
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = std::io::stdout();
    match args.first().map(String::as_str) {
        Some("report") => {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            for l in status.lines() {
                if [
                    "Uid:",
                    "Gid:",
                    "CapEff:",
                    "CapPrm:",
                    "CapAmb:",
                    "CapBnd:",
                    "NoNewPrivs:",
                    "Groups:",
                ]
                .iter()
                .any(|p| l.starts_with(p))
                {
                    let _ = writeln!(out, "{l}");
                }
            }
            let cwd = std::env::current_dir()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let _ = writeln!(out, "cwd: {cwd}");
            // SAFETY: getsid(0) queries this process.
            let sid = unsafe { libc::getsid(0) };
            let _ = writeln!(out, "session_leader: {}", sid == std::process::id() as i32);
            for (k, v) in std::env::vars() {
                let _ = writeln!(out, "env: {k}={v}");
            }
            let _ = writeln!(out, "report done");
            let _ = out.flush();
            sleep_forever()
        }
        Some("exit") => std::process::exit(args.get(1).and_then(|c| c.parse().ok()).unwrap_or(1)),
        Some("sleep") => sleep_forever(),
        Some("stubborn") => {
            ignore_term();
            for _ in 0..2 {
                // SAFETY: fork in a single-threaded program; the child only sleeps or forks.
                match unsafe { libc::fork() } {
                    0 => {
                        // SAFETY: as above.
                        if unsafe { libc::fork() } == 0 {
                            sleep_forever()
                        }
                        sleep_forever()
                    }
                    pid if pid > 0 => {}
                    _ => std::process::exit(2),
                }
            }
            let _ = writeln!(out, "stubborn ready");
            let _ = out.flush();
            sleep_forever()
        }
        Some("alloc") => {
            let mb: usize = args.get(1).and_then(|m| m.parse().ok()).unwrap_or(100);
            let mut v: Vec<u8> = Vec::with_capacity(mb << 20);
            for _ in 0..mb {
                v.extend(std::iter::repeat_n(7u8, 1 << 20));
            }
            let _ = writeln!(out, "allocated {} MiB", v.len() >> 20);
            let _ = out.flush();
            sleep_forever()
        }
        Some("forkbomb") => {
            let mut forks = 0;
            loop {
                // SAFETY: fork in a single-threaded program; children only sleep.
                match unsafe { libc::fork() } {
                    0 => sleep_forever(),
                    pid if pid > 0 => forks += 1,
                    _ => {
                        let e = std::io::Error::last_os_error();
                        let _ = writeln!(
                            out,
                            "forks {forks} stopped by {}",
                            e.raw_os_error().unwrap_or(0)
                        );
                        let _ = out.flush();
                        sleep_forever()
                    }
                }
                if forks > 10_000 {
                    let _ = writeln!(out, "forks {forks} never stopped");
                    let _ = out.flush();
                    sleep_forever()
                }
            }
        }
        Some("spin") => {
            let mut x: u64 = 1;
            loop {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        _ => {
            eprintln!("usage: spore-probe report|exit N|sleep|stubborn|alloc MB|forkbomb|spin");
            std::process::exit(64)
        }
    }
}
