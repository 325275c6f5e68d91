//! Ed25519 signing keys and their short ids.
//!
//! File formats (one line each, text):
//! - secret key (`mesh.key`, mode 0600): `mesh-secret-key ed25519 <key-id> <base64 32-byte seed>`
//! - public key (`mesh.pub`): `ed25519 <key-id> <base64 32-byte key> [comment]`, which is also
//!   a valid one-key trusted-keys file (see [`crate::trust`]).
//!
//! The key id is the first 8 bytes of SHA-256 over the raw public key, as 16 lowercase hex
//! digits: short enough to read aloud, long enough that a collision needs ~2^32 keys.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

use crate::digest::Digest;

const SECRET_TAG: &str = "mesh-secret-key";
pub(crate) const ALGORITHM: &str = "ed25519";

/// Short id of a public key: 16 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> Self {
        let d = Digest::of(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&d.as_bytes()[..8]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let ok = s.len() == 16
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let mut id = [0u8; 8];
        if !ok || hex::decode_to_slice(s, &mut id).is_err() {
            return Err(KeyError::BadKeyId(s.to_string()));
        }
        Ok(KeyId(id))
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Problems with key material or key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0:?} is not a key id (want 16 lowercase hex digits, as `mesh key id FILE` prints)")]
    BadKeyId(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: already exists; refusing to overwrite a key (move it away or pass --force)")]
    Exists { path: PathBuf },
    #[error(
        "{path}: permissions {mode:04o} give group or others access to the secret key; run `chmod 600 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

/// An Ed25519 public key with its id.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, String> {
        let key = VerifyingKey::from_bytes(bytes)
            .map_err(|_| "not a valid Ed25519 public key".to_string())?;
        Ok(PublicKey {
            id: KeyId::of(&key),
            key,
        })
    }

    /// Parses the base64 text of a raw 32-byte public key.
    pub fn from_base64(text: &str) -> Result<Self, String> {
        let raw = B64
            .decode(text)
            .map_err(|_| "public key is not valid base64".to_string())?;
        let bytes: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| format!("public key is {} bytes, want 32", raw.len()))?;
        Self::from_bytes(&bytes)
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.key.as_bytes())
    }

    /// Strict verification (rejects malleable and small-order signatures).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        self.key.verify_strict(message, &sig).is_ok()
    }

    /// The trusted-keys line for this key.
    pub fn to_line(&self, comment: &str) -> String {
        let comment = comment.replace(['\n', '\r'], " ");
        let comment = comment.trim();
        if comment.is_empty() {
            format!("{ALGORITHM} {} {}", self.id, self.to_base64())
        } else {
            format!("{ALGORITHM} {} {} {comment}", self.id, self.to_base64())
        }
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id)
    }
}

/// An Ed25519 signing key (zeroized on drop by ed25519-dalek).
pub struct SecretKey {
    key: SigningKey,
    public: PublicKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public.id)
    }
}

impl SecretKey {
    pub fn generate() -> Self {
        let key = SigningKey::generate(&mut rand_core::OsRng);
        Self::from_signing_key(key)
    }

    /// A key from a fixed 32-byte seed: deterministic keys for tests and fuzzing only.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self::from_signing_key(SigningKey::from_bytes(seed))
    }

    fn from_signing_key(key: SigningKey) -> Self {
        let vk = key.verifying_key();
        SecretKey {
            public: PublicKey {
                id: KeyId::of(&vk),
                key: vk,
            },
            key,
        }
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    pub fn id(&self) -> KeyId {
        self.public.id
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// Reads a secret key file, refusing one that group or others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io_err = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(io_err)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(io_err)?;
        Self::parse(&text).map_err(|reason| KeyError::Malformed {
            path: path.to_path_buf(),
            reason,
        })
    }

    fn parse(text: &str) -> Result<Self, String> {
        let line = text
            .lines()
            .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        let Some(line) = line else {
            return Err("empty file; create a key with `mesh key gen --out DIR`".into());
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [SECRET_TAG, ALGORITHM, id, seed] => {
                let raw = B64
                    .decode(seed)
                    .map_err(|_| "secret key is not valid base64".to_string())?;
                let seed: [u8; 32] = raw
                    .as_slice()
                    .try_into()
                    .map_err(|_| format!("secret key is {} bytes, want 32", raw.len()))?;
                let key = Self::from_signing_key(SigningKey::from_bytes(&seed));
                if key.id().to_string() != *id {
                    return Err(format!(
                        "the file names key id {id} but its key has id {}; the file is damaged",
                        key.id()
                    ));
                }
                Ok(key)
            }
            [ALGORITHM, ..] => Err(
                "this is a public key; signing needs the secret half (mesh.key, not mesh.pub)"
                    .into(),
            ),
            _ => Err(format!(
                "not a mesh secret key (want `{SECRET_TAG} {ALGORITHM} <id> <base64>`)"
            )),
        }
    }

    /// Writes `dir/mesh.key` (0600, created that way) and `dir/mesh.pub`.
    /// Returns the two paths. Refuses to overwrite unless `force`.
    pub fn write_pair(
        &self,
        dir: &Path,
        comment: &str,
        force: bool,
    ) -> Result<(PathBuf, PathBuf), KeyError> {
        let key_path = dir.join("mesh.key");
        let pub_path = dir.join("mesh.pub");
        if !force {
            for p in [&key_path, &pub_path] {
                if p.exists() {
                    return Err(KeyError::Exists { path: p.clone() });
                }
            }
        }
        fs::create_dir_all(dir).map_err(|source| KeyError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let secret_line = format!(
            "{SECRET_TAG} {ALGORITHM} {} {}\n",
            self.id(),
            B64.encode(self.key.to_bytes())
        );
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| KeyError::Io { path, source }
        };
        crate::fsutil::write_atomic(&key_path, secret_line.as_bytes(), 0o600)
            .map_err(io(&key_path))?;
        let pub_line = format!("{}\n", self.public.to_line(comment));
        crate::fsutil::write_atomic(&pub_path, pub_line.as_bytes(), 0o644)
            .map_err(io(&pub_path))?;
        Ok((key_path, pub_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_pair_round_trips_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        let (kp, pp) = key.write_pair(dir.path(), "test key", false).unwrap();
        assert_eq!(
            fs::metadata(&kp).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let loaded = SecretKey::load(&kp).unwrap();
        assert_eq!(loaded.id(), key.id());
        let pub_text = fs::read_to_string(&pp).unwrap();
        assert!(pub_text.starts_with(&format!("ed25519 {} ", key.id())));
        assert!(pub_text.trim_end().ends_with("test key"));
        let sig = loaded.sign(b"hello");
        assert!(key.public().verify(b"hello", &sig));
        assert!(!key.public().verify(b"hellO", &sig));
    }

    #[test]
    fn refuses_to_overwrite_and_to_read_open_keys() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        key.write_pair(dir.path(), "", false).unwrap();
        let err = SecretKey::generate()
            .write_pair(dir.path(), "", false)
            .unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err}");
        let kp = dir.path().join("mesh.key");
        fs::set_permissions(&kp, fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretKey::load(&kp).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn key_id_is_stable_and_strict() {
        let pk = PublicKey::from_bytes(&[
            0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64,
            0x07, 0x3a, 0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68,
            0xf7, 0x07, 0x51, 0x1a,
        ])
        .unwrap();
        // sha256 of the RFC 8032 test-1 public key, first 8 bytes.
        assert_eq!(
            pk.id().to_string(),
            hex::encode(&Digest::of(pk.key.as_bytes()).as_bytes()[..8])
        );
        assert_eq!(pk.id().to_string().parse::<KeyId>().unwrap(), pk.id());
        for bad in [
            "",
            "3f2a",
            "3F2A000000000000",
            "3f2a00000000000g",
            "3f2a0000000000000",
        ] {
            assert!(bad.parse::<KeyId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn public_key_file_is_not_a_secret_key() {
        let dir = tempfile::tempdir().unwrap();
        let (_, pp) = SecretKey::generate()
            .write_pair(dir.path(), "", false)
            .unwrap();
        fs::set_permissions(&pp, fs::Permissions::from_mode(0o600)).unwrap();
        let err = SecretKey::load(&pp).unwrap_err().to_string();
        assert!(err.contains("public key"), "{err}");
    }
}
