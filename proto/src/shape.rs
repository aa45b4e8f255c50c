//! The pool shape key, as both ends of the NodeAgent API spell it: the node
//! plugin reports each pool under the key of the shape it builds slots
//! with, and the controller derives the key of a pod from its spec the way
//! kubelet derives the sandbox's security context. Part of the API's
//! contract (`PoolStatus.shape`, `SetPoolSizeRequest.shape`), so one
//! encoder serves both and the two can never order a field differently.
//!
//! Encoding: `seccomp=<profile>[;uid=N][;gid=N][;groups=A,B][;selinux=u:r:t:l]`
//! with the groups sorted and without duplicates (the node plugin sorts a
//! claim's groups before it compares shapes: kubelet sends `fsGroup` first,
//! then the volumes' groups, then `supplementalGroups`, docs/warm-slots.md).

use std::fmt::{self, Write as _};

/// The seccomp profile kubelet (v1.26 on) asks for every pod sandbox,
/// whatever the pod's own `seccompProfile` says (that one applies to its
/// containers): `kuberuntime_sandbox.go` `generatePodSandboxLinuxConfig`,
/// confirmed by every `RunPodSandbox` in `tests/recordings/`.
pub const KUBELET_SANDBOX_SECCOMP: &str = "runtime-default";

/// The fields of a sandbox shape, borrowed from whichever type holds them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShapeKey<'a> {
    /// `unconfined`, `runtime-default` or `localhost/<profile>`.
    pub seccomp: &'a str,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    /// In any order, duplicates allowed: the key sorts and dedups them.
    pub supplemental_groups: &'a [i64],
    /// user, role, type, level; `None` when every part is empty.
    pub selinux: Option<[&'a str; 4]>,
}

impl fmt::Display for ShapeKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seccomp={}", self.seccomp)?;
        if let Some(uid) = self.run_as_user {
            write!(f, ";uid={uid}")?;
        }
        if let Some(gid) = self.run_as_group {
            write!(f, ";gid={gid}")?;
        }
        let mut groups = self.supplemental_groups.to_vec();
        groups.sort_unstable();
        groups.dedup();
        for (i, group) in groups.iter().enumerate() {
            f.write_str(if i == 0 { ";groups=" } else { "," })?;
            write!(f, "{group}")?;
        }
        if let Some([user, role, r#type, level]) = self.selinux {
            write!(f, ";selinux={user}:{role}:{type}:{level}")?;
        }
        Ok(())
    }
}

impl ShapeKey<'_> {
    /// The key as a string.
    pub fn encode(&self) -> String {
        let mut key = String::new();
        let _ = write!(key, "{self}");
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_sorted_and_deduplicated() {
        let key = ShapeKey {
            seccomp: KUBELET_SANDBOX_SECCOMP,
            run_as_user: Some(1000),
            run_as_group: Some(1001),
            supplemental_groups: &[2000, 6, 5, 6],
            selinux: Some(["u", "r", "t", "s0:c1,c2"]),
        };
        assert_eq!(
            key.encode(),
            "seccomp=runtime-default;uid=1000;gid=1001;groups=5,6,2000;selinux=u:r:t:s0:c1,c2"
        );
        let plain = ShapeKey {
            seccomp: "unconfined",
            ..Default::default()
        };
        assert_eq!(plain.to_string(), "seccomp=unconfined");
    }
}
