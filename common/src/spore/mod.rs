//! The spore file: one signed file holding a manifest and the files it lists.
//!
//! ```text
//! offset  size  field
//!      0     8  magic            89 53 50 4f 52 45 0d 0a   ("\x89SPORE\r\n")
//!      8     2  format version   u16 little-endian, 1
//!     10     2  flags            u16, must be 0
//!     12     4  manifest length  u32 little-endian, 1 ..= 1 MiB
//!     16     8  key id           first 8 bytes of SHA-256 of the signer's public key
//!     24    64  signature        Ed25519 over "mycelium-spore-v1\0" || manifest bytes
//!     88     N  manifest         JSON (see manifest.rs), exactly the signed bytes
//!   88+N     -  payload          the files' bytes in manifest order, raw or one zstd frame
//! ```
//!
//! Reading follows one order and never skips a step: bounded header, trusted key, signature
//! over the raw manifest bytes, then JSON parsing and validation, then rollback check, then
//! every file hashed while it streams, then the end of the payload. No length or path from the
//! file is used before the step that checks it. docs/spore-format.md is the full specification.

mod extract;
mod pack;
mod rollback;

#[cfg(test)]
mod tests;

use std::io::{self, BufReader, Read};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::keys::KeyId;
use crate::manifest::{Compression, FileEntry, Manifest, ManifestError};
use crate::trust::{TrustError, TrustStore};

pub use extract::extract;
pub use pack::{PackError, PackFile, Progress, pack};
pub use rollback::VersionStore;

pub const MAGIC: [u8; 8] = *b"\x89SPORE\r\n";
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 88;
/// Largest manifest accepted (and written).
pub const MAX_MANIFEST_BYTES: u32 = 1 << 20;
/// Domain separation: a spore signature can never be replayed as another kind of signature.
pub const SIGNING_CONTEXT: &[u8] = b"mycelium-spore-v1\0";

/// Why a spore was refused. Every message says what is wrong; callers prefix the file name.
#[derive(Debug, thiserror::Error)]
pub enum SporeError {
    #[error("not a spore file (bad magic: the first 8 bytes are not \\x89SPORE\\r\\n)")]
    BadMagic,
    #[error("spore format version {0} is not supported (this mesh reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    #[error("header flags {0:#06x} are set; this mesh knows none (corrupt file or newer format)")]
    UnknownFlags(u16),
    #[error("manifest length {0} is outside 1..={MAX_MANIFEST_BYTES} bytes")]
    ManifestSize(u32),
    #[error("file is truncated: it ends inside the {0}")]
    Truncated(&'static str),
    #[error("signature by {0}")]
    Untrusted(#[source] TrustError),
    #[error(
        "signature by key {0} does not match the manifest (the manifest was altered or the signature is corrupt)"
    )]
    BadSignature(KeyId),
    #[error("manifest is signed but not valid JSON for this format: {0}")]
    ManifestJson(#[source] serde_json::Error),
    #[error("manifest is signed but refused: {0}")]
    Manifest(#[from] ManifestError),
    #[error(
        "app {app}: version {version} is older than version {seen} already seen (rollback refused; allow it explicitly to downgrade)"
    )]
    Rollback {
        app: String,
        version: semver::Version,
        seen: semver::Version,
    },
    #[error("file {path:?}: content hashes to {actual}, the manifest says {expected}")]
    HashMismatch {
        path: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("file {path:?}: payload ends after {got} of its {expected} bytes (truncated spore)")]
    FileTruncated {
        path: String,
        expected: u64,
        got: u64,
    },
    #[error(
        "payload continues past the declared files (the manifest's sizes are smaller than the content)"
    )]
    TrailingData,
    #[error("payload is not a valid zstd stream: {0}")]
    Decompress(#[source] io::Error),
    #[error("writing file {path:?}: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("extracting into {path}: {source}")]
    Extract {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What the fixed header says, before anything is trusted.
#[derive(Debug, Clone)]
pub struct Header {
    pub key_id: KeyId,
    pub signature: [u8; 64],
    pub manifest_len: u32,
}

/// How a spore is checked when it is opened.
pub struct VerifyOptions<'a> {
    pub trust: &'a TrustStore,
    /// Highest version seen per app; `None` skips rollback protection.
    pub versions: Option<&'a mut VersionStore>,
    /// Accept an older version than one already seen (an operator's explicit downgrade).
    pub allow_downgrade: bool,
}

impl<'a> VerifyOptions<'a> {
    pub fn new(trust: &'a TrustStore) -> Self {
        VerifyOptions {
            trust,
            versions: None,
            allow_downgrade: false,
        }
    }
}

/// A spore whose signature and manifest are verified; its files are not, until they stream.
pub struct OpenSpore<'a, R: Read> {
    manifest: Manifest,
    header: Header,
    payload: Payload<R>,
    versions: Option<&'a mut VersionStore>,
}

/// The result of a full verification.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    pub key_id: KeyId,
    /// Bytes of file content checked.
    pub content_bytes: u64,
}

/// Receives each file's bytes as they stream. `finish` runs only after the file's hash matched.
pub trait FileSink {
    fn start(&mut self, entry: &FileEntry) -> io::Result<()>;
    fn write(&mut self, data: &[u8]) -> io::Result<()>;
    fn finish(&mut self, entry: &FileEntry) -> io::Result<()>;
}

/// Opens a spore: header, trusted key, signature, manifest, rollback check, in that order.
pub fn open<'a, R: Read>(
    mut reader: R,
    opts: VerifyOptions<'a>,
) -> Result<OpenSpore<'a, R>, SporeError> {
    let header = read_header(&mut reader)?;
    let key = opts
        .trust
        .lookup(header.key_id)
        .map_err(SporeError::Untrusted)?;
    let manifest_bytes = read_manifest_bytes(&mut reader, &header)?;
    let mut signed = Vec::with_capacity(SIGNING_CONTEXT.len() + manifest_bytes.len());
    signed.extend_from_slice(SIGNING_CONTEXT);
    signed.extend_from_slice(&manifest_bytes);
    if !key.verify(&signed, &header.signature) {
        return Err(SporeError::BadSignature(header.key_id));
    }
    // Only now is the manifest text trusted enough to parse.
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).map_err(SporeError::ManifestJson)?;
    manifest.validate()?;
    if let Some(store) = opts.versions.as_deref() {
        store.check(&manifest.name, &manifest.version, opts.allow_downgrade)?;
    }
    let payload = Payload::new(reader, manifest.compression)?;
    Ok(OpenSpore {
        manifest,
        header,
        payload,
        versions: opts.versions,
    })
}

/// Reads header and manifest without checking the signature: for display only
/// (`mesh spore inspect`), never for acting on a spore.
pub fn inspect_unverified(mut reader: impl Read) -> Result<(Header, Manifest), SporeError> {
    let header = read_header(&mut reader)?;
    let bytes = read_manifest_bytes(&mut reader, &header)?;
    let manifest = serde_json::from_slice(&bytes).map_err(SporeError::ManifestJson)?;
    Ok((header, manifest))
}

fn read_header(reader: &mut impl Read) -> Result<Header, SporeError> {
    let mut buf = [0u8; HEADER_LEN];
    let got = read_full(reader, &mut buf)?;
    if got < MAGIC.len() || buf[..8] != MAGIC {
        return Err(SporeError::BadMagic);
    }
    if got < HEADER_LEN {
        return Err(SporeError::Truncated("header"));
    }
    let version = u16::from_le_bytes([buf[8], buf[9]]);
    if version != FORMAT_VERSION {
        return Err(SporeError::UnsupportedVersion(version));
    }
    let flags = u16::from_le_bytes([buf[10], buf[11]]);
    if flags != 0 {
        return Err(SporeError::UnknownFlags(flags));
    }
    let manifest_len = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
    if manifest_len == 0 || manifest_len > MAX_MANIFEST_BYTES {
        return Err(SporeError::ManifestSize(manifest_len));
    }
    let mut key_id = [0u8; 8];
    key_id.copy_from_slice(&buf[16..24]);
    let mut signature = [0u8; 64];
    signature.copy_from_slice(&buf[24..88]);
    Ok(Header {
        key_id: KeyId(key_id),
        signature,
        manifest_len,
    })
}

fn read_manifest_bytes(reader: &mut impl Read, header: &Header) -> Result<Vec<u8>, SporeError> {
    // The length is bounded by read_header, so this allocation is at most 1 MiB.
    let mut bytes = vec![0u8; header.manifest_len as usize];
    if read_full(reader, &mut bytes)? < bytes.len() {
        return Err(SporeError::Truncated("manifest"));
    }
    Ok(bytes)
}

/// Like read_exact, but says how much it got instead of failing at EOF.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The magic number of a zstd data frame (skippable frames, which carry unsigned bytes and
/// no content, are refused).
const ZSTD_FRAME_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

type ZstdSource<R> = BufReader<io::Chain<io::Cursor<[u8; 4]>, R>>;

/// The payload stream, decoded.
enum Payload<R: Read> {
    Raw(R),
    Zstd(zstd::stream::read::Decoder<'static, ZstdSource<R>>),
}

impl<R: Read> Payload<R> {
    fn new(mut reader: R, compression: Compression) -> Result<Self, SporeError> {
        Ok(match compression {
            Compression::None => Payload::Raw(reader),
            Compression::Zstd => {
                let mut magic = [0u8; 4];
                if read_full(&mut reader, &mut magic)? < magic.len() {
                    return Err(SporeError::Truncated("payload"));
                }
                if magic != ZSTD_FRAME_MAGIC {
                    return Err(SporeError::Decompress(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the payload does not start with a zstd data frame",
                    )));
                }
                let source = BufReader::new(io::Cursor::new(magic).chain(reader));
                let decoder = zstd::stream::read::Decoder::with_buffer(source)
                    .map_err(SporeError::Decompress)?;
                Payload::Zstd(decoder.single_frame())
            }
        })
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, SporeError> {
        loop {
            let r = match self {
                Payload::Raw(r) => r.read(buf),
                Payload::Zstd(d) => d.read(buf),
            };
            return match r {
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(match (self, e.kind()) {
                    (_, io::ErrorKind::UnexpectedEof) => SporeError::Truncated("payload"),
                    (Payload::Zstd(_), _) => SporeError::Decompress(e),
                    (Payload::Raw(_), _) => SporeError::Io(e),
                }),
            };
        }
    }

    /// Succeeds only if neither the decoded stream nor the file holds another byte.
    fn expect_end(self) -> Result<(), SporeError> {
        let mut one = [0u8; 1];
        match self {
            Payload::Raw(mut r) => {
                if read_full(&mut r, &mut one)? != 0 {
                    return Err(SporeError::TrailingData);
                }
            }
            Payload::Zstd(mut d) => {
                if read_full(&mut d, &mut one).map_err(SporeError::Decompress)? != 0 {
                    return Err(SporeError::TrailingData);
                }
                let mut rest = d.finish();
                if read_full(&mut rest, &mut one)? != 0 {
                    return Err(SporeError::TrailingData);
                }
            }
        }
        Ok(())
    }
}

impl<'a, R: Read> OpenSpore<'a, R> {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Streams every file into `sink`, checking each hash before `finish`, then checks that the
    /// payload ends exactly after the last file, then records the version as seen.
    pub fn stream(mut self, sink: &mut dyn FileSink) -> Result<Verified, SporeError> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut content_bytes = 0;
        for entry in &self.manifest.files {
            let sink_err = |source| SporeError::Write {
                path: entry.path.clone(),
                source,
            };
            sink.start(entry).map_err(sink_err)?;
            let mut hasher = Sha256::new();
            let mut left = entry.size;
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                let n = self.payload.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(SporeError::FileTruncated {
                        path: entry.path.clone(),
                        expected: entry.size,
                        got: entry.size - left,
                    });
                }
                hasher.update(&buf[..n]);
                sink.write(&buf[..n]).map_err(sink_err)?;
                left -= n as u64;
            }
            let actual = Digest::from_bytes(hasher.finalize().into());
            if actual != entry.sha256 {
                return Err(SporeError::HashMismatch {
                    path: entry.path.clone(),
                    expected: entry.sha256,
                    actual,
                });
            }
            sink.finish(entry).map_err(sink_err)?;
            content_bytes += entry.size;
        }
        self.payload.expect_end()?;
        if let Some(store) = self.versions {
            store.record(&self.manifest.name, &self.manifest.version)?;
        }
        Ok(Verified {
            manifest: self.manifest,
            key_id: self.header.key_id,
            content_bytes,
        })
    }

    /// Checks every file without writing anything.
    pub fn verify(self) -> Result<Verified, SporeError> {
        struct Discard;
        impl FileSink for Discard {
            fn start(&mut self, _: &FileEntry) -> io::Result<()> {
                Ok(())
            }
            fn write(&mut self, _: &[u8]) -> io::Result<()> {
                Ok(())
            }
            fn finish(&mut self, _: &FileEntry) -> io::Result<()> {
                Ok(())
            }
        }
        self.stream(&mut Discard)
    }
}
