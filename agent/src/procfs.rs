//! What /proc says about a process: its start time (the identity that survives pid reuse)
//! and its cgroups.

use std::io;
use std::path::Path;

/// Field 22 of /proc/PID/stat: start time in clock ticks after boot. A pid plus this value
/// names one process for the life of the system.
pub fn start_time(pid: u32) -> io::Result<u64> {
    parse_start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)
}

fn parse_start_time(stat: &str) -> io::Result<u64> {
    // comm may hold spaces and parentheses: fields resume after the last ')'.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no ')' in stat"))?;
    // After ')' come fields 3.. ; start time is field 22, the 20th of them.
    after
        .split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no start time in stat"))
}

/// Whether the process's v2 cgroup is `cgroup` (a path relative to the v2 mount).
pub fn in_v2_cgroup(pid: u32, cgroup: &Path) -> io::Result<bool> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .is_some_and(|p| Path::new(p) == cgroup))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_names() {
        let stat = "4242 (my) (evil) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_start_time(stat).unwrap(), 987654);
        let own = start_time(std::process::id()).unwrap();
        assert!(own > 0);
        assert_eq!(start_time(std::process::id()).unwrap(), own, "stable");
    }
}
