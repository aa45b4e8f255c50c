//! The cgroup hierarchies mounted here and a process's place in them, both
//! parsed by `procfs` (`/proc/self/mountinfo` and `/proc/<pid>/cgroup`).
//! procfs 0.18 leaves the kernel's octal escapes in mount points (`\040`
//! for a space): [`unescape`] undoes them.

use std::{
    ffi::OsString,
    fs, io,
    os::unix::ffi::{OsStrExt as _, OsStringExt as _},
    path::{Path, PathBuf},
};

use procfs::{process::MountInfo, FromBufRead as _, ProcessCGroup, ProcessCGroups};

use crate::CgroupError;

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
pub struct Hierarchy {
    pub mount: PathBuf,
    /// `None` for cgroup v2; for v1, the options of its superblock (the
    /// controllers, `name=…`; flags such as `rw` left out).
    v1_options: Option<Vec<(String, Option<String>)>>,
    /// The superblock, to skip a second mount of the same hierarchy.
    majmin: String,
}

impl Hierarchy {
    /// A hierarchy at `mount`: v1 with `controllers`, or v2 when `None`
    /// (for tests on fake cgroup trees).
    pub fn at(mount: impl Into<PathBuf>, controllers: Option<&[&str]>) -> Self {
        let mount = mount.into();
        Self {
            majmin: mount.display().to_string(),
            v1_options: controllers.map(|c| c.iter().map(|k| ((*k).to_owned(), None)).collect()),
            mount,
        }
    }

    pub fn is_v2(&self) -> bool {
        self.v1_options.is_none()
    }

    /// True for a v1 hierarchy with `controller` (or `name=<name>`).
    pub fn has(&self, controller: &str) -> bool {
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
            self.is_v2()
        } else {
            membership.controllers.iter().all(|c| self.has(c))
        }
    }
}

/// The cgroup hierarchies mounted in this process's mount namespace with
/// their root at the mount point, one mount per hierarchy.
pub fn mounted() -> Result<Vec<Hierarchy>, CgroupError> {
    let mounts = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map_err(|e| CgroupError::Mounts {
            source: io_error(e),
        })?;
    Ok(hierarchies_from(&mounts.0))
}

pub(crate) fn hierarchies_from(mounts: &[MountInfo]) -> Vec<Hierarchy> {
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
            mount: unescape(&m.mount_point),
            v1_options: v1.then_some(opts),
            majmin: m.majmin.clone(),
        });
    }
    out
}

/// A mountinfo path with the kernel's `\ooo` escapes (space, tab, newline,
/// backslash) decoded.
fn unescape(path: &Path) -> PathBuf {
    let b = path.as_os_str().as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| {
            (b'0'..=b'3').contains(&d[0]) && d[1..].iter().all(|c| (b'0'..=b'7').contains(c))
        });
        match octal {
            Some(d) if b[i] == b'\\' => {
                out.push(((d[0] - b'0') << 6) | ((d[1] - b'0') << 3) | (d[2] - b'0'));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// One hierarchy `pid` is in, and where.
#[derive(Debug)]
pub(crate) struct Membership<'h> {
    pub hierarchy: &'h Hierarchy,
    /// The hierarchy as `/proc/<pid>/cgroup` names it, for errors.
    pub name: String,
    /// The cgroup, relative to the hierarchy's root (`/kubepods/…`).
    pub path: String,
}

/// Where `pid` is in every hierarchy it is in; a hierarchy that is not in
/// `hierarchies` is an error.
pub(crate) fn memberships(
    pid: i32,
    hierarchies: &[Hierarchy],
) -> Result<Vec<Membership<'_>>, CgroupError> {
    let path = format!("/proc/{pid}/cgroup");
    let lines = fs::File::open(&path)
        .and_then(|file| parse_memberships(io::BufReader::new(file)))
        .map_err(|source| CgroupError::ProcessCgroups { pid, source })?;
    lines
        .into_iter()
        .map(|m| {
            let name = hierarchy_name(&m);
            let hierarchy = hierarchies.iter().find(|h| h.serves(&m)).ok_or_else(|| {
                CgroupError::HierarchyNotMounted {
                    pid,
                    hierarchy: name.clone(),
                }
            })?;
            Ok(Membership {
                hierarchy,
                name,
                path: m.pathname,
            })
        })
        .collect()
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
    /// hybrid), plus a co-mounted `cpu,cpuacct`, a bind mount of a sub-tree
    /// and a second mount of one hierarchy (at an escaped path), which must
    /// be ignored.
    const MOUNTINFO: &str = "\
25 30 0:22 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu
27 25 0:24 / /sys/fs/cgroup/cpuset rw,relatime shared:11 - cgroup cgroup rw,cpuset
28 25 0:25 / /sys/fs/cgroup/devices rw,relatime shared:12 - cgroup cgroup rw,devices
29 25 0:26 / /sys/fs/cgroup/systemd rw,relatime shared:13 - cgroup cgroup rw,xattr,name=systemd
30 25 0:27 / /sys/fs/cgroup/unified rw,relatime shared:14 - cgroup2 cgroup2 rw,nsdelegate
31 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
32 25 0:23 /kubepods /mnt/cpu-kubepods rw,relatime shared:10 - cgroup cgroup rw,cpu
33 25 0:23 / /mnt/cpu-again rw,relatime shared:10 - cgroup cgroup rw,cpu
34 25 0:29 / /mnt/memory\\040here rw,relatime shared:16 - cgroup cgroup rw,memory
35 25 0:24 / /mnt/cpuset\\040again rw,relatime shared:11 - cgroup cgroup rw,cpuset
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
                "/mnt/memory here",
            ]
            .map(PathBuf::from)
        );
        let hs = hierarchies();
        assert!(hs[4].is_v2() && !hs[0].is_v2());
        assert!(hs[5].has("cpuacct") && hs[5].has("cpu") && !hs[5].has("memory"));
        assert!(hs[3].has("name=systemd") && !hs[3].has("xattr"));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(
            unescape(Path::new("/a\\040b\\134c\\011d")),
            Path::new("/a b\\c\td")
        );
        assert_eq!(unescape(Path::new("/a\\09x\\")), Path::new("/a\\09x\\"));
        assert_eq!(
            unescape(Path::new("/\\777")),
            Path::new("/\\777"),
            "not a byte"
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
