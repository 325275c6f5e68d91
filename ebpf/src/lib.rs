//! eBPF programs of Mycelium Mesh.
//!
//! The programs are C, compiled by clang-19 (`-target bpf -O2 -g`, CO-RE against a committed
//! vmlinux.h) in this crate's build script and embedded as object bytes; the `#[repr(C)]`
//! structs here mirror the one C header shared with the kernel side. Nothing of this crate
//! runs in user space beyond handing bytes and layouts to the agent's loader (issue #7).
