//! Content repository: blobs addressed by their SHA-256, OCI-like layout on disk.
//!
//! ```text
//! <root>/blobs/sha256/<64 hex>   immutable blobs, mode 0644
//! <root>/ingest/                 uploads in progress (temp files, removed on failure)
//! ```
//!
//! A blob becomes visible only after its bytes were hashed, compared with the expected digest,
//! fsynced and renamed into place; reads hash again and fail at the end on a mismatch, so a
//! bit flipped on disk is reported rather than served.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::{Digest, HashingReader};
use crate::fsutil;

/// A content repository rooted at one directory.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {0} is not in the store")]
    NotFound(Digest),
    #[error("upload does not match its digest: expected {expected}, content hashes to {actual}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("blob store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ContentStore {
    /// Opens (creating if needed) a store at `root`, clearing uploads a crash left behind
    /// (temp files untouched for an hour; younger ones may belong to a live upload).
    pub fn open(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = root.as_ref().to_path_buf();
        let store = ContentStore { root };
        for dir in [store.blob_dir(), store.ingest_dir()] {
            fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let ingest = store.ingest_dir();
        let stale = |e: &fs::DirEntry| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(3600))
        };
        if let Ok(entries) = fs::read_dir(&ingest) {
            for e in entries.flatten().filter(stale) {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn ingest_dir(&self) -> PathBuf {
        self.root.join("ingest")
    }

    /// Where the blob lives (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blob_dir().join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Size of a stored blob.
    pub fn size(&self, digest: &Digest) -> Result<u64, StoreError> {
        fs::metadata(self.path(digest))
            .map(|m| m.len())
            .map_err(|e| self.not_found_or(digest, e))
    }

    /// Stores everything `reader` yields. With `expected`, the blob is refused unless it hashes
    /// to it. Returns the digest and size. A blob already stored is left as it is.
    pub fn put(
        &self,
        reader: impl Read,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), StoreError> {
        let (mut file, temp) = self.begin_ingest()?;
        let io_err = |source| StoreError::Io {
            path: temp.clone(),
            source,
        };
        let mut hashing = HashingReader::new(reader);
        let copied = io::copy(&mut hashing, &mut file).map_err(io_err);
        let (actual, size) = hashing.finish();
        let result = copied.and_then(|_| match expected {
            Some(e) if *e != actual => Err(StoreError::Mismatch {
                expected: *e,
                actual,
            }),
            _ => self.finish_ingest(file, &temp, &actual),
        });
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result.map(|()| (actual, size))
    }

    /// Starts an upload whose bytes the caller writes and hashes itself (an async server):
    /// a new temp file in `ingest/`. Remove it on failure, or pass it to `finish_ingest`.
    pub fn begin_ingest(&self) -> Result<(File, PathBuf), StoreError> {
        let ingest = self.ingest_dir();
        fsutil::create_unique(&ingest, "upload", 0o644).map_err(|source| StoreError::Io {
            path: ingest,
            source,
        })
    }

    /// Makes a finished upload, whose content the caller hashed to `digest`, the blob `digest`:
    /// fsync, rename into place, fsync the directory. A blob already stored is kept and the
    /// upload dropped.
    pub fn finish_ingest(
        &self,
        file: File,
        temp: &Path,
        digest: &Digest,
    ) -> Result<(), StoreError> {
        let io_err = |source| StoreError::Io {
            path: temp.to_path_buf(),
            source,
        };
        let target = self.path(digest);
        if target.is_file() {
            drop(file);
            return fs::remove_file(temp).map_err(io_err);
        }
        file.sync_all().map_err(io_err)?;
        drop(file);
        fs::rename(temp, &target).map_err(|source| StoreError::Io {
            path: target.clone(),
            source,
        })?;
        fsutil::sync_dir(&self.blob_dir()).map_err(io_err)
    }

    /// Stores a file from disk.
    pub fn put_file(
        &self,
        path: &Path,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), StoreError> {
        let f = File::open(path).map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.put(f, expected)
    }

    /// Opens a blob for reading; the reader fails at its end if the bytes do not match.
    pub fn get(&self, digest: &Digest) -> Result<BlobReader, StoreError> {
        let file = File::open(self.path(digest)).map_err(|e| self.not_found_or(digest, e))?;
        Ok(BlobReader {
            file,
            hasher: Sha256::new(),
            expected: *digest,
        })
    }

    /// Reads a whole blob and checks its digest.
    pub fn verify(&self, digest: &Digest) -> Result<u64, StoreError> {
        let mut r = self.get(digest)?;
        io::copy(&mut r, &mut io::sink()).map_err(|source| StoreError::Io {
            path: self.path(digest),
            source,
        })
    }

    pub fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        fs::remove_file(self.path(digest)).map_err(|e| self.not_found_or(digest, e))
    }

    /// Every blob in the store, skipping names that are not digests.
    pub fn list(&self) -> Result<Vec<Digest>, StoreError> {
        let dir = self.blob_dir();
        let entries = fs::read_dir(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut out: Vec<Digest> = entries
            .flatten()
            .filter_map(|e| Digest::from_hex(&e.file_name().to_string_lossy()).ok())
            .collect();
        out.sort();
        Ok(out)
    }

    fn not_found_or(&self, digest: &Digest, e: io::Error) -> StoreError {
        if e.kind() == io::ErrorKind::NotFound {
            StoreError::NotFound(*digest)
        } else {
            StoreError::Io {
                path: self.path(digest),
                source: e,
            }
        }
    }
}

/// A blob being read; returns an `InvalidData` error at the end if its bytes do not hash to
/// its digest.
pub struct BlobReader {
    file: File,
    hasher: Sha256,
    expected: Digest,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.hasher.update(&buf[..n]);
        if n == 0 && !buf.is_empty() {
            let actual = Digest::from_bytes(self.hasher.clone().finalize().into());
            if actual != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "blob {} is corrupt on disk: its content hashes to {actual}; remove it and fetch it again",
                        self.expected
                    ),
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let data = b"spore bytes".repeat(1000);
        let (d, n) = store.put(&data[..], None).unwrap();
        assert_eq!((d, n), (Digest::of(&data), data.len() as u64));
        assert!(
            store
                .path(&d)
                .ends_with(format!("blobs/sha256/{}", d.hex()))
        );
        let mut back = Vec::new();
        store.get(&d).unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(store.size(&d).unwrap(), n);
        assert_eq!(store.list().unwrap(), vec![d]);
        // Storing it again with the right digest is fine.
        store.put(&data[..], Some(&d)).unwrap();
    }

    #[test]
    fn wrong_digest_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let wrong = Digest::of(b"other");
        let err = store.put(&b"data"[..], Some(&wrong)).unwrap_err();
        assert!(matches!(err, StoreError::Mismatch { .. }), "{err}");
        assert!(store.list().unwrap().is_empty());
        assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
    }

    #[test]
    fn corruption_on_disk_is_reported_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let (d, _) = store.put(&b"hello world"[..], None).unwrap();
        fs::write(store.path(&d), b"hello w0rld").unwrap();
        let err = store.verify(&d).unwrap_err().to_string();
        assert!(err.contains("corrupt on disk"), "{err}");
        let err = store.get(&Digest::of(b"absent")).err().unwrap();
        assert!(matches!(err, StoreError::NotFound(_)));
    }
}
