//! Rollback protection: the highest version seen per app, kept in a small JSON file.
//!
//! A verifier given a store refuses a spore older than what it has seen for that app unless
//! the caller allows a downgrade explicitly; a fully verified spore raises the mark (even if
//! extracting it then fails locally: the version was seen, signed and intact). Versions
//! compare by SemVer precedence, so build metadata is ignored. One process owns a store file.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::SporeError;
use crate::fsutil;

/// Highest version seen per app, persisted at one path.
#[derive(Debug)]
pub struct VersionStore {
    path: PathBuf,
    seen: BTreeMap<String, semver::Version>,
}

impl VersionStore {
    /// Loads the store at `path`; a missing file is an empty store.
    pub fn load(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let seen = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("version store {}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(VersionStore { path, seen })
    }

    pub fn get(&self, app: &str) -> Option<&semver::Version> {
        self.seen.get(app)
    }

    /// Refuses `version` when a higher one was seen, unless `allow_downgrade`.
    pub fn check(
        &self,
        app: &str,
        version: &semver::Version,
        allow_downgrade: bool,
    ) -> Result<(), SporeError> {
        match self.seen.get(app) {
            Some(seen) if version.cmp_precedence(seen).is_lt() && !allow_downgrade => {
                Err(SporeError::Rollback {
                    app: app.to_string(),
                    version: version.clone(),
                    seen: seen.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Raises the mark for `app` to `version` if it is higher, durably.
    pub fn record(&mut self, app: &str, version: &semver::Version) -> io::Result<()> {
        // SemVer precedence: build metadata (`+b`) does not make a version newer or older.
        if self
            .seen
            .get(app)
            .is_some_and(|seen| seen.cmp_precedence(version).is_ge())
        {
            return Ok(());
        }
        self.seen.insert(app.to_string(), version.clone());
        let mut bytes = serde_json::to_vec_pretty(&self.seen).map_err(io::Error::other)?;
        bytes.push(b'\n');
        fsutil::write_atomic(&self.path, &bytes, 0o644)
    }
}
