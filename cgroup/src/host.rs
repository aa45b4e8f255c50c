//! Changing cgroups on this host, the way runc would have: moving a process
//! with the settings of the leaf it leaves, joining one, listing and
//! removing leaves. Every function takes the hierarchies to work in, so
//! tests run them on fake cgroup trees.
//!
//! What runc 1.1.5 sets on a pause's leaf, measured here by diffing every
//! file of the leaf against a fresh sibling: `cpu.shares` (2), the device
//! allow-list, and `cpuset.cpus`/`cpuset.mems` (copied down from the parent
//! because a new v1 cpuset is empty). Nothing else differs, so those are
//! what [`move_pid`] reproduces.

use std::{
    fs,
    io::{self, Write as _},
    path::Path,
};

use crate::{
    mounts::{memberships, Hierarchy},
    CgroupError, CgroupLeaf, MoveScope,
};

/// Moves `pid` from `from` to `to` in every hierarchy of `scope`. Checks
/// every hierarchy before changing anything; hierarchies where the pid
/// already is in `to` are skipped (a retried move).
pub(crate) fn move_pid(
    hierarchies: &[Hierarchy],
    pid: i32,
    from: &CgroupLeaf,
    to: &CgroupLeaf,
    scope: MoveScope,
) -> Result<(), CgroupError> {
    let mut todo: Vec<&Hierarchy> = Vec::new();
    for m in memberships(pid, hierarchies)? {
        if m.path == to.as_str() {
            continue;
        }
        if m.path != from.as_str() {
            if scope == MoveScope::WhereIn {
                continue;
            }
            return Err(CgroupError::UnexpectedCgroup {
                pid,
                hierarchy: m.name,
                expected: from.as_str().to_owned(),
                actual: m.path,
            });
        }
        todo.push(m.hierarchy);
    }
    for h in todo {
        let source = h.mount.join(from.relative());
        let target = h.mount.join(to.relative());
        create_leaf(h, to)?;
        copy_settings(h, &source, &target)?;
        charge_with_tasks(h, &target)?;
        write(&target.join("cgroup.procs"), &pid.to_string())?;
        reclaim_emptied(h, &source);
    }
    Ok(())
}

/// Puts `pid` into `leaf` in every hierarchy, creating it where missing.
/// Returns what failed, per hierarchy (the others are joined).
pub(crate) fn join(hierarchies: &[Hierarchy], pid: u32, leaf: &CgroupLeaf) -> Vec<CgroupError> {
    hierarchies
        .iter()
        .filter_map(|h| {
            create_leaf(h, leaf)
                .and_then(|()| {
                    write(
                        &h.mount.join(leaf.relative()).join("cgroup.procs"),
                        &pid.to_string(),
                    )
                })
                .err()
        })
        .collect()
}

/// The PIDs in `leaf`, in any of `hierarchies`.
pub(crate) fn procs(hierarchies: &[Hierarchy], leaf: &CgroupLeaf) -> Result<Vec<i32>, CgroupError> {
    let mut pids = Vec::new();
    for h in hierarchies {
        let path = h.mount.join(leaf.relative()).join("cgroup.procs");
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(CgroupError::Read { path, source }),
        };
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// Removes (the empty) `leaf` in every hierarchy; a missing one is fine.
/// Returns what could not be removed.
pub(crate) fn remove(hierarchies: &[Hierarchy], leaf: &CgroupLeaf) -> Vec<CgroupError> {
    hierarchies
        .iter()
        .filter_map(|h| {
            let path = h.mount.join(leaf.relative());
            match fs::remove_dir(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Some(CgroupError::Remove { path, source: e })
                }
                _ => None,
            }
        })
        .collect()
}

/// `memory.move_charge_at_immigrate` bits: the anonymous pages and the
/// file pages (shmem included) a task has mapped move with it.
const MOVE_ANON_AND_FILE: &str = "3";

/// How a v1 memory hierarchy treats the charges of a task joining `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChargeMove {
    /// Not a v1 memory hierarchy: nothing to ask.
    NotMemory,
    /// Charges move with the task.
    WithTasks,
    /// The kernel no longer moves charges (Linux removed charge moving in
    /// late 2024; 6.18 answers `EINVAL` to anything but 0) or has no such
    /// file: they stay where they were made, see [`reclaim_emptied`].
    Refused,
}

/// Asks a v1 memory hierarchy to move the charges of every task that joins
/// `target` with it (before the move: the kernel decides at attach).
fn charge_with_tasks(h: &Hierarchy, target: &Path) -> Result<ChargeMove, CgroupError> {
    if !h.has("memory") {
        return Ok(ChargeMove::NotMemory);
    }
    match write(
        &target.join("memory.move_charge_at_immigrate"),
        MOVE_ANON_AND_FILE,
    ) {
        Ok(()) => Ok(ChargeMove::WithTasks),
        Err(CgroupError::Write { source, .. }) if charge_move_refused(&source) => {
            warn_charges_stay();
            Ok(ChargeMove::Refused)
        }
        Err(e) => Err(e),
    }
}

fn charge_move_refused(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::libc::EINVAL)
}

fn warn_charges_stay() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing::warn!(
            "this kernel does not move cgroup v1 memory charges with a process \
             (memory.move_charge_at_immigrate): memory a slot's processes use \
             before a claim and the kernel cannot reclaim stays charged to the \
             slot's placeholder cgroup (docs/runtimes.md, \"Memory accounting\")"
        );
    });
}

/// Once the last task has left `source` in a hierarchy with the memory
/// controller, reclaims what is still charged there (v1
/// `memory.force_empty`, v2 `memory.reclaim`): page cache and other
/// reclaimable pages are charged again to whoever faults them next, the
/// pod. Memory the kernel cannot reclaim (anonymous and shmem pages
/// without swap) stays. Best effort: a failure is logged, the move stands.
fn reclaim_emptied(h: &Hierarchy, source: &Path) {
    let v1 = h.has("memory");
    let v2 = h.is_v2() && source.join("memory.reclaim").exists();
    if !v1 && !v2 {
        return;
    }
    let reclaimed = read(&source.join("cgroup.procs")).and_then(|procs| {
        if !procs.trim().is_empty() {
            return Ok(());
        }
        if v1 {
            return write(&source.join("memory.force_empty"), "0");
        }
        let current = read(&source.join("memory.current"))?;
        match write(&source.join("memory.reclaim"), current.trim()) {
            // Not all of it was reclaimable: expected.
            Err(CgroupError::Write { source, .. })
                if source.raw_os_error() == Some(nix::libc::EAGAIN) =>
            {
                Ok(())
            }
            other => other,
        }
    });
    if let Err(e) = reclaimed {
        let cause = std::error::Error::source(&e).map(ToString::to_string);
        tracing::warn!(cgroup = %source.display(), error = %e, cause = cause.unwrap_or_default(),
            "reclaiming the emptied placeholder cgroup failed; its charges stay there");
    }
}

/// Creates `leaf` and its missing parents in `h`; in a v1 cpuset hierarchy
/// fills empty `cpuset.cpus`/`cpuset.mems` from the parent on the way down,
/// as runc does (a task cannot join an empty cpuset).
fn create_leaf(h: &Hierarchy, leaf: &CgroupLeaf) -> Result<(), CgroupError> {
    let cpuset = h.has("cpuset");
    let mut dir = h.mount.clone();
    for component in leaf.relative().components() {
        let parent = dir.clone();
        dir.push(component);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::Create { path: dir, source }),
        }
        if cpuset {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if read(&dir.join(file))?.trim().is_empty() {
                    let value = read(&parent.join(file))?;
                    write(&dir.join(file), value.trim())?;
                }
            }
        }
    }
    Ok(())
}

/// Gives `target` what runc set on `source`: CPU shares and the device
/// allow-list (cpuset is handled by [`create_leaf`]).
///
/// On cgroup v2 runc turns the shares into `cpu.weight` (copied when the
/// cpu controller is enabled there) and enforces devices with an eBPF
/// program attached to the leaf, which is not copied: on a pure v2 host the
/// moved pause would have its parent's device access. Unverified, these
/// machines are v1 hybrid (the unified hierarchy has no controllers).
fn copy_settings(h: &Hierarchy, source: &Path, target: &Path) -> Result<(), CgroupError> {
    if h.has("cpu") {
        copy_file(&source.join("cpu.shares"), &target.join("cpu.shares"))?;
    }
    if h.is_v2() && source.join("cpu.weight").exists() {
        copy_file(&source.join("cpu.weight"), &target.join("cpu.weight"))?;
    }
    if h.has("devices") {
        let allowed = read(&source.join("devices.list"))?;
        if read(&target.join("devices.list"))? != allowed {
            write(&target.join("devices.deny"), "a")?;
            for rule in allowed.lines().filter(|l| !l.trim().is_empty()) {
                write(&target.join("devices.allow"), rule)?;
            }
        }
    }
    Ok(())
}

/// Writes the value of cgroup file `from` to `to` unless they already agree.
fn copy_file(from: &Path, to: &Path) -> Result<(), CgroupError> {
    let value = read(from)?;
    if read(to)? != value {
        write(to, value.trim())?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// One `write(2)` of `value`, as the cgroup files expect.
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write {
            path: path.to_owned(),
            value: value.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests;
