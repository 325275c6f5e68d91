//! Spores on this node: fetched by digest from the fabric's blob service into a local content
//! store (resumable, digest-checked), verified (trusted key, every hash, rollback store) and
//! extracted into a fresh run dir per instance.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mesh_common::Digest;
use mesh_common::manifest::Manifest;
use mesh_common::spore::{self, SporeError, VerifyOptions, VersionStore};
use mesh_common::store::ContentStore;
use mesh_common::trust::TrustStore;

/// A download that has not finished by then is abandoned (and resumed on the next try), so a
/// dead connection cannot hold the download lock forever.
const DOWNLOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Why a spore could not be made ready; `fatal` when retrying the same digest cannot help.
#[derive(Debug, Clone)]
pub struct PrepareError {
    pub message: String,
    pub fatal: bool,
}

pub struct SporeCache {
    store: ContentStore,
    downloads: PathBuf,
    run_root: PathBuf,
    trust: TrustStore,
    versions: Mutex<VersionStore>,
    /// One download at a time: instances of a new digest start together and must not fetch
    /// the same blob into the same file twice.
    fetching: tokio::sync::Mutex<()>,
}

impl SporeCache {
    pub fn open(state_dir: &Path, trust: TrustStore) -> std::io::Result<Arc<SporeCache>> {
        let store = ContentStore::open(state_dir.join("spores")).map_err(std::io::Error::other)?;
        let downloads = state_dir.join("downloads");
        let run_root = state_dir.join("run");
        std::fs::create_dir_all(&downloads)?;
        std::fs::create_dir_all(&run_root)?;
        let versions = VersionStore::load(state_dir.join("versions.json"))?;
        Ok(Arc::new(SporeCache {
            store,
            downloads,
            run_root,
            trust,
            versions: Mutex::new(versions),
            fetching: tokio::sync::Mutex::new(()),
        }))
    }

    /// The run dir of an instance.
    pub fn run_dir(&self, app: &str, instance: &str) -> PathBuf {
        self.run_root.join(app).join(instance)
    }

    fn manifest_path(&self, app: &str, instance: &str) -> PathBuf {
        self.run_root
            .join(app)
            .join(format!("{instance}.manifest.json"))
    }

    /// The manifest of an extracted instance (for re-adopted instances).
    pub fn extracted_manifest(&self, app: &str, instance: &str) -> Option<Manifest> {
        let bytes = std::fs::read(self.manifest_path(app, instance)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Fetches (if needed), verifies and extracts the spore for an instance; returns its
    /// manifest and run dir. An instance restarting reuses its verified run dir.
    pub async fn prepare(
        self: &Arc<Self>,
        blob_url: &str,
        token: &str,
        app: &str,
        instance: &str,
        digest: Digest,
    ) -> Result<(Manifest, PathBuf), PrepareError> {
        let run_dir = self.run_dir(app, instance);
        if let Some(m) = self.extracted_manifest(app, instance)
            && run_dir.is_dir()
        {
            return Ok((m, run_dir));
        }
        let fetch_guard = self.fetching.lock().await;
        // Checked under the lock: the instance that waited finds the blob its sibling fetched.
        if !self.store.contains(&digest) {
            let dl = self.downloads.join(format!("{}.spore", digest.hex()));
            tokio::time::timeout(DOWNLOAD_TIMEOUT, mesh_common::blob::pull(blob_url, token, &digest, &dl, |_, _| {}))
                .await
                .map_err(|_| PrepareError {
                    message: format!("fetching {digest}: no end after {} s; the partial download is kept and resumed", DOWNLOAD_TIMEOUT.as_secs()),
                    fatal: false,
                })?
                .map_err(|e| PrepareError {
                    message: format!("fetching {digest}: {e}"),
                    fatal: false,
                })?;
            let this = self.clone();
            tokio::task::spawn_blocking(move || {
                let r = this.store.put_file(&dl, Some(&digest));
                let _ = std::fs::remove_file(&dl);
                r
            })
            .await
            .map_err(|e| PrepareError {
                message: e.to_string(),
                fatal: false,
            })?
            .map_err(|e| PrepareError {
                message: format!("storing {digest}: {e}"),
                fatal: false,
            })?;
        }
        drop(fetch_guard);
        let this = self.clone();
        let (app, instance) = (app.to_string(), instance.to_string());
        tokio::task::spawn_blocking(move || this.verify_and_extract(&app, &instance, digest))
            .await
            .map_err(|e| PrepareError {
                message: e.to_string(),
                fatal: false,
            })?
    }

    fn verify_and_extract(
        &self,
        app: &str,
        instance: &str,
        digest: Digest,
    ) -> Result<(Manifest, PathBuf), PrepareError> {
        let run_dir = self.run_dir(app, instance);
        // A run dir without its manifest file is a leftover of a crash mid-way: start fresh.
        if run_dir.exists() {
            let _ = std::fs::remove_dir_all(&run_dir);
        }
        if let Some(parent) = run_dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| PrepareError {
                message: format!("{}: {e}", parent.display()),
                fatal: false,
            })?;
        }
        let blob = self.store.get(&digest).map_err(|e| PrepareError {
            message: e.to_string(),
            fatal: false,
        })?;
        let mut versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let opts = VerifyOptions {
            trust: &self.trust,
            versions: Some(&mut versions),
            allow_downgrade: false,
        };
        let verified = spore::open(std::io::BufReader::new(blob), opts)
            .and_then(|open| {
                if open.manifest().name != app {
                    return Err(SporeError::Manifest(
                        mesh_common::manifest::ManifestError::Field {
                            field: "name".into(),
                            reason: format!(
                                "the spore is app {:?}, the plan says {app:?}",
                                open.manifest().name
                            ),
                        },
                    ));
                }
                spore::extract(open, &run_dir)
            })
            .map_err(|e| {
                let fatal = !matches!(
                    e,
                    SporeError::Io(_) | SporeError::Write { .. } | SporeError::Extract { .. }
                );
                PrepareError {
                    message: format!("spore {digest}: {e}"),
                    fatal,
                }
            })?;
        let json = serde_json::to_vec_pretty(&verified.manifest).map_err(|e| PrepareError {
            message: e.to_string(),
            fatal: false,
        })?;
        mesh_common::fsutil::write_atomic(self.manifest_path(app, instance), &json, 0o644)
            .map_err(|e| PrepareError {
                message: format!("saving the manifest: {e}"),
                fatal: false,
            })?;
        Ok((verified.manifest, run_dir))
    }

    /// Removes an instance's run dir once it is stopped for good.
    pub fn remove_run_dir(&self, app: &str, instance: &str) {
        let _ = std::fs::remove_dir_all(self.run_dir(app, instance));
        let _ = std::fs::remove_file(self.manifest_path(app, instance));
    }
}
