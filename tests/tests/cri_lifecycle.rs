//! The shim forwards exactly: the call sequence kubelet makes for a pod gives
//! the same answers through the shim as straight from containerd (modulo
//! ids, timestamps, IPs and usage counters), for runc and crun.

use fast_sandbox_tests::{
    kubelet::kubelet_sequence, pod::TestPod, CaseGuard, DevNode, InProcessShim,
};

async fn lifecycle_equivalence(handler: &str, host_port: i32) {
    let test = format!("lifecycle_equivalence_{handler}");
    let Some(node) = DevNode::require(&test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, &test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let mut pod = TestPod::new(&test, &format!("lifecycle-{handler}"), logs.path());
    pod.host_port = Some(host_port);

    let mut direct = node.cri().expect("containerd client");
    let direct_t = kubelet_sequence(&mut direct, &node, &pod, handler).await;

    let shim = InProcessShim::start(&node.containerd_endpoint)
        .await
        .expect("shim");
    std::fs::remove_dir_all(&pod.log_directory).expect("clean log dir");
    let mut through = shim.cri().expect("shim client");
    let shim_t = kubelet_sequence(&mut through, &node, &pod, handler).await;
    shim.stop().await.expect("shim stops cleanly");

    direct_t.assert_equivalent(&shim_t, "containerd", "shim");
}

#[tokio::test]
async fn lifecycle_equivalence_runc() {
    lifecycle_equivalence("runc", 30801).await;
}

#[tokio::test]
async fn lifecycle_equivalence_crun() {
    lifecycle_equivalence("crun", 30802).await;
}
