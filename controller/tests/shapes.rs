//! One shape model, true to kubelet: the pool shape key the controller
//! derives from a pod is the key the node plugin gives kubelet's
//! `RunPodSandbox` for that pod. Ground truth is the CRI traffic of real
//! kubelets (tests/recordings/) and, for security contexts the recordings
//! do not carry, kubelet's documented construction of the sandbox's
//! security context (docs/warm-slots.md, "What kubelet sends") applied to a
//! recorded request.

use std::path::PathBuf;

use base64::Engine as _;
use fast_sandbox_controller::extender::{pod_shape, ExtenderConfig};
use fast_sandbox_node::agent::shape_key;
use fast_sandbox_proto::cri::{Int64Value, PodSandboxConfig, RunPodSandboxRequest};
use fast_sandbox_shim::slots::Shape;
use k8s_openapi::api::core::v1::{Pod, PodSecurityContext, SeccompProfile};
use prost::Message as _;

fn recordings() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/recordings")
}

/// Every recorded `RunPodSandbox` request of one kubelet.
fn run_pod_sandbox_requests(kubelet: &str) -> Vec<RunPodSandboxRequest> {
    let path = recordings().join(kubelet).join("lifecycle.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("a JSON line"))
        .filter(|call| call["method"] == "/runtime.v1.RuntimeService/RunPodSandbox")
        .map(|call| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(call["request_pb"].as_str().expect("request_pb"))
                .expect("base64");
            RunPodSandboxRequest::decode(bytes.as_slice()).expect("a RunPodSandboxRequest")
        })
        .collect()
}

/// The pods the recordings were made with, by name.
fn recorded_pods() -> Vec<Pod> {
    let text = std::fs::read_to_string(recordings().join("pods.yaml")).expect("pods.yaml");
    serde_saphyr::from_multiple::<serde_json::Value>(&text)
        .expect("pods.yaml parses")
        .into_iter()
        .filter(|doc| doc["kind"] == "Pod")
        .map(|doc| serde_json::from_value(doc).expect("a Pod"))
        .collect()
}

fn controller_key(security: Option<&PodSecurityContext>) -> String {
    pod_shape(security, &ExtenderConfig::default().default_seccomp)
}

/// The key the node plugin matches a claim of `config` against, or `None`
/// when the pod is not eligible for any slot (it starts cold).
fn node_key(config: &PodSandboxConfig) -> Option<String> {
    Shape::of(config).ok().map(|shape| shape_key(&shape))
}

#[test]
fn recorded_kubelet_requests_have_the_shape_the_controller_derives() {
    let pods = recorded_pods();
    for kubelet in ["kubelet-v1.26.0", "kubelet-v1.36.2"] {
        let requests = run_pod_sandbox_requests(kubelet);
        assert_eq!(requests.len(), pods.len(), "{kubelet}: one sandbox per pod");
        let mut eligible = 0;
        for request in &requests {
            let config = request.config.as_ref().expect("config");
            let name = &config.metadata.as_ref().expect("metadata").name;
            let pod = pods
                .iter()
                .find(|p| p.metadata.name.as_ref() == Some(name))
                .unwrap_or_else(|| panic!("{kubelet}: no pod {name} in pods.yaml"));
            let Some(node) = node_key(config) else {
                continue;
            };
            eligible += 1;
            let spec = pod.spec.as_ref().expect("spec");
            assert_eq!(
                controller_key(spec.security_context.as_ref()),
                node,
                "{kubelet}: pod {name}"
            );
        }
        // Every pod but the host-network one.
        assert_eq!(eligible, pods.len() - 1, "{kubelet}");
    }
}

/// kubelet's sandbox security context for a pod-level security context
/// (`generatePodSandboxLinuxConfig`): seccomp RuntimeDefault whatever the
/// pod says (left as recorded), the pod's user and group, and the groups
/// `fsGroup` first, then `supplementalGroups`.
fn as_kubelet_sends(recorded: &PodSandboxConfig, pod: &PodSecurityContext) -> PodSandboxConfig {
    let mut config = recorded.clone();
    let security = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .expect("a recorded sandbox security context");
    security.run_as_user = pod.run_as_user.map(|value| Int64Value { value });
    security.run_as_group = pod.run_as_group.map(|value| Int64Value { value });
    security.supplemental_groups = pod.fs_group.into_iter().collect();
    security
        .supplemental_groups
        .extend(pod.supplemental_groups.iter().flatten());
    config
}

#[test]
fn pod_security_contexts_give_the_shape_kubelets_sandbox_gets() {
    let recorded = run_pod_sandbox_requests("kubelet-v1.36.2")
        .into_iter()
        .filter_map(|r| r.config)
        .find(|c| c.metadata.as_ref().is_some_and(|m| m.name == "warm-runc"))
        .expect("warm-runc was recorded");
    let unconfined = PodSecurityContext {
        seccomp_profile: Some(SeccompProfile {
            type_: "Unconfined".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    };
    let cases = [
        ("plain", PodSecurityContext::default()),
        ("seccompProfile: Unconfined", unconfined),
        (
            "runAsUser: 1000",
            PodSecurityContext {
                run_as_user: Some(1000),
                ..Default::default()
            },
        ),
        (
            "runAsUser and runAsGroup",
            PodSecurityContext {
                run_as_user: Some(1000),
                run_as_group: Some(3000),
                ..Default::default()
            },
        ),
        (
            "fsGroup and supplementalGroups",
            PodSecurityContext {
                run_as_user: Some(1000),
                fs_group: Some(2000),
                supplemental_groups: Some(vec![5, 3, 2000]),
                ..Default::default()
            },
        ),
    ];
    for (what, pod) in cases {
        let config = as_kubelet_sends(&recorded, &pod);
        let node = node_key(&config).unwrap_or_else(|| panic!("{what}: eligible"));
        assert_eq!(controller_key(Some(&pod)), node, "{what}");
    }
}
