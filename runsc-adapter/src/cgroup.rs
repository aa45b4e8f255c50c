//! Puts the adapter's own long-lived processes (the waiter, `runsc wait`,
//! `runsc exec`'s child) into the container's cgroup, in every hierarchy, so
//! the shim's per-container stats read the container's cgroup and the pod's
//! cgroup is charged for everything the pod runs. The cgroup work is the
//! shared cgroup layer's (`fast-sandbox-cgroup`); this module turns its
//! answers into what the adapter logs.
//!
//! containerd's runc shim loads a container's cgroup from
//! `/proc/<pid>/cgroup` of the PID in its pid file: with runsc that PID is
//! the waiter's, so the waiter must be in the container's cgroup before
//! `create` returns.

use std::{error::Error as _, path::PathBuf};

use fast_sandbox_cgroup::{CgroupError, CgroupLeaf, Cgroups, HostCgroups};

use crate::error::AdapterError;

/// How the OCI spec names the path, in errors.
const FIELD: &str = "linux.cgroupsPath";

/// A cgroupfs `cgroupsPath` the adapter can join: absolute, normalised
/// below a hierarchy root. The systemd driver's `slice:prefix:name` form is
/// not supported (this node uses cgroupfs).
pub fn cgroupfs_path(cgroups_path: &str) -> Option<CgroupLeaf> {
    if cgroups_path.contains(':') {
        return None;
    }
    CgroupLeaf::parse(cgroups_path, FIELD).ok()
}

/// Moves process `pid` into `cgroups_path` in every mounted hierarchy,
/// creating directories that runsc did not create. Returns the hierarchies
/// it could not join, with why (the caller logs them: a missing optional
/// hierarchy must not fail a container).
pub fn join_all(pid: u32, cgroups_path: &str) -> Result<Vec<(PathBuf, String)>, AdapterError> {
    let leaf = cgroupfs_path(cgroups_path)
        .ok_or_else(|| AdapterError::Usage(format!("{FIELD} {cgroups_path:?}: not cgroupfs")))?;
    let failed = HostCgroups::default()
        .join(pid, &leaf)
        .map_err(|e| AdapterError::Usage(why(&e)))?;
    Ok(failed.iter().map(|e| (path(e), why(e))).collect())
}

/// Removes the (empty) directory of `cgroups_path` in every hierarchy, as
/// `runc delete` does: runsc removes only those it made itself, not those
/// the adapter made to put its waiter in. Returns what could not be removed.
pub fn remove_all(cgroups_path: &str) -> Vec<(PathBuf, String)> {
    let Some(leaf) = cgroupfs_path(cgroups_path) else {
        return Vec::new();
    };
    match HostCgroups::default().remove(&leaf) {
        Ok(failed) => failed.iter().map(|e| (path(e), why(e))).collect(),
        Err(e) => vec![(PathBuf::from("/proc/self/mountinfo"), why(&e))],
    }
}

fn path(e: &CgroupError) -> PathBuf {
    e.path().map(PathBuf::from).unwrap_or_default()
}

/// The error and its cause, as the adapter's log lines print them.
fn why(e: &CgroupError) -> String {
    match e.source() {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cgroupfs_paths_are_joined() {
        let path = |p| cgroupfs_path(p).map(|l| l.as_str().to_owned());
        assert_eq!(
            path("/kubepods/pod1/abc").as_deref(),
            Some("/kubepods/pod1/abc")
        );
        assert_eq!(path("kubepods.slice:cri-containerd:abc"), None);
        assert_eq!(path("/kubepods/../etc"), None);
        assert_eq!(path("/"), None, "never a hierarchy root");
        let leaf = cgroupfs_path("/kubepods/pod1/abc").unwrap();
        assert_eq!(
            PathBuf::from("/sys/fs/cgroup/memory").join(leaf.relative()),
            PathBuf::from("/sys/fs/cgroup/memory/kubepods/pod1/abc")
        );
        let err = join_all(1, "/a/../b").unwrap_err();
        assert!(err.to_string().contains("linux.cgroupsPath"), "{err}");
        assert!(remove_all("x:y:z").is_empty());
    }
}
