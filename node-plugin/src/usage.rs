//! CPU and memory numbers of a claimed slot's `PodSandboxStats`.
//!
//! containerd 1.6 reads a sandbox's CPU and memory from the cgroup named by
//! its *stored* config's `cgroup_parent` (`metricsForSandbox`): the pod-level
//! cgroup, holding the pause and every container of the pod. A slot's stored
//! config is the placeholder's, so upstream reports the placeholder's own,
//! empty cgroup. The pool reads the pod's cgroup instead and converts the
//! numbers as containerd does (`cpuContainerStats`, `memoryContainerStats`,
//! `getUsageNanoCores`):
//!
//! - `usage_core_nano_seconds`: v1 `cpuacct.usage`, v2 `cpu.stat`
//!   `usage_usec` × 1000;
//! - `usage_nano_cores`: the rate since the previous sample of the same
//!   sandbox, 0 for the first;
//! - `usage_bytes`: v1 `memory.usage_in_bytes`, v2 `memory.current`;
//! - `working_set_bytes`: usage − inactive file pages (0 when those exceed
//!   usage);
//! - `available_bytes`: limit − working set, 0 when unlimited (> 2⁶²);
//! - `rss_bytes`: v1 `total_rss`, v2 `anon`;
//! - `page_faults`, `major_page_faults`: v1 `total_pgfault`/`total_pgmajfault`,
//!   v2 `pgfault`/`pgmajfault`.
//!
//! The reads themselves are the cgroup layer's (`fast-sandbox-cgroup`,
//! [`Cgroups::pod_sample`]): a cgroup that is gone gives `None`, and the
//! shim then passes upstream's numbers on.

use std::{collections::HashMap, sync::Mutex};

pub use fast_sandbox_cgroup::{Cgroups, HostCgroups, Sample};
use fast_sandbox_proto::cri::{CpuUsage, MemoryUsage, UInt64Value};

/// Size above which a memory limit counts as none (containerd's
/// `isMemoryUnlimited`: the kernel rounds "unlimited" down to a page).
const UNLIMITED: u64 = 1 << 62;

/// Converts samples into CRI usage, remembering the previous CPU sample of
/// each sandbox for `usage_nano_cores`.
#[derive(Debug, Default)]
pub struct UsageTracker {
    previous: Mutex<HashMap<String, (u64, i64)>>,
}

impl UsageTracker {
    /// CRI usage of `sandbox_id` from `sample` taken at `now_ns`.
    pub fn usage(&self, sandbox_id: &str, sample: &Sample, now_ns: i64) -> (CpuUsage, MemoryUsage) {
        let nano_cores = {
            let mut prev = self
                .previous
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let rate = match prev.get(sandbox_id) {
                Some(&(cpu, at)) if now_ns > at => {
                    let elapsed = (now_ns - at) as f64;
                    (sample.cpu_ns.saturating_sub(cpu) as f64 / elapsed * 1e9) as u64
                }
                _ => 0,
            };
            prev.insert(sandbox_id.to_owned(), (sample.cpu_ns, now_ns));
            rate
        };
        let value = |value| Some(UInt64Value { value });
        let working_set = sample.usage.saturating_sub(sample.inactive_file);
        let available = match sample.limit {
            Some(limit) if limit <= UNLIMITED => limit.saturating_sub(working_set),
            _ => 0,
        };
        (
            CpuUsage {
                timestamp: now_ns,
                usage_core_nano_seconds: value(sample.cpu_ns),
                usage_nano_cores: value(nano_cores),
            },
            MemoryUsage {
                timestamp: now_ns,
                working_set_bytes: value(working_set),
                available_bytes: value(available),
                usage_bytes: value(sample.usage),
                rss_bytes: value(sample.rss),
                page_faults: value(sample.pgfault),
                major_page_faults: value(sample.pgmajfault),
            },
        )
    }

    /// Forgets a removed sandbox.
    pub fn forget(&self, sandbox_id: &str) {
        self.previous
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(sandbox_id);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use fast_sandbox_cgroup::stats::read;

    use super::*;
    use crate::fixup::{CgroupLeaf, ContainerdCgroup as _};

    fn leaf() -> CgroupLeaf {
        CgroupLeaf::for_pod("/kubepods/besteffort/podabc").unwrap()
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn v1_reads_cpuacct_and_memory() {
        let root = tempfile::tempdir().unwrap();
        let rel = "kubepods/besteffort/podabc";
        write(
            &root.path().join("cpu,cpuacct").join(rel),
            "cpuacct.usage",
            "5000\n",
        );
        let mem = root.path().join("memory").join(rel);
        write(&mem, "memory.usage_in_bytes", "1000\n");
        write(&mem, "memory.limit_in_bytes", "9223372036854771712\n");
        write(
            &mem,
            "memory.stat",
            "cache 1\ntotal_inactive_file 300\ntotal_rss 600\ntotal_pgfault 7\ntotal_pgmajfault 2\n",
        );
        let s = read(root.path(), &leaf()).unwrap();
        assert_eq!(
            s,
            Sample {
                cpu_ns: 5000,
                usage: 1000,
                limit: Some(9_223_372_036_854_771_712),
                inactive_file: 300,
                rss: 600,
                pgfault: 7,
                pgmajfault: 2,
            }
        );
        let (cpu, memu) = UsageTracker::default().usage("id", &s, 10);
        assert_eq!(cpu.usage_core_nano_seconds.unwrap().value, 5000);
        assert_eq!(cpu.usage_nano_cores.unwrap().value, 0, "first sample");
        assert_eq!(memu.working_set_bytes.unwrap().value, 700);
        assert_eq!(memu.available_bytes.unwrap().value, 0, "unlimited");
        assert_eq!(memu.rss_bytes.unwrap().value, 600);
    }

    #[test]
    fn v2_reads_the_unified_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "cgroup.controllers", "cpu memory\n");
        let dir = root.path().join("kubepods/besteffort/podabc");
        write(&dir, "cpu.stat", "usage_usec 12\nuser_usec 10\n");
        write(&dir, "memory.current", "4096\n");
        write(&dir, "memory.max", "8192\n");
        write(
            &dir,
            "memory.stat",
            "anon 1024\ninactive_file 5000\npgfault 3\npgmajfault 1\n",
        );
        let s = read(root.path(), &leaf()).unwrap();
        assert_eq!(s.cpu_ns, 12_000);
        assert_eq!(s.limit, Some(8192));
        let (_, memu) = UsageTracker::default().usage("id", &s, 10);
        assert_eq!(memu.working_set_bytes.unwrap().value, 0, "inactive > usage");
        assert_eq!(memu.available_bytes.unwrap().value, 8192);
        assert_eq!(memu.rss_bytes.unwrap().value, 1024);
    }

    #[test]
    fn nano_cores_is_the_rate_since_the_previous_sample() {
        let t = UsageTracker::default();
        let at = |cpu_ns| Sample {
            cpu_ns,
            ..Sample::default()
        };
        t.usage("a", &at(1_000), 1_000_000_000);
        let (cpu, _) = t.usage("a", &at(501_000), 2_000_000_000);
        assert_eq!(cpu.usage_nano_cores.unwrap().value, 500_000, "0.5 ms per s");
        let (cpu, _) = t.usage("b", &at(501_000), 2_000_000_000);
        assert_eq!(cpu.usage_nano_cores.unwrap().value, 0, "per sandbox");
        t.forget("a");
        let (cpu, _) = t.usage("a", &at(900_000), 3_000_000_000);
        assert_eq!(cpu.usage_nano_cores.unwrap().value, 0, "forgotten");
    }
}
