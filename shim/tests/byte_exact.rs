//! Byte-exact forwarding, in process: a raw fake upstream
//! (support/scripted.rs) records the bytes of every request it receives and
//! answers scripted bytes, and every message carries field numbers no CRI
//! schema knows (900 and up, of each wire type), at the top and nested.
//!
//! - Calls the shim does not change arrive byte for byte in both
//!   directions, with and without slots, and so do methods the compiled
//!   schema does not know at all.
//! - Calls the shim guards (they name a sandbox) pass their request through
//!   byte for byte once the guard lets them.
//! - Calls the shim changes (a cold miss's request, the answers about a
//!   claimed slot, `Status`'s handler list) change exactly the fields
//!   rewrite.rs documents; every other field, unknown ones at any depth
//!   included, arrives as it was sent.

mod support;

use std::collections::HashMap;

use fast_sandbox_proto::cri;
use fast_sandbox_shim::slots::{
    MissReason, PodIps, PoolKey, SeccompShape, Shape, POOL_LABEL, RUNTIME_HANDLER_LABEL,
    SLOT_LABEL, SLOT_TOKEN_LABEL,
};
use prost::Message;
use support::{
    raw_call,
    scripted::{
        contains, nest, payload, payloads, raw_stream, unknown, untouched, with_unknown,
        ScriptedRig,
    },
    slots::{kubelet_pod, runc_key, FIRST_CLAIM_NS, TOKEN},
    version_response,
};

macro_rules! runtime {
    ($name:literal) => {
        concat!("/runtime.v1.RuntimeService/", $name)
    };
}

macro_rules! image {
    ($name:literal) => {
        concat!("/runtime.v1.ImageService/", $name)
    };
}

/// A claimed slot (full containerd ids: the shim resolves them without
/// asking upstream).
const CLAIMED: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
/// A free slot.
const UNCLAIMED: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
/// An ordinary sandbox.
const ORDINARY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const CONTAINER: &str = "feedfeedfeedfeedfeedfeedfeedfeedfeedfeedfeedfeedfeedfeedfeedfeed";

/// The IPs the claimed pod got when its network was rebound.
fn rebound() -> PodIps {
    PodIps {
        ip: "10.1.2.3".into(),
        additional: vec!["fd00::3".into()],
    }
}

/// The key of the free slot: no pod of these tests has its shape.
fn unconfined_key() -> PoolKey {
    PoolKey {
        upstream_handler: "runc".into(),
        shape: Shape {
            seccomp: SeccompShape::Unconfined,
            ..Default::default()
        },
    }
}

/// A rig whose slot source holds [`CLAIMED`] (claimed by `kubelet_pod("web")`,
/// network rebound) and [`UNCLAIMED`], and an empty pool for
/// [`runc_key`].
async fn rig() -> ScriptedRig {
    let rig = ScriptedRig::start().await;
    rig.slots.add_slot(CLAIMED, &runc_key());
    rig.slots
        .mark_claimed(CLAIMED, kubelet_pod("web"), Some(rebound()));
    rig.slots.add_slot(UNCLAIMED, &unconfined_key());
    rig.slots.add_pool(&runc_key());
    rig
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn placeholder_labels() -> HashMap<String, String> {
    labels(&[
        (SLOT_LABEL, "unclaimed"),
        (POOL_LABEL, "runc-default"),
        (SLOT_TOKEN_LABEL, TOKEN),
    ])
}

fn slot_metadata() -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: "slot-runc-0001".into(),
        uid: "slot-uid-0001".into(),
        namespace: "fast-sandbox".into(),
        attempt: 0,
    }
}

fn decode<M: Message + Default>(bytes: &[u8]) -> M {
    M::decode(bytes).unwrap_or_else(|e| panic!("{}: {e}", std::any::type_name::<M>()))
}

/// `kubelet_pod(name)` with unknown fields in the config (900), in
/// `config.linux` (910) and in `config.linux.security_context` (920).
fn sandbox_config(name: &str) -> Vec<u8> {
    let pod = kubelet_pod(name);
    let linux = pod.linux.clone().expect("linux");
    let security = linux.security_context.clone().expect("security context");
    let linux = nest(
        with_unknown(
            &cri::LinuxPodSandboxConfig {
                security_context: None,
                ..linux
            },
            910,
        ),
        2,
        &with_unknown(&security, 920),
    );
    let config = nest(
        with_unknown(&cri::PodSandboxConfig { linux: None, ..pod }, 900),
        8,
        &linux,
    );
    assert_eq!(decode::<cri::PodSandboxConfig>(&config), kubelet_pod(name));
    config
}

/// A container status with unknown fields in it (1000) and in its mounts
/// (1010).
fn container_status() -> Vec<u8> {
    let status = cri::ContainerStatus {
        id: CONTAINER.into(),
        metadata: Some(cri::ContainerMetadata {
            name: "app".into(),
            attempt: 0,
        }),
        state: cri::ContainerState::ContainerRunning as i32,
        image_ref: "sha256:abc".into(),
        ..Default::default()
    };
    let mount = cri::Mount {
        container_path: "/data".into(),
        host_path: "/var/lib/data".into(),
        readonly: true,
        ..Default::default()
    };
    nest(with_unknown(&status, 1000), 14, &with_unknown(&mount, 1010))
}

/// One call: what is sent and what upstream answers.
struct Exchange {
    path: &'static str,
    request: Vec<u8>,
    answer: Vec<u8>,
}

impl Exchange {
    fn new(path: &'static str, request: Vec<u8>, answer: Vec<u8>) -> Self {
        Exchange {
            path,
            request,
            answer,
        }
    }
}

/// Runs every exchange through both shims: upstream must receive the
/// request's bytes, the caller upstream's answer bytes.
async fn byte_exact_both_ways(rig: &ScriptedRig, exchanges: &[Exchange]) {
    for exchange in exchanges {
        rig.script.answer(exchange.path, exchange.answer.clone());
        for (shim, channel) in rig.shims() {
            let answer = rig.call(channel, exchange.path, &exchange.request).await;
            assert_eq!(
                answer, exchange.answer,
                "{} through the shim {shim}: the answer's bytes changed",
                exchange.path
            );
        }
    }
}

#[tokio::test]
async fn relayed_calls_are_byte_exact_both_ways() {
    let rig = rig().await;
    let image = |name: &str, tag| {
        with_unknown(
            &cri::ImageSpec {
                image: name.into(),
                ..Default::default()
            },
            tag,
        )
    };
    let exchanges = [
        Exchange::new(
            runtime!("Version"),
            with_unknown(
                &cri::VersionRequest {
                    version: "0.1.0".into(),
                },
                900,
            ),
            with_unknown(&version_response("0.1.0"), 910),
        ),
        Exchange::new(
            runtime!("ContainerStatus"),
            with_unknown(
                &cri::ContainerStatusRequest {
                    container_id: CONTAINER.into(),
                    verbose: true,
                },
                900,
            ),
            nest(
                with_unknown(
                    &cri::ContainerStatusResponse {
                        status: None,
                        info: labels(&[("pid", "4242")]),
                    },
                    910,
                ),
                1,
                &container_status(),
            ),
        ),
        Exchange::new(
            runtime!("StartContainer"),
            with_unknown(
                &cri::StartContainerRequest {
                    container_id: CONTAINER.into(),
                },
                900,
            ),
            unknown(910),
        ),
        Exchange::new(
            runtime!("ExecSync"),
            with_unknown(
                &cri::ExecSyncRequest {
                    container_id: CONTAINER.into(),
                    cmd: vec!["cat".into(), "/etc/hostname".into()],
                    timeout: 5,
                },
                900,
            ),
            with_unknown(
                &cri::ExecSyncResponse {
                    stdout: b"web\n".to_vec(),
                    stderr: Vec::new(),
                    exit_code: 3,
                },
                910,
            ),
        ),
        Exchange::new(
            image!("ListImages"),
            nest(
                unknown(900),
                1,
                &nest(unknown(910), 1, &image("busybox", 920)),
            ),
            nest(
                nest(
                    unknown(930),
                    1,
                    &nest(
                        with_unknown(
                            &cri::Image {
                                id: "sha256:abc".into(),
                                repo_tags: vec!["busybox:latest".into()],
                                size: 1234,
                                ..Default::default()
                            },
                            940,
                        ),
                        7,
                        &image("busybox", 950),
                    ),
                ),
                1,
                &unknown(960),
            ),
        ),
        Exchange::new(
            image!("PullImage"),
            nest(
                nest(unknown(900), 1, &image("busybox", 930)),
                3,
                &sandbox_config("web"),
            ),
            with_unknown(
                &cri::PullImageResponse {
                    image_ref: "sha256:abc".into(),
                },
                940,
            ),
        ),
        // Not an exposed handler: the shim with slots forwards it as is.
        Exchange::new(
            runtime!("RunPodSandbox"),
            nest(
                with_unknown(
                    &cri::RunPodSandboxRequest {
                        config: None,
                        runtime_handler: "runc".into(),
                    },
                    930,
                ),
                1,
                &sandbox_config("web"),
            ),
            with_unknown(
                &cri::RunPodSandboxResponse {
                    pod_sandbox_id: ORDINARY.into(),
                },
                940,
            ),
        ),
    ];
    byte_exact_both_ways(&rig, &exchanges).await;
    assert!(rig.slots.record().claims.is_empty());
    rig.stop().await;
}

#[tokio::test]
async fn methods_the_schema_does_not_know_are_forwarded_byte_exact() {
    let rig = rig().await;
    let exchanges = [
        // Kubernetes 1.33's in-place pod resize, newer than the schema.
        Exchange::new(
            runtime!("UpdatePodSandboxResources"),
            nest(unknown(900), 1, CLAIMED.as_bytes()),
            unknown(910),
        ),
        // Another service altogether, and bytes that are no protobuf: the
        // shim does not read them.
        Exchange::new(
            "/example.v9.Frobnicator/Frobnicate",
            b"\xff\xfe not protobuf \x00".to_vec(),
            b"\x07 nor is this \xff".to_vec(),
        ),
    ];
    byte_exact_both_ways(&rig, &exchanges).await;
    rig.stop().await;
}

#[tokio::test]
async fn calls_naming_a_claimed_slot_pass_byte_exact() {
    let rig = rig().await;
    let mounts = [
        with_unknown(
            &cri::Mount {
                container_path: "/data".into(),
                host_path: "/var/lib/data".into(),
                ..Default::default()
            },
            920,
        ),
        nest(
            with_unknown(
                &cri::Mount {
                    container_path: "/image".into(),
                    ..Default::default()
                },
                930,
            ),
            9,
            &with_unknown(
                &cri::ImageSpec {
                    image: "registry/volume:1".into(),
                    ..Default::default()
                },
                940,
            ),
        ),
    ];
    let config = support::slots::create_request(CLAIMED, "web")
        .config
        .expect("config");
    let config = mounts
        .iter()
        .fold(with_unknown(&config, 910), |c, m| nest(c, 7, m));
    let create = nest(
        nest(
            with_unknown(
                &cri::CreateContainerRequest {
                    pod_sandbox_id: CLAIMED.into(),
                    config: None,
                    sandbox_config: None,
                },
                900,
            ),
            2,
            &config,
        ),
        3,
        &sandbox_config("web"),
    );
    let filter = |filter: Vec<u8>| nest(unknown(900), 1, &filter);
    let exchanges = [
        Exchange::new(
            runtime!("CreateContainer"),
            create,
            with_unknown(
                &cri::CreateContainerResponse {
                    container_id: CONTAINER.into(),
                },
                950,
            ),
        ),
        Exchange::new(
            runtime!("PortForward"),
            with_unknown(
                &cri::PortForwardRequest {
                    pod_sandbox_id: CLAIMED.into(),
                    port: vec![80, 443],
                },
                900,
            ),
            with_unknown(
                &cri::PortForwardResponse {
                    url: "http://127.0.0.1:10010/portforward/x".into(),
                },
                910,
            ),
        ),
        Exchange::new(
            runtime!("ListContainers"),
            filter(with_unknown(
                &cri::ContainerFilter {
                    pod_sandbox_id: CLAIMED.into(),
                    label_selector: labels(&[("app", "web")]),
                    ..Default::default()
                },
                910,
            )),
            nest(
                unknown(920),
                1,
                &with_unknown(&cri::Container::default(), 930),
            ),
        ),
        Exchange::new(
            runtime!("ListContainerStats"),
            filter(with_unknown(
                &cri::ContainerStatsFilter {
                    pod_sandbox_id: CLAIMED.into(),
                    ..Default::default()
                },
                910,
            )),
            nest(unknown(920), 1, &unknown(930)),
        ),
        Exchange::new(
            runtime!("StopPodSandbox"),
            with_unknown(
                &cri::StopPodSandboxRequest {
                    pod_sandbox_id: CLAIMED.into(),
                },
                900,
            ),
            unknown(910),
        ),
        // Last: the slot source forgets a removed slot.
        Exchange::new(
            runtime!("RemovePodSandbox"),
            with_unknown(
                &cri::RemovePodSandboxRequest {
                    pod_sandbox_id: CLAIMED.into(),
                },
                900,
            ),
            unknown(910),
        ),
    ];
    byte_exact_both_ways(&rig, &exchanges).await;
    // The guards ran: the barrier was asked, the removal recorded.
    {
        let record = rig.slots.record();
        assert_eq!(record.readiness_asked, [CLAIMED]);
        assert_eq!(record.removed, [CLAIMED]);
    }
    rig.stop().await;
}

#[tokio::test]
async fn a_cold_miss_changes_only_the_handler_and_the_reserved_label() {
    let rig = rig().await;
    let answer = with_unknown(
        &cri::RunPodSandboxResponse {
            pod_sandbox_id: ORDINARY.into(),
        },
        950,
    );
    rig.script.answer(runtime!("RunPodSandbox"), answer.clone());
    // fast-crun has no pool at all; fast-runc's pool is empty.
    for (exposed, upstream, reason) in [
        ("fast-crun", "crun", MissReason::NoPool),
        ("fast-runc", "runc", MissReason::PoolEmpty),
    ] {
        let config = sandbox_config("web");
        let sent = nest(
            with_unknown(
                &cri::RunPodSandboxRequest {
                    config: None,
                    runtime_handler: exposed.into(),
                },
                930,
            ),
            1,
            &config,
        );
        let got = raw_call(rig.shim.channel(), runtime!("RunPodSandbox"), sent.clone())
            .await
            .expect("RunPodSandbox");
        assert_eq!(got, answer, "{exposed}: upstream's answer, byte for byte");
        assert_eq!(rig.slots.misses().last(), Some(&reason), "{exposed}");

        let received = rig.script.last(runtime!("RunPodSandbox"));
        let mut pod = kubelet_pod("web");
        pod.labels
            .insert(RUNTIME_HANDLER_LABEL.into(), exposed.into());
        assert_eq!(
            decode::<cri::RunPodSandboxRequest>(&received),
            cri::RunPodSandboxRequest {
                config: Some(pod),
                runtime_handler: upstream.into(),
            },
            "{exposed}"
        );
        // Everything but the handler and the labels, byte for byte and in
        // order: unknown fields at the top, in the config, in its linux
        // part and deeper.
        assert_eq!(untouched(&received, &[1, 2]), untouched(&sent, &[1, 2]));
        let received_config = payload(&received, 1);
        assert_eq!(
            untouched(&received_config, &[6]),
            untouched(&config, &[6]),
            "{exposed}: the config's other fields"
        );
        for (tag, within) in [(930, &received), (900, &received_config)] {
            assert!(contains(within, &unknown(tag)), "{exposed}: {tag}");
        }
        let linux = payload(&received_config, 8);
        assert!(contains(&linux, &unknown(910)));
        assert!(contains(&payload(&linux, 2), &unknown(920)));
    }
    rig.stop().await;
}

/// A sandbox list item as upstream reports it, with unknown fields (tag)
/// and unknown fields in its metadata (tag + 5).
fn sandbox_item(id: &str, labels: HashMap<String, String>, tag: u32) -> Vec<u8> {
    let item = cri::PodSandbox {
        id: id.into(),
        metadata: None,
        state: cri::PodSandboxState::SandboxReady as i32,
        created_at: 5,
        labels,
        annotations: HashMap::new(),
        runtime_handler: "runc".into(),
    };
    nest(
        with_unknown(&item, tag),
        2,
        &with_unknown(&slot_metadata(), tag + 5),
    )
}

/// What kubelet must see of the claimed slot in a list.
fn claimed_item() -> cri::PodSandbox {
    let pod = kubelet_pod("web");
    cri::PodSandbox {
        id: CLAIMED.into(),
        metadata: pod.metadata,
        state: cri::PodSandboxState::SandboxReady as i32,
        created_at: FIRST_CLAIM_NS,
        labels: pod.labels,
        annotations: pod.annotations,
        runtime_handler: "fast-runc".into(),
    }
}

#[tokio::test]
async fn a_claimed_slot_in_a_sandbox_list_keeps_unknown_fields() {
    let rig = rig().await;
    let ordinary = sandbox_item(ORDINARY, labels(&[("app", "other")]), 910);
    let claimed = sandbox_item(CLAIMED, placeholder_labels(), 920);
    let answer = [
        ordinary.clone(),
        sandbox_item(UNCLAIMED, placeholder_labels(), 930),
        claimed.clone(),
    ]
    .iter()
    .fold(unknown(900), |list, item| nest(list, 1, item));
    // Nothing of a slot in the answer: the very bytes. Then the unclaimed
    // slot goes, the ordinary sandbox stays as it was, the claimed one is
    // the pod's. No selector: the request goes as it came.
    let only_ordinary = nest(unknown(900), 1, &ordinary);
    let mut got = Vec::new();
    for scripted in [&only_ordinary, &answer] {
        rig.script
            .answer(runtime!("ListPodSandbox"), scripted.clone());
        let path = runtime!("ListPodSandbox");
        got.push(rig.call(rig.shim.channel(), path, &unknown(940)).await);
    }
    assert_eq!(got[0], only_ordinary);
    let got = &got[1];
    let items = payloads(got, 1);
    assert_eq!(items.len(), 2);
    assert_eq!(items[0], ordinary);
    assert_claimed_item(&items[1], &claimed);
    assert_eq!(untouched(got, &[1]), untouched(&answer, &[1]));

    // A selector: taken off the request, the rest of it kept.
    let filter = with_unknown(
        &cri::PodSandboxFilter {
            id: String::new(),
            state: Some(cri::PodSandboxStateValue {
                state: cri::PodSandboxState::SandboxReady as i32,
            }),
            label_selector: labels(&[("app", "web")]),
        },
        950,
    );
    let sent = nest(unknown(940), 1, &filter);
    let got = raw_call(rig.shim.channel(), runtime!("ListPodSandbox"), sent.clone())
        .await
        .expect("ListPodSandbox");
    let items = payloads(&got, 1);
    assert_eq!(items.len(), 1);
    assert_claimed_item(&items[0], &claimed);
    let received = rig.script.last(runtime!("ListPodSandbox"));
    let mut expected = decode::<cri::ListPodSandboxRequest>(&sent);
    expected
        .filter
        .as_mut()
        .expect("filter")
        .label_selector
        .clear();
    assert_eq!(decode::<cri::ListPodSandboxRequest>(&received), expected);
    assert_eq!(untouched(&received, &[1]), untouched(&sent, &[1]));
    assert_eq!(
        untouched(&payload(&received, 1), &[3]),
        untouched(&filter, &[3])
    );
    rig.stop().await;
}

/// `got`, the claimed slot's list item, is the pod's ([`claimed_item`]),
/// and upstream's `item` otherwise: unknown fields included.
fn assert_claimed_item(got: &[u8], item: &[u8]) {
    assert_eq!(decode::<cri::PodSandbox>(got), claimed_item());
    assert_eq!(
        untouched(got, &[2, 4, 5, 6, 7]),
        untouched(item, &[2, 4, 5, 6, 7]),
        "id, state and unknown fields as upstream sent them"
    );
}

/// A sandbox status as upstream reports it, unknown fields in it (1100),
/// in its network (1110), its network's additional IPs (1120), and its
/// linux status (1130), namespaces (1140) and namespace options (1150).
fn sandbox_status(id: &str, labels: HashMap<String, String>) -> Vec<u8> {
    let status = cri::PodSandboxStatus {
        id: id.into(),
        metadata: Some(slot_metadata()),
        state: cri::PodSandboxState::SandboxReady as i32,
        created_at: 5,
        network: None,
        linux: None,
        labels,
        annotations: HashMap::new(),
        runtime_handler: "runc".into(),
    };
    let network = nest(
        with_unknown(
            &cri::PodSandboxNetworkStatus {
                ip: "10.88.0.5".into(),
                additional_ips: Vec::new(),
            },
            1110,
        ),
        2,
        &with_unknown(
            &cri::PodIp {
                ip: "fd00::5".into(),
            },
            1120,
        ),
    );
    let options = with_unknown(
        &cri::NamespaceOption {
            network: cri::NamespaceMode::Pod as i32,
            pid: cri::NamespaceMode::Pod as i32,
            ipc: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        },
        1150,
    );
    let linux = nest(unknown(1130), 1, &nest(unknown(1140), 2, &options));
    nest(nest(with_unknown(&status, 1100), 5, &network), 6, &linux)
}

/// What kubelet must see of the claimed slot's status, as rewrite.rs
/// documents: the pod's identity, handler, claim time, IPs and namespace
/// modes; upstream's `state` and `id`.
fn claimed_status() -> cri::PodSandboxStatus {
    let pod = kubelet_pod("web");
    let ips = rebound();
    let ns = pod
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .expect("namespace options");
    cri::PodSandboxStatus {
        id: CLAIMED.into(),
        metadata: pod.metadata,
        state: cri::PodSandboxState::SandboxReady as i32,
        created_at: FIRST_CLAIM_NS,
        network: Some(cri::PodSandboxNetworkStatus {
            ip: ips.ip,
            additional_ips: ips
                .additional
                .into_iter()
                .map(|ip| cri::PodIp { ip })
                .collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    network: ns.network,
                    pid: ns.pid,
                    ipc: ns.ipc,
                    ..Default::default()
                }),
            }),
        }),
        labels: pod.labels,
        annotations: pod.annotations,
        runtime_handler: "fast-runc".into(),
    }
}

/// `got`, the claimed slot's status, is [`claimed_status`], and every
/// unknown field of upstream's `status` is in it, where it was.
fn assert_claimed_status(got: &[u8], status: &[u8]) {
    assert_eq!(decode::<cri::PodSandboxStatus>(got), claimed_status());
    let rewritten = [2, 4, 5, 6, 7, 8, 9];
    assert_eq!(untouched(got, &rewritten), untouched(status, &rewritten));
    let network = payload(got, 5);
    assert!(contains(&network, &unknown(1110)), "network");
    let linux = payload(got, 6);
    assert!(contains(&linux, &unknown(1130)), "linux");
    let namespaces = payload(&linux, 1);
    assert!(contains(&namespaces, &unknown(1140)), "linux.namespaces");
    let options = payload(&namespaces, 2);
    assert!(contains(&options, &unknown(1150)), "namespace options");
}

#[tokio::test]
async fn a_claimed_slots_status_keeps_unknown_fields() {
    let rig = rig().await;
    let status = sandbox_status(CLAIMED, placeholder_labels());
    let upstream_info = labels(&[
        ("info", r#"{"pid":42,"runtimeHandler":"runc"}"#),
        ("other", "kept"),
    ]);
    let answer = |status: &[u8]| {
        nest(
            nest(
                with_unknown(
                    &cri::PodSandboxStatusResponse {
                        status: None,
                        info: upstream_info.clone(),
                        containers_statuses: Vec::new(),
                        timestamp: 7,
                    },
                    1160,
                ),
                1,
                status,
            ),
            3,
            &container_status(),
        )
    };
    let request = with_unknown(
        &cri::PodSandboxStatusRequest {
            pod_sandbox_id: CLAIMED.into(),
            verbose: true,
        },
        1170,
    );
    let claimed = answer(&status);
    rig.script
        .answer(runtime!("PodSandboxStatus"), claimed.clone());
    let got = rig
        .call(rig.shim.channel(), runtime!("PodSandboxStatus"), &request)
        .await;
    assert_claimed_status(&payload(&got, 1), &status);
    assert_eq!(
        decode::<cri::PodSandboxStatusResponse>(&got).info,
        labels(&[
            ("info", r#"{"pid":42,"runtimeHandler":"fast-runc"}"#),
            ("other", "kept"),
        ])
    );
    // The container statuses, the timestamp and the unknown fields.
    assert_eq!(untouched(&got, &[1, 2]), untouched(&claimed, &[1, 2]));

    // An ordinary sandbox: nothing to change, the very bytes.
    let ordinary = answer(&sandbox_status(ORDINARY, labels(&[("app", "other")])));
    rig.script
        .answer(runtime!("PodSandboxStatus"), ordinary.clone());
    for (shim, channel) in rig.shims() {
        let got = rig
            .call(channel, runtime!("PodSandboxStatus"), &request)
            .await;
        assert_eq!(got, ordinary, "{shim}");
    }
    rig.stop().await;
}

/// Sandbox stats as upstream reports them: unknown fields in them (tag),
/// in their attributes (tag + 10), the attributes' metadata (tag + 20) and
/// the linux stats (tag + 30).
fn sandbox_stats(id: &str, labels: HashMap<String, String>, tag: u32) -> Vec<u8> {
    let attributes = nest(
        with_unknown(
            &cri::PodSandboxAttributes {
                id: id.into(),
                metadata: None,
                labels,
                annotations: HashMap::new(),
            },
            tag + 10,
        ),
        2,
        &with_unknown(&slot_metadata(), tag + 20),
    );
    let linux = with_unknown(
        &cri::LinuxPodSandboxStats {
            cpu: Some(cri::CpuUsage {
                timestamp: 11,
                usage_core_nano_seconds: Some(cri::UInt64Value { value: 12 }),
                ..Default::default()
            }),
            ..Default::default()
        },
        tag + 30,
    );
    nest(nest(unknown(tag), 1, &attributes), 2, &linux)
}

/// `got`, the claimed slot's stats, carry the pod's attributes and
/// upstream's `stats` otherwise, unknown fields included.
fn assert_claimed_stats(got: &[u8], stats: &[u8]) {
    let pod = kubelet_pod("web");
    let mut expected = decode::<cri::PodSandboxStats>(stats);
    let attributes = expected.attributes.as_mut().expect("attributes");
    attributes.metadata = pod.metadata;
    attributes.labels = pod.labels;
    attributes.annotations = pod.annotations;
    assert_eq!(decode::<cri::PodSandboxStats>(got), expected);
    assert_eq!(untouched(got, &[1]), untouched(stats, &[1]));
    let rewritten = [2, 3, 4];
    assert_eq!(
        untouched(&payload(got, 1), &rewritten),
        untouched(&payload(stats, 1), &rewritten)
    );
}

#[tokio::test]
async fn a_claimed_slots_stats_keep_unknown_fields() {
    let rig = rig().await;
    let claimed = sandbox_stats(CLAIMED, placeholder_labels(), 1200);
    let ordinary = sandbox_stats(ORDINARY, labels(&[("app", "other")]), 1300);
    let unclaimed = sandbox_stats(UNCLAIMED, placeholder_labels(), 1400);

    // One sandbox.
    let answer = nest(unknown(1500), 1, &claimed);
    rig.script
        .answer(runtime!("PodSandboxStats"), answer.clone());
    let request = with_unknown(
        &cri::PodSandboxStatsRequest {
            pod_sandbox_id: CLAIMED.into(),
        },
        1510,
    );
    let got = rig
        .call(rig.shim.channel(), runtime!("PodSandboxStats"), &request)
        .await;
    assert_claimed_stats(&payload(&got, 1), &claimed);
    assert_eq!(untouched(&got, &[1]), untouched(&answer, &[1]));

    // The list, no selector: the request as it came.
    let all = [&ordinary, &unclaimed, &claimed]
        .iter()
        .fold(unknown(1520), |list, item| nest(list, 1, item));
    rig.script
        .answer(runtime!("ListPodSandboxStats"), all.clone());
    let request = |selector: &[(&str, &str)]| {
        nest(
            unknown(1530),
            1,
            &with_unknown(
                &cri::PodSandboxStatsFilter {
                    id: String::new(),
                    label_selector: labels(selector),
                },
                1540,
            ),
        )
    };
    let got = rig
        .call(
            rig.shim.channel(),
            runtime!("ListPodSandboxStats"),
            &request(&[]),
        )
        .await;
    let items = payloads(&got, 1);
    assert_eq!(items.len(), 2);
    assert_eq!(items[0], ordinary);
    assert_claimed_stats(&items[1], &claimed);
    assert_eq!(untouched(&got, &[1]), untouched(&all, &[1]));

    // With a selector the shim lists sandboxes, selects on what kubelet
    // sees and asks for each selected sandbox's stats: with the caller's
    // request, its selector taken off and the id set.
    let list = [
        sandbox_item(ORDINARY, labels(&[("app", "other")]), 910),
        sandbox_item(UNCLAIMED, placeholder_labels(), 920),
        sandbox_item(CLAIMED, placeholder_labels(), 930),
    ]
    .iter()
    .fold(Vec::new(), |list, item| nest(list, 1, item));
    rig.script.answer(runtime!("ListPodSandbox"), list);
    let by_id = HashMap::from([
        (ORDINARY.to_owned(), ordinary.clone()),
        (UNCLAIMED.to_owned(), unclaimed.clone()),
        (CLAIMED.to_owned(), claimed.clone()),
    ]);
    rig.script
        .answer_with(runtime!("ListPodSandboxStats"), move |request| {
            let request = decode::<cri::ListPodSandboxStatsRequest>(request);
            let id = request.filter.map(|f| f.id).unwrap_or_default();
            nest(unknown(1520), 1, &by_id[&id])
        });
    let sent = request(&[("app", "web")]);
    let got = raw_call(
        rig.shim.channel(),
        runtime!("ListPodSandboxStats"),
        sent.clone(),
    )
    .await
    .expect("ListPodSandboxStats");
    let items = payloads(&got, 1);
    assert_eq!(items.len(), 1);
    assert_claimed_stats(&items[0], &claimed);
    let asked = rig.script.requests(runtime!("ListPodSandboxStats"));
    let received = asked.last().expect("a stats request");
    assert_eq!(asked.len(), 2, "one list without selector, one for CLAIMED");
    let mut expected = decode::<cri::ListPodSandboxStatsRequest>(&sent);
    let filter = expected.filter.as_mut().expect("filter");
    filter.label_selector.clear();
    filter.id = CLAIMED.into();
    assert_eq!(
        decode::<cri::ListPodSandboxStatsRequest>(received),
        expected
    );
    assert_eq!(untouched(received, &[1]), untouched(&sent, &[1]));
    let rewritten = [1, 2];
    assert_eq!(
        untouched(&payload(received, 1), &rewritten),
        untouched(&payload(&sent, 1), &rewritten)
    );
    rig.stop().await;
}

#[tokio::test]
async fn container_events_keep_unknown_fields() {
    let rig = rig().await;
    let event = |sandbox: &[u8], tag| {
        let event = cri::ContainerEventResponse {
            container_id: CONTAINER.into(),
            container_event_type: cri::ContainerEventType::ContainerStartedEvent as i32,
            created_at: 9,
            pod_sandbox_status: None,
            containers_statuses: Vec::new(),
        };
        nest(
            nest(with_unknown(&event, tag), 4, sandbox),
            5,
            &container_status(),
        )
    };
    let status = sandbox_status(CLAIMED, placeholder_labels());
    let claimed = event(&status, 1600);
    let ordinary = event(&sandbox_status(ORDINARY, labels(&[("app", "x")])), 1610);
    let unclaimed = event(&sandbox_status(UNCLAIMED, placeholder_labels()), 1620);
    let path = runtime!("GetContainerEvents");
    rig.script.stream(
        path,
        vec![claimed.clone(), unclaimed.clone(), ordinary.clone()],
    );
    let request = unknown(1630);

    let got = raw_stream(rig.shim.channel(), path, request.clone())
        .await
        .expect("events");
    assert_eq!(rig.script.last(path), request);
    assert_eq!(got.len(), 2, "the unclaimed slot's event is dropped");
    assert_claimed_status(&payload(&got[0], 4), &status);
    assert_eq!(untouched(&got[0], &[4]), untouched(&claimed, &[4]));
    assert_eq!(got[1], ordinary);

    let got = raw_stream(rig.plain.channel(), path, request.clone())
        .await
        .expect("events");
    assert_eq!(rig.script.last(path), request);
    assert_eq!(got, [claimed, unclaimed, ordinary]);
    rig.stop().await;
}

#[tokio::test]
async fn status_keeps_upstreams_handlers_and_adds_the_exposed_ones() {
    let rig = rig().await;
    let handler = |name: &str, features: Option<cri::RuntimeHandlerFeatures>, tag| {
        let plain = cri::RuntimeHandler {
            name: name.into(),
            features: None,
        };
        match features {
            Some(features) => nest(
                with_unknown(&plain, tag),
                2,
                &with_unknown(&features, tag + 5),
            ),
            None => with_unknown(&plain, tag),
        }
    };
    let runc = handler(
        "runc",
        Some(cri::RuntimeHandlerFeatures {
            recursive_read_only_mounts: true,
            user_namespaces: true,
        }),
        1710,
    );
    let crun = handler(
        "crun",
        Some(cri::RuntimeHandlerFeatures {
            recursive_read_only_mounts: false,
            user_namespaces: true,
        }),
        1720,
    );
    let runtime_status = nest(
        unknown(1730),
        1,
        &with_unknown(
            &cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                ..Default::default()
            },
            1740,
        ),
    );
    let top = with_unknown(
        &cri::StatusResponse {
            status: None,
            info: labels(&[("config", "{}")]),
            runtime_handlers: Vec::new(),
            features: None,
        },
        1700,
    );
    let answer = [handler("", None, 1750), runc.clone(), crun.clone()]
        .iter()
        .fold(nest(top, 1, &runtime_status), |a, h| nest(a, 3, h));
    let answer = nest(
        answer,
        4,
        &with_unknown(
            &cri::RuntimeFeatures {
                supplemental_groups_policy: true,
            },
            1760,
        ),
    );
    rig.script.answer(runtime!("Status"), answer.clone());
    let request = with_unknown(&cri::StatusRequest { verbose: true }, 1770);

    let got = rig
        .call(rig.plain.channel(), runtime!("Status"), &request)
        .await;
    assert_eq!(got, answer, "plain: the very bytes");

    let got = rig
        .call(rig.shim.channel(), runtime!("Status"), &request)
        .await;
    // Upstream's answer whole, then one entry per exposed handler: its
    // upstream handler's entry, features and unknown fields included,
    // under the exposed name.
    let added = got
        .strip_prefix(answer.as_slice())
        .expect("upstream's answer first, unchanged");
    let mut added = payloads(added, 3);
    added.sort_by_key(|h| decode::<cri::RuntimeHandler>(h).name);
    assert_eq!(added.len(), 2, "fast-crun and fast-runc");
    for (entry, (name, upstream)) in added
        .iter()
        .zip([("fast-crun", &crun), ("fast-runc", &runc)])
    {
        let mut expected = decode::<cri::RuntimeHandler>(upstream);
        expected.name = name.into();
        assert_eq!(decode::<cri::RuntimeHandler>(entry), expected);
        assert_eq!(untouched(entry, &[1]), untouched(upstream, &[1]), "{name}");
    }
    rig.stop().await;
}
