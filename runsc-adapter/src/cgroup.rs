//! Puts the adapter's own long-lived processes (the waiter, `runsc wait`,
//! `runsc exec`'s child) into the container's cgroup, in every hierarchy, so
//! the shim's per-container stats read the container's cgroup and the pod's
//! cgroup is charged for everything the pod runs.
//!
//! containerd's runc shim loads a container's cgroup from
//! `/proc/<pid>/cgroup` of the PID in its pid file: with runsc that PID is
//! the waiter's, so the waiter must be in the container's cgroup before
//! `create` returns.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::error::AdapterError;

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mountpoint: PathBuf,
    /// Super options for v1 (`memory`, `cpu,cpuacct`, `name=systemd`), empty for v2.
    pub options: String,
    pub v2: bool,
}

/// The cgroup hierarchies mounted at their root, from `/proc/self/mountinfo`
/// text; one entry per hierarchy.
pub fn hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    let mut out: Vec<Hierarchy> = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        let (Some(root), Some(mountpoint), Some(fstype)) = (pre.get(3), pre.get(4), post.first())
        else {
            continue;
        };
        if *root != "/" {
            continue;
        }
        let v2 = match *fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let options = if v2 {
            String::new()
        } else {
            post.get(2)
                .map(|o| {
                    o.split(',')
                        .filter(|x| *x != "rw" && *x != "ro" && !x.starts_with("release_agent"))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        };
        let h = Hierarchy {
            mountpoint: PathBuf::from(unescape(mountpoint)),
            options,
            v2,
        };
        if !out.iter().any(|o| o.v2 == h.v2 && o.options == h.options) {
            out.push(h);
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of cgroup `path` (an OCI `cgroupsPath` for the cgroupfs
/// driver) in hierarchy `h`.
pub fn dir_in(h: &Hierarchy, path: &str) -> PathBuf {
    h.mountpoint.join(path.trim_start_matches('/'))
}

/// A cgroupfs `cgroupsPath` the adapter can join. The systemd driver's
/// `slice:prefix:name` form is not supported (this node uses cgroupfs).
pub fn cgroupfs_path(cgroups_path: &str) -> Option<&str> {
    (cgroups_path.starts_with('/') && !cgroups_path.contains(':') && !cgroups_path.contains(".."))
        .then_some(cgroups_path)
}

/// Moves process `pid` into `cgroups_path` in every mounted hierarchy,
/// creating directories that runsc did not create. Returns the hierarchies
/// it could not join, with why (the caller logs them: a missing optional
/// hierarchy must not fail a container).
pub fn join_all(pid: u32, cgroups_path: &str) -> Result<Vec<(PathBuf, String)>, AdapterError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| AdapterError::io("read", "/proc/self/mountinfo", e))?;
    let mut failed = Vec::new();
    for h in hierarchies(&mountinfo) {
        let dir = dir_in(&h, cgroups_path);
        if let Err(e) = join(&h, &dir, pid) {
            failed.push((dir, e.to_string()));
        }
    }
    Ok(failed)
}

/// Removes the (empty) directory of `cgroups_path` in every hierarchy, as
/// `runc delete` does: runsc removes only those it made itself, not those
/// the adapter made to put its waiter in. Returns what could not be removed.
pub fn remove_all(cgroups_path: &str) -> Vec<(PathBuf, String)> {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut failed = Vec::new();
    for h in hierarchies(&mountinfo) {
        let dir = dir_in(&h, cgroups_path);
        match fs::remove_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                failed.push((dir, e.to_string()));
            }
            _ => {}
        }
    }
    failed
}

fn join(h: &Hierarchy, dir: &Path, pid: u32) -> std::io::Result<()> {
    if !dir.is_dir() {
        fs::create_dir_all(dir)?;
    }
    if !h.v2 && h.options.split(',').any(|o| o == "cpuset") {
        init_cpuset(&h.mountpoint, dir)?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))?;
    f.write_all(pid.to_string().as_bytes())
}

/// A new v1 cpuset cgroup has empty `cpus`/`mems` and refuses tasks until
/// they are set: copy them down from the nearest configured ancestor.
fn init_cpuset(mountpoint: &Path, dir: &Path) -> std::io::Result<()> {
    let mut chain = Vec::new();
    let mut d = dir.to_path_buf();
    while d.starts_with(mountpoint) && d != mountpoint {
        chain.push(d.clone());
        if !d.pop() {
            break;
        }
    }
    chain.push(mountpoint.to_path_buf());
    chain.reverse();
    for pair in chain.windows(2) {
        let (parent, child) = (&pair[0], &pair[1]);
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let current = fs::read_to_string(child.join(file))?;
            if current.trim().is_empty() {
                let value = fs::read_to_string(parent.join(file))?;
                fs::write(child.join(file), value.trim())?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
28 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
29 28 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
30 28 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
33 28 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
34 28 0:32 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
35 28 0:33 / /sys/fs/cgroup/cpuset rw,nosuid - cgroup cgroup rw,cpuset
90 28 0:33 / /sys/fs/cgroup/cpuset\\040again rw,nosuid - cgroup cgroup rw,cpuset
91 28 0:32 /kubepods /mnt/sub rw - cgroup cgroup rw,memory
";

    #[test]
    fn every_hierarchy_once_at_its_root_mount() {
        let hs = hierarchies(MOUNTINFO);
        let names: Vec<(String, &str, bool)> = hs
            .iter()
            .map(|h| (h.mountpoint.display().to_string(), h.options.as_str(), h.v2))
            .collect();
        assert_eq!(
            names,
            [
                ("/sys/fs/cgroup/unified".to_owned(), "", true),
                (
                    "/sys/fs/cgroup/systemd".to_owned(),
                    "xattr,name=systemd",
                    false
                ),
                (
                    "/sys/fs/cgroup/cpu,cpuacct".to_owned(),
                    "cpu,cpuacct",
                    false
                ),
                ("/sys/fs/cgroup/memory".to_owned(), "memory", false),
                ("/sys/fs/cgroup/cpuset".to_owned(), "cpuset", false),
            ]
        );
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
    }

    #[test]
    fn only_cgroupfs_paths_are_joined() {
        assert_eq!(
            cgroupfs_path("/kubepods/pod1/abc"),
            Some("/kubepods/pod1/abc")
        );
        assert_eq!(cgroupfs_path("kubepods.slice:cri-containerd:abc"), None);
        assert_eq!(cgroupfs_path("/kubepods/../etc"), None);
        let h = &hierarchies(MOUNTINFO)[3];
        assert_eq!(
            dir_in(h, "/kubepods/pod1/abc"),
            PathBuf::from("/sys/fs/cgroup/memory/kubepods/pod1/abc")
        );
    }

    #[test]
    fn cpuset_values_are_copied_down() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cpuset.cpus"), "0-1\n").unwrap();
        fs::write(root.path().join("cpuset.mems"), "0\n").unwrap();
        let mid = root.path().join("kubepods");
        let leaf = mid.join("c1");
        fs::create_dir_all(&leaf).unwrap();
        for d in [&mid, &leaf] {
            fs::write(d.join("cpuset.cpus"), "\n").unwrap();
            fs::write(d.join("cpuset.mems"), "").unwrap();
        }
        fs::write(mid.join("cpuset.cpus"), "1\n").unwrap();
        init_cpuset(root.path(), &leaf).unwrap();
        assert_eq!(fs::read_to_string(mid.join("cpuset.cpus")).unwrap(), "1\n");
        assert_eq!(fs::read_to_string(mid.join("cpuset.mems")).unwrap(), "0");
        assert_eq!(fs::read_to_string(leaf.join("cpuset.cpus")).unwrap(), "1");
        assert_eq!(fs::read_to_string(leaf.join("cpuset.mems")).unwrap(), "0");
    }
}
