//! `network = "rebind"` on the bundled bridge/host-local CNI: a claimed slot
//! gets a new IP under the pod's identity, `PodSandboxStatus` reports it, the
//! host reaches it, the placeholder's IP is released at claim and the pod's
//! at stop, and nothing is left once the pod is removed. Its own test
//! binary, so no other test's pods disturb the counts.

mod support;

use std::{path::Path, time::Duration};

use fast_sandbox_node::config::NetworkMode;
use fast_sandbox_proto::cri::{
    PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StopPodSandboxRequest,
};
use fast_sandbox_shim::slots::POOL_LABEL;
use fast_sandbox_tests::{pod::TestPod, CaseGuard, Cri, DevNode};
use support::WarmNode;

/// The sandbox id host-local recorded for `ip`, if it is allocated.
fn ipam_owner(ipam: &Path, ip: &str) -> Option<String> {
    std::fs::read_dir(ipam).ok()?.flatten().find_map(|net| {
        let text = std::fs::read_to_string(net.path().join(ip)).ok()?;
        text.lines().next().map(str::to_owned)
    })
}

async fn status_ip(cri: &mut Cri, id: &str) -> String {
    cri.runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        })
        .await
        .expect("status")
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default()
}

/// A TCP connection to a port nobody listens on is refused by a live
/// network stack at `ip` (a RST), and times out or is unreachable
/// otherwise: the address is routed to the pod's namespace.
async fn answers_at(ip: &str) -> bool {
    let addr = format!("{ip}:9");
    match tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Ok(Ok(_)) | Err(_) => false,
    }
}

#[tokio::test]
async fn rebind_gives_the_pod_its_own_ip_and_releases_both() {
    let test = "rebind_gives_the_pod_its_own_ip_and_releases_both";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let warm = WarmNode::start_with(&node, "rebind", "runc", 1, NetworkMode::Rebind)
        .await
        .expect("pool");
    warm.wait_free(1).await.expect("pool filled");
    let roots = [warm.cgroup_root.as_str(), "/kubepods/besteffort"];
    let ipam = node.cni_ipam_dir();

    let mut direct = Cri::connect(&node.containerd_endpoint).expect("client");
    let slots = direct
        .list_by_label(POOL_LABEL, "rebind")
        .await
        .expect("list");
    assert_eq!(slots.len(), 1);
    let slot_id = slots[0].id.clone();
    let slot_ip = status_ip(&mut direct, &slot_id).await;
    assert_eq!(
        ipam_owner(&ipam, &slot_ip).as_deref(),
        Some(slot_id.as_str()),
        "the placeholder holds {slot_ip}"
    );
    let before = node.census(&roots).await.expect("census");

    let mut cri = warm.shim.cri().expect("client");
    let pod = TestPod::new(test, "rebind-0", logs.path());
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
    assert_eq!(id, slot_id, "the pod got the warm slot");
    assert_eq!(warm.hits(), 1);

    let pod_ip = status_ip(&mut cri, &id).await;
    assert!(!pod_ip.is_empty(), "status reports an IP");
    assert_ne!(pod_ip, slot_ip, "the pod has a new IP");
    assert_eq!(
        ipam_owner(&ipam, &slot_ip),
        None,
        "the placeholder's {slot_ip} was released at claim"
    );
    assert_eq!(
        ipam_owner(&ipam, &pod_ip).as_deref(),
        Some(id.as_str()),
        "{pod_ip} is allocated to the sandbox"
    );
    assert!(
        answers_at(&pod_ip).await,
        "the host reaches the pod at {pod_ip}"
    );

    cri.runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .expect("stop");
    assert_eq!(
        ipam_owner(&ipam, &pod_ip),
        None,
        "the pod's {pod_ip} is released at stop"
    );
    cri.runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .expect("remove");
    pod.remove_pod_cgroups();
    warm.wait_free(1).await.expect("pool refilled");
    let after = node
        .settled_census(&before, &roots, Duration::from_secs(15))
        .await
        .expect("census");
    assert_eq!(before, after, "a rebound claim leaked");
    warm.stop().await.expect("pool stops");
}
