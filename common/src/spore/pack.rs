//! Packing: hash every file, build and validate the manifest, sign it, stream the payload.
//!
//! Files are read twice (once to hash for the manifest, once to write the payload) and the
//! second read is hashed again, so a file that changes while packing fails the pack instead
//! of producing a spore that can never verify.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::SystemTime;

use super::{FORMAT_VERSION, MAGIC, MAX_MANIFEST_BYTES, SIGNING_CONTEXT};
use crate::digest::HashingReader;
use crate::keys::SecretKey;
use crate::manifest::{Compression, FileEntry, Manifest, ManifestError, SporeSpec};

/// A file to put into a spore.
#[derive(Debug, Clone)]
pub struct PackFile {
    /// Path inside the spore.
    pub path: String,
    /// Where to read it from.
    pub source: PathBuf,
    /// Permission bits; the source's own (without setuid/setgid/sticky) when `None`.
    pub mode: Option<u32>,
}

/// Why packing failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{path}: {source}")]
    Source {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}: not a regular file; spores carry regular files only")]
    NotRegular(PathBuf),
    #[error("{0}: changed while it was being packed; pack again when it is stable")]
    Changed(PathBuf),
    #[error("the spore would be refused: {0}")]
    Manifest(#[from] ManifestError),
    #[error(
        "manifest is {0} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit (too many files?)"
    )]
    ManifestTooLarge(usize),
    #[error("writing the spore: {0}")]
    Output(#[source] io::Error),
}

/// Progress callback: bytes done and bytes in all (both passes over the files).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Packs `files` as described by `spec` (its `files` list is ignored: `files` is what is
/// packed), signs with `key`, writes the spore to `out`; returns the manifest written.
pub fn pack(
    spec: &SporeSpec,
    files: &[PackFile],
    key: &SecretKey,
    out: &mut dyn Write,
    progress: Progress<'_>,
) -> Result<Manifest, PackError> {
    let source_err = |path: &PathBuf| {
        let path = path.clone();
        move |source| PackError::Source { path, source }
    };
    let mut entries = Vec::with_capacity(files.len());
    let mut total = 0u64;
    for f in files {
        let meta = std::fs::metadata(&f.source).map_err(source_err(&f.source))?;
        if !meta.is_file() {
            return Err(PackError::NotRegular(f.source.clone()));
        }
        total += meta.len();
    }
    let all = total * 2;
    let mut done = 0u64;
    for f in files {
        let file = File::open(&f.source).map_err(source_err(&f.source))?;
        let mode = match f.mode {
            Some(m) => m,
            None => {
                file.metadata()
                    .map_err(source_err(&f.source))?
                    .permissions()
                    .mode()
                    & 0o777
            }
        };
        let mut r = HashingReader::new(file);
        copy_with_progress(&mut r, &mut io::sink(), &mut done, all, progress)
            .map_err(source_err(&f.source))?;
        let (sha256, size) = r.finish();
        entries.push(FileEntry {
            path: f.path.clone(),
            size,
            mode,
            sha256,
        });
    }
    let created_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let manifest = spec.to_manifest(entries, created_at);
    manifest.validate()?;
    let manifest_bytes =
        serde_json::to_vec(&manifest).map_err(|e| PackError::Output(io::Error::other(e)))?;
    if manifest_bytes.len() > MAX_MANIFEST_BYTES as usize {
        return Err(PackError::ManifestTooLarge(manifest_bytes.len()));
    }
    let mut signed = Vec::with_capacity(SIGNING_CONTEXT.len() + manifest_bytes.len());
    signed.extend_from_slice(SIGNING_CONTEXT);
    signed.extend_from_slice(&manifest_bytes);
    let signature = key.sign(&signed);

    let mut header = Vec::with_capacity(super::HEADER_LEN);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&(manifest_bytes.len() as u32).to_le_bytes());
    header.extend_from_slice(&key.id().0);
    header.extend_from_slice(&signature);
    out.write_all(&header).map_err(PackError::Output)?;
    out.write_all(&manifest_bytes).map_err(PackError::Output)?;

    match manifest.compression {
        Compression::None => write_payload(&manifest, files, out, &mut done, all, progress)?,
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(out, 3).map_err(PackError::Output)?;
            enc.include_contentsize(false).map_err(PackError::Output)?;
            write_payload(&manifest, files, &mut enc, &mut done, all, progress)?;
            enc.finish().map_err(PackError::Output)?;
        }
    }
    Ok(manifest)
}

fn write_payload(
    manifest: &Manifest,
    files: &[PackFile],
    out: &mut dyn Write,
    done: &mut u64,
    all: u64,
    progress: Progress<'_>,
) -> Result<(), PackError> {
    for (f, entry) in files.iter().zip(&manifest.files) {
        let file = File::open(&f.source).map_err(|source| PackError::Source {
            path: f.source.clone(),
            source,
        })?;
        // Read at most the hashed size; more or fewer bytes, or other bytes, mean it changed.
        let mut r = HashingReader::new(file.take(entry.size + 1));
        copy_with_progress(&mut r, out, done, all, progress).map_err(PackError::Output)?;
        let (sha256, size) = r.finish();
        if size != entry.size || sha256 != entry.sha256 {
            return Err(PackError::Changed(f.source.clone()));
        }
    }
    Ok(())
}

fn copy_with_progress(
    r: &mut dyn Read,
    w: &mut dyn Write,
    done: &mut u64,
    all: u64,
    progress: Progress<'_>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        *done += n as u64;
        progress(*done, all);
    }
}
