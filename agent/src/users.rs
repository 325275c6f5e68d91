//! Who a spore runs as: the manifest names a user; the agent maps it to a uid and gid from
//! its config, else from the system's user database. Root is never an answer.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};

/// A resolved unprivileged identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error(
        "user {0:?} does not exist on this node; create it (useradd --system --no-create-home {0}) or map it in the agent's config ([users] {0} = \"UID:GID\")"
    )]
    Unknown(String),
    #[error("user {0:?} resolves to uid 0 or gid 0; spores never run as root")]
    Root(String),
}

/// User name -> identity, from the agent's config, consulted before the system.
#[derive(Debug, Clone, Default)]
pub struct UserMap {
    pub explicit: BTreeMap<String, Identity>,
    /// Create missing users as system users (`useradd --system`), like systemd's DynamicUser
    /// but persistent.
    pub create_missing: bool,
}

impl UserMap {
    pub fn resolve(&self, name: &str) -> Result<Identity, UserError> {
        let id = match self.explicit.get(name) {
            Some(id) => *id,
            None => match lookup(name) {
                Some(id) => id,
                None if self.create_missing => {
                    create_system_user(name);
                    lookup(name).ok_or_else(|| UserError::Unknown(name.to_string()))?
                }
                None => return Err(UserError::Unknown(name.to_string())),
            },
        };
        if id.uid == 0 || id.gid == 0 {
            return Err(UserError::Root(name.to_string()));
        }
        Ok(id)
    }
}

/// `useradd --system`: no home, no login shell. Failures show up as the lookup failing.
fn create_system_user(name: &str) {
    let status = std::process::Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--user-group",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .status();
    match status {
        Ok(s) if s.success() => tracing::info!(user = name, "created a system user for spores"),
        Ok(s) => tracing::warn!(user = name, "useradd failed ({s})"),
        Err(e) => tracing::warn!(user = name, "cannot run useradd: {e}"),
    }
}

/// getpwnam_r(3).
fn lookup(name: &str) -> Option<Identity> {
    let cname = CString::new(name).ok()?;
    // SAFETY: zeroed passwd is valid for getpwnam_r to fill.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are to live locals of the sizes given.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return None;
    }
    // SAFETY: getpwnam_r succeeded, so pw_name points into buf.
    let _ = unsafe { CStr::from_ptr(pw.pw_name) };
    Some(Identity {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

/// Parses `"UID:GID"` from the agent's config.
pub fn parse_identity(s: &str) -> Result<Identity, String> {
    let (u, g) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: want UID:GID"))?;
    let uid = u
        .parse()
        .map_err(|_| format!("{s:?}: {u:?} is not a uid"))?;
    let gid = g
        .parse()
        .map_err(|_| format!("{s:?}: {g:?} is not a gid"))?;
    Ok(Identity { uid, gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_system_users_and_refuses_root() {
        let map = UserMap::default();
        assert_eq!(map.resolve("root"), Err(UserError::Root("root".into())));
        let nobody = map.resolve("nobody").unwrap();
        assert_eq!(nobody.uid, 65534);
        assert!(matches!(
            map.resolve("no-such-user-here"),
            Err(UserError::Unknown(_))
        ));
        let mut map = UserMap::default();
        map.explicit
            .insert("mesh-spore".into(), parse_identity("61000:61000").unwrap());
        assert_eq!(
            map.resolve("mesh-spore").unwrap(),
            Identity {
                uid: 61000,
                gid: 61000
            }
        );
        map.explicit
            .insert("sneaky".into(), parse_identity("0:100").unwrap());
        assert_eq!(map.resolve("sneaky"), Err(UserError::Root("sneaky".into())));
        assert!(parse_identity("10").is_err());
    }
}
