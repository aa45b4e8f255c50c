//! What can go wrong while planning or applying a fix-up. Every variant names
//! the request field, path or pid it is about, so a claim that falls back to
//! the cold path logs a reason an operator can act on.

use std::{io, path::PathBuf, time::Duration};

use fast_sandbox_cgroup::{CgroupError, LeafError};

use super::kernel::Namespace;

/// A fix-up could not be planned (bad input) or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FixupError {
    // ---- planning: the request or the slot record is not acceptable ----
    /// A sandbox id is always 64 lowercase hex digits (containerd's
    /// `GenerateID`); anything else could turn into a path outside the
    /// sandbox's own directory.
    #[error("sandbox id {id:?} is not 64 lowercase hex digits")]
    InvalidSandboxId { id: String },

    #[error("pause pid {pid} is not a valid process id")]
    InvalidPid { pid: i32 },

    #[error("containerd root {path:?} must be an absolute path")]
    RelativeContainerdRoot { path: PathBuf },

    /// The kernel refuses hostnames longer than `HOST_NAME_MAX` (64 bytes),
    /// so a cold start would fail in runc as well.
    #[error("PodSandboxConfig field hostname: {hostname:?} is {len} bytes, the kernel allows 64")]
    HostnameTooLong { hostname: String, len: usize },

    #[error("PodSandboxConfig field hostname: {hostname:?} contains a NUL byte")]
    HostnameHasNul { hostname: String },

    /// runc refuses sysctls that are not isolated by a namespace the pod owns.
    #[error(
        "PodSandboxConfig field linux.sysctls[{name:?}]: not in a separate kernel namespace \
         (allowed: net.*, kernel.shmall, kernel.shmmax, kernel.shmmni, kernel.shm_rmid_forced, \
         kernel.msgmax, kernel.msgmnb, kernel.msgmni, kernel.sem, fs.mqueue.*, kernel.domainname)"
    )]
    SysctlNotNamespaced { name: String },

    #[error(
        "PodSandboxConfig field linux.sysctls[{name:?}]: conflicts with the hostname field \
         (runc refuses it)"
    )]
    SysctlConflictsWithHostname { name: String },

    /// The name does not map to a file under `/proc/sys` (empty component,
    /// `..`, NUL byte).
    #[error("PodSandboxConfig field linux.sysctls[{name:?}]: not a valid sysctl name")]
    InvalidSysctlName { name: String },

    #[error("PodSandboxConfig field linux.sysctls[{name:?}]: value contains a NUL byte")]
    SysctlValueHasNul { name: String },

    /// A host namespace cannot be served by a slot (it has its own), and
    /// writing the pod's sysctls into the slot's namespaces would then be
    /// wrong.
    #[error("PodSandboxConfig field {field}: host namespaces cannot be served by a warm slot")]
    HostNamespace { field: &'static str },

    #[error("{field} {parent:?}: {reason}")]
    InvalidCgroupParent {
        /// `linux.cgroup_parent` for the pod, or `placeholder cgroup parent`.
        field: &'static str,
        parent: String,
        reason: &'static str,
    },

    // ---- node reads ----
    #[error("reading the node's hostname")]
    NodeHostname { source: io::Error },

    #[error("the node's hostname {hostname:?} is not UTF-8")]
    NodeHostnameNotUtf8 { hostname: String },

    #[error("reading the node's resolv.conf {path:?}")]
    NodeResolvConf { path: PathBuf, source: io::Error },

    // ---- sandbox files ----
    #[error("sandbox file name {name:?} is not a single path component")]
    InvalidFileName { name: String },

    #[error("opening sandbox directory {path:?}")]
    OpenSandboxDir { path: PathBuf, source: io::Error },

    /// Missing, a symlink (`ELOOP` from `O_NOFOLLOW`), or unreadable.
    #[error("opening sandbox file {path:?} for writing")]
    OpenSandboxFile { path: PathBuf, source: io::Error },

    #[error("sandbox file {path:?} is not a regular file")]
    NotARegularFile { path: PathBuf },

    #[error("rewriting sandbox file {path:?}")]
    WriteSandboxFile { path: PathBuf, source: io::Error },

    // ---- namespaces ----
    #[error("opening the {ns} namespace of pid {pid}")]
    OpenNamespace {
        pid: i32,
        ns: Namespace,
        source: io::Error,
    },

    #[error("starting a thread to enter the {ns} namespace of pid {pid}")]
    SpawnNamespaceThread {
        pid: i32,
        ns: Namespace,
        source: io::Error,
    },

    #[error("the thread in the {ns} namespace of pid {pid} panicked")]
    NamespaceThreadPanicked { pid: i32, ns: Namespace },

    #[error("entering the {ns} namespace of pid {pid}")]
    EnterNamespace {
        pid: i32,
        ns: Namespace,
        source: io::Error,
    },

    #[error("setting hostname {hostname:?} in the UTS namespace of pid {pid}")]
    SetHostname {
        pid: i32,
        hostname: String,
        source: io::Error,
    },

    #[error("writing sysctl {name} ({path:?}) in the {ns} namespace of pid {pid}")]
    WriteSysctl {
        pid: i32,
        ns: Namespace,
        name: String,
        path: PathBuf,
        source: io::Error,
    },

    // ---- cgroups ----
    /// A cgroup move, read or removal (the cgroup layer,
    /// `fast-sandbox-cgroup`) failed; the error names the pid or path.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),

    // ---- the claim as a whole ----
    #[error("fix-up of sandbox {sandbox_id} did not finish within {deadline:?}")]
    Timeout {
        sandbox_id: String,
        deadline: Duration,
    },

    #[error("the blocking task fixing up sandbox {sandbox_id} panicked")]
    Panicked { sandbox_id: String },
}

impl From<LeafError> for FixupError {
    fn from(e: LeafError) -> Self {
        Self::InvalidCgroupParent {
            field: e.field,
            parent: e.path,
            reason: e.reason,
        }
    }
}
