//! Many claim → stop → remove cycles of warm pods leave nothing behind:
//! counted before and after (sandboxes, netns, IPs, mounts, shims, cgroup
//! directories), and no slot is ever handed out twice. Its own test binary,
//! so no other test's pods disturb the counts.

mod support;

use std::time::Duration;

use fast_sandbox_proto::cri::{
    RemovePodSandboxRequest, RunPodSandboxRequest, StopPodSandboxRequest,
};
use fast_sandbox_tests::{pod::TestPod, wait_for, CaseGuard, DevNode};
use support::WarmNode;

#[tokio::test]
async fn claim_cycles_leak_nothing() {
    let test = "claim_cycles_leak_nothing";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let cycles: usize = std::env::var("FAST_SANDBOX_CLAIM_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let logs = tempfile::tempdir().expect("tempdir");
    let warm = WarmNode::start(&node, "cycles", "runc", 2)
        .await
        .expect("pool");
    warm.wait_free(2).await.expect("pool filled");
    let roots = [warm.cgroup_root.as_str(), "/kubepods/besteffort"];
    let before = node.census(&roots).await.expect("census");

    let mut cri = warm.shim.cri().expect("client");
    let mut seen = std::collections::HashSet::new();
    for i in 0..cycles {
        // Every cycle is a warm claim: wait for the refill first.
        wait_for("a free slot", Duration::from_secs(30), || async {
            (warm.free() > 0).then_some(())
        })
        .await
        .expect("refill");
        let pod = TestPod::new(test, &format!("cycle-{i}"), logs.path());
        let id = cri
            .runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod.sandbox_config()),
                runtime_handler: "fast-runc".into(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        assert!(seen.insert(id.clone()), "slot {id} handed out twice");
        cri.runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .expect("stop");
        cri.runtime
            .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
            .await
            .expect("remove");
        // Kubelet removes the pod-level cgroup; the test has no kubelet.
        pod.remove_pod_cgroups();
    }
    assert_eq!(
        warm.claimed(),
        0,
        "every claimed slot was forgotten after removal"
    );
    warm.wait_free(2).await.expect("pool refilled");
    let after = node
        .settled_census(&before, &roots, Duration::from_secs(15))
        .await
        .expect("census");
    eprintln!("{cycles} warm claim cycles: before {before:?}, after {after:?}");
    assert_eq!(before, after, "resources leaked over {cycles} claim cycles");
    assert_eq!(seen.len(), cycles);
    assert_eq!(warm.hits(), cycles as u64, "every cycle was a warm claim");
    warm.stop().await.expect("pool stops");
}
