//! Roles, what each may do, and tokens.
//!
//! Tokens are 32 random bytes shown once as `mesh_<64 hex>`; the fabric stores only their
//! SHA-256, so a copy of its data directory does not leak usable tokens.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including tokens and budgets.
    Admin,
    /// Plans and blobs; reads everything.
    Deployer,
    /// Node agents: nodes, leases, endpoints; reads plans and budgets.
    Agent,
    /// Reads only.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Deployer => "deployer",
            Role::Agent => "agent",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "deployer" => Ok(Role::Deployer),
            "agent" => Ok(Role::Agent),
            "viewer" => Ok(Role::Viewer),
            _ => Err(format!(
                "{s:?} is not a role (admin, deployer, agent, viewer)"
            )),
        }
    }
}

/// What a command does, for the permission check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads state or subscribes.
    Read,
    /// Changes plans or uploads blobs.
    Deploy,
    /// Changes budgets or tokens.
    Administer,
    /// Registers nodes, leases and endpoints.
    Agent,
}

/// Whether `role` may perform `access`.
pub fn allows(role: Role, access: Access) -> bool {
    match access {
        Access::Read => true,
        Access::Deploy => matches!(role, Role::Admin | Role::Deployer),
        Access::Administer => role == Role::Admin,
        Access::Agent => matches!(role, Role::Admin | Role::Agent),
    }
}

/// A stored token: its role and a name for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub role: Role,
    pub name: String,
}

/// A new random token.
pub fn new_token() -> String {
    use rand_core::RngCore;
    let mut bytes = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut bytes);
    format!("mesh_{}", hex::encode(bytes))
}

/// The form a token is stored and looked up in.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_map_to_access() {
        assert!(allows(Role::Viewer, Access::Read));
        assert!(!allows(Role::Viewer, Access::Deploy));
        assert!(allows(Role::Deployer, Access::Deploy));
        assert!(!allows(Role::Deployer, Access::Administer));
        assert!(!allows(Role::Agent, Access::Administer));
        assert!(!allows(Role::Agent, Access::Deploy));
        assert!(allows(Role::Agent, Access::Agent));
        assert!(allows(Role::Admin, Access::Agent));
        assert!(!allows(Role::Deployer, Access::Agent));
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with("mesh_") && a.len() == 69);
        assert_eq!(token_hash(&a).len(), 64);
        assert_ne!(token_hash(&a), token_hash(&b));
    }
}
