//! Control fabric of Mycelium Mesh.
//!
//! One process that holds the mesh's desired state: the registry of plans and endpoints, the
//! nutrient ledger of per-app budgets, pub/sub over the line protocol, persistence in an
//! embedded store behind a storage trait, and the content repository served over HTTP.
//! It meets agents and edges only on the line protocol and the blob HTTP API (issue #3).
