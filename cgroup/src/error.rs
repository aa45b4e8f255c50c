//! What can go wrong in a cgroup operation; every variant names the path or
//! pid it is about.

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading the cgroup mounts of this process")]
    Mounts { source: io::Error },

    #[error("reading the cgroups of pid {pid}")]
    ProcessCgroups { pid: i32, source: io::Error },

    /// `/proc/<pid>/cgroup` names a hierarchy that is not mounted here with
    /// its root at the mount point (the caller needs the host's
    /// `/sys/fs/cgroup` and the host cgroup namespace).
    #[error(
        "pid {pid} is in cgroup hierarchy {hierarchy:?}, which is not mounted at its root here"
    )]
    HierarchyNotMounted { pid: i32, hierarchy: String },

    /// The process is not where the caller expected it: nothing is moved.
    #[error("pid {pid} is in {actual:?} of cgroup hierarchy {hierarchy:?}, expected {expected:?}")]
    UnexpectedCgroup {
        pid: i32,
        hierarchy: String,
        expected: String,
        actual: String,
    },

    #[error("creating cgroup {path:?}")]
    Create { path: PathBuf, source: io::Error },

    #[error("reading cgroup file {path:?}")]
    Read { path: PathBuf, source: io::Error },

    #[error("writing {value:?} to cgroup file {path:?}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },

    #[error("removing cgroup {path:?}")]
    Remove { path: PathBuf, source: io::Error },
}

impl CgroupError {
    /// The cgroup directory or file the error is about, when it is one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Self::Create { path, .. }
            | Self::Read { path, .. }
            | Self::Write { path, .. }
            | Self::Remove { path, .. } => Some(path),
            _ => None,
        }
    }

    /// True when it failed only because process `pid` no longer exists (its
    /// `/proc/<pid>/cgroup` is gone, or the kernel says no such process).
    pub fn process_gone(&self) -> bool {
        match self {
            Self::ProcessCgroups { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(nix::libc::ESRCH)
            }
            Self::Write { source, .. } => source.raw_os_error() == Some(nix::libc::ESRCH),
            _ => false,
        }
    }
}
