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

static TERM_CODE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(1);

extern "C" fn on_term(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(TERM_CODE.load(std::sync::atomic::Ordering::SeqCst)) }
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
        Some("burn") => {
            // spin for MS milliseconds, then stay idle (a CPU total that holds still)
            let ms: u64 = args.get(1).and_then(|m| m.parse().ok()).unwrap_or(1000);
            let end = std::time::Instant::now() + std::time::Duration::from_millis(ms);
            let mut x: u64 = 1;
            while std::time::Instant::now() < end {
                for _ in 0..10_000 {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            let _ = writeln!(out, "burned");
            let _ = out.flush();
            sleep_forever()
        }
        Some("exit-after") => {
            let ms: u64 = args.get(1).and_then(|m| m.parse().ok()).unwrap_or(1000);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            std::process::exit(args.get(2).and_then(|c| c.parse().ok()).unwrap_or(1))
        }
        Some("exit-on-term") => {
            // exit with code N when SIGTERM arrives
            let code: i32 = args.get(1).and_then(|c| c.parse().ok()).unwrap_or(1);
            TERM_CODE.store(code, std::sync::atomic::Ordering::SeqCst);
            // SAFETY: installing a handler that only calls the async-signal-safe _exit.
            unsafe { libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t) };
            let _ = writeln!(out, "waiting for SIGTERM");
            let _ = out.flush();
            sleep_forever()
        }
        Some("fetch") => {
            // read everything a TCP server sends, then stay idle
            use std::io::Read;
            let addr = args.get(1).map(String::as_str).unwrap_or("127.0.0.1:1");
            let n = std::net::TcpStream::connect(addr)
                .and_then(|mut s| {
                    let mut buf = vec![0u8; 65536];
                    let mut total = 0usize;
                    loop {
                        match s.read(&mut buf)? {
                            0 => return Ok(total),
                            k => total += k,
                        }
                    }
                })
                .unwrap_or(0);
            let _ = writeln!(out, "fetched {n}");
            let _ = out.flush();
            sleep_forever()
        }
        _ => {
            eprintln!(
                "usage: spore-probe report|exit N|sleep|stubborn|alloc MB|forkbomb|spin|burn MS|exit-after MS N|fetch ADDR"
            );
            std::process::exit(64)
        }
    }
}
