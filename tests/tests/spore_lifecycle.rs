//! The life of a spore with the real binaries: key gen -> pack the example service ->
//! verify -> extract -> run the extracted binary -> it serves HTTP; and a tampered copy of the
//! same spore is refused with nothing extracted.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::process::Command;
use std::time::Duration;

use mesh_tests::{ChildGuard, bin, free_port, http_get, wait_until};

fn mesh(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(bin("mesh")).args(args).output().unwrap()
}

macro_rules! os {
    ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new($a)),*] };
}

#[test]
fn packed_hello_verifies_extracts_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let spore = dir.path().join("hello.spore");
    let run = dir.path().join("run");
    let hello = bin("hello");

    assert!(mesh(os!["key", "gen", "--out", &keys]).status.success());
    let out = mesh(os![
        "spore",
        "pack",
        &hello,
        "--name",
        "hello",
        "--version",
        "1.0.0",
        "--env",
        "HELLO_VERSION=1.0.0-e2e",
        "--key",
        &keys.join("mesh.key"),
        "-o",
        &spore,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A tampered copy: one payload byte flipped. Refused, nothing extracted.
    let mut bytes = fs::read(&spore).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x20;
    let bad = dir.path().join("bad.spore");
    fs::write(&bad, &bytes).unwrap();
    let bad_run = dir.path().join("bad-run");
    let out = mesh(os![
        "spore",
        "extract",
        &bad,
        "--trust",
        &keys.join("mesh.pub"),
        "--into",
        &bad_run
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!bad_run.exists());

    let out = mesh(os![
        "spore",
        "extract",
        &spore,
        "--trust",
        &keys.join("mesh.pub"),
        "--into",
        &run
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Run what was extracted, the way the agent will: cwd = run dir, manifest env + PORT.
    let port = free_port();
    let _child = ChildGuard::spawn(
        Command::new(run.join("hello"))
            .current_dir(&run)
            .env_clear()
            .env("PORT", port.to_string())
            .env("HELLO_VERSION", "1.0.0-e2e")
            .stdout(std::process::Stdio::null()),
    );
    assert!(
        wait_until(Duration::from_secs(10), || http_get(port, "/health")
            .is_ok_and(|(s, _)| s == 200)),
        "extracted hello never became healthy"
    );
    let (status, body) = http_get(port, "/").unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("hello from hello v1.0.0-e2e"), "{body}");
}
