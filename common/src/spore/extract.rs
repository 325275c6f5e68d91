//! Extraction into a fresh run dir.
//!
//! Files are written into a private sibling directory (`.<name>.partial-*`, mode 0700) that only
//! this process created, each with O_CREAT|O_EXCL|O_NOFOLLOW, and the directory is renamed onto
//! the target (never replacing anything) only after every hash matched and the payload ended.
//! On any failure the partial directory is removed: nothing half-verified is ever visible.

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{FileSink, OpenSpore, SporeError, Verified};
use crate::fsutil;
use crate::manifest::FileEntry;

/// Verifies and extracts `spore` into `target`, which must not exist yet.
pub fn extract<R: Read>(spore: OpenSpore<'_, R>, target: &Path) -> Result<Verified, SporeError> {
    let fail = |source| SporeError::Extract {
        path: target.to_path_buf(),
        source,
    };
    if fs::symlink_metadata(target).is_ok() {
        return Err(fail(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "target already exists; a run dir is always fresh",
        )));
    }
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = target.file_name().ok_or_else(|| {
        fail(io::Error::new(
            io::ErrorKind::InvalidInput,
            "target has no name",
        ))
    })?;
    let partial = parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        fsutil::unique_suffix()
    ));
    DirBuilder::new()
        .mode(0o700)
        .create(&partial)
        .map_err(fail)?;
    let mut sink = DirSink {
        root: partial.clone(),
        dirs: BTreeSet::new(),
        file: None,
    };
    let result = spore.stream(&mut sink).and_then(|verified| {
        drop(sink.file.take());
        // Subdirectories first, so that a crash after the rename cannot lose an entry.
        for dir in sink.dirs.iter().rev() {
            fsutil::sync_dir(&partial.join(dir)).map_err(fail)?;
        }
        fs::set_permissions(&partial, fs::Permissions::from_mode(0o755)).map_err(fail)?;
        fsutil::sync_dir(&partial).map_err(fail)?;
        fsutil::rename_noreplace(&partial, target).map_err(fail)?;
        fsutil::sync_dir(parent).map_err(fail)?;
        Ok(verified)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    result
}

/// Writes streamed files under a directory this process created.
struct DirSink {
    root: PathBuf,
    dirs: BTreeSet<String>,
    file: Option<File>,
}

impl FileSink for DirSink {
    fn start(&mut self, entry: &FileEntry) -> io::Result<()> {
        // Paths were validated (relative, plain components, no duplicates) before any byte
        // of the payload was read; directories below root are ours alone.
        let mut prefix = String::new();
        let comps: Vec<&str> = entry.path.split('/').collect();
        for comp in &comps[..comps.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(comp);
            if self.dirs.insert(prefix.clone()) {
                let dir = self.root.join(&prefix);
                DirBuilder::new().mode(0o755).create(&dir)?;
                // Exact bits whatever the umask, like the files.
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
            }
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.root.join(&entry.path))?;
        self.file = Some(file);
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.write_all(data),
            None => Err(io::Error::other("write before start")),
        }
    }

    fn finish(&mut self, entry: &FileEntry) -> io::Result<()> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("finish before start"))?;
        // fchmod on the open file: exact bits whatever the umask, and no path lookup.
        file.set_permissions(fs::Permissions::from_mode(entry.mode & 0o777))?;
        file.sync_all()
    }
}
