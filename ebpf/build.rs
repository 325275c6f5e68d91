//! Compiles the eBPF programs (bpf/mesh.bpf.c) with clang for the BPF target, and a host
//! probe that prints the C layout of the shared structs for the layout test.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for f in ["bpf/mesh.bpf.c", "bpf/mesh.h", "bpf/vmlinux.h"] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = std::env::var("CLANG").ok().unwrap_or_else(|| {
        ["clang-19", "clang"]
            .into_iter()
            .find(|c| {
                Command::new(c)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .unwrap_or("clang-19")
            .to_string()
    });
    let obj = out.join("mesh.bpf.o");
    let status = Command::new(&clang)
        .args([
            "-target",
            "bpf",
            "-O2",
            "-g",
            "-Wall",
            "-Werror",
            "-Ibpf",
            "-c",
            "bpf/mesh.bpf.c",
            "-o",
        ])
        .arg(&obj)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to compile bpf/mesh.bpf.c ({s})"),
        Err(e) => panic!(
            "cannot run {clang}: {e}. The eBPF programs need clang 19 and the libbpf headers: \
             `apt-get install clang-19 libbpf-dev` (or set CLANG=/path/to/clang)"
        ),
    }

    // The C compiler's view of the shared structs, for the #[repr(C)] mirror test.
    let probe_c = out.join("layout_probe.c");
    std::fs::write(
        &probe_c,
        r#"#include <stdio.h>
#include <stddef.h>
#include <linux/types.h>
#include "mesh.h"
#define F(s, f) printf("(\"" #s "." #f "\", %zu, %zu),\n", offsetof(struct s, f), sizeof(((struct s *)0)->f))
int main(void) {
    printf("pub const C_SIZES: &[(&str, usize)] = &[(\"mesh_cgroup_stats\", %zu), (\"mesh_event\", %zu)];\n",
        sizeof(struct mesh_cgroup_stats), sizeof(struct mesh_event));
    printf("pub const C_FIELDS: &[(&str, usize, usize)] = &[\n");
    F(mesh_cgroup_stats, cpu_ns); F(mesh_cgroup_stats, rx_bytes); F(mesh_cgroup_stats, rx_packets);
    F(mesh_cgroup_stats, tx_bytes); F(mesh_cgroup_stats, tx_packets); F(mesh_cgroup_stats, rq_count);
    F(mesh_cgroup_stats, rq_sum_ns); F(mesh_cgroup_stats, rq_hist); F(mesh_cgroup_stats, execs);
    F(mesh_cgroup_stats, exits);
    F(mesh_event, kind); F(mesh_event, pid); F(mesh_event, ppid); F(mesh_event, exit_code);
    F(mesh_event, cgroup_id); F(mesh_event, ts_ns); F(mesh_event, comm); F(mesh_event, filename);
    printf("];\npub const C_CONSTS: &[(&str, u64)] = &[(\"MESH_RQ_SLOTS\", %d), (\"MESH_EVENT_EXEC\", %d), (\"MESH_EVENT_EXIT\", %d)];\n",
        MESH_RQ_SLOTS, MESH_EVENT_EXEC, MESH_EVENT_EXIT);
    return 0;
}
"#,
    )
    .expect("write layout probe");
    let probe = out.join("layout_probe");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let ok = Command::new(&cc)
        .arg("-Ibpf")
        .arg(&probe_c)
        .arg("-o")
        .arg(&probe)
        .status()
        .is_ok_and(|s| s.success());
    let layout = if ok {
        Command::new(&probe)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        None
    };
    // Without a host C compiler the layout test has nothing to compare with; it says so.
    let layout = layout.unwrap_or_else(|| {
        "pub const C_SIZES: &[(&str, usize)] = &[];\npub const C_FIELDS: &[(&str, usize, usize)] = &[];\npub const C_CONSTS: &[(&str, u64)] = &[];\n".into()
    });
    std::fs::write(out.join("c_layout.rs"), layout).expect("write c_layout.rs");
}
