//! Counting what sandboxes leave on a node, to prove nothing leaks: pod
//! sandboxes and their network namespaces, CNI IP allocations, mounts,
//! containerd shims and cgroup directories; containerd's own containers,
//! tasks and snapshots; and the in-process node plugin's fds and RSS.

use std::path::{Path, PathBuf};

use fast_sandbox_proto::cri::ListPodSandboxRequest;

use crate::{Cri, DevNode};

/// What one development node holds at a moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    /// Pod sandboxes containerd knows (any state).
    pub sandboxes: usize,
    /// Network namespaces containerd made (`netns_mounts_under_state_dir`).
    pub netns: usize,
    /// IPs the host-local IPAM has handed out.
    pub ips: usize,
    /// Mounts under the containerd instance's directory.
    pub mounts: usize,
    /// `containerd-shim*` processes of this instance.
    pub shims: usize,
    /// Directories in every hierarchy under each of the given cgroup roots.
    pub cgroup_dirs: usize,
}

impl DevNode {
    /// The containerd instance's directory (parent of its `root`).
    pub fn instance_dir(&self) -> PathBuf {
        self.containerd_root
            .parent()
            .unwrap_or(Path::new("/"))
            .to_owned()
    }

    /// containerd's CNI configuration directory on the development node.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.instance_dir().join("cni/conf")
    }

    /// The host-local IPAM directory: one file per allocated IP, per network.
    pub fn cni_ipam_dir(&self) -> PathBuf {
        self.instance_dir().join("cni/ipam")
    }

    /// Counts what the node holds now; `cgroup_roots` are the cgroup
    /// subtrees to count directories under (e.g. a pool's placeholder root).
    pub async fn census(&self, cgroup_roots: &[&str]) -> anyhow::Result<Census> {
        let dir = self.instance_dir();
        let mut cri = Cri::connect(&self.containerd_endpoint)?;
        let sandboxes = cri
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .await?
            .into_inner()
            .items
            .len();
        let count = |p: PathBuf, keep: &dyn Fn(&str) -> bool| {
            std::fs::read_dir(p)
                .map(|d| {
                    d.flatten()
                        .filter(|e| keep(&e.file_name().to_string_lossy()))
                        .count()
                })
                .unwrap_or(0)
        };
        let netns = count(
            self.containerd_state
                .join("io.containerd.grpc.v1.cri/netns"),
            &|_| true,
        );
        let ips = std::fs::read_dir(dir.join("cni/ipam"))
            .map(|nets| {
                nets.flatten()
                    .map(|n| count(n.path(), &|f| f.parse::<std::net::IpAddr>().is_ok()))
                    .sum()
            })
            .unwrap_or(0);
        let dir_str = dir.display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(4)
                    .is_some_and(|m| m.starts_with(&dir_str))
            })
            .count();
        let address = format!("-address {}", dir.join("containerd.sock").display());
        let shims = std::fs::read_dir("/proc")?
            .flatten()
            .filter(|p| {
                p.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains("containerd-shim") && c.contains(&address))
            .count();
        let cgroup_dirs = cgroup_roots.iter().map(|r| cgroup_dirs_under(r)).sum();
        Ok(Census {
            sandboxes,
            netns,
            ips,
            mounts,
            shims,
            cgroup_dirs,
        })
    }
}

impl DevNode {
    /// Waits (bounded) until the census equals `expected` and returns the
    /// last one taken: shims and mounts go away a moment after the CRI call
    /// that removed their sandbox has returned.
    pub async fn settled_census(
        &self,
        expected: &Census,
        cgroup_roots: &[&str],
        deadline: std::time::Duration,
    ) -> anyhow::Result<Census> {
        let start = std::time::Instant::now();
        loop {
            let now = self.census(cgroup_roots).await?;
            if now == *expected || start.elapsed() > deadline {
                return Ok(now);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// Directories (recursively) under `root` in every cgroup hierarchy.
pub fn cgroup_dirs_under(root: &str) -> usize {
    fn walk(p: &Path) -> usize {
        std::fs::read_dir(p)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| 1 + walk(&e.path()))
                    .sum()
            })
            .unwrap_or(0)
    }
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return 0;
    };
    hierarchies
        .flatten()
        .map(|h| walk(&h.path().join(root.trim_start_matches('/'))))
        .sum()
}

/// containerd's own objects in the CRI namespace (`k8s.io`): what a
/// sandbox or container leaves in containerd's metadata and state even
/// when its netns, IP and shim are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Objects {
    /// CRI containers (`ListContainers` straight on containerd, any state).
    pub cri_containers: usize,
    /// containerd containers (sandboxes' pause containers and CRI
    /// containers alike), from `ctr containers ls`.
    pub containers: usize,
    /// Running or stopped tasks: one directory each under the v2 runtime's
    /// state.
    pub tasks: usize,
    /// Snapshots of the overlayfs snapshotter (image layers and every
    /// container's writable layer).
    pub snapshots: usize,
}

impl DevNode {
    /// Counts containerd's objects in the `k8s.io` namespace now.
    pub async fn objects(&self) -> anyhow::Result<Objects> {
        use anyhow::Context as _;
        let mut cri = Cri::connect(&self.containerd_endpoint)?;
        let cri_containers = cri
            .runtime
            .list_containers(fast_sandbox_proto::cri::ListContainersRequest::default())
            .await?
            .into_inner()
            .containers
            .len();
        let out = tokio::process::Command::new("ctr")
            .arg("--address")
            .arg(self.instance_dir().join("containerd.sock"))
            .args(["-n", "k8s.io", "containers", "ls", "-q"])
            .output()
            .await
            .context("running ctr containers ls")?;
        anyhow::ensure!(
            out.status.success(),
            "ctr containers ls: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let containers = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count();
        let entries = |p: PathBuf| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
        let tasks = entries(
            self.containerd_state
                .join("io.containerd.runtime.v2.task/k8s.io"),
        );
        let snapshots = entries(
            self.containerd_root
                .join("io.containerd.snapshotter.v1.overlayfs/snapshots"),
        );
        Ok(Objects {
            cri_containers,
            containers,
            tasks,
            snapshots,
        })
    }

    /// Waits (bounded) until [`DevNode::objects`] equals `expected` and
    /// returns the last count: a task's state directory goes a moment after
    /// the call that removed it.
    pub async fn settled_objects(
        &self,
        expected: &Objects,
        deadline: std::time::Duration,
    ) -> anyhow::Result<Objects> {
        let start = std::time::Instant::now();
        loop {
            let now = self.objects().await?;
            if now == *expected || start.elapsed() > deadline {
                return Ok(now);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// The test process's own open file descriptors and resident set size:
/// with the shim and pool manager served in-process, these are the node
/// plugin's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessUsage {
    pub fds: usize,
    pub rss_bytes: u64,
}

impl ProcessUsage {
    /// This process, now.
    pub fn now() -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let fds = std::fs::read_dir("/proc/self/fd")?.count();
        let status = std::fs::read_to_string("/proc/self/status")?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .context("VmRSS missing from /proc/self/status")?;
        Ok(Self {
            fds,
            rss_bytes: kb * 1024,
        })
    }
}
