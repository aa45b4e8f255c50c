//! The node's one cgroup layer, shared by the node plugin (the fix-up's
//! moves, pod stats, placeholder discovery) and the runsc adapter (joining
//! a container's cgroup): every cgroup read or write of the project goes
//! through the [`Cgroups`] trait, whose host implementation is
//! [`HostCgroups`]. Works on cgroup v1, v2 and hybrid hosts: the mounted
//! hierarchies come from `/proc/self/mountinfo` (parsed by `procfs`), a
//! process's cgroups from `/proc/<pid>/cgroup`.
//!
//! # Why not `cgroups-rs`
//!
//! `cgroups-rs` (checked at 0.5.1, the current release, and 0.4.0, 0.3.4)
//! cannot serve here:
//! - 0.4 and 0.5 depend on `zbus` 5 unconditionally (their systemd
//!   manager); `default-features = false` changes nothing, the default set
//!   is already empty. All three pull `nix` 0.25 next to our 0.29.
//! - It hard-codes `/sys/fs/cgroup` (`fs::hierarchies::UNIFIED_MOUNTPOINT`,
//!   `V2::new`, `auto()`), so nothing can run on a fake cgroup tree.
//! - `fs::hierarchies::auto()` picks V1 or V2 for the whole host: on a
//!   hybrid host (these machines) `V1` sees only `cgroup` mounts, so a
//!   move would leave the process behind in the unified hierarchy.
//! - It hides a missing cgroup: `MemController::memory_stat` returns a
//!   `Memory` with every failed read as 0 (`unwrap_or(0)`), and
//!   `Cgroup::procs` a `Vec` with no error, so a pod removed between list
//!   and read looks idle instead of gone; `Cgroup::load` and `V1::root`
//!   `unwrap()` (a non-UTF-8 path, a host without v1 mounts).
//! - It has no way to say "the cgroup this pid is in now" per hierarchy,
//!   which a move from a placeholder leaf needs (and checks).

mod error;
mod host;
mod leaf;
pub mod mounts;
pub mod stats;

use std::{
    collections::HashSet,
    fmt,
    path::{Path, PathBuf},
};

pub use error::CgroupError;
pub use leaf::{CgroupLeaf, LeafError};
pub use stats::Sample;

/// Which hierarchies a move changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveScope {
    /// Every hierarchy the process is in: it must be in `from` (or already
    /// in `to`) in each, else nothing moves (a runc/crun pause).
    Every,
    /// Only those where it is in `from`; it stays put in the others (a
    /// gVisor sandbox's processes, which runsc places in the v1
    /// hierarchies only).
    WhereIn,
}

/// Every cgroup operation of the node. Blocking file I/O: async callers run
/// it on a blocking thread with a deadline. Behind a trait so tests can
/// fake or hold it.
pub trait Cgroups: Send + Sync + fmt::Debug {
    /// CPU and memory of the pod cgroup `leaf`; `None` when it is gone.
    fn pod_sample(&self, leaf: &CgroupLeaf) -> Option<Sample>;

    /// The per-slot placeholder cgroup parents (`<root>/<slot uid>`, 32
    /// hex digits) that exist in any mounted hierarchy.
    fn placeholder_dirs(&self, root: &str) -> HashSet<String>;

    /// Moves `pid` from `from` to `to` (see [`MoveScope`]), giving `to` the
    /// settings runc gave `from`, moving memory charges with the process
    /// where the kernel can and reclaiming what stays in an emptied `from`.
    fn move_pid(
        &self,
        pid: i32,
        from: &CgroupLeaf,
        to: &CgroupLeaf,
        scope: MoveScope,
    ) -> Result<(), CgroupError>;

    /// The PIDs in `leaf`, in any hierarchy.
    fn procs(&self, leaf: &CgroupLeaf) -> Result<Vec<i32>, CgroupError>;

    /// Puts `pid` into `leaf` in every hierarchy, creating it where it is
    /// missing. `Ok` holds the hierarchies where that failed.
    fn join(&self, pid: u32, leaf: &CgroupLeaf) -> Result<Vec<CgroupError>, CgroupError>;

    /// Removes the empty `leaf` in every hierarchy; missing is fine. `Ok`
    /// holds the hierarchies where that failed.
    fn remove(&self, leaf: &CgroupLeaf) -> Result<Vec<CgroupError>, CgroupError>;
}

/// [`Cgroups`] of this host: hierarchies as mounted here, stats from the
/// cgroup mount at `root` (`/sys/fs/cgroup`).
#[derive(Debug, Clone)]
pub struct HostCgroups {
    root: PathBuf,
}

impl Default for HostCgroups {
    fn default() -> Self {
        Self::at("/sys/fs/cgroup")
    }
}

impl HostCgroups {
    /// Stats and placeholders read under `root` instead of `/sys/fs/cgroup`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Cgroups for HostCgroups {
    fn pod_sample(&self, leaf: &CgroupLeaf) -> Option<Sample> {
        stats::read(&self.root, leaf)
    }

    fn placeholder_dirs(&self, root: &str) -> HashSet<String> {
        stats::placeholder_dirs(&self.root, root)
    }

    fn move_pid(
        &self,
        pid: i32,
        from: &CgroupLeaf,
        to: &CgroupLeaf,
        scope: MoveScope,
    ) -> Result<(), CgroupError> {
        host::move_pid(&mounts::mounted()?, pid, from, to, scope)
    }

    fn procs(&self, leaf: &CgroupLeaf) -> Result<Vec<i32>, CgroupError> {
        host::procs(&mounts::mounted()?, leaf)
    }

    fn join(&self, pid: u32, leaf: &CgroupLeaf) -> Result<Vec<CgroupError>, CgroupError> {
        Ok(host::join(&mounts::mounted()?, pid, leaf))
    }

    fn remove(&self, leaf: &CgroupLeaf) -> Result<Vec<CgroupError>, CgroupError> {
        Ok(host::remove(&mounts::mounted()?, leaf))
    }
}
