//! Capabilities a spore may keep: what its manifest asks for, if the agent's policy allows it.
//! Everything else is dropped from every set, the bounding set included.

/// Linux capability names in number order (capability.h).
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The capability's number.
pub fn number(name: &str) -> Option<u32> {
    NAMES.iter().position(|n| *n == name).map(|i| i as u32)
}

/// What the agent lets spores keep.
#[derive(Debug, Clone)]
pub struct CapPolicy {
    pub allowed: Vec<String>,
}

impl Default for CapPolicy {
    /// Binding low ports is the one capability a web service commonly needs.
    fn default() -> Self {
        CapPolicy {
            allowed: vec!["CAP_NET_BIND_SERVICE".into()],
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapError {
    #[error("capability {0} is unknown to this agent")]
    Unknown(String),
    #[error("capability {0} is not allowed by this agent's policy (allowed: {1})")]
    NotAllowed(String, String),
}

impl CapPolicy {
    /// The bit mask of capabilities to keep, or why the request is refused.
    pub fn mask(&self, requested: &[String]) -> Result<u64, CapError> {
        let mut mask = 0u64;
        for c in requested {
            let n = number(c).ok_or_else(|| CapError::Unknown(c.clone()))?;
            if !self.allowed.contains(c) {
                return Err(CapError::NotAllowed(c.clone(), self.allowed.join(", ")));
            }
            mask |= 1 << n;
        }
        Ok(mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_refusals() {
        assert_eq!(number("CAP_NET_BIND_SERVICE"), Some(10));
        assert_eq!(number("CAP_CHECKPOINT_RESTORE"), Some(40));
        let p = CapPolicy::default();
        assert_eq!(p.mask(&[]), Ok(0));
        assert_eq!(p.mask(&["CAP_NET_BIND_SERVICE".into()]), Ok(1 << 10));
        assert!(matches!(
            p.mask(&["CAP_SYS_ADMIN".into()]),
            Err(CapError::NotAllowed(..))
        ));
        assert!(matches!(
            p.mask(&["CAP_FLY".into()]),
            Err(CapError::Unknown(_))
        ));
    }
}
