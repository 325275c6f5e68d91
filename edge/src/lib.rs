//! Edge of Mycelium Mesh: an HTTP/1.1 reverse proxy.
//!
//! Thread per core, each with its own io_uring and SO_REUSEPORT listener; request and
//! response heads parsed with httparse, bodies above a threshold moved with splice(2)
//! through a pooled pipe. Routes come from the fabric's endpoint stream and are swapped
//! atomically; routing, forwarding and accounting live in separate modules (issue #6).
