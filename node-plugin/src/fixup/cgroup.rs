//! Moving a pause process between cgroups the way runc would have placed it,
//! on cgroup v1, v2 and hybrid hosts.
//!
//! Hand code rather than `cgroups-rs`: that crate models "a cgroup" as one
//! controller set it creates and configures from a resource spec, while a
//! claim needs something narrower: follow the pid through whatever
//! hierarchies runc put it in (`/proc/<pid>/cgroup`), recreate the leaf
//! elsewhere with the same settings, move the pid. `procfs` parses
//! `mountinfo` (escapes included) and `/proc/<pid>/cgroup`.
//!
//! What runc 1.1.5 sets on a pause's leaf, measured here by diffing every
//! file of the leaf against a fresh sibling: `cpu.shares` (2), the device
//! allow-list, and `cpuset.cpus`/`cpuset.mems` (copied down from the parent
//! because a new v1 cpuset is empty). Nothing else differs, so those are
//! what [`move_pid`] reproduces.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use procfs::{process::MountInfo, FromBufRead as _, ProcessCGroup, ProcessCGroups};

use super::{plan::CgroupLeaf, FixupError};

/// Superblock options of a v1 hierarchy that are not controllers.
const V1_FLAGS: [&str; 10] = [
    "rw",
    "ro",
    "xattr",
    "noprefix",
    "clone_children",
    "cpuset_v2_mode",
    "all",
    "none",
    "favordynmods",
    "release_agent",
];

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Hierarchy {
    pub mount: PathBuf,
    /// `None` for cgroup v2; for v1, the options of its superblock (the
    /// controllers, `name=…`, and flags such as `rw`).
    v1_options: Option<Vec<(String, Option<String>)>>,
    /// The superblock, to skip a second mount of the same hierarchy.
    majmin: String,
}

impl Hierarchy {
    fn has(&self, controller: &str) -> bool {
        let Some(opts) = &self.v1_options else {
            return false;
        };
        match controller.strip_prefix("name=") {
            Some(name) => opts
                .iter()
                .any(|(k, v)| k == "name" && v.as_deref() == Some(name)),
            None => opts.iter().any(|(k, v)| k == controller && v.is_none()),
        }
    }

    /// True when the line of `/proc/<pid>/cgroup` is about this hierarchy.
    fn serves(&self, membership: &ProcessCGroup) -> bool {
        if membership.controllers.is_empty() {
            self.v1_options.is_none()
        } else {
            membership.controllers.iter().all(|c| self.has(c))
        }
    }
}

/// The cgroup hierarchies mounted in this process's mount namespace with
/// their root at the mount point, one mount per hierarchy.
pub(super) fn mounted_hierarchies() -> Result<Vec<Hierarchy>, FixupError> {
    let mounts = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map_err(|e| FixupError::CgroupMounts {
            source: io_error(e),
        })?;
    Ok(hierarchies_from(&mounts.0))
}

fn hierarchies_from(mounts: &[MountInfo]) -> Vec<Hierarchy> {
    let mut out: Vec<Hierarchy> = Vec::new();
    for m in mounts {
        let v1 = match m.fs_type.as_str() {
            "cgroup" => true,
            "cgroup2" => false,
            _ => continue,
        };
        if m.root != "/" || out.iter().any(|h| h.majmin == m.majmin) {
            continue;
        }
        let mut opts: Vec<(String, Option<String>)> = m
            .super_options
            .iter()
            .filter(|(k, _)| !V1_FLAGS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        opts.sort();
        out.push(Hierarchy {
            mount: m.mount_point.clone(),
            v1_options: v1.then_some(opts),
            majmin: m.majmin.clone(),
        });
    }
    out
}

/// The cgroups of `pid`, one per hierarchy.
fn memberships(pid: i32) -> Result<Vec<ProcessCGroup>, FixupError> {
    let path = format!("/proc/{pid}/cgroup");
    let file =
        fs::File::open(&path).map_err(|source| FixupError::ProcessCgroups { pid, source })?;
    parse_memberships(io::BufReader::new(file))
        .map_err(|source| FixupError::ProcessCgroups { pid, source })
}

fn parse_memberships(r: impl io::BufRead) -> io::Result<Vec<ProcessCGroup>> {
    ProcessCGroups::from_buf_read(r)
        .map(|c| c.0)
        .map_err(io_error)
}

fn hierarchy_name(m: &ProcessCGroup) -> String {
    if m.controllers.is_empty() {
        "cgroup2".to_owned()
    } else {
        m.controllers.join(",")
    }
}

/// Moves `pid` from `from` to `to` in every hierarchy it is in. Checks every
/// hierarchy before changing anything; hierarchies where the pid already is
/// in `to` are skipped (a retried claim).
pub(super) fn move_pid(pid: i32, from: &CgroupLeaf, to: &CgroupLeaf) -> Result<(), FixupError> {
    move_pid_checked(pid, from, to, true)
}

/// As [`move_pid`], but hierarchies where `pid` is neither in `from` nor in
/// `to` are left alone instead of being an error: for a gVisor sandbox's
/// processes, which runsc places in the v1 hierarchies only (the unified
/// one keeps them at the root, warm or cold).
pub(super) fn move_pid_where_in(
    pid: i32,
    from: &CgroupLeaf,
    to: &CgroupLeaf,
) -> Result<(), FixupError> {
    move_pid_checked(pid, from, to, false)
}

/// The PIDs in the leaf cgroup `leaf`, in any mounted hierarchy.
pub(super) fn leaf_procs(leaf: &CgroupLeaf) -> Result<Vec<i32>, FixupError> {
    let mut pids = Vec::new();
    for h in mounted_hierarchies()? {
        let path = h.mount.join(leaf.relative()).join("cgroup.procs");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(FixupError::ReadCgroupFile { path, source }),
        };
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

fn move_pid_checked(
    pid: i32,
    from: &CgroupLeaf,
    to: &CgroupLeaf,
    strict: bool,
) -> Result<(), FixupError> {
    let hierarchies = mounted_hierarchies()?;
    let mut todo: Vec<&Hierarchy> = Vec::new();
    for m in memberships(pid)? {
        let h = hierarchies.iter().find(|h| h.serves(&m)).ok_or_else(|| {
            FixupError::HierarchyNotMounted {
                pid,
                hierarchy: hierarchy_name(&m),
            }
        })?;
        if m.pathname == to.as_str() {
            continue;
        }
        if m.pathname != from.as_str() {
            if !strict {
                continue;
            }
            return Err(FixupError::UnexpectedCgroup {
                pid,
                hierarchy: hierarchy_name(&m),
                expected: from.as_str().to_owned(),
                actual: m.pathname,
            });
        }
        todo.push(h);
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
fn charge_with_tasks(h: &Hierarchy, target: &Path) -> Result<ChargeMove, FixupError> {
    if !h.has("memory") {
        return Ok(ChargeMove::NotMemory);
    }
    match write(
        &target.join("memory.move_charge_at_immigrate"),
        MOVE_ANON_AND_FILE,
    ) {
        Ok(()) => Ok(ChargeMove::WithTasks),
        Err(FixupError::WriteCgroupFile { source, .. }) if charge_move_refused(&source) => {
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
    let v2 = h.v1_options.is_none() && source.join("memory.reclaim").exists();
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
            Err(FixupError::WriteCgroupFile { source, .. })
                if source.raw_os_error() == Some(nix::libc::EAGAIN) =>
            {
                Ok(())
            }
            other => other,
        }
    });
    if let Err(e) = reclaimed {
        tracing::warn!(cgroup = %source.display(), error = %crate::blocking::chain(&e),
            "reclaiming the emptied placeholder cgroup failed; its charges stay there");
    }
}

/// Creates `leaf` and its missing parents in `h`; in a v1 cpuset hierarchy
/// fills empty `cpuset.cpus`/`cpuset.mems` from the parent on the way down,
/// as runc does (a task cannot join an empty cpuset).
fn create_leaf(h: &Hierarchy, leaf: &CgroupLeaf) -> Result<(), FixupError> {
    let cpuset = h.has("cpuset");
    let mut dir = h.mount.clone();
    for component in leaf.relative().components() {
        let parent = dir.clone();
        dir.push(component);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(FixupError::CreateCgroup { path: dir, source }),
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
fn copy_settings(h: &Hierarchy, source: &Path, target: &Path) -> Result<(), FixupError> {
    if h.has("cpu") {
        copy_file(&source.join("cpu.shares"), &target.join("cpu.shares"))?;
    }
    if h.v1_options.is_none() && source.join("cpu.weight").exists() {
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
fn copy_file(from: &Path, to: &Path) -> Result<(), FixupError> {
    let value = read(from)?;
    if read(to)? != value {
        write(to, value.trim())?;
    }
    Ok(())
}

/// Removes `leaf` in every mounted hierarchy; a missing one is fine.
pub(super) fn remove_leaf(leaf: &CgroupLeaf) -> Result<(), FixupError> {
    for h in mounted_hierarchies()? {
        let path = h.mount.join(leaf.relative());
        match fs::remove_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(FixupError::RemoveCgroup { path, source }),
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, FixupError> {
    fs::read_to_string(path).map_err(|source| FixupError::ReadCgroupFile {
        path: path.to_owned(),
        source,
    })
}

/// One `write(2)` of `value`, as the cgroup files expect.
fn write(path: &Path, value: &str) -> Result<(), FixupError> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| FixupError::WriteCgroupFile {
            path: path.to_owned(),
            value: value.to_owned(),
            source,
        })
}

fn io_error(e: procfs::ProcError) -> io::Error {
    match e {
        procfs::ProcError::Io(e, _) => e,
        other => io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/self/mountinfo` lines of this project's machines (cgroup v1
    /// hybrid), plus a co-mounted `cpu,cpuacct` and a bind mount of a
    /// sub-tree that must be ignored.
    const MOUNTINFO: &str = "\
25 30 0:22 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu
27 25 0:24 / /sys/fs/cgroup/cpuset rw,relatime shared:11 - cgroup cgroup rw,cpuset
28 25 0:25 / /sys/fs/cgroup/devices rw,relatime shared:12 - cgroup cgroup rw,devices
29 25 0:26 / /sys/fs/cgroup/systemd rw,relatime shared:13 - cgroup cgroup rw,xattr,name=systemd
30 25 0:27 / /sys/fs/cgroup/unified rw,relatime shared:14 - cgroup2 cgroup2 rw
31 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
32 25 0:23 /kubepods /mnt/cpu-kubepods rw,relatime shared:10 - cgroup cgroup rw,cpu
33 25 0:23 / /mnt/cpu-again rw,relatime shared:10 - cgroup cgroup rw,cpu
";

    fn hierarchies() -> Vec<Hierarchy> {
        let mounts = procfs::process::MountInfos::from_buf_read(MOUNTINFO.as_bytes()).unwrap();
        hierarchies_from(&mounts.0)
    }

    fn membership(line: &str) -> ProcessCGroup {
        parse_memberships(line.as_bytes()).unwrap().remove(0)
    }

    fn served_by(line: &str) -> Vec<PathBuf> {
        let m = membership(line);
        hierarchies()
            .into_iter()
            .filter(|h| h.serves(&m))
            .map(|h| h.mount)
            .collect()
    }

    /// A hierarchy mounted at `mount` on a fake cgroup tree (a tempdir):
    /// v1 with `controllers`, or v2 when `None`.
    fn fake(mount: &Path, controllers: Option<&[&str]>) -> Hierarchy {
        Hierarchy {
            mount: mount.to_owned(),
            v1_options: controllers.map(|c| c.iter().map(|k| ((*k).to_owned(), None)).collect()),
            majmin: mount.display().to_string(),
        }
    }

    fn leaf_with(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
        fs::create_dir_all(dir).unwrap();
        for (name, text) in files {
            fs::write(dir.join(name), text).unwrap();
        }
        dir.to_owned()
    }

    fn text(path: PathBuf) -> String {
        fs::read_to_string(path).unwrap()
    }

    /// Issue 12 item 2: on a v1 memory hierarchy the target asks for the
    /// charges of every joining task; other hierarchies are not touched; a
    /// kernel without charge moving (no file, `EINVAL`) is no error.
    #[test]
    fn charges_are_asked_to_move_with_tasks_on_v1_memory_only() {
        let root = tempfile::tempdir().unwrap();
        let memory = fake(&root.path().join("memory"), Some(&["memory"]));
        let cpu = fake(&root.path().join("cpu"), Some(&["cpu", "cpuacct"]));
        let unified = fake(&root.path().join("unified"), None);
        let file = "memory.move_charge_at_immigrate";
        let target = leaf_with(&memory.mount.join("pod/sb"), &[(file, "")]);
        assert_eq!(
            charge_with_tasks(&memory, &target).unwrap(),
            ChargeMove::WithTasks
        );
        assert_eq!(text(target.join(file)), "3");
        for h in [&cpu, &unified] {
            let target = leaf_with(&h.mount.join("pod/sb"), &[]);
            assert_eq!(
                charge_with_tasks(h, &target).unwrap(),
                ChargeMove::NotMemory
            );
            assert!(!target.join(file).exists());
        }
        // No file (a kernel without the knob): writing never creates one.
        let without = leaf_with(&memory.mount.join("pod/other"), &[]);
        assert_eq!(
            charge_with_tasks(&memory, &without).unwrap(),
            ChargeMove::Refused
        );
        assert!(!without.join(file).exists());
        let code = |c| io::Error::from_raw_os_error(c);
        assert!(charge_move_refused(&code(nix::libc::EINVAL)));
        assert!(!charge_move_refused(&code(nix::libc::EIO)));
        assert!(!charge_move_refused(&code(nix::libc::EACCES)));
    }

    /// What stays charged to an emptied placeholder leaf is reclaimed so it
    /// faults back in charged to the pod: v1 `memory.force_empty`, v2
    /// `memory.reclaim` of its whole usage. Not while a task is left, and
    /// not in hierarchies without the memory controller.
    #[test]
    fn an_emptied_leaf_is_reclaimed_v1_and_v2() {
        let root = tempfile::tempdir().unwrap();
        let memory = fake(&root.path().join("memory"), Some(&["memory"]));
        let emptied = leaf_with(
            &memory.mount.join("slots/u/sb"),
            &[("cgroup.procs", ""), ("memory.force_empty", "")],
        );
        reclaim_emptied(&memory, &emptied);
        assert_eq!(text(emptied.join("memory.force_empty")), "0");

        let busy = leaf_with(
            &memory.mount.join("slots/u/busy"),
            &[("cgroup.procs", "42\n"), ("memory.force_empty", "")],
        );
        reclaim_emptied(&memory, &busy);
        assert_eq!(text(busy.join("memory.force_empty")), "", "a task is left");

        let unified = fake(&root.path().join("unified"), None);
        let v2 = leaf_with(
            &unified.mount.join("slots/u/sb"),
            &[
                ("cgroup.procs", ""),
                ("memory.current", "8192\n"),
                ("memory.reclaim", ""),
            ],
        );
        reclaim_emptied(&unified, &v2);
        assert_eq!(text(v2.join("memory.reclaim")), "8192");

        let cpu = fake(&root.path().join("cpu"), Some(&["cpu"]));
        let other = leaf_with(
            &cpu.mount.join("slots/u/sb"),
            &[("cgroup.procs", ""), ("memory.force_empty", "")],
        );
        reclaim_emptied(&cpu, &other);
        assert_eq!(text(other.join("memory.force_empty")), "");
    }

    #[test]
    fn one_hierarchy_per_superblock_mounted_at_its_root() {
        let mounts: Vec<_> = hierarchies().into_iter().map(|h| h.mount).collect();
        assert_eq!(
            mounts,
            [
                "/sys/fs/cgroup/cpu",
                "/sys/fs/cgroup/cpuset",
                "/sys/fs/cgroup/devices",
                "/sys/fs/cgroup/systemd",
                "/sys/fs/cgroup/unified",
                "/sys/fs/cgroup/cpu,cpuacct",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn proc_pid_cgroup_lines_find_their_hierarchy() {
        assert_eq!(
            served_by("3:cpuset:/a/b\n"),
            [PathBuf::from("/sys/fs/cgroup/cpuset")]
        );
        assert_eq!(
            served_by("9:name=systemd:/a\n"),
            [PathBuf::from("/sys/fs/cgroup/systemd")]
        );
        assert_eq!(
            served_by("0::/a\n"),
            [PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert_eq!(
            served_by("2:cpu,cpuacct:/a\n"),
            [PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")]
        );
        // `rw` is a flag, not a controller; `name=other` is not mounted.
        assert!(served_by("7:rw:/a\n").is_empty());
        assert!(served_by("8:name=other:/a\n").is_empty());
        let m = membership("4:memory:/kubepods/x\n");
        assert_eq!(hierarchy_name(&m), "memory");
        assert_eq!(m.pathname, "/kubepods/x");
        assert_eq!(hierarchy_name(&membership("0::/\n")), "cgroup2");
    }
}
