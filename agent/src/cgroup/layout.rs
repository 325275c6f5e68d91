//! Where the cgroup hierarchies are and where this process sits in them.
//!
//! Pure cgroup v2 is the target. Hybrid hosts bind cpu, memory and pids to v1 hierarchies and
//! mount v2 (often at /sys/fs/cgroup/unified) without controllers: there the limits go to the
//! v1 controllers and every spore is still placed in the v2 hierarchy, whose cgroup id is what
//! eBPF sees and whose cgroup.kill ends a spore's whole process tree.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The controllers the agent enforces nutrients with.
pub const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Controllers live in the v2 hierarchy.
    Unified,
    /// Controllers are bound to v1 hierarchies; v2 only places processes.
    Hybrid,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Unified => "cgroup v2 (unified)",
            Mode::Hybrid => "hybrid (limits via cgroup v1 controllers, placement in v2)",
        })
    }
}

/// The hierarchies of this host and this process's place in each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub mode: Mode,
    /// Mount point of the v2 hierarchy.
    pub v2_mount: PathBuf,
    /// This process's v2 cgroup, relative to the mount (`/` for the root).
    pub v2_self: PathBuf,
    /// For hybrid hosts: controller -> (mount point, this process's cgroup there).
    pub v1: BTreeMap<String, (PathBuf, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup2 file system is mounted; mount one (e.g. at /sys/fs/cgroup) to run spores")]
    NoV2,
    #[error(
        "controller {0} is neither available in cgroup v2 nor mounted as cgroup v1; the agent needs cpu, memory and pids"
    )]
    Missing(String),
}

impl Layout {
    /// Reads /proc/self/mountinfo and /proc/self/cgroup.
    pub fn detect() -> Result<Layout, LayoutError> {
        let read = |p: &str| {
            std::fs::read_to_string(p).map_err(|source| LayoutError::Read {
                path: p.into(),
                source,
            })
        };
        let mountinfo = read("/proc/self/mountinfo")?;
        let cgroup = read("/proc/self/cgroup")?;
        let v2_mount = parse_v2_mount(&mountinfo).ok_or(LayoutError::NoV2)?;
        let controllers =
            std::fs::read_to_string(v2_mount.join("cgroup.controllers")).unwrap_or_default();
        Layout::from_parts(&mountinfo, &cgroup, v2_mount, &controllers)
    }

    /// The layout from the texts of mountinfo, /proc/self/cgroup and the v2 root's
    /// cgroup.controllers (testable without a real host).
    pub fn from_parts(
        mountinfo: &str,
        cgroup: &str,
        v2_mount: PathBuf,
        v2_controllers: &str,
    ) -> Result<Layout, LayoutError> {
        let mut v2_self = PathBuf::from("/");
        let mut self_paths: BTreeMap<String, PathBuf> = BTreeMap::new();
        for line in cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if ctrls.is_empty() {
                v2_self = PathBuf::from(path);
            } else {
                for c in ctrls.split(',') {
                    self_paths.insert(c.to_string(), PathBuf::from(path));
                }
            }
        }
        let v2_has: Vec<&str> = v2_controllers.split_whitespace().collect();
        if CONTROLLERS.iter().all(|c| v2_has.contains(c)) {
            return Ok(Layout {
                mode: Mode::Unified,
                v2_mount,
                v2_self,
                v1: BTreeMap::new(),
            });
        }
        let v1_mounts = parse_v1_mounts(mountinfo);
        let mut v1 = BTreeMap::new();
        for c in CONTROLLERS {
            let mount = v1_mounts
                .get(c)
                .ok_or_else(|| LayoutError::Missing(c.to_string()))?;
            let own = self_paths
                .get(c)
                .cloned()
                .unwrap_or_else(|| PathBuf::from("/"));
            v1.insert(c.to_string(), (mount.clone(), own));
        }
        Ok(Layout {
            mode: Mode::Hybrid,
            v2_mount,
            v2_self,
            v1,
        })
    }

    /// Absolute path of this process's v2 cgroup.
    pub fn v2_self_dir(&self) -> PathBuf {
        join_cgroup(&self.v2_mount, &self.v2_self)
    }
}

/// `mount` + a cgroup path that starts with `/`.
pub fn join_cgroup(mount: &Path, cgroup: &Path) -> PathBuf {
    mount.join(cgroup.strip_prefix("/").unwrap_or(cgroup))
}

/// The mount point of the cgroup2 file system (the first one).
fn parse_v2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let fstype = post.split(' ').next()?;
        let mount = pre.split(' ').nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mount)))
    })
}

/// v1 controller -> mount point, from the super options of `cgroup` mounts.
fn parse_v1_mounts(mountinfo: &str) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for l in mountinfo.lines() {
        let Some((pre, post)) = l.split_once(" - ") else {
            continue;
        };
        let mut post = post.split(' ');
        if post.next() != Some("cgroup") {
            continue;
        }
        let Some(mount) = pre.split(' ').nth(4) else {
            continue;
        };
        let opts = post.nth(1).unwrap_or_default();
        for o in opts.split(',') {
            if CONTROLLERS.contains(&o) {
                out.entry(o.to_string())
                    .or_insert_with(|| PathBuf::from(unescape(mount)));
            }
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_SELF: &str = "8:pids:/\n4:memory:/process_api/08e8\n1:cpu:/\n0::/\n";

    #[test]
    fn hybrid_host_uses_v1_controllers_and_v2_for_placement() {
        let l = Layout::from_parts(
            HYBRID_MOUNTS,
            HYBRID_SELF,
            "/sys/fs/cgroup/unified".into(),
            "",
        )
        .unwrap();
        assert_eq!(l.mode, Mode::Hybrid);
        assert_eq!(l.v2_mount, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(l.v2_self_dir(), PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(
            l.v1["memory"],
            ("/sys/fs/cgroup/memory".into(), "/process_api/08e8".into())
        );
        assert_eq!(l.v1["cpu"].0, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(l.v1["pids"].1, PathBuf::from("/"));
    }

    #[test]
    fn pure_v2_host() {
        let mounts = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let l = Layout::from_parts(
            mounts,
            "0::/system.slice/mesh-agent.service\n",
            "/sys/fs/cgroup".into(),
            "cpuset cpu io memory pids",
        )
        .unwrap();
        assert_eq!(l.mode, Mode::Unified);
        assert_eq!(
            l.v2_self_dir(),
            PathBuf::from("/sys/fs/cgroup/system.slice/mesh-agent.service")
        );
        assert_eq!(
            parse_v2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn missing_controller_is_named() {
        let mounts = "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let e =
            Layout::from_parts(mounts, "0::/\n", "/sys/fs/cgroup/unified".into(), "").unwrap_err();
        assert!(e.to_string().contains("controller cpu"), "{e}");
    }
}
