//! Trusted-keys files and revocations.
//!
//! A trusted-keys file is text, one entry per line; `#` starts a comment line, blank lines are
//! ignored:
//!
//! ```text
//! # who may sign spores for this node
//! ed25519 3f2a9c0d1e5b7a64 q1Yk...base64...= release key 2026
//! revoke  b81c40aa02d39f17 laptop stolen 2026-10-02
//! ```
//!
//! `ed25519 <key-id> <base64 public key> [comment]` trusts a key (a `mesh.pub` file is exactly
//! one such line); `revoke <key-id> [comment]` revokes one, whether or not it is listed. A
//! revocation list is a file of `revoke` lines; several files merge into one [`TrustStore`].

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::keys::{ALGORITHM, KeyId, PublicKey};

/// A key the store trusts, with where it came from.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    pub key: PublicKey,
    pub comment: String,
}

/// Trusted public keys plus revoked key ids.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    keys: BTreeMap<KeyId, TrustedKey>,
    revoked: BTreeMap<KeyId, String>,
    sources: Vec<PathBuf>,
}

/// Why a trust file could not be read, or why a key is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Syntax {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("key {id} is not in the trusted key list ({sources})")]
    Unknown { id: KeyId, sources: String },
    #[error("key {id} is revoked ({reason}) in {sources}")]
    Revoked {
        id: KeyId,
        reason: String,
        sources: String,
    },
}

impl TrustStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads one trusted-keys or revocation file.
    pub fn load(path: &Path) -> Result<Self, TrustError> {
        let mut store = TrustStore::new();
        store.merge_file(path)?;
        Ok(store)
    }

    /// Adds the entries of another file to this store.
    pub fn merge_file(&mut self, path: &Path) -> Result<(), TrustError> {
        let text = fs::read_to_string(path).map_err(|source| TrustError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.merge_text(&text, path)
    }

    /// Adds entries from text; `origin` names it in errors.
    pub fn merge_text(&mut self, text: &str, origin: &Path) -> Result<(), TrustError> {
        for (i, raw) in text.lines().enumerate() {
            let syntax = |reason: String| TrustError::Syntax {
                path: origin.to_path_buf(),
                line: i + 1,
                reason,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.splitn(2, char::is_whitespace);
            let kind = parts.next().unwrap_or_default();
            let rest = parts.next().unwrap_or_default().trim_start();
            match kind {
                ALGORITHM => {
                    let mut f = rest.split_whitespace();
                    let (Some(id), Some(b64)) = (f.next(), f.next()) else {
                        return Err(syntax(format!(
                            "want `{ALGORITHM} <key-id> <base64 public key> [comment]`"
                        )));
                    };
                    let comment = f.collect::<Vec<_>>().join(" ");
                    let id: KeyId = id
                        .parse()
                        .map_err(|e: crate::keys::KeyError| syntax(e.to_string()))?;
                    let key = PublicKey::from_base64(b64).map_err(syntax)?;
                    if key.id() != id {
                        return Err(syntax(format!(
                            "the line names key id {id} but its key has id {}; the line is damaged",
                            key.id()
                        )));
                    }
                    self.keys.insert(id, TrustedKey { key, comment });
                }
                "revoke" => {
                    let mut f = rest.splitn(2, char::is_whitespace);
                    let id = f.next().unwrap_or_default().trim();
                    if id.is_empty() {
                        return Err(syntax("want `revoke <key-id> [comment]`".into()));
                    }
                    let id: KeyId = id
                        .parse()
                        .map_err(|e: crate::keys::KeyError| syntax(e.to_string()))?;
                    let reason = f.next().unwrap_or_default().trim();
                    let reason = if reason.is_empty() {
                        "no reason given"
                    } else {
                        reason
                    };
                    self.revoked.insert(id, reason.to_string());
                }
                other => {
                    return Err(syntax(format!(
                        "unknown entry {other:?}; lines start with `{ALGORITHM}`, `revoke` or `#`"
                    )));
                }
            }
        }
        self.sources.push(origin.to_path_buf());
        Ok(())
    }

    /// Trusts a key directly (for a store built in code).
    pub fn trust(&mut self, key: PublicKey, comment: &str) {
        self.keys.insert(
            key.id(),
            TrustedKey {
                key,
                comment: comment.to_string(),
            },
        );
    }

    /// Revokes a key id directly.
    pub fn revoke(&mut self, id: KeyId, reason: &str) {
        self.revoked.insert(id, reason.to_string());
    }

    /// The key to verify a signature by `id` with, if it is trusted and not revoked.
    pub fn lookup(&self, id: KeyId) -> Result<&PublicKey, TrustError> {
        if let Some(reason) = self.revoked.get(&id) {
            return Err(TrustError::Revoked {
                id,
                reason: reason.clone(),
                sources: self.sources_text(),
            });
        }
        self.keys
            .get(&id)
            .map(|k| &k.key)
            .ok_or_else(|| TrustError::Unknown {
                id,
                sources: self.sources_text(),
            })
    }

    pub fn keys(&self) -> impl Iterator<Item = &TrustedKey> {
        self.keys.values()
    }

    pub fn revoked(&self) -> impl Iterator<Item = (&KeyId, &String)> {
        self.revoked.iter()
    }

    fn sources_text(&self) -> String {
        if self.sources.is_empty() {
            return "no trust file loaded".into();
        }
        self.sources
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    fn origin() -> &'static Path {
        Path::new("/etc/mesh/trusted.keys")
    }

    #[test]
    fn pub_file_line_is_a_trust_file() {
        let k = SecretKey::generate();
        let line = k.public().to_line("release key").replace(' ', "  \t");
        let text = format!("# comment\n\n{line}\n");
        let mut s = TrustStore::new();
        s.merge_text(&text, origin()).unwrap();
        assert_eq!(s.lookup(k.id()).unwrap().id(), k.id());
        assert_eq!(s.keys().next().unwrap().comment, "release key");
    }

    #[test]
    fn revocation_wins_over_trust() {
        let k = SecretKey::generate();
        let text = format!(
            "{}\nrevoke {} laptop stolen\n",
            k.public().to_line(""),
            k.id()
        );
        let mut s = TrustStore::new();
        s.merge_text(&text, origin()).unwrap();
        let err = s.lookup(k.id()).unwrap_err().to_string();
        assert!(err.contains("revoked (laptop stolen)"), "{err}");
        assert!(err.contains(&k.id().to_string()));
    }

    #[test]
    fn unknown_key_names_the_trust_file() {
        let mut s = TrustStore::new();
        s.merge_text("", origin()).unwrap();
        let id = SecretKey::generate().id();
        let err = s.lookup(id).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("key {id} is not in the trusted key list (/etc/mesh/trusted.keys)")
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let k = SecretKey::generate();
        let other = SecretKey::generate();
        let wrong_id = format!("ed25519 {} {}", other.id(), k.public().to_base64());
        let cases = [
            ("ssh-rsa AAAA", "unknown entry"),
            ("ed25519 abc", "want `ed25519"),
            ("ed25519 zz AAAA", "not a key id"),
            (wrong_id.as_str(), "damaged"),
            ("revoke", "want `revoke"),
        ];
        for (line, want) in cases {
            let text = format!("# header\n{line}\n");
            let err = TrustStore::new()
                .merge_text(&text, origin())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("/etc/mesh/trusted.keys:2: "), "{err}");
            assert!(err.contains(want), "{line}: {err}");
        }
    }
}
