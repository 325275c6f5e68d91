//! Nutrients as cgroup files: one small controller type per resource, each knowing its v2
//! and v1 spelling. A directory goes in, files come out, so unit tests use temp dirs.

use std::io;
use std::path::Path;

/// CPU bandwidth period; a quota of one period is one core.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The kernel refuses quotas below 1 ms.
const CPU_MIN_QUOTA_US: u64 = 1_000;

/// Limits for one cgroup; `None` leaves a resource unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub cpu_milli: Option<u64>,
    pub pids: Option<u64>,
}

impl Limits {
    pub fn from_nutrients(n: &mesh_common::manifest::Nutrients) -> Limits {
        Limits {
            memory_bytes: Some(u64::from(n.memory_mb) << 20),
            cpu_milli: Some(u64::from(n.cpu_milli)),
            pids: Some(u64::from(n.pids)),
        }
    }
}

/// One resource controller.
pub trait Controller {
    fn name(&self) -> &'static str;
    fn apply_v2(&self, dir: &Path, limits: &Limits) -> io::Result<()>;
    fn apply_v1(&self, dir: &Path, limits: &Limits) -> io::Result<()>;
}

pub struct Memory;
pub struct Cpu;
pub struct Pids;

pub const ALL: [&dyn Controller; 3] = [&Cpu, &Memory, &Pids];

fn write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    std::fs::write(dir.join(file), value)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display())))
}

/// Writes only where the kernel offers the file (swap accounting is optional).
fn write_if_present(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    if dir.join(file).exists() {
        write(dir, file, value)
    } else {
        Ok(())
    }
}

impl Controller for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn apply_v2(&self, dir: &Path, l: &Limits) -> io::Result<()> {
        let v = l.memory_bytes.map_or("max".to_string(), |b| b.to_string());
        write(dir, "memory.max", &v)?;
        // No swap: an instance over its memory is OOM-killed promptly instead of crawling.
        write_if_present(
            dir,
            "memory.swap.max",
            if l.memory_bytes.is_some() { "0" } else { "max" },
        )
    }

    fn apply_v1(&self, dir: &Path, l: &Limits) -> io::Result<()> {
        let v = l.memory_bytes.map_or("-1".to_string(), |b| b.to_string());
        write(dir, "memory.limit_in_bytes", &v)?;
        write_if_present(dir, "memory.memsw.limit_in_bytes", &v)
    }
}

/// cpu_milli -> quota per period, at least the kernel's minimum.
pub fn cpu_quota_us(cpu_milli: u64) -> u64 {
    (cpu_milli * CPU_PERIOD_US / 1000).max(CPU_MIN_QUOTA_US)
}

impl Controller for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn apply_v2(&self, dir: &Path, l: &Limits) -> io::Result<()> {
        let quota = l
            .cpu_milli
            .map_or("max".to_string(), |m| cpu_quota_us(m).to_string());
        write(dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))
    }

    fn apply_v1(&self, dir: &Path, l: &Limits) -> io::Result<()> {
        write(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
        let quota = l
            .cpu_milli
            .map_or("-1".to_string(), |m| cpu_quota_us(m).to_string());
        write(dir, "cpu.cfs_quota_us", &quota)
    }
}

impl Controller for Pids {
    fn name(&self) -> &'static str {
        "pids"
    }

    fn apply_v2(&self, dir: &Path, l: &Limits) -> io::Result<()> {
        write(
            dir,
            "pids.max",
            &l.pids.map_or("max".to_string(), |p| p.to_string()),
        )
    }

    fn apply_v1(&self, dir: &Path, l: &Limits) -> io::Result<()> {
        self.apply_v2(dir, l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dir: &Path, f: &str) -> String {
        std::fs::read_to_string(dir.join(f)).unwrap()
    }

    #[test]
    fn v2_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("memory.swap.max"), "max").unwrap();
        let l = Limits {
            memory_bytes: Some(32 << 20),
            cpu_milli: Some(250),
            pids: Some(16),
        };
        for c in ALL {
            c.apply_v2(d.path(), &l).unwrap();
        }
        assert_eq!(read(d.path(), "memory.max"), "33554432");
        assert_eq!(read(d.path(), "memory.swap.max"), "0");
        assert_eq!(read(d.path(), "cpu.max"), "25000 100000");
        assert_eq!(read(d.path(), "pids.max"), "16");
        for c in ALL {
            c.apply_v2(d.path(), &Limits::default()).unwrap();
        }
        assert_eq!(read(d.path(), "memory.max"), "max");
        assert_eq!(read(d.path(), "cpu.max"), "max 100000");
        assert_eq!(read(d.path(), "pids.max"), "max");
        assert!(
            !d.path().join("memory.memsw.limit_in_bytes").exists(),
            "v1 files untouched"
        );
    }

    #[test]
    fn v1_files() {
        let d = tempfile::tempdir().unwrap();
        let l = Limits {
            memory_bytes: Some(1 << 30),
            cpu_milli: Some(1500),
            pids: Some(64),
        };
        for c in ALL {
            c.apply_v1(d.path(), &l).unwrap();
        }
        assert_eq!(read(d.path(), "memory.limit_in_bytes"), "1073741824");
        assert!(
            !d.path().join("memory.memsw.limit_in_bytes").exists(),
            "only where the kernel has it"
        );
        assert_eq!(read(d.path(), "cpu.cfs_period_us"), "100000");
        assert_eq!(read(d.path(), "cpu.cfs_quota_us"), "150000");
        assert_eq!(read(d.path(), "pids.max"), "64");
    }

    #[test]
    fn tiny_cpu_is_clamped_to_the_kernel_minimum() {
        assert_eq!(cpu_quota_us(1), 1000);
        assert_eq!(cpu_quota_us(10), 1000);
        assert_eq!(cpu_quota_us(1000), 100_000);
    }
}
