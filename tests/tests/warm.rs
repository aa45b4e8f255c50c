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
    warm.manager.set_size(&warm.pool, 0);
    warm.wait_free(0).await.expect("pool emptied");
    warm.stop().await.expect("pool stops");

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
