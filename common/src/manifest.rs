//! What a spore declares: identity, how to run it, what it may consume, how to tell it is
//! healthy, what it may do, and the files it carries.
//!
//! The manifest travels as JSON inside the signed spore; [`SporeSpec`] is the `spore.toml` a
//! developer writes, which `mesh spore pack` turns into a manifest. [`Manifest::validate`] is
//! the one gate every manifest passes before anything acts on it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Most files one spore may carry.
pub const MAX_FILES: usize = 10_000;
/// Most bytes all files of one spore may add up to (16 GiB).
pub const MAX_TOTAL_BYTES: u64 = 16 << 30;
const MAX_PATH_BYTES: usize = 1024;
const MAX_COMPONENT_BYTES: usize = 255;
const MAX_DEPTH: usize = 32;
const MAX_ARGS: usize = 256;
const MAX_ENV: usize = 256;
const MAX_STRING_BYTES: usize = 8 * 1024;

/// A signed spore's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// App name: a DNS label (`[a-z][a-z0-9-]*`, at most 63 bytes); it names cgroups and hosts.
    pub name: String,
    /// Semantic version; rollback protection compares it per app.
    pub version: semver::Version,
    /// The program to run: one of `files`, relative to the run dir, with an exec bit.
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment of the spore (the agent adds PORT, and nothing else).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub nutrients: Nutrients,
    #[serde(default)]
    pub slo: Slo,
    #[serde(default)]
    pub security: Security,
    /// RFC 3339 time of packing, UTC.
    pub created_at: String,
    /// How the payload after the manifest is encoded.
    pub compression: Compression,
    /// The files, in payload order.
    pub files: Vec<FileEntry>,
}

/// Resources one instance may consume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Nutrients {
    /// CPU in thousandths of a core (1000 = one core), enforced as cpu.max.
    pub cpu_milli: u32,
    /// Memory limit in MiB, enforced as memory.max.
    pub memory_mb: u32,
    /// Most processes and threads, enforced as pids.max.
    pub pids: u32,
}

impl Default for Nutrients {
    fn default() -> Self {
        Nutrients {
            cpu_milli: 1000,
            memory_mb: 256,
            pids: 128,
        }
    }
}

/// How the agent decides an instance is healthy, and how long it waits for it to stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Slo {
    /// HTTP path probed with GET; `None` means a TCP connect is the check.
    pub health_path: Option<String>,
    /// Time after start before the first check.
    pub warmup_ms: u64,
    /// Time between checks.
    pub interval_ms: u64,
    /// Time one check may take.
    pub timeout_ms: u64,
    /// Passing checks must last this long before the instance counts as Ready.
    pub min_healthy_ms: u64,
    /// Time between SIGTERM and killing the instance's whole cgroup.
    pub stop_grace_ms: u64,
}

impl Default for Slo {
    fn default() -> Self {
        Slo {
            health_path: Some("/health".into()),
            warmup_ms: 100,
            interval_ms: 1000,
            timeout_ms: 1000,
            min_healthy_ms: 1000,
            stop_grace_ms: 5000,
        }
    }
}

/// Who the spore runs as and what it may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Security {
    /// Unprivileged user name; the agent maps it to a uid (never root).
    pub user: String,
    /// Capabilities the spore asks to keep (`CAP_NET_BIND_SERVICE`, ...); the agent's policy
    /// may still refuse them. Everything else is dropped.
    pub capabilities: Vec<String>,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            user: "mesh-spore".into(),
            capabilities: Vec::new(),
        }
    }
}

/// Payload encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    /// One zstd stream over all files' bytes.
    #[default]
    Zstd,
}

/// One file of a spore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative path inside the run dir: plain components separated by `/`.
    pub path: String,
    /// Exact size in bytes.
    pub size: u64,
    /// Permission bits (at most 0o777), optionally with the regular-file type bits.
    pub mode: u32,
    pub sha256: Digest,
}

/// Why a manifest is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest field {field}: {reason}")]
    Field { field: String, reason: String },
    #[error("file {path:?}: {reason}")]
    Path { path: String, reason: String },
    #[error("file {path:?}: mode {mode:o} {reason}")]
    Mode {
        path: String,
        mode: u32,
        reason: String,
    },
    #[error("file {path:?} appears twice")]
    Duplicate { path: String },
    #[error("file {path:?} is also used as a directory by {other:?}")]
    Conflict { path: String, other: String },
}

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;

impl Manifest {
    /// Checks every field against the format's rules; nothing may act on a manifest before.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let field = |field: &str, reason: String| ManifestError::Field {
            field: field.into(),
            reason,
        };
        check_app_name(&self.name).map_err(|r| field("name", r))?;
        if self.files.is_empty() {
            return Err(field("files", "a spore carries at least one file".into()));
        }
        if self.files.len() > MAX_FILES {
            return Err(field(
                "files",
                format!("{} files, at most {MAX_FILES}", self.files.len()),
            ));
        }
        let mut total: u64 = 0;
        let mut paths = BTreeSet::new();
        for f in &self.files {
            check_path(&f.path).map_err(|reason| ManifestError::Path {
                path: f.path.clone(),
                reason,
            })?;
            check_mode(f.mode).map_err(|reason| ManifestError::Mode {
                path: f.path.clone(),
                mode: f.mode,
                reason,
            })?;
            if !paths.insert(f.path.as_str()) {
                return Err(ManifestError::Duplicate {
                    path: f.path.clone(),
                });
            }
            total = total.saturating_add(f.size);
        }
        if total > MAX_TOTAL_BYTES {
            return Err(field(
                "files",
                format!("{total} bytes in all, at most {MAX_TOTAL_BYTES}"),
            ));
        }
        // A path that is a file cannot also be a directory of another path.
        for p in &paths {
            let mut prefix = String::new();
            for comp in p.split('/') {
                if !prefix.is_empty() && paths.contains(prefix.as_str()) {
                    return Err(ManifestError::Conflict {
                        path: prefix,
                        other: (*p).to_string(),
                    });
                }
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(comp);
            }
        }
        let command = self.command_path();
        match self.files.iter().find(|f| f.path == command) {
            None => {
                return Err(field(
                    "command",
                    format!("{:?} is not one of the spore's files", self.command),
                ));
            }
            Some(f) if f.mode & 0o111 == 0 => {
                return Err(field(
                    "command",
                    format!(
                        "{:?} has mode {:o}, which is not executable",
                        self.command,
                        f.mode & 0o777
                    ),
                ));
            }
            Some(_) => {}
        }
        if self.args.len() > MAX_ARGS {
            return Err(field(
                "args",
                format!("{} arguments, at most {MAX_ARGS}", self.args.len()),
            ));
        }
        for a in &self.args {
            check_string(a).map_err(|r| field("args", r))?;
        }
        if self.env.len() > MAX_ENV {
            return Err(field(
                "env",
                format!("{} variables, at most {MAX_ENV}", self.env.len()),
            ));
        }
        for (k, v) in &self.env {
            check_env_name(k).map_err(|r| field(&format!("env.{k}"), r))?;
            check_string(v).map_err(|r| field(&format!("env.{k}"), r))?;
        }
        self.nutrients.validate()?;
        self.slo.validate()?;
        self.security.validate()?;
        humantime::parse_rfc3339(&self.created_at).map_err(|e| {
            field(
                "created_at",
                format!("{:?} is not an RFC 3339 UTC time: {e}", self.created_at),
            )
        })?;
        Ok(())
    }

    /// The command as a path inside the run dir (`./hello` and `hello` name the same file).
    pub fn command_path(&self) -> &str {
        self.command.strip_prefix("./").unwrap_or(&self.command)
    }

    /// Sum of all file sizes.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

impl Nutrients {
    pub fn validate(&self) -> Result<(), ManifestError> {
        let checks = [
            ("nutrients.cpu_milli", self.cpu_milli, 1, 1_000_000),
            ("nutrients.memory_mb", self.memory_mb, 1, 16 << 20),
            ("nutrients.pids", self.pids, 1, 1 << 22),
        ];
        for (name, v, lo, hi) in checks {
            if !(lo..=hi).contains(&v) {
                return Err(ManifestError::Field {
                    field: name.into(),
                    reason: format!("{v} is outside {lo}..={hi}"),
                });
            }
        }
        Ok(())
    }
}

impl Slo {
    pub fn validate(&self) -> Result<(), ManifestError> {
        if let Some(p) = &self.health_path {
            let ok =
                p.starts_with('/') && p.len() <= 1024 && p.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(ManifestError::Field {
                    field: "slo.health_path".into(),
                    reason: format!(
                        "{p:?} must start with / and hold printable ASCII without spaces"
                    ),
                });
            }
        }
        const HOUR_MS: u64 = 3_600_000;
        let times = [
            ("slo.warmup_ms", self.warmup_ms, 0),
            ("slo.interval_ms", self.interval_ms, 10),
            ("slo.timeout_ms", self.timeout_ms, 10),
            ("slo.min_healthy_ms", self.min_healthy_ms, 0),
            ("slo.stop_grace_ms", self.stop_grace_ms, 0),
        ];
        for (name, v, lo) in times {
            if !(lo..=HOUR_MS).contains(&v) {
                return Err(ManifestError::Field {
                    field: name.into(),
                    reason: format!("{v} ms is outside {lo}..={HOUR_MS}"),
                });
            }
        }
        Ok(())
    }
}

impl Security {
    pub fn validate(&self) -> Result<(), ManifestError> {
        let u = &self.user;
        let ok = !u.is_empty()
            && u.len() <= 32
            && u.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && u.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            return Err(ManifestError::Field {
                field: "security.user".into(),
                reason: format!("{u:?} is not a user name ([a-z_][a-z0-9_-]*, at most 32 bytes)"),
            });
        }
        if u == "root" {
            return Err(ManifestError::Field {
                field: "security.user".into(),
                reason: "spores never run as root; name an unprivileged user".into(),
            });
        }
        let mut seen = BTreeSet::new();
        for c in &self.capabilities {
            let ok = c.len() > 4
                && c.starts_with("CAP_")
                && c.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(ManifestError::Field {
                    field: "security.capabilities".into(),
                    reason: format!("{c:?} is not a capability name like CAP_NET_BIND_SERVICE"),
                });
            }
            if !seen.insert(c) {
                return Err(ManifestError::Field {
                    field: "security.capabilities".into(),
                    reason: format!("{c} is listed twice"),
                });
            }
        }
        Ok(())
    }
}

/// App names are DNS labels: they name cgroups, hosts and URLs.
pub fn check_app_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not an app name (a-z, 0-9 and '-', starting with a letter, not ending with '-', at most 63 bytes)"
        ))
    }
}

/// A spore path: relative, `/`-separated plain components, no `.`/`..`, no NUL or backslash.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(format!("path longer than {MAX_PATH_BYTES} bytes"));
    }
    if path.starts_with('/') {
        return Err("absolute path; spore paths are relative to the run dir".into());
    }
    let mut depth = 0;
    for comp in path.split('/') {
        depth += 1;
        match comp {
            "" => return Err("empty path component (leading, trailing or double '/')".into()),
            "." => return Err("'.' component; write paths without it".into()),
            ".." => return Err("'..' component would leave the run dir".into()),
            c if c.len() > MAX_COMPONENT_BYTES => {
                return Err(format!("component longer than {MAX_COMPONENT_BYTES} bytes"));
            }
            c if c
                .bytes()
                .any(|b| b == 0 || b == b'\\' || b.is_ascii_control()) =>
            {
                return Err("NUL, backslash or control character in path".into());
            }
            _ => {}
        }
    }
    if depth > MAX_DEPTH {
        return Err(format!("more than {MAX_DEPTH} levels deep"));
    }
    Ok(())
}

fn check_mode(mode: u32) -> Result<(), String> {
    let kind = mode & S_IFMT;
    let kind_name = match kind {
        0 | S_IFREG => None,
        0o120000 => Some("is a symbolic link"),
        0o040000 => Some("is a directory (directories come from file paths)"),
        0o020000 => Some("is a character device"),
        0o060000 => Some("is a block device"),
        0o010000 => Some("is a FIFO"),
        0o140000 => Some("is a socket"),
        _ => Some("has an unknown file type"),
    };
    if let Some(k) = kind_name {
        return Err(format!("{k}; spores carry regular files only"));
    }
    if mode & 0o7000 != 0 {
        return Err("has setuid, setgid or sticky bits; spores may not carry them".into());
    }
    if mode & !(S_IFMT | 0o7777) != 0 {
        return Err("has bits beyond a file mode".into());
    }
    Ok(())
}

fn check_string(s: &str) -> Result<(), String> {
    if s.len() > MAX_STRING_BYTES {
        return Err(format!("value longer than {MAX_STRING_BYTES} bytes"));
    }
    if s.contains('\0') {
        return Err("value holds a NUL byte".into());
    }
    Ok(())
}

fn check_env_name(k: &str) -> Result<(), String> {
    let b = k.as_bytes();
    let ok = !b.is_empty()
        && !b[0].is_ascii_digit()
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_');
    if !ok {
        return Err(format!(
            "{k:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"
        ));
    }
    if k == "PORT" {
        return Err("PORT is set by the agent for each instance; leave it out".into());
    }
    Ok(())
}

/// The `spore.toml` a developer writes: the manifest without what packing computes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SporeSpec {
    pub name: String,
    pub version: semver::Version,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub nutrients: Nutrients,
    #[serde(default)]
    pub slo: Slo,
    #[serde(default)]
    pub security: Security,
    #[serde(default)]
    pub compression: Compression,
    pub files: Vec<SpecFile>,
}

/// A file to pack: where it goes in the spore and where it comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    /// Path inside the spore.
    pub path: String,
    /// Source on disk, relative to the spore.toml's directory.
    pub source: PathBuf,
    /// Permission bits; the source file's own when absent.
    pub mode: Option<u32>,
}

impl SporeSpec {
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The manifest for these files, packed at `created_at`. In spore.toml an empty
    /// `slo.health_path` (TOML has no null) selects the TCP connect check.
    pub fn to_manifest(&self, files: Vec<FileEntry>, created_at: String) -> Manifest {
        let mut slo = self.slo.clone();
        if slo.health_path.as_deref() == Some("") {
            slo.health_path = None;
        }
        Manifest {
            name: self.name.clone(),
            version: self.version.clone(),
            command: self.command.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
            nutrients: self.nutrients,
            slo,
            security: self.security.clone(),
            created_at,
            compression: self.compression,
            files,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            name: "billing".into(),
            version: "1.4.0".parse().unwrap(),
            command: "./bin/billing".into(),
            args: vec!["--serve".into()],
            env: BTreeMap::from([("RUST_LOG".into(), "info".into())]),
            nutrients: Nutrients::default(),
            slo: Slo::default(),
            security: Security::default(),
            created_at: "2026-11-23T10:00:00Z".into(),
            compression: Compression::Zstd,
            files: vec![
                FileEntry {
                    path: "bin/billing".into(),
                    size: 10,
                    mode: 0o755,
                    sha256: Digest::of(b"x"),
                },
                FileEntry {
                    path: "share/data.txt".into(),
                    size: 3,
                    mode: 0o100644,
                    sha256: Digest::of(b"y"),
                },
            ],
        }
    }

    #[test]
    fn a_good_manifest_passes_and_round_trips() {
        let m = manifest();
        m.validate().unwrap();
        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(serde_json::from_slice::<Manifest>(&json).unwrap(), m);
        assert_eq!(m.command_path(), "bin/billing");
        assert_eq!(m.total_size(), 13);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v = serde_json::to_value(manifest()).unwrap();
        v["seccomp"] = serde_json::json!("off");
        assert!(
            serde_json::from_value::<Manifest>(v)
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
    }

    fn refused(edit: impl FnOnce(&mut Manifest)) -> ManifestError {
        let mut m = manifest();
        edit(&mut m);
        m.validate().unwrap_err()
    }

    #[test]
    fn paths_that_leave_the_run_dir_are_refused() {
        for (p, want) in [
            ("../x", "'..'"),
            ("a/../../x", "'..'"),
            ("/etc/x", "absolute"),
            ("a//b", "empty path component"),
            ("./a", "'.'"),
            ("a\\b", "backslash"),
            ("", "empty path"),
        ] {
            let err = refused(|m| m.files[1].path = p.into());
            assert!(matches!(&err, ManifestError::Path { .. }), "{p}: {err}");
            assert!(err.to_string().contains(want), "{p}: {err}");
        }
    }

    #[test]
    fn non_regular_files_and_special_bits_are_refused() {
        for (mode, want) in [
            (0o120777, "symbolic link"),
            (0o020644, "character device"),
            (0o060644, "block device"),
            (0o010644, "FIFO"),
            (0o040755, "directory"),
            (0o104755, "setuid"),
            (0o2755, "setuid, setgid"),
        ] {
            let err = refused(|m| m.files[1].mode = mode);
            assert!(err.to_string().contains(want), "{mode:o}: {err}");
        }
    }

    #[test]
    fn duplicates_and_file_directory_conflicts_are_refused() {
        let err = refused(|m| m.files[1].path = "bin/billing".into());
        assert_eq!(
            err,
            ManifestError::Duplicate {
                path: "bin/billing".into()
            }
        );
        let err = refused(|m| m.files[1].path = "bin/billing/extra".into());
        assert!(matches!(err, ManifestError::Conflict { .. }), "{err}");
    }

    type Edit = Box<dyn FnOnce(&mut Manifest)>;

    #[test]
    fn fields_are_checked() {
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|m| m.name = "Billing".into()), "name"),
            (Box::new(|m| m.name = "bill-".into()), "name"),
            (
                Box::new(|m| m.command = "./missing".into()),
                "not one of the spore's files",
            ),
            (Box::new(|m| m.files[0].mode = 0o644), "not executable"),
            (
                Box::new(|m| {
                    m.env
                        .insert("PORT".into(), "1".into())
                        .map(|_| ())
                        .unwrap_or(())
                }),
                "PORT",
            ),
            (
                Box::new(|m| {
                    m.env
                        .insert("1X".into(), "1".into())
                        .map(|_| ())
                        .unwrap_or(())
                }),
                "variable name",
            ),
            (Box::new(|m| m.args.push("a\0b".into())), "NUL"),
            (Box::new(|m| m.nutrients.memory_mb = 0), "memory_mb"),
            (
                Box::new(|m| m.slo.health_path = Some("health".into())),
                "health_path",
            ),
            (
                Box::new(|m| m.security.user = "root".into()),
                "never run as root",
            ),
            (
                Box::new(|m| m.security.capabilities = vec!["net_admin".into()]),
                "capability name",
            ),
            (
                Box::new(|m| m.created_at = "yesterday".into()),
                "created_at",
            ),
            (Box::new(|m| m.files.clear()), "at least one file"),
        ];
        for (edit, want) in cases {
            let err = refused(edit);
            assert!(err.to_string().contains(want), "want {want:?}: {err}");
        }
    }

    #[test]
    fn spec_parses_from_toml() {
        let spec = SporeSpec::from_toml(
            r#"
            name = "hello"
            version = "1.0.0"
            command = "hello"
            [nutrients]
            memory_mb = 64
            [[files]]
            path = "hello"
            source = "../../target/release/hello"
            mode = 0o755
            "#,
        )
        .unwrap();
        assert_eq!(spec.nutrients.memory_mb, 64);
        assert_eq!(spec.nutrients.cpu_milli, 1000);
        assert_eq!(spec.files[0].mode, Some(0o755));
        assert_eq!(spec.compression, Compression::Zstd);
        let m = spec.to_manifest(Vec::new(), String::new());
        assert_eq!(m.slo.health_path.as_deref(), Some("/health"));
        let mut tcp = spec.clone();
        tcp.slo.health_path = Some(String::new());
        assert_eq!(
            tcp.to_manifest(Vec::new(), String::new()).slo.health_path,
            None
        );
        let err = SporeSpec::from_toml(
            "name = \"x\"\nversion = \"1.0.0\"\ncommand = \"x\"\nfiles = []\ncolour = 1\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
