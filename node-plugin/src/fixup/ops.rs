//! The privileged operations a fix-up is made of, behind a trait so the
//! sequencing in [`super::apply`] is tested with a recording fake and the
//! real syscalls live in one place ([`super::RealOps`]).

use std::{fmt, path::Path};

use super::{
    kernel::{Namespace, Sysctl},
    plan::CgroupLeaf,
    FixupError,
};

/// The privileged operations of a fix-up. Each is one step an operator could
/// do by hand; none of them decides anything (that is the plan's job).
///
/// Implementations must not change the calling thread's namespaces: callers
/// run them on shared blocking-pool threads.
pub trait NodeOps: Send + Sync + fmt::Debug {
    /// The node's hostname, as containerd's `os.Hostname()` sees it.
    fn node_hostname(&self) -> Result<String, FixupError>;

    /// The node's `/etc/resolv.conf`, byte for byte (containerd copies it
    /// when the pod's `dns_config` renders empty).
    fn node_resolv_conf(&self) -> Result<Vec<u8>, FixupError>;

    /// Rewrites `dir/name` in place: same inode, so existing bind mounts
    /// (the pause's `/etc/resolv.conf`) see the new content and any SELinux
    /// label stays. Refuses a `name` that is not one path component, a
    /// symlink, a missing file and anything but a regular file.
    fn write_file_in_place(
        &self,
        dir: &Path,
        name: &str,
        contents: &[u8],
    ) -> Result<(), FixupError>;

    /// `sethostname` inside the UTS namespace of `pid`.
    fn set_hostname_in_uts_ns(&self, pid: i32, hostname: &str) -> Result<(), FixupError>;

    /// Writes `sysctls`, in order, under `/proc/sys` from inside the `ns`
    /// namespace of `pid`.
    fn write_sysctls_in_ns(
        &self,
        pid: i32,
        ns: Namespace,
        sysctls: &[Sysctl],
    ) -> Result<(), FixupError>;

    /// Moves `pid` from the leaf cgroup `from` to `to` in every hierarchy it
    /// belongs to, giving `to` the resources `from` had (what runc set for
    /// the pause). Creates `to` and any missing parent. Does not remove
    /// `from`. Idempotent: a hierarchy where `pid` is already in `to` is
    /// left alone.
    fn move_to_cgroup(
        &self,
        pid: i32,
        from: &CgroupLeaf,
        to: &CgroupLeaf,
    ) -> Result<(), FixupError>;

    /// Removes the leaf cgroup `leaf` in every mounted hierarchy. A leaf
    /// that does not exist is fine; one that still has processes is an
    /// error. Parents are kept.
    fn remove_cgroup(&self, leaf: &CgroupLeaf) -> Result<(), FixupError>;
}
