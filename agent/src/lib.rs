//! Node agent of Mycelium Mesh.
//!
//! Runs spores as supervised processes: each instance in its own cgroup (nutrients as
//! limits), started with clone3 into that cgroup, watched and signalled only through its
//! pidfd, as an unprivileged user with capabilities dropped, its output in a rotated log file,
//! its identity on disk so that a restarted agent re-adopts it. Plans from the fabric, health
//! checks, endpoints and blue/green build on the [`supervisor::Supervisor`] (issue #5); eBPF
//! accounting joins from `mesh-ebpf` (issue #7).
//!
//! Modules: `cgroup` (layout, tree, limits), `spawn` (clone3 / fork fallback, privilege drop),
//! `pidfd`, `procfs` (identity), `users`, `capabilities`, `logs`, `record` (state on disk),
//! `supervisor` (start, watch, stop, adopt).

pub mod accounting;
pub mod capabilities;
pub mod cgroup;
pub mod health;
pub mod logs;
pub mod machine;
pub mod metrics;
pub mod node;
pub mod pidfd;
pub mod procfs;
pub mod record;
pub mod spawn;
pub mod spores;
pub mod supervisor;
pub mod users;
