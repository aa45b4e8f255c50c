//! Issue 12 item 2: everything a warm slot consumed is charged to the pod.
//! The same pod spec runs cold, then warm, each with one long-running
//! container, and the memory charged to the pod's cgroup (cgroup v1
//! `memory.usage_in_bytes` of its `cgroup_parent`, what kubelet's cAdvisor
//! reads) is compared once the warm slot's processes have left the
//! placeholder cgroup.
//!
//! The kernel decides how much of a slot's memory can follow it: with
//! `memory.move_charge_at_immigrate` (Linux before the end of 2024) all
//! of it, and then the pod cgroups must agree within 10 %; otherwise only
//! what the placeholder's reclaim can push out (page cache), and the rest
//! is counted in `PodSandboxStats`, which must agree within 10 % either
//! way. docs/runtimes.md, "Memory a warm slot used before its claim".

mod support;

use std::time::Duration;

use fast_sandbox_proto::cri::{PodSandboxStatsRequest, PodSandboxStatsResponse};
use fast_sandbox_tests::{
    pod::{run_pod, start_container, TestPod},
    wait_for, CaseGuard, DevNode,
};
use support::WarmNode;

/// The pod's charges in the v1 memory hierarchy: usage, and the working set
/// kubelet reports (usage less inactive file pages).
#[derive(Debug, Clone, Copy)]
struct Charged {
    usage: u64,
    working_set: u64,
    /// `PodSandboxStats` memory usage through the shim, read just after.
    reported: u64,
    /// The pod cgroup's usage read again just after `reported`.
    usage_after: u64,
    /// `PodSandboxStats` memory usage straight from containerd, which reads
    /// the sandbox's *stored* cgroup parent: for a warm pod the slot's
    /// placeholder, holding what the slot used before its claim.
    upstream: u64,
}

/// How far two readings of `memory.usage_in_bytes` can differ with nothing
/// changed: the kernel charges a cgroup in batches of 64 pages per CPU
/// (`MEMCG_CHARGE_BATCH`) and drains the unused rest at other CPUs' will,
/// so a pod of a megabyte reads ±256 KiB per CPU from one moment to the
/// next (seen here: 880 KiB, then 368 KiB a millisecond later).
fn charge_batch_fuzz() -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    64 * 4096 * cpus
}

fn usage_of(cri: &PodSandboxStatsResponse) -> u64 {
    cri.stats
        .as_ref()
        .and_then(|s| s.linux.as_ref())
        .and_then(|l| l.memory.as_ref())
        .and_then(|m| m.usage_bytes.as_ref())
        .expect("memory usage reported")
        .value
}

fn charged(rel: &str) -> Option<Charged> {
    let dir = std::path::Path::new("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'));
    let usage: u64 = std::fs::read_to_string(dir.join("memory.usage_in_bytes"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
    let inactive_file = stat
        .lines()
        .find_map(|l| l.strip_prefix("total_inactive_file "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Some(Charged {
        usage,
        working_set: usage.saturating_sub(inactive_file),
        reported: 0,
        usage_after: 0,
        upstream: 0,
    })
}

/// Whether sandbox `sid`'s leaf under the pod's parent holds a process in
/// the memory hierarchy: the claim's deferred move has happened (cold: at
/// once).
fn moved(parent: &str, sid: &str) -> bool {
    let procs = format!(
        "/sys/fs/cgroup/memory/{}/{sid}/cgroup.procs",
        parent.trim_start_matches('/')
    );
    std::fs::read_to_string(procs).is_ok_and(|p| !p.trim().is_empty())
}

/// Runs `pod` with one container through `warm`'s shim and returns what
/// its cgroup is charged once the sandbox's processes are in it.
async fn run_and_measure(node: &DevNode, warm: &WarmNode, pod: &TestPod, handler: &str) -> Charged {
    let mut cri = warm.shim.cri().expect("client");
    let exposed = format!("fast-{handler}");
    let sid = run_pod(&mut cri, pod, &exposed)
        .await
        .expect("RunPodSandbox");
    start_container(
        &mut cri,
        node,
        pod,
        &sid,
        "app",
        fast_sandbox_tests::pod::IDLE_SCRIPT,
        false,
    )
    .await
    .expect("container");
    let parent = pod.cgroup_parent();
    wait_for(
        "the sandbox's processes in the pod's cgroup",
        Duration::from_secs(30),
        || {
            let done = moved(&parent, &sid);
            async move { done.then_some(()) }
        },
    )
    .await
    .expect("moved");
    let request = PodSandboxStatsRequest {
        pod_sandbox_id: sid.clone(),
    };
    let mut measured = charged(&parent).expect("the pod's memory cgroup");
    measured.reported = usage_of(
        &cri.runtime
            .pod_sandbox_stats(request.clone())
            .await
            .expect("PodSandboxStats")
            .into_inner(),
    );
    measured.usage_after = charged(&parent).expect("the pod's memory cgroup").usage;
    measured.upstream = usage_of(
        &node
            .cri()
            .expect("containerd client")
            .runtime
            .pod_sandbox_stats(request)
            .await
            .expect("PodSandboxStats from containerd")
            .into_inner(),
    );
    cri.remove_sandbox(&sid).await.expect("pod removed");
    pod.remove_pod_cgroups();
    measured
}

async fn warm_and_cold_charge_the_same(test: &str, handler: &str) {
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(test, &format!("mem-{handler}"), logs.path());
    let warm = WarmNode::start(&node, &format!("mem-{handler}"), handler, 0)
        .await
        .expect("pool");

    // Page cache is charged to the first cgroup that reads a file: a first
    // cold run pays for the image's and the runtime's files, so it primes
    // the cache and only the second cold run is compared.
    run_and_measure(&node, &warm, &pod, handler).await;
    std::fs::remove_dir_all(&pod.log_directory).expect("clean log dir");
    let cold = run_and_measure(&node, &warm, &pod, handler).await;
    assert_eq!(warm.hits(), 0, "the cold run must not have claimed a slot");
    assert!(warm.manager.set_size(&warm.pool, 1));
    warm.wait_free(1).await.expect("slot created");
    std::fs::remove_dir_all(&pod.log_directory).expect("clean log dir");
    let hot = run_and_measure(&node, &warm, &pod, handler).await;
    assert_eq!(warm.hits(), 1, "the warm run must have claimed the slot");
    warm.empty_and_stop().await;

    let ratio = |w: u64, c: u64| w as f64 / c.max(1) as f64;
    let usage = ratio(hot.usage, cold.usage);
    let working_set = ratio(hot.working_set, cold.working_set);
    let reported = ratio(hot.reported, cold.reported);
    eprintln!(
        "{handler}: pod cgroup usage cold {} warm {} ({usage:.2}x); working set cold {} warm {} ({working_set:.2}x); PodSandboxStats cold {} warm {} ({reported:.2}x); warm placeholder {}",
        cold.usage, hot.usage, cold.working_set, hot.working_set, cold.reported, hot.reported, hot.upstream
    );
    // Two readings of a pod of a megabyte differ by up to the kernel's
    // charge batches; every bound allows that much besides its own.
    let fuzz = charge_batch_fuzz();
    let close = |w: u64, c: u64| w.abs_diff(c) <= c / 10 + fuzz;
    if kernel_moves_charges() {
        // Issue 12's bound: a warm pod charged like a cold one, in its own
        // cgroup and in what CRI reports.
        assert!(
            close(hot.reported, cold.reported),
            "{handler}: PodSandboxStats reports {} bytes warm, {} cold ({reported:.2}x, {fuzz} bytes of charge batches allowed)",
            hot.reported,
            cold.reported
        );
        assert!(
            close(hot.usage, cold.usage),
            "{handler}: a warm pod's cgroup holds {} bytes, a cold one's {} ({usage:.2}x, {fuzz} bytes of charge batches allowed)",
            hot.usage,
            cold.usage
        );
    } else {
        // Linux removed charge moving (end of 2024): what the slot touched
        // before the claim stays charged to its placeholder, which no
        // write can change, and which containerd reports as the sandbox's
        // (`upstream`). The node plugin's part is to count it:
        // PodSandboxStats reports the pod cgroup plus that remainder
        // (docs/runtimes.md, "Memory"). The pod cgroup is read just before
        // and just after; the smaller reading bounds it from below. A
        // remainder below the charge batches (runc's few hundred KiB on
        // two CPUs) cannot be told from noise here: the sum itself is
        // unit-tested (`placeholder_memory_adds_to_the_pods`); gVisor's
        // tens of MiB can.
        eprintln!("{handler}: this kernel does not move cgroup v1 charges with a task");
        assert!(hot.usage > 0, "{handler}: the warm pod's cgroup is charged");
        let floor = (hot.usage.min(hot.usage_after) + hot.upstream).saturating_sub(fuzz);
        assert!(
            hot.reported >= floor,
            "{handler}: PodSandboxStats reports {} bytes for a warm pod whose cgroup holds {}..{} and whose placeholder holds {} ({fuzz} bytes of charge batches allowed): the placeholder's remainder is not counted",
            hot.reported,
            hot.usage.min(hot.usage_after),
            hot.usage.max(hot.usage_after),
            hot.upstream
        );
    }
}

/// Whether this kernel accepts `memory.move_charge_at_immigrate = 3` (Linux
/// removed charge moving at the end of 2024: `EINVAL`), probed on a
/// throw-away cgroup of the test's own.
fn kernel_moves_charges() -> bool {
    let dir = std::path::PathBuf::from(format!(
        "/sys/fs/cgroup/memory/fast-sandbox-test-charge-probe-{}",
        std::process::id()
    ));
    if std::fs::create_dir(&dir).is_err() {
        return false;
    }
    let moves = std::fs::write(dir.join("memory.move_charge_at_immigrate"), "3").is_ok();
    std::fs::remove_dir(&dir).expect("remove the probe cgroup");
    moves
}

#[tokio::test]
async fn warm_runc_pod_is_charged_like_a_cold_one() {
    warm_and_cold_charge_the_same("warm_runc_pod_is_charged_like_a_cold_one", "runc").await;
}

#[tokio::test]
async fn warm_runsc_pod_is_charged_like_a_cold_one() {
    warm_and_cold_charge_the_same("warm_runsc_pod_is_charged_like_a_cold_one", "runsc").await;
}
