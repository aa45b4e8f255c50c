//! The pools' network mode decided from containerd's CNI configuration
//! (issue 14, item 3): on a new node the CNI's own pods start through this
//! CRI before the CNI writes its configuration, so the shim serves CRI
//! without it and no slot exists until the mode is decided; `keep` on a
//! network that is not identity-free is refused, at start or when the
//! configuration appears. A real `PoolManager` and the shim in process, in
//! front of a fake CRI upstream. No root, no containerd.

use std::{sync::Arc, time::Duration};

use fast_sandbox_node::pool::{NetworkMode, PoolError};
use fast_sandbox_proto::cri;
use fast_sandbox_shim::slots::{HandlerMap, PoolKey, SeccompShape, Shape, SlotSource};
use fast_sandbox_tests::{fake_cri::PoolRig, pod::TestPod, wait_for, InProcessShim};

/// A Calico-like chain: not identity-free.
const CALICO: &str = r#"{"cniVersion":"0.3.1","name":"k8s-pod-network","plugins":[
  {"type":"calico","ipam":{"type":"calico-ipam"}},{"type":"portmap"}]}"#;

const BRIDGE: &str = fast_sandbox_tests::fake_cri::BRIDGE_CONFLIST;

/// The shape of a kubelet pod (`TestPod`): runtime-default seccomp.
fn kubelet_key() -> PoolKey {
    PoolKey {
        upstream_handler: "runc".into(),
        shape: Shape {
            seccomp: SeccompShape::RuntimeDefault,
            ..Shape::default()
        },
    }
}

/// Sandboxes the fake upstream ran for pods other than slots.
fn pods_upstream(rig: &PoolRig) -> usize {
    rig.cri
        .state()
        .sandboxes
        .iter()
        .filter(|s| {
            s.metadata
                .as_ref()
                .is_some_and(|m| m.namespace != "fast-sandbox-slots")
        })
        .count()
}

#[tokio::test]
async fn without_cni_configuration_cri_is_served_and_no_slot_exists_until_it_appears() {
    let rig = PoolRig::builder()
        .pool("auto", "fast-runc", kubelet_key(), 2)
        .unix_socket()
        .without_cni()
        .tune(|cfg| cfg.placeholder_cgroup_root = "/fast-sandbox-test/netdefault".into())
        .start()
        .await;
    let manager = Arc::clone(&rig.manager);
    manager.recovered().await;
    assert!(manager.network_modes().is_none(), "nothing to decide from");

    // The CNI's own pod, say: served cold through the shim meanwhile.
    let upstream = fast_sandbox_shim::Upstream::connect_lazy(
        &fast_sandbox_shim::UpstreamConfig::new(rig.endpoint.clone().expect("unix socket")),
    )
    .expect("upstream");
    let shim = InProcessShim::serve(fast_sandbox_shim::Shim::with_slots(
        upstream,
        HandlerMap::new([("fast-runc", "runc")]),
        Arc::clone(&manager) as Arc<dyn SlotSource>,
    ))
    .await
    .expect("shim");
    let mut cri = shim.cri().expect("client");
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new("netdefault", "cni-installer", logs.path());
    let id = cri
        .runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.sandbox_config()),
            runtime_handler: "fast-runc".into(),
        })
        .await
        .expect("served cold without CNI configuration")
        .into_inner()
        .pod_sandbox_id;
    assert!(!id.is_empty());
    assert_eq!(pods_upstream(&rig), 1, "the pod started cold");
    // Absence has no event to wait for: give the refill task many of its
    // 20 ms re-checks, then look.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rig.cri.state().sandboxes.len(),
        1,
        "no slot before the decision"
    );
    assert_eq!(manager.stats()[0].free, 0);
    assert!(manager.network_modes().is_none());

    std::fs::create_dir_all(rig.cni_dir()).expect("conf dir");
    std::fs::write(rig.cni_dir().join("10-bridge.conflist"), BRIDGE).expect("conflist");
    rig.wait_free(2).await;
    let modes = manager.network_modes().expect("decided");
    assert_eq!(
        modes,
        [Ok(NetworkMode::Keep)],
        "bridge + host-local + portmap"
    );
    shim.stop().await.expect("shim stops");
}

#[tokio::test]
async fn keep_on_a_policy_cni_is_refused_at_start_naming_the_plugin_and_file() {
    let err = PoolRig::builder()
        .pool("kept", "fast-runc", kubelet_key(), 1)
        .network(NetworkMode::Keep)
        .conflist(CALICO)
        .try_start()
        .await
        .expect_err("keep on calico");
    assert!(matches!(err, PoolError::KeepRefused(_)), "{err:?}");
    let msg = err.to_string();
    for part in [
        "\"kept\"",
        "\"k8s-pod-network\"",
        "10-rig.conflist",
        "calico, calico-ipam",
    ] {
        assert!(msg.contains(part), "{part} not in: {msg}");
    }
}

#[tokio::test]
async fn keep_refused_when_the_configuration_appears_later_leaves_that_pool_empty() {
    let rig = PoolRig::builder()
        .pool("kept", "fast-runc", kubelet_key(), 1)
        .network(NetworkMode::Keep)
        .without_cni()
        .start()
        .await;
    let manager = Arc::clone(&rig.manager);
    std::fs::create_dir_all(rig.cni_dir()).expect("conf dir");
    std::fs::write(rig.cni_dir().join("10-calico.conflist"), CALICO).expect("conflist");
    let modes = wait_for("the decision", Duration::from_secs(10), || async {
        manager.network_modes()
    })
    .await
    .expect("decided once the configuration exists");
    let refused = modes[0].clone().expect_err("keep on calico refused");
    assert_eq!(refused.plugins, ["calico", "calico-ipam"]);
    assert!(refused.file.ends_with("10-calico.conflist"), "{refused}");
    // Absence has no event to wait for: the refill task runs on after the
    // decision; give it time to (wrongly) create a slot, then look.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(manager.stats()[0].free, 0);
    assert!(
        rig.cri.state().sandboxes.is_empty(),
        "no slot in a refused pool"
    );
}
