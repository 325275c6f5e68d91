//! `mesh logs` over an agent state directory.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn logs_of_one_and_of_all_instances() {
    let dir = tempfile::tempdir().unwrap();
    for (i, text) in [("hello-1", "one\ntwo\n"), ("hello-2", "three\n")] {
        let d = dir.path().join("logs/hello").join(i);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("output.log"), text).unwrap();
    }
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mesh"))
            .args(args)
            .arg("--state")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let all = run(&["logs", "hello"]);
    assert!(all.status.success());
    assert_eq!(
        String::from_utf8(all.stdout).unwrap(),
        "[hello-1] one\n[hello-1] two\n[hello-2] three\n"
    );
    let one = run(&["logs", "hello", "--instance", "hello-2"]);
    assert_eq!(String::from_utf8(one.stdout).unwrap(), "three\n");
    let none = run(&["logs", "nope"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(
        String::from_utf8(none.stderr)
            .unwrap()
            .contains("no logs of app nope")
    );
}
