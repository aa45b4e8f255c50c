//! Warm ≡ cold: the same pod spec, started once from a pre-created slot
//! (warm hit) and once with the pool empty (cold miss), through the same shim
//! with warm pools, gives the same transcript — every CRI answer kubelet
//! sees, and what the pod and the host observe (hostname, /etc/hostname,
//! /etc/resolv.conf, sysctl, container and pause cgroups, IP reachable from
//! the host, log file).

mod support;

use fast_sandbox_node::config::NetworkMode;
use fast_sandbox_tests::{kubelet::kubelet_sequence, pod::TestPod, CaseGuard, DevNode};
use support::WarmNode;

async fn warm_equals_cold(handler: &str, network: NetworkMode) {
    let suffix = match network {
        NetworkMode::Keep => "",
        NetworkMode::Rebind => "_rebind",
        NetworkMode::Auto => "_auto",
    };
    let test = format!("warm_equals_cold_{handler}{suffix}");
    let Some(node) = DevNode::require(&test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, &test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(
        &test,
        &format!("warm-cold-{handler}{suffix}").replace('_', "-"),
        logs.path(),
    );
    let exposed = format!("fast-{handler}");

    // Cold: the pool exists but is empty, so the claim misses.
    let warm = WarmNode::start_with(
        &node,
        &format!("wc-{handler}{suffix}").replace('_', "-"),
        handler,
        0,
        network,
    )
    .await
    .expect("pool");
    let mut cri = warm.shim.cri().expect("client");
    let cold_t = kubelet_sequence(&mut cri, &node, &pod, &exposed).await;
    assert_eq!(
        warm.claimed(),
        0,
        "the cold run must not have claimed a slot"
    );

    // Warm: one free slot, claimed by the same pod spec.
    assert!(warm.manager.set_size(&warm.pool, 1));
    warm.wait_free(1).await.expect("slot created");
    std::fs::remove_dir_all(&pod.log_directory).expect("clean log dir");
    let warm_t = kubelet_sequence(&mut cri, &node, &pod, &exposed).await;
    assert_eq!(
        warm.hits(),
        1,
        "the warm run must have claimed the free slot"
    );
    warm.empty_and_stop().await;

    cold_t.assert_equivalent(&warm_t, "cold", "warm");
}

#[tokio::test]
async fn warm_equals_cold_runc() {
    warm_equals_cold("runc", NetworkMode::Keep).await;
}

/// With the network rebound at claim, the pod's new IP is what status
/// reports and what the host reaches.
#[tokio::test]
async fn warm_equals_cold_runc_rebind() {
    warm_equals_cold("runc", NetworkMode::Rebind).await;
}

#[tokio::test]
async fn warm_equals_cold_crun() {
    warm_equals_cold("crun", NetworkMode::Keep).await;
}

/// A claimed slot's `PodSandboxStats` measure the pod's cgroup, as a cold
/// start's do: at least what its one container uses. Upstream's numbers
/// for the slot describe the placeholder's cgroup instead (containerd
/// reads the stored config's `cgroup_parent`), which holds none of it.
#[tokio::test]
async fn warm_pod_stats_measure_the_pods_cgroup() {
    use fast_sandbox_proto::cri::{
        ContainerStatsRequest, CreateContainerRequest, PodSandboxStatsRequest,
        RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
        StopPodSandboxRequest,
    };
    use std::time::Duration;

    let test = "warm_pod_stats_measure_the_pods_cgroup";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(test, "stats-0", logs.path());
    pod.prepare_log_dirs(&["app"]).expect("log dirs");
    let warm = WarmNode::start(&node, "stats", "runc", 1)
        .await
        .expect("pool");
    warm.wait_free(1).await.expect("slot");
    let mut cri = warm.shim.cri().expect("client");
    let config = pod.sandbox_config();
    let sid = cri
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: "fast-runc".into(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    assert_eq!(warm.hits(), 1, "a warm claim");
    // 16 MiB of tmpfs pages and some CPU, charged to the container.
    let script = "dd if=/dev/zero of=/dev/shm/fill bs=1M count=16 2>/dev/null; \
                  i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 600";
    let cid = cri
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sid.clone(),
            config: Some(pod.container_config("app", &node.test_image, script)),
            sandbox_config: Some(config),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    cri.runtime
        .start_container(StartContainerRequest {
            container_id: cid.clone(),
        })
        .await
        .expect("StartContainer");
    let container_usage = fast_sandbox_tests::wait_for(
        "the container's 16 MiB and CPU",
        Duration::from_secs(30),
        || {
            let mut cri = cri.clone();
            let cid = cid.clone();
            async move {
                let stats = cri
                    .runtime
                    .container_stats(ContainerStatsRequest { container_id: cid })
                    .await
                    .ok()?
                    .into_inner()
                    .stats?;
                let mem = stats.memory?.usage_bytes?.value;
                let cpu = stats.cpu?.usage_core_nano_seconds?.value;
                (mem >= 16 << 20 && cpu > 0).then_some((mem, cpu))
            }
        },
    )
    .await
    .expect("container usage");

    let pod_stats = |mut client: fast_sandbox_tests::Cri| {
        let sid = sid.clone();
        async move {
            let linux = client
                .runtime
                .pod_sandbox_stats(PodSandboxStatsRequest {
                    pod_sandbox_id: sid,
                })
                .await
                .expect("PodSandboxStats")
                .into_inner()
                .stats
                .and_then(|s| s.linux)
                .expect("linux stats");
            let mem = linux
                .memory
                .and_then(|m| m.usage_bytes)
                .map_or(0, |v| v.value);
            let cpu = linux
                .cpu
                .and_then(|c| c.usage_core_nano_seconds)
                .map_or(0, |v| v.value);
            (mem, cpu)
        }
    };
    let (pod_mem, pod_cpu) = pod_stats(cri.clone()).await;
    let (slot_mem, _) =
        pod_stats(fast_sandbox_tests::Cri::connect(&node.containerd_endpoint).expect("client"))
            .await;
    eprintln!(
        "container mem {} cpu {}; pod through the shim mem {pod_mem} cpu {pod_cpu}; \
         upstream for the slot mem {slot_mem}",
        container_usage.0, container_usage.1
    );
    // CPU time only grows, so the pod's, read later, covers the container's.
    // Memory moves a little between two reads; the 16 MiB of tmpfs pages
    // stay charged while the file exists, so they are the bound.
    let filled = 16 << 20;
    assert!(
        pod_mem >= filled && pod_cpu >= container_usage.1,
        "the pod's stats include its container's usage"
    );
    assert!(
        slot_mem < filled,
        "upstream measures the placeholder's cgroup (this is what the shim corrects)"
    );

    cri.runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sid.clone(),
        })
        .await
        .expect("stop");
    cri.runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: sid,
        })
        .await
        .expect("remove");
    pod.remove_pod_cgroups();
    warm.stop().await.expect("pool stops");
}
