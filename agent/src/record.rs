//! What the agent remembers about each running instance, on disk, so that a restarted agent
//! can find and re-adopt it. One JSON file per instance, written atomically.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub app: String,
    pub instance: String,
    pub digest: String,
    pub pid: u32,
    /// /proc/PID/stat start time: with the pid, the process's identity.
    pub start_time: u64,
    /// Absolute path of the instance's v2 cgroup.
    pub cgroup: PathBuf,
    /// The same cgroup as /proc/PID/cgroup spells it (relative to the v2 mount).
    pub cgroup_rel: PathBuf,
    pub port: Option<u16>,
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
    /// Unix seconds.
    pub started_at: u64,
    pub stop_grace_ms: u64,
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("instances")
}

fn path(state_dir: &Path, app: &str, instance: &str) -> PathBuf {
    dir(state_dir).join(format!("{app}--{instance}.json"))
}

impl InstanceRecord {
    pub fn save(&self, state_dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir(state_dir))?;
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        mesh_common::fsutil::write_atomic(path(state_dir, &self.app, &self.instance), &bytes, 0o600)
    }

    pub fn remove(state_dir: &Path, app: &str, instance: &str) -> io::Result<()> {
        match std::fs::remove_file(path(state_dir, app, instance)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every record on disk; unreadable ones are reported and skipped.
    pub fn load_all(state_dir: &Path) -> Vec<InstanceRecord> {
        let Ok(entries) = std::fs::read_dir(dir(state_dir)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(path = %p.display(), "skipping an unreadable instance record: {e}")
                }
            }
        }
        out.sort_by(|a: &InstanceRecord, b| (&a.app, &a.instance).cmp(&(&b.app, &b.instance)));
        out
    }
}
