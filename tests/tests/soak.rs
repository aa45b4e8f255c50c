//! Leak soak: many bounded create/delete cycles through the shim, warm and
//! cold mixed, leave nothing behind. Its own test binary, so no other test's
//! pods disturb the counts.
//!
//! `FAST_SANDBOX_SOAK_CYCLES` cycles (default 1000) after a warm-up of
//! [`WARM_UP`] cycles. The mix: one cycle in [`COLD_EVERY`] is cold (a pod
//! whose seccomp shape, `Unconfined`, no pool serves: the shim's real miss
//! path, forwarded as `runc`), the rest are warm claims (the test waits for
//! a free slot first and checks the hit counter moved); one cycle in
//! [`CONTAINER_EVERY`] (half of them cold) also creates and starts a
//! container and stops and removes it the way kubelet does. So 1000 cycles
//! are 900 warm + 100 cold pods, 200 of them with a container.
//!
//! Counted before (after the warm-up) and after, and required equal: pod
//! sandboxes, netns, CNI IPs, mounts, containerd shims, cgroup directories
//! under the pool's placeholder root and kubelet's BestEffort root; CRI
//! containers, containerd containers, tasks and snapshots; and, since the
//! shim and pool manager run in this process, its open fds. Its RSS may
//! not grow by more than [`RSS_SLACK`] plus [`RSS_PER_CYCLE`] per cycle
//! (see there).

mod support;

use std::time::{Duration, Instant};

use fast_sandbox_proto::cri::{
    CreateContainerRequest, RemoveContainerRequest, RunPodSandboxRequest, SecurityProfile,
    StartContainerRequest, StopContainerRequest,
};
use fast_sandbox_tests::{census::ProcessUsage, pod::TestPod, wait_for, CaseGuard, Cri, DevNode};
use support::WarmNode;

const WARM_UP: usize = 20;
const COLD_EVERY: usize = 10;
const CONTAINER_EVERY: usize = 5;
const POOL: usize = 2;
/// RSS the process may gain over the measured cycles regardless of their
/// number: glibc's per-thread arenas and tonic/hyper buffers settle at
/// their high-water mark in the first few hundred calls, and a few MiB of
/// that is noise, not a leak.
const RSS_SLACK: u64 = 4 * 1024 * 1024;
/// RSS the process may gain per cycle on top of [`RSS_SLACK`]: below what
/// one forgotten pod costs (its `PodSandboxConfig` with labels,
/// annotations and DNS config kept in a claim, about 2–3 KiB, or a leaked
/// connection or task, tens of KiB), so a per-pod leak over 1000 cycles
/// cannot hide in the bound. The test's own list of seen ids (about 100
/// bytes a cycle) is inside it.
const RSS_PER_CYCLE: u64 = 1024;

fn cycles() -> usize {
    std::env::var("FAST_SANDBOX_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Warm,
    Cold,
}

/// One create/delete cycle through the shim: the sandbox's id.
async fn cycle(
    cri: &mut Cri,
    warm: &WarmNode,
    node: &DevNode,
    pod: &TestPod,
    kind: Kind,
    container: bool,
) -> anyhow::Result<String> {
    let mut config = pod.sandbox_config();
    if kind == Kind::Cold {
        if let Some(sc) = config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
        {
            sc.seccomp = Some(SecurityProfile {
                profile_type: fast_sandbox_proto::cri::security_profile::ProfileType::Unconfined
                    as i32,
                localhost_ref: String::new(),
            });
        }
    } else {
        wait_for("a free slot", Duration::from_secs(60), || async {
            (warm.free() > 0).then_some(())
        })
        .await?;
    }
    let hits = warm.hits();
    let id = cri
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: "fast-runc".into(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let served_warm = warm.hits() > hits;
    anyhow::ensure!(
        served_warm == (kind == Kind::Warm),
        "{}: a {kind:?} pod was served {}",
        pod.name,
        if served_warm { "warm" } else { "cold" }
    );
    let mut result = Ok(());
    let mut cid = None;
    if container {
        result = async {
            pod.prepare_log_dirs(&["app"])?;
            let c = cri
                .runtime
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: id.clone(),
                    config: Some(pod.container_config("app", &node.test_image, "sleep 3600")),
                    sandbox_config: Some(config.clone()),
                })
                .await?
                .into_inner()
                .container_id;
            cid = Some(c.clone());
            cri.runtime
                .start_container(StartContainerRequest { container_id: c })
                .await?;
            anyhow::Ok(())
        }
        .await;
    }
    // Kubelet's order: containers stopped, sandbox stopped, containers and
    // sandbox removed. Always, also when a step above failed.
    if let Some(c) = &cid {
        cri.runtime
            .stop_container(StopContainerRequest {
                container_id: c.clone(),
                timeout: 0,
            })
            .await?;
    }
    cri.runtime
        .stop_pod_sandbox(fast_sandbox_proto::cri::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await?;
    if let Some(c) = cid {
        cri.runtime
            .remove_container(RemoveContainerRequest { container_id: c })
            .await?;
    }
    cri.runtime
        .remove_pod_sandbox(fast_sandbox_proto::cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await?;
    pod.remove_pod_cgroups();
    let _ = std::fs::remove_dir_all(&pod.log_directory);
    result.map(|()| id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_create_delete_cycles_leak_nothing() {
    let test = "soak_create_delete_cycles";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let n = cycles();
    let logs = tempfile::tempdir().expect("tempdir");
    support::remove_pool_leftovers(&node, "soak")
        .await
        .expect("leftovers of an earlier run removed");
    let warm = WarmNode::start(&node, "soak", "runc", POOL)
        .await
        .expect("pool");
    warm.wait_free(POOL).await.expect("pool filled");
    let roots = [warm.cgroup_root.as_str(), "/kubepods/besteffort"];
    let mut cri = warm.shim.cri().expect("client");
    let mut seen = std::collections::HashSet::new();
    let run = |i: usize| {
        let kind = if i % COLD_EVERY == COLD_EVERY - 1 {
            Kind::Cold
        } else {
            Kind::Warm
        };
        (kind, i % CONTAINER_EVERY == CONTAINER_EVERY - 1)
    };

    for i in 0..WARM_UP {
        let (kind, container) = run(i);
        let pod = TestPod::new(test, &format!("soak-warmup-{i}"), logs.path());
        let id = cycle(&mut cri, &warm, &node, &pod, kind, container)
            .await
            .unwrap_or_else(|e| panic!("warm-up cycle {i}: {e:#}"));
        assert!(seen.insert(id.clone()), "sandbox {id} handed out twice");
    }
    warm.wait_free(POOL).await.expect("pool refilled");
    let before = node.census(&roots).await.expect("census");
    let objects_before = node.objects().await.expect("objects");
    let usage_before = ProcessUsage::now().expect("usage");

    let started = Instant::now();
    let (mut warm_pods, mut cold_pods, mut containers) = (0usize, 0usize, 0usize);
    let hits_before = warm.hits();
    for i in 0..n {
        let (kind, container) = run(i);
        let pod = TestPod::new(test, &format!("soak-{i}"), logs.path());
        let id = cycle(&mut cri, &warm, &node, &pod, kind, container)
            .await
            .unwrap_or_else(|e| panic!("cycle {i}: {e:#}"));
        assert!(seen.insert(id.clone()), "sandbox {id} handed out twice");
        match kind {
            Kind::Warm => warm_pods += 1,
            Kind::Cold => cold_pods += 1,
        }
        containers += usize::from(container);
        if (i + 1) % 100 == 0 {
            eprintln!("soak: {} cycles in {:?}", i + 1, started.elapsed());
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(warm.hits() - hits_before, warm_pods as u64, "warm claims");
    assert_eq!(
        warm.claimed(),
        0,
        "every claimed slot forgotten after removal"
    );

    warm.wait_free(POOL).await.expect("pool refilled");
    let after = node
        .settled_census(&before, &roots, Duration::from_secs(30))
        .await
        .expect("census");
    let objects_after = node
        .settled_objects(&objects_before, Duration::from_secs(30))
        .await
        .expect("objects");
    // Idle connections and finished tasks close a moment after the last
    // answer: wait (bounded) for the fds to come back to the baseline.
    let fds_after = wait_for(
        "the process's fds back to the baseline",
        Duration::from_secs(30),
        || async {
            ProcessUsage::now()
                .ok()
                .map(|u| u.fds)
                .filter(|fds| *fds <= usage_before.fds)
        },
    )
    .await
    .unwrap_or_else(|_| ProcessUsage::now().map_or(usize::MAX, |u| u.fds));
    let usage_after = ProcessUsage::now().expect("usage");
    let rss_bound = RSS_SLACK + RSS_PER_CYCLE * n as u64;
    eprintln!(
        "soak: {n} cycles ({warm_pods} warm, {cold_pods} cold, {containers} with a container) \
         in {elapsed:?}\n  census before {before:?}\n  census after  {after:?}\n  \
         objects before {objects_before:?}\n  objects after  {objects_after:?}\n  \
         fds {} -> {fds_after}, RSS {:.1} -> {:.1} MiB (bound +{:.1} MiB)",
        usage_before.fds,
        usage_before.rss_bytes as f64 / 1048576.0,
        usage_after.rss_bytes as f64 / 1048576.0,
        rss_bound as f64 / 1048576.0,
    );
    assert_eq!(before, after, "node resources leaked over {n} cycles");
    // Snapshots of images that earlier tests removed are garbage-collected
    // by containerd in its own time, so their count may fall meanwhile; a
    // leak makes it grow. Containers and tasks are removed synchronously.
    assert_eq!(
        (
            objects_before.cri_containers,
            objects_before.containers,
            objects_before.tasks
        ),
        (
            objects_after.cri_containers,
            objects_after.containers,
            objects_after.tasks
        ),
        "containerd containers or tasks leaked over {n} cycles"
    );
    assert!(
        objects_after.snapshots <= objects_before.snapshots,
        "snapshots leaked over {n} cycles: {} -> {}",
        objects_before.snapshots,
        objects_after.snapshots
    );
    assert!(
        fds_after <= usage_before.fds,
        "open fds grew from {} to {fds_after}",
        usage_before.fds
    );
    assert!(
        usage_after.rss_bytes <= usage_before.rss_bytes + rss_bound,
        "RSS grew by {} KiB over {n} cycles (bound {} KiB)",
        (usage_after.rss_bytes.saturating_sub(usage_before.rss_bytes)) / 1024,
        rss_bound / 1024
    );
    warm.stop().await.expect("pool stops");
}
