//! Instance output: stdout and stderr go straight into one append-only file per instance, so
//! logging never depends on the agent being alive (a dying agent cannot block or kill a
//! spore through a pipe).
//!
//! Rotation is size based and keeps the current file's name, so `tail -F` follows it: the
//! current file is copied to `output.log.1` (older ones shift up) and then truncated in place;
//! the spore's O_APPEND descriptor keeps writing at the new end. Lines written between the
//! copy and the truncation (a few milliseconds at most) are the price of that.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const LOG_NAME: &str = "output.log";

/// Where an instance's logs live.
pub fn dir(state_dir: &Path, app: &str, instance: &str) -> PathBuf {
    state_dir.join("logs").join(app).join(instance)
}

/// Opens (creating) the current log of an instance for appending.
pub fn open_output(dir: &Path) -> io::Result<File> {
    fs::create_dir_all(dir)?;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(dir.join(LOG_NAME))
}

/// Rotates `dir/output.log` if it is larger than `max_bytes`, keeping `keep` old files.
/// Returns whether it rotated.
pub fn rotate_if_large(dir: &Path, max_bytes: u64, keep: usize) -> io::Result<bool> {
    let current = dir.join(LOG_NAME);
    let size = match fs::metadata(&current) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if size <= max_bytes || keep == 0 {
        if size > max_bytes {
            OpenOptions::new().write(true).open(&current)?.set_len(0)?;
            return Ok(true);
        }
        return Ok(false);
    }
    let numbered = |n: usize| dir.join(format!("{LOG_NAME}.{n}"));
    let _ = fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        let _ = fs::rename(numbered(n), numbered(n + 1));
    }
    let mut src = File::open(&current)?;
    let mut dst = File::create(numbered(1))?;
    io::copy(&mut src, &mut dst)?;
    dst.flush()?;
    OpenOptions::new().write(true).open(&current)?.set_len(0)?;
    Ok(true)
}

/// Reads what was appended to a file since `pos`, following truncation (rotation) like
/// `tail -F`: returns the new position.
pub fn read_new(path: &Path, pos: u64, out: &mut Vec<u8>) -> io::Result<u64> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = if len < pos { 0 } else { pos };
    f.seek(SeekFrom::Start(start))?;
    f.take(len - start).read_to_end(out)?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_name_and_the_writer_appends_at_the_new_end() {
        let d = tempfile::tempdir().unwrap();
        let mut w = open_output(d.path()).unwrap();
        w.write_all(&[b'a'; 100]).unwrap();
        assert!(!rotate_if_large(d.path(), 200, 2).unwrap());
        w.write_all(&[b'b'; 150]).unwrap();
        assert!(rotate_if_large(d.path(), 200, 2).unwrap());
        assert_eq!(fs::read(d.path().join("output.log.1")).unwrap().len(), 250);
        w.write_all(b"after\n").unwrap();
        assert_eq!(
            fs::read(d.path().join(LOG_NAME)).unwrap(),
            b"after\n",
            "O_APPEND writes at the new end"
        );
        w.write_all(&[b'c'; 300]).unwrap();
        rotate_if_large(d.path(), 200, 2).unwrap();
        w.write_all(&[b'd'; 300]).unwrap();
        rotate_if_large(d.path(), 200, 2).unwrap();
        assert!(d.path().join("output.log.2").exists());
        assert!(!d.path().join("output.log.3").exists(), "keeps two");
    }

    #[test]
    fn follow_reads_appends_and_restarts_after_truncation() {
        let d = tempfile::tempdir().unwrap();
        let mut w = open_output(d.path()).unwrap();
        let p = d.path().join(LOG_NAME);
        w.write_all(b"one\n").unwrap();
        let mut out = Vec::new();
        let pos = read_new(&p, 0, &mut out).unwrap();
        w.write_all(b"two\n").unwrap();
        let pos = read_new(&p, pos, &mut out).unwrap();
        assert_eq!(out, b"one\ntwo\n");
        rotate_if_large(d.path(), 1, 1).unwrap();
        w.write_all(b"3\n").unwrap();
        out.clear();
        read_new(&p, pos, &mut out).unwrap();
        assert_eq!(out, b"3\n");
    }
}
