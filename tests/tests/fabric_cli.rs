//! The fabric's CLI as an operator uses it: the real `mesh` against a real `mesh fabric`,
//! finding it through flags, environment or a client config file.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use mesh_tests::{FabricProcess, bin};

fn mesh(envs: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(bin("mesh"));
    c.args(args)
        .env_remove("MESH_FABRIC")
        .env_remove("MESH_TOKEN")
        .env_remove("MESH_CONFIG");
    // No config from the developer's home directory.
    c.env("XDG_CONFIG_HOME", "/nonexistent");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stdout_ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr_fail(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "expected failure, got {o:?}");
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[test]
fn push_deploy_budget_ps_with_env_flags_and_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let fabric = FabricProcess::start(&dir.path().join("data"));
    let addr = fabric.line.to_string();
    let token = fabric.token();
    let env = [
        ("MESH_FABRIC", addr.as_str()),
        ("MESH_TOKEN", token.as_str()),
    ];

    let keys = dir.path().join("keys");
    stdout_ok(&mesh(&[], &["key", "gen", "--out", keys.to_str().unwrap()]));
    let spore = dir.path().join("hello.spore");
    let hello = bin("hello");
    stdout_ok(&mesh(
        &[],
        &[
            "spore",
            "pack",
            hello.to_str().unwrap(),
            "--name",
            "hello",
            "--version",
            "1.0.0",
            "--key",
            keys.join("mesh.key").to_str().unwrap(),
            "-o",
            spore.to_str().unwrap(),
        ],
    ));
    let digest = stdout_ok(&mesh(&env, &["spore", "push", spore.to_str().unwrap()]))
        .trim()
        .to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );

    // No token anywhere: a clear error, not a hang.
    let err = stderr_fail(&mesh(&[("MESH_FABRIC", &addr)], &["ps"]));
    assert!(err.contains("no token"), "{err}");

    let out = stdout_ok(&mesh(
        &env,
        &["deploy", "hello", &digest, "--min", "2", "--port", "8081"],
    ));
    assert!(out.starts_with("deployed hello sha256:"), "{out}");
    let err = stderr_fail(&mesh(
        &env,
        &[
            "budget",
            "hello",
            "--max-instances",
            "1",
            "--cpu",
            "1",
            "--memory",
            "1G",
        ],
    ));
    assert!(
        err.contains("plan min 2 exceeds the budget's max_instances 1"),
        "{err}"
    );
    stdout_ok(&mesh(
        &env,
        &[
            "budget",
            "hello",
            "--max-instances",
            "4",
            "--cpu",
            "2000m",
            "--memory",
            "1G",
        ],
    ));
    let err = stderr_fail(&mesh(&env, &["scale", "hello", "--min", "5"]));
    assert!(err.contains("BUDGET"), "{err}");

    // Flags instead of the environment.
    let ps = stdout_ok(&mesh(&[], &["ps", "--fabric", &addr, "--token", &token]));
    let row = ps.lines().find(|l| l.starts_with("hello ")).unwrap();
    assert!(
        row.contains(&digest[7..19]) && row.contains(" 8081 "),
        "{ps}"
    );

    // A client config file with a token file, as `mesh up` leaves behind.
    let cfg = dir.path().join("client.toml");
    std::fs::write(
        &cfg,
        format!(
            "fabric = \"{addr}\"\ntoken_file = \"{}\"\n",
            fabric.data.join("admin.token").display()
        ),
    )
    .unwrap();
    let budget = stdout_ok(&mesh(
        &[("MESH_CONFIG", cfg.to_str().unwrap())],
        &["budget", "hello"],
    ));
    assert_eq!(
        budget.trim(),
        "hello: max 4 instances, 2000m CPU, 1024 MiB memory (rev 2)",
        "refusals take no revision"
    );

    // A viewer token reads but cannot deploy.
    let viewer = stdout_ok(&mesh(&env, &["token", "create", "--role", "viewer"]))
        .trim()
        .to_string();
    let venv = [
        ("MESH_FABRIC", addr.as_str()),
        ("MESH_TOKEN", viewer.as_str()),
    ];
    stdout_ok(&mesh(&venv, &["ps", "--json"]));
    let err = stderr_fail(&mesh(&venv, &["deploy", "hello", &digest]));
    assert!(
        err.contains("DENIED role viewer may not run PLAN.SET"),
        "{err}"
    );

    // The pulled spore is byte for byte the pushed one.
    let pulled = dir.path().join("pulled.spore");
    stdout_ok(&mesh(
        &env,
        &["spore", "pull", &digest, "-o", pulled.to_str().unwrap()],
    ));
    assert_eq!(
        std::fs::read(&pulled).unwrap(),
        std::fs::read(&spore).unwrap()
    );

    stdout_ok(&mesh(&env, &["undeploy", "hello"]));
    let err = stderr_fail(&mesh(&env, &["undeploy", "hello"]));
    assert!(err.contains("NOT_FOUND"), "{err}");
}

#[test]
fn unreachable_fabric_is_a_clear_error() {
    let port = mesh_tests::free_port();
    let err = stderr_fail(&mesh(
        &[("MESH_TOKEN", "mesh_x")],
        &["ps", "--fabric", &format!("127.0.0.1:{port}")],
    ));
    assert!(
        err.contains("cannot reach the fabric at 127.0.0.1:"),
        "{err}"
    );
    assert!(err.contains("is `mesh fabric` running there?"), "{err}");
}
