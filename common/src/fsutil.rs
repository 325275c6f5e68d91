//! Atomic file writes: a reader never sees a half-written file, a crash never leaves one.
//!
//! The recipe is the classic one: write a temp file in the same directory, fsync it, rename it
//! over the target, fsync the directory so that the rename itself is durable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A file being written under a temporary name next to its final path.
/// Dropped without [`AtomicFile::commit`], the temporary file is removed.
pub struct AtomicFile {
    file: Option<File>,
    temp: PathBuf,
    target: PathBuf,
}

impl AtomicFile {
    /// Starts writing `target` with permission bits `mode` (applied at creation, so the
    /// content is never readable with wider permissions, whatever the umask).
    pub fn create(target: impl AsRef<Path>, mode: u32) -> io::Result<Self> {
        let target = target.as_ref().to_path_buf();
        let dir = parent_dir(&target);
        let name = target
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "target has no file name"))?
            .to_string_lossy()
            .into_owned();
        let (file, temp) = create_unique(dir, &format!(".{name}"), mode)?;
        Ok(AtomicFile {
            file: Some(file),
            temp,
            target,
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("AtomicFile used after commit")
    }

    /// Makes the content durable and visible under the target name.
    pub fn commit(mut self) -> io::Result<()> {
        let file = self.file.take().expect("AtomicFile committed twice");
        file.sync_all()?;
        drop(file);
        fs::rename(&self.temp, &self.target)?;
        sync_dir(parent_dir(&self.target))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Writes `bytes` to `path` atomically with permission bits `mode`.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = AtomicFile::create(path, mode)?;
    f.write_all(bytes)?;
    f.commit()
}

/// fsyncs a directory so that renames and creations inside it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates a new file `dir/<prefix>.<unique>.tmp` that did not exist before.
pub fn create_unique(dir: &Path, prefix: &str, mode: u32) -> io::Result<(File, PathBuf)> {
    loop {
        let path = dir.join(format!("{prefix}.{}.tmp", unique_suffix()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A name part that is unique within this process and very likely across processes.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{n}-{nanos:08x}", std::process::id())
}

/// Renames `from` to `to`, failing with `AlreadyExists` instead of replacing anything at `to`
/// (plain rename(2) silently replaces an empty directory).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
    };
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_atomic_replaces_content_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn rename_noreplace_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let err = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        let c = dir.path().join("c");
        rename_noreplace(&a, &c).unwrap();
        assert!(c.is_dir() && !a.exists());
    }

    #[test]
    fn dropped_file_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        {
            let mut f = AtomicFile::create(&p, 0o644).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert!(!p.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
