//! End-to-end tests of Mycelium Mesh: they run the real `mesh` and example binaries built by
//! the same `cargo test` invocation, with real processes, files and sockets.
