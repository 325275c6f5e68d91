//! Node agent of Mycelium Mesh.
//!
//! Watches plans from the fabric, fetches and verifies spores by digest, extracts them into
//! fresh run dirs, spawns them into their own cgroups (clone3 with CLONE_PIDFD |
//! CLONE_INTO_CGROUP), supervises them through pidfds, health-checks them, registers their
//! endpoints, rolls out new versions blue/green and re-adopts live instances after a restart.
//! eBPF accounting is loaded from `mesh-ebpf` (issues #4, #5, #7).
