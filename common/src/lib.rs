//! Shared ground of Mycelium Mesh: the types every component speaks and the formats they trust.
//!
//! - [`digest`]: `sha256:<hex>` content digests, validated strictly.
//! - [`keys`] and [`trust`]: Ed25519 signing keys, short key ids, trusted-keys files with
//!   revocations.
//! - [`manifest`]: what a spore declares (command, env, nutrients, SLO, security, files).
//! - [`spore`]: the signed spore file: pack, verify (signature first, then parse, then hashes
//!   while streaming), extract safely, refuse rollbacks.
//! - [`store`]: the content repository (`blobs/sha256/<hex>`) shared by fabric and agent.
//! - [`fsutil`]: atomic file writes (temp + fsync + rename + fsync of the directory).
//!
//! - [`proto`] and [`model`]: the line protocol's text forms and the control-plane types.
//! - [`client`], [`blob`] and [`lines`]: the fabric's client (commands, subscriptions that
//!   resume) and blob transfer, used by the CLI, the agent and the edge.

pub mod blob;
pub mod client;
pub mod digest;
pub mod fsutil;
pub mod keys;
pub mod lines;
pub mod manifest;
pub mod model;
pub mod proto;
pub mod spore;
pub mod store;
pub mod trust;

pub use digest::Digest;
pub use keys::{KeyId, PublicKey, SecretKey};
pub use manifest::Manifest;
pub use trust::TrustStore;
