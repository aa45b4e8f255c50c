//! Reading a pod cgroup's CPU and memory numbers, and finding the per-slot
//! placeholder cgroups.
//!
//! The files read, v1 | v2: CPU time `cpuacct.usage` | `cpu.stat`
//! `usage_usec` × 1000; memory usage `memory.usage_in_bytes` |
//! `memory.current`; the limit `memory.limit_in_bytes` | `memory.max`; from
//! `memory.stat`, `total_inactive_file`, `total_rss`, `total_pgfault`,
//! `total_pgmajfault` | `inactive_file`, `anon`, `pgfault`, `pgmajfault`.
//! A cgroup that is gone (or a file missing) reads as `None`, never as
//! zeros.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use crate::CgroupLeaf;

/// One reading of a pod cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub cpu_ns: u64,
    pub usage: u64,
    pub limit: Option<u64>,
    pub inactive_file: u64,
    pub rss: u64,
    pub pgfault: u64,
    pub pgmajfault: u64,
}

impl Sample {
    /// Adds the memory charged to `other` (a claimed slot's placeholder
    /// cgroup, holding what the slot used before the claim) to this one's;
    /// the limit and CPU stay this cgroup's.
    pub fn add_memory(&mut self, other: &Sample) {
        self.usage = self.usage.saturating_add(other.usage);
        self.inactive_file = self.inactive_file.saturating_add(other.inactive_file);
        self.rss = self.rss.saturating_add(other.rss);
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `key value` lines (`memory.stat`, `cpu.stat`).
fn flat_keyed(path: &Path) -> Option<HashMap<String, u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_owned(), v.trim().parse().ok()?))
            })
            .collect(),
    )
}

/// Reads the pod cgroup `leaf` under the cgroup mount `root`
/// (`/sys/fs/cgroup`): the unified hierarchy when `root` is one (cgroup
/// v2), else the v1 `cpuacct` and `memory` hierarchies.
pub fn read(root: &Path, leaf: &CgroupLeaf) -> Option<Sample> {
    let rel = leaf.relative();
    if root.join("cgroup.controllers").exists() {
        let dir = root.join(rel);
        let cpu = flat_keyed(&dir.join("cpu.stat"))?;
        let stat = flat_keyed(&dir.join("memory.stat"))?;
        let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
        let get = |k: &str| stat.get(k).copied().unwrap_or(0);
        return Some(Sample {
            cpu_ns: cpu.get("usage_usec").copied()?.saturating_mul(1000),
            usage: read_u64(&dir.join("memory.current"))?,
            limit: max.trim().parse().ok(),
            inactive_file: get("inactive_file"),
            rss: get("anon"),
            pgfault: get("pgfault"),
            pgmajfault: get("pgmajfault"),
        });
    }
    let cpu_dir = ["cpuacct", "cpu,cpuacct", "cpuacct,cpu"]
        .iter()
        .map(|h| root.join(h))
        .find(|p| p.is_dir())?;
    let cpu_ns = read_u64(&cpu_dir.join(rel).join("cpuacct.usage"))?;
    let mem = root.join("memory").join(rel);
    let stat = flat_keyed(&mem.join("memory.stat"))?;
    let get = |k: &str| stat.get(k).copied().unwrap_or(0);
    Some(Sample {
        cpu_ns,
        usage: read_u64(&mem.join("memory.usage_in_bytes"))?,
        limit: read_u64(&mem.join("memory.limit_in_bytes")),
        inactive_file: get("total_inactive_file"),
        rss: get("total_rss"),
        pgfault: get("total_pgfault"),
        pgmajfault: get("total_pgmajfault"),
    })
}

/// The directories named by 32 hex digits (slot uids) under `parent` in
/// the cgroup mount `root` itself (v2) or in any hierarchy mounted below it
/// (v1).
pub fn placeholder_dirs(root: &Path, parent: &str) -> HashSet<String> {
    let rel = parent.trim_start_matches('/');
    let mut bases = vec![root.join(rel)];
    if let Ok(hierarchies) = std::fs::read_dir(root) {
        bases.extend(hierarchies.flatten().map(|h| h.path().join(rel)));
    }
    bases
        .iter()
        .filter_map(|b| std::fs::read_dir(b).ok())
        .flat_map(|d| d.flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gone_cgroup_reads_as_none() {
        let root = tempfile::tempdir().unwrap();
        let leaf = CgroupLeaf::parse("/kubepods/besteffort/podabc", "test").unwrap();
        assert_eq!(read(root.path(), &leaf), None);
        std::fs::create_dir_all(root.path().join("cpuacct/kubepods/besteffort/podabc")).unwrap();
        assert_eq!(read(root.path(), &leaf), None, "no memory hierarchy");
    }

    /// A claimed slot's leftover placeholder charges count as the pod's
    /// memory; its CPU, fault counters and limit do not change.
    #[test]
    fn placeholder_memory_adds_to_the_pods() {
        let mut pod = Sample {
            cpu_ns: 5,
            usage: 1000,
            limit: Some(4096),
            inactive_file: 100,
            rss: 600,
            pgfault: 7,
            pgmajfault: 1,
        };
        let left = Sample {
            cpu_ns: 50,
            usage: 300,
            limit: None,
            inactive_file: 20,
            rss: 250,
            pgfault: 70,
            pgmajfault: 10,
        };
        pod.add_memory(&left);
        assert_eq!(
            pod,
            Sample {
                cpu_ns: 5,
                usage: 1300,
                limit: Some(4096),
                inactive_file: 120,
                rss: 850,
                pgfault: 7,
                pgmajfault: 1,
            }
        );
    }

    #[test]
    fn placeholder_dirs_are_slot_uids_in_any_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        let uid_a = "0123456789abcdef0123456789abcdef";
        let uid_b = "fedcba9876543210fedcba9876543210";
        for d in [
            format!("memory/slots/{uid_a}"),
            format!("cpu,cpuacct/slots/{uid_a}"),
            format!("slots/{uid_b}"),
            "memory/slots/not-a-uid".to_owned(),
            format!("memory/other/{}", "1".repeat(32)),
        ] {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        std::fs::write(root.path().join("slots").join("2".repeat(32)), "").unwrap();
        let found = placeholder_dirs(root.path(), "/slots");
        assert_eq!(found, HashSet::from([uid_a.to_owned(), uid_b.to_owned()]));
    }
}
