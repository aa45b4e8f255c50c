//! Bad requests get upstream's answer through the shim, code and message
//! unchanged, and never take the shim down.

use fast_sandbox_proto::cri::{
    ContainerStatsRequest, CreateContainerRequest, ExecSyncRequest, ImageSpec, ImageStatusRequest,
    PodSandboxConfig, PodSandboxStatusRequest, PullImageRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, VersionRequest,
};
use fast_sandbox_tests::{equiv::Transcript, pod::TestPod, Cri, DevNode, InProcessShim};

const UNKNOWN_ID: &str = "0000000000000000000000000000000000000000000000000000000000000000";

async fn bad_calls(cri: &mut Cri, pod: &TestPod) -> Transcript {
    let mut t = Transcript::new();
    let rt = &mut cri.runtime;
    let r = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: None,
            runtime_handler: "runc".into(),
        })
        .await;
    t.record("RunPodSandbox(no config)", &r);
    let r = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(PodSandboxConfig {
                metadata: None,
                ..pod.sandbox_config()
            }),
            runtime_handler: "runc".into(),
        })
        .await;
    t.record("RunPodSandbox(no metadata)", &r);
    let r = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod.sandbox_config()),
            runtime_handler: "no-such-handler".into(),
        })
        .await;
    t.record("RunPodSandbox(unknown handler)", &r);
    for id in [UNKNOWN_ID, ""] {
        let r = rt
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .await;
        t.record(&format!("PodSandboxStatus({id:?})"), &r);
    }
    let r = rt
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: UNKNOWN_ID.into(),
        })
        .await;
    t.record("RemovePodSandbox(unknown)", &r);
    let r = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: UNKNOWN_ID.into(),
            config: Some(pod.container_config("app", "busybox", "true")),
            sandbox_config: Some(pod.sandbox_config()),
        })
        .await;
    t.record("CreateContainer(unknown sandbox)", &r);
    let r = rt
        .start_container(StartContainerRequest {
            container_id: UNKNOWN_ID.into(),
        })
        .await;
    t.record("StartContainer(unknown)", &r);
    let r = rt
        .exec_sync(ExecSyncRequest {
            container_id: UNKNOWN_ID.into(),
            cmd: vec!["true".into()],
            timeout: 1,
        })
        .await;
    t.record("ExecSync(unknown)", &r);
    let r = rt
        .container_stats(ContainerStatsRequest {
            container_id: UNKNOWN_ID.into(),
        })
        .await;
    t.record("ContainerStats(unknown)", &r);
    let r = cri
        .image
        .pull_image(PullImageRequest {
            image: Some(ImageSpec::default()),
            auth: None,
            sandbox_config: None,
        })
        .await;
    t.record("PullImage(empty)", &r);
    let r = cri
        .image
        .image_status(ImageStatusRequest {
            image: None,
            verbose: false,
        })
        .await;
    t.record("ImageStatus(none)", &r);
    t
}

#[tokio::test]
async fn bad_requests_get_upstreams_errors() {
    let Some(node) = DevNode::require("bad_requests_get_upstreams_errors") else {
        return;
    };
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new("bad-requests", "bad-requests", logs.path());

    let mut direct = node.cri().expect("client");
    let direct_t = bad_calls(&mut direct, &pod).await;
    let shim = InProcessShim::start(&node.containerd_endpoint)
        .await
        .expect("shim");
    let mut through = shim.cri().expect("client");
    let shim_t = bad_calls(&mut through, &pod).await;

    direct_t.assert_equivalent(&shim_t, "containerd", "shim");
    let errors = direct_t
        .normalized()
        .iter()
        .filter(|e| e.outcome.get("code").is_some())
        .count();
    assert!(
        errors >= 8,
        "the bad calls must actually fail upstream, {errors} did"
    );
    // Still serving after all of that.
    through
        .runtime
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await
        .expect("the shim still answers");
    assert!(shim.is_running());
    shim.stop().await.expect("clean stop");
}
