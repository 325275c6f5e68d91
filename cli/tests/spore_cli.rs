//! The `mesh key` and `mesh spore` commands as scripts use them: real binary, real files,
//! exit codes and the one-line messages.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = mesh(args);
    assert!(
        out.status.success(),
        "mesh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its stderr, which must be exactly one line.
fn fails(args: &[&str]) -> String {
    let out = mesh(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "mesh {args:?} did not exit 1: {out:?}"
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "want one line, got: {err}");
    err
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let env = Env {
            dir: tempfile::tempdir().unwrap(),
        };
        ok(&["key", "gen", "--out", env.s("keys"), "--comment", "ci key"]);
        let bin = env.path("app");
        fs::write(&bin, b"#!/bin/sh\necho hi\n".repeat(1000)).unwrap();
        env
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn s(&self, rel: &str) -> &'static str {
        Box::leak(
            self.path(rel)
                .to_string_lossy()
                .into_owned()
                .into_boxed_str(),
        )
    }

    fn pack(&self, version: &str, out: &str) -> String {
        ok(&[
            "spore",
            "pack",
            self.s("app"),
            "--name",
            "app",
            "--version",
            version,
            "--key",
            self.s("keys/mesh.key"),
            "-o",
            self.s(out),
        ])
    }
}

#[test]
fn key_gen_writes_a_private_key_and_a_trust_line() {
    let env = Env::new();
    let key = env.path("keys/mesh.key");
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let id = ok(&["key", "id", env.s("keys/mesh.pub")]);
    assert_eq!(id.trim().len(), 16);
    assert_eq!(ok(&["key", "id", env.s("keys/mesh.key")]), id);
    let pub_line = fs::read_to_string(env.path("keys/mesh.pub")).unwrap();
    assert!(pub_line.starts_with(&format!("ed25519 {} ", id.trim())));
    assert!(pub_line.trim_end().ends_with("ci key"));
    let err = fails(&["key", "gen", "--out", env.s("keys")]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn pack_then_verify_and_extract() {
    let env = Env::new();
    let out = env.pack("1.0.0", "app.spore");
    assert!(out.contains("packed app 1.0.0"), "{out}");
    let digest = out
        .lines()
        .find_map(|l| l.strip_prefix("digest "))
        .unwrap()
        .to_string();
    assert!(digest.starts_with("sha256:") && digest.len() == 71);
    let verified = ok(&[
        "spore",
        "verify",
        env.s("app.spore"),
        "--trust",
        env.s("keys/mesh.pub"),
    ]);
    assert!(
        verified.starts_with("ok: app 1.0.0 signed by key "),
        "{verified}"
    );
    assert!(
        verified.trim_end().ends_with(&digest),
        "verify and pack agree on the digest"
    );
    ok(&[
        "spore",
        "extract",
        env.s("app.spore"),
        "--trust",
        env.s("keys/mesh.pub"),
        "--into",
        env.s("run"),
    ]);
    assert_eq!(
        fs::read(env.path("run/app")).unwrap(),
        fs::read(env.path("app")).unwrap()
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["spore", "inspect", env.s("app.spore"), "--json"])).unwrap();
    assert_eq!(json["manifest"]["name"], "app");
    assert_eq!(json["manifest"]["files"][0]["mode"], 0o755);
    assert_eq!(json["verified"], false);
}

#[test]
fn verify_refuses_with_one_line_reasons() {
    let env = Env::new();
    env.pack("1.0.0", "app.spore");
    let trust = env.s("keys/mesh.pub");

    ok(&["key", "gen", "--out", env.s("other")]);
    let err = fails(&[
        "spore",
        "verify",
        env.s("app.spore"),
        "--trust",
        env.s("other/mesh.pub"),
    ]);
    assert!(err.contains("is not in the trusted key list"), "{err}");
    assert!(
        err.starts_with(&format!(
            "mesh: spore {}: signature by key ",
            env.s("app.spore")
        )),
        "{err}"
    );

    let id = ok(&["key", "id", trust]);
    fs::write(
        env.path("revoked"),
        format!("revoke {} rotated\n", id.trim()),
    )
    .unwrap();
    let err = fails(&[
        "spore",
        "verify",
        env.s("app.spore"),
        "--trust",
        trust,
        "--revoked",
        env.s("revoked"),
    ]);
    assert!(err.contains("is revoked (rotated)"), "{err}");

    let mut bytes = fs::read(env.path("app.spore")).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x40;
    fs::write(env.path("tampered.spore"), &bytes).unwrap();
    fails(&["spore", "verify", env.s("tampered.spore"), "--trust", trust]);

    fs::write(env.path("short.spore"), &bytes[..100]).unwrap();
    let err = fails(&["spore", "verify", env.s("short.spore"), "--trust", trust]);
    assert!(err.contains("truncated"), "{err}");

    let err = fails(&["spore", "verify", trust, "--trust", trust]);
    assert!(err.contains("not a spore file"), "{err}");
}

#[test]
fn rollback_store_refuses_older_versions_unless_allowed() {
    let env = Env::new();
    env.pack("2.0.0", "new.spore");
    env.pack("1.9.9", "old.spore");
    let trust = env.s("keys/mesh.pub");
    let versions = env.s("versions.json");
    ok(&[
        "spore",
        "verify",
        env.s("new.spore"),
        "--trust",
        trust,
        "--versions",
        versions,
    ]);
    let err = fails(&[
        "spore",
        "verify",
        env.s("old.spore"),
        "--trust",
        trust,
        "--versions",
        versions,
    ]);
    assert!(
        err.contains("version 1.9.9 is older than version 2.0.0"),
        "{err}"
    );
    ok(&[
        "spore",
        "verify",
        env.s("old.spore"),
        "--trust",
        trust,
        "--versions",
        versions,
        "--allow-downgrade",
    ]);
}

#[test]
fn pack_from_spore_toml_with_flag_overrides() {
    let env = Env::new();
    fs::write(
        env.path("spore.toml"),
        "name = \"svc\"\nversion = \"0.3.0\"\ncommand = \"bin/app\"\nargs = [\"--serve\"]\n\
         [nutrients]\nmemory_mb = 64\n[[files]]\npath = \"bin/app\"\nsource = \"app\"\nmode = 0o755\n",
    )
    .unwrap();
    ok(&[
        "spore",
        "pack",
        env.s("spore.toml"),
        "--key",
        env.s("keys/mesh.key"),
        "--version",
        "0.4.0",
        "--env",
        "MODE=prod",
        "-o",
        env.s("svc.spore"),
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["spore", "inspect", env.s("svc.spore"), "--json"])).unwrap();
    let m = &json["manifest"];
    assert_eq!(
        (m["name"].as_str(), m["version"].as_str()),
        (Some("svc"), Some("0.4.0"))
    );
    assert_eq!(m["args"][0], "--serve");
    assert_eq!(m["env"]["MODE"], "prod");
    assert_eq!(m["nutrients"]["memory_mb"], 64);
    assert_eq!(m["files"][0]["path"], "bin/app");
}

#[test]
fn pack_refuses_bad_input_clearly() {
    let env = Env::new();
    let key = env.s("keys/mesh.key");
    let err = fails(&["spore", "pack", env.s("app"), "--key", key]);
    assert!(err.contains("needs --name and --version"), "{err}");
    let err = fails(&[
        "spore",
        "pack",
        env.s("app"),
        "--name",
        "Bad_Name",
        "--version",
        "1.0.0",
        "--key",
        key,
    ]);
    assert!(err.contains("is not an app name"), "{err}");
    let err = fails(&[
        "spore",
        "pack",
        env.s("app"),
        "--name",
        "a",
        "--version",
        "1.0.0",
        "--key",
        env.s("keys/mesh.pub"),
    ]);
    assert!(
        err.contains("permissions") || err.contains("public key"),
        "{err}"
    );
    fs::set_permissions(env.path("keys/mesh.key"), fs::Permissions::from_mode(0o644)).unwrap();
    let err = fails(&[
        "spore",
        "pack",
        env.s("app"),
        "--name",
        "a",
        "--version",
        "1.0.0",
        "--key",
        key,
    ]);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!Path::new("a-1.0.0.spore").exists());
}
