//! The shim with slots, in process: claims, cold fallbacks, and what kubelet
//! sees of slots (nothing of unclaimed ones; its own pod for claimed ones).
//! A stateful fake upstream stands in for containerd and a recording fake
//! for the node plugin's pools. No root, no containerd.

mod support;

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use fast_sandbox_proto::cri::{self, runtime_service_client::RuntimeServiceClient};
use fast_sandbox_shim::slots::{
    MissReason, PoolKey, SeccompShape, Shape, POOL_LABEL, RUNTIME_HANDLER_LABEL, SLOT_LABEL,
    SLOT_TOKEN_LABEL,
};
use support::{
    pods::{stats_not_found, STATUS_NOT_FOUND},
    slots::{kubelet_pod, run_request, runc_key, SlotsRig, FIRST_CLAIM_NS, TOKEN},
};
use tonic::{transport::Channel, Code};

type Client = RuntimeServiceClient<Channel>;

async fn run(client: &mut Client, handler: &str, config: cri::PodSandboxConfig) -> String {
    client
        .run_pod_sandbox(run_request(handler, config))
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id
}

async fn list(client: &mut Client, filter: Option<cri::PodSandboxFilter>) -> Vec<cri::PodSandbox> {
    client
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items
}

async fn list_stats(
    client: &mut Client,
    filter: Option<cri::PodSandboxStatsFilter>,
) -> Vec<cri::PodSandboxStats> {
    client
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter })
        .await
        .expect("ListPodSandboxStats")
        .into_inner()
        .stats
}

fn by_labels(pairs: &[(&str, &str)]) -> Option<cri::PodSandboxFilter> {
    Some(cri::PodSandboxFilter {
        label_selector: labels(pairs),
        ..Default::default()
    })
}

fn stats_by_labels(pairs: &[(&str, &str)]) -> Option<cri::PodSandboxStatsFilter> {
    Some(cri::PodSandboxStatsFilter {
        label_selector: labels(pairs),
        ..Default::default()
    })
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `pod` as the shim forwards a cold miss of exposed handler `exposed`.
fn cold_config(mut pod: cri::PodSandboxConfig, exposed: &str) -> cri::PodSandboxConfig {
    pod.labels
        .insert(RUNTIME_HANDLER_LABEL.into(), exposed.into());
    pod
}

fn ids(items: &[cri::PodSandbox]) -> Vec<&str> {
    items.iter().map(|i| i.id.as_str()).collect()
}

fn stats_ids(stats: &[cri::PodSandboxStats]) -> Vec<&str> {
    stats
        .iter()
        .map(|s| s.attributes.as_ref().expect("attributes").id.as_str())
        .collect()
}

#[tokio::test]
async fn hit_returns_the_slot_and_never_runs_a_sandbox_upstream() {
    let rig = SlotsRig::start().await;
    let slots = rig.fill(&runc_key(), 2).await;
    let runs_before = rig.pods.store().runs.len();

    let mut shim = rig.shim.runtime();
    let pod = kubelet_pod("web");
    let id = run(&mut shim, "fast-runc", pod.clone()).await;

    assert!(slots.contains(&id), "{id} is one of the slots");
    assert_eq!(rig.pods.store().runs.len(), runs_before, "no upstream run");
    {
        let record = rig.slots.record();
        assert_eq!(record.claims.len(), 1);
        let claim = &record.claims[0];
        assert_eq!(claim.exposed_handler, "fast-runc");
        assert_eq!(claim.key, runc_key());
        assert_eq!(claim.config, pod);
        assert!(record.misses.is_empty());
    }

    // Single use: the second pod gets the other slot, the third goes cold.
    let second = run(&mut shim, "fast-runc", kubelet_pod("api")).await;
    assert!(slots.contains(&second) && second != id);
    let third = run(&mut shim, "fast-runc", kubelet_pod("db")).await;
    assert!(!slots.contains(&third));
    assert_eq!(rig.slots.misses(), [MissReason::PoolEmpty]);
    rig.stop().await;
}

#[tokio::test]
async fn miss_goes_cold_with_the_upstream_handler() {
    let rig = SlotsRig::start().await;
    let mut shim = rig.shim.runtime();
    let pod = kubelet_pod("web");

    // No pool for fast-crun's key at all.
    let id = run(&mut shim, "fast-crun", pod.clone()).await;
    let runs = rig.pods.store().runs.clone();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].runtime_handler, "crun");
    assert_eq!(
        runs[0].config,
        Some(cold_config(pod, "fast-crun")),
        "config unchanged but for the exposed handler it keeps"
    );
    assert_eq!(rig.pods.ids(), [id]);
    let crun_key = PoolKey {
        upstream_handler: "crun".into(),
        ..runc_key()
    };
    assert_eq!(
        rig.slots.record().misses,
        [("fast-crun".to_owned(), Some(crun_key), MissReason::NoPool)]
    );
    rig.stop().await;
}

#[tokio::test]
async fn ineligible_pods_go_cold_with_the_upstream_handler() {
    let rig = SlotsRig::start().await;
    let slots = rig.fill(&runc_key(), 1).await;
    let mut shim = rig.shim.runtime();

    let mut host_network = kubelet_pod("hostnet");
    host_network
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
        .expect("namespace options")
        .network = cri::NamespaceMode::Node as i32;
    let mut host_port = kubelet_pod("hostport");
    host_port.port_mappings[0].host_port = 30080;
    let mut other_shape = kubelet_pod("unconfined");
    other_shape
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .expect("security context")
        .seccomp = None;
    let no_metadata = cri::PodSandboxConfig {
        metadata: None,
        ..kubelet_pod("x")
    };

    for pod in [host_network.clone(), host_port, other_shape.clone()] {
        let id = run(&mut shim, "fast-runc", pod).await;
        assert!(!slots.contains(&id));
    }
    // Upstream's own error for a request it rejects, as without the shim.
    let err = shim
        .run_pod_sandbox(run_request("fast-runc", no_metadata))
        .await
        .expect_err("rejected upstream");
    assert_eq!(err.code(), Code::Unknown);
    assert_eq!(err.message(), "sandbox config must include metadata");

    let runs = rig.pods.store().runs.clone();
    let handlers: Vec<&str> = runs[1..]
        .iter()
        .map(|r| r.runtime_handler.as_str())
        .collect();
    assert_eq!(handlers, ["runc"; 4]);
    assert_eq!(runs[1].config, Some(cold_config(host_network, "fast-runc")));
    let misses = rig.slots.record().misses.clone();
    let reasons: Vec<MissReason> = misses.iter().map(|m| m.2).collect();
    assert_eq!(
        reasons,
        [
            MissReason::HostNetwork,
            MissReason::HostPort,
            MissReason::NoPool,
            MissReason::InvalidConfig,
        ]
    );
    let unconfined_key = PoolKey {
        upstream_handler: "runc".into(),
        shape: Shape {
            seccomp: SeccompShape::Unconfined,
            ..Default::default()
        },
    };
    assert_eq!(misses[2].1.as_ref(), Some(&unconfined_key));
    assert!(
        rig.slots.record().claims.len() == 1,
        "only the eligible pod claims"
    );
    assert!(
        rig.slots.claimed(&slots[0]).is_none(),
        "the slot stays free"
    );
    rig.stop().await;
}

#[tokio::test]
async fn unknown_handlers_are_forwarded_untouched() {
    let rig = SlotsRig::start().await;
    let slots = rig.fill(&runc_key(), 1).await;
    let mut shim = rig.shim.runtime();
    for handler in ["runc", "", "kata"] {
        let request = run_request(handler, kubelet_pod(&format!("p{}", handler.len())));
        let id = shim
            .run_pod_sandbox(request.clone())
            .await
            .expect("cold")
            .into_inner()
            .pod_sandbox_id;
        assert!(!slots.contains(&id));
        assert_eq!(rig.pods.store().runs.last(), Some(&request));
    }
    assert!(rig.slots.record().claims.is_empty());
    assert_eq!(rig.slots.misses(), [MissReason::NotFastHandler; 3]);
    rig.stop().await;
}

#[tokio::test]
async fn failed_claim_falls_back_to_cold() {
    let rig = SlotsRig::start().await;
    let slots = rig.fill(&runc_key(), 1).await;
    rig.slots.fail_claims.store(true, Ordering::SeqCst);
    let mut shim = rig.shim.runtime();
    let pod = kubelet_pod("web");
    let id = run(&mut shim, "fast-runc", pod.clone()).await;
    assert_ne!(id, slots[0]);
    let last = rig.pods.store().runs.last().cloned().expect("cold run");
    assert_eq!(last, run_request("runc", cold_config(pod, "fast-runc")));
    assert_eq!(rig.slots.misses(), [MissReason::ClaimFailed]);
    // The broken slot stays out of sight.
    assert_eq!(ids(&list(&mut shim, None).await), [id.as_str()]);
    rig.stop().await;
}

#[tokio::test]
async fn unclaimed_slots_never_appear() {
    let rig = SlotsRig::start().await;
    let slots = rig.fill(&runc_key(), 2).await;
    let mut shim = rig.shim.runtime();
    let mut direct = rig.direct();

    // An ordinary pod, and one that carries the slot labels itself (the
    // token with a wrong value): both are ordinary sandboxes.
    let ordinary = run(&mut shim, "runc", kubelet_pod("web")).await;
    let mut spoof_config = kubelet_pod("spoof");
    spoof_config
        .labels
        .insert(SLOT_LABEL.into(), "unclaimed".into());
    spoof_config
        .labels
        .insert(SLOT_TOKEN_LABEL.into(), "guessed".into());
    spoof_config
        .labels
        .insert(POOL_LABEL.into(), "runc-default".into());
    let spoof = run(&mut shim, "runc", spoof_config.clone()).await;
    let visible = [ordinary.as_str(), spoof.as_str()];

    // Upstream holds the slots (the test is not vacuous)...
    assert_eq!(list(&mut direct, None).await.len(), 4);
    let slot_filter = [(SLOT_LABEL, "unclaimed")];
    assert_eq!(
        ids(&list(&mut direct, by_labels(&slot_filter)).await).len(),
        3
    );

    // ...the shim shows none of them, whatever the filter.
    let ready = Some(cri::PodSandboxFilter {
        state: Some(cri::PodSandboxStateValue {
            state: cri::PodSandboxState::SandboxReady as i32,
        }),
        ..Default::default()
    });
    for filter in [None, Some(Default::default()), ready] {
        assert_eq!(ids(&list(&mut shim, filter).await), visible);
    }
    for selector in [
        &[(SLOT_LABEL, "unclaimed")][..],
        &[(POOL_LABEL, "runc-default")],
        &[(SLOT_LABEL, "unclaimed"), (POOL_LABEL, "runc-default")],
    ] {
        assert_eq!(
            ids(&list(&mut shim, by_labels(selector)).await),
            [spoof.as_str()],
            "{selector:?}"
        );
        assert_eq!(
            stats_ids(&list_stats(&mut shim, stats_by_labels(selector)).await),
            [spoof.as_str()],
            "{selector:?}"
        );
    }
    let token = [(SLOT_TOKEN_LABEL, TOKEN)];
    assert!(list(&mut shim, by_labels(&token)).await.is_empty());
    assert!(list_stats(&mut shim, stats_by_labels(&token))
        .await
        .is_empty());
    for stats_filter in [None, Some(Default::default())] {
        assert_eq!(
            stats_ids(&list_stats(&mut shim, stats_filter).await),
            visible
        );
    }

    for slot in &slots {
        for id in [slot.as_str(), &slot[..12]] {
            // By id or by prefix: the same answers as for an unknown id.
            let by_id = Some(cri::PodSandboxFilter {
                id: id.into(),
                ..Default::default()
            });
            assert!(list(&mut shim, by_id).await.is_empty());
            let by_id = Some(cri::PodSandboxStatsFilter {
                id: id.into(),
                ..Default::default()
            });
            assert!(list_stats(&mut shim, by_id).await.is_empty());
            for verbose in [false, true] {
                let err = shim
                    .pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: id.into(),
                        verbose,
                    })
                    .await
                    .expect_err("hidden");
                assert_eq!(err.code(), Code::NotFound);
                assert_eq!(err.message(), STATUS_NOT_FOUND);
            }
            let err = shim
                .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                    pod_sandbox_id: id.into(),
                })
                .await
                .expect_err("hidden");
            assert_eq!(err.code(), Code::NotFound);
            assert_eq!(err.message(), stats_not_found(id));
            // The answers equal upstream's for an id it does not know.
            let unknown = direct
                .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                    pod_sandbox_id: id.replace(|_| true, "f"),
                })
                .await
                .expect_err("unknown");
            assert_eq!(unknown.code(), err.code());
        }
    }

    // The spoofing pod is reported as itself, and never handed out.
    let status = shim
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: spoof.clone(),
            verbose: true,
        })
        .await
        .expect("visible")
        .into_inner();
    assert_eq!(
        status.status.as_ref().map(|s| &s.labels),
        Some(&spoof_config.labels)
    );
    for i in 0..3 {
        let id = run(&mut shim, "fast-runc", kubelet_pod(&format!("claimer-{i}"))).await;
        assert_ne!(id, spoof);
        assert_ne!(id, ordinary);
    }
    rig.stop().await;
}

#[tokio::test]
async fn claimed_slots_report_the_pod() {
    let rig = SlotsRig::start().await;
    let slots = rig.fill(&runc_key(), 1).await;
    let mut shim = rig.shim.runtime();
    let mut direct = rig.direct();
    let mut pod = kubelet_pod("web");
    pod.linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
        .expect("namespace options")
        .pid = cri::NamespaceMode::Pod as i32;
    let id = run(&mut shim, "fast-runc", pod.clone()).await;
    assert_eq!(id, slots[0]);
    let ordinary = run(&mut shim, "runc", kubelet_pod("other")).await;

    let items = list(&mut shim, None).await;
    assert_eq!(ids(&items), [id.as_str(), ordinary.as_str()]);
    let item = &items[0];
    assert_eq!(item.metadata, pod.metadata);
    assert_eq!(item.labels, pod.labels);
    assert_eq!(item.annotations, pod.annotations);
    assert_eq!(item.runtime_handler, "fast-runc");
    assert_eq!(item.created_at, FIRST_CLAIM_NS);
    assert_eq!(item.state, cri::PodSandboxState::SandboxReady as i32);

    let response = shim
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id[..10].into(),
            verbose: true,
        })
        .await
        .expect("status")
        .into_inner();
    let status = response.status.as_ref().expect("status");
    assert_eq!(status.id, id);
    assert_eq!(status.metadata, pod.metadata);
    assert_eq!(status.labels, pod.labels);
    assert_eq!(status.annotations, pod.annotations);
    assert_eq!(status.runtime_handler, "fast-runc");
    assert_eq!(status.created_at, FIRST_CLAIM_NS);
    let options = status
        .linux
        .as_ref()
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .expect("namespace options");
    assert_eq!(options.pid, cri::NamespaceMode::Pod as i32);
    assert_eq!(
        status.network.as_ref().map(|n| n.ip.as_str()),
        Some("10.209.0.7"),
        "the slot's IP"
    );
    let info: serde_json::Value =
        serde_json::from_str(&response.info["info"]).expect("verbose info");
    assert_eq!(info["runtimeHandler"], "fast-runc");
    assert_eq!(info["config"]["metadata"]["name"], "web");
    assert_eq!(info["config"]["labels"]["app"], "web");
    assert_eq!(info["runtimeSpec"]["hostname"], "web");
    assert_eq!(
        info["runtimeSpec"]["annotations"]["io.kubernetes.cri.sandbox-uid"],
        "uid-web"
    );
    assert_eq!(
        info["runtimeSpec"]["linux"]["cgroupsPath"],
        format!("/kubepods/besteffort/poduid-web/{id}")
    );
    assert_eq!(info["pid"], 4242, "the rest is upstream's");
    assert!(!response.info["info"].contains("slot-"));

    let stats = shim
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .expect("stats")
        .into_inner()
        .stats
        .expect("stats");
    let attributes = stats.attributes.as_ref().expect("attributes");
    assert_eq!(attributes.id, id);
    assert_eq!(attributes.metadata, pod.metadata);
    assert_eq!(attributes.labels, pod.labels);
    assert_eq!(attributes.annotations, pod.annotations);
    assert!(stats.linux.is_some(), "numbers are upstream's");
    let all = list_stats(&mut shim, Some(Default::default())).await;
    assert_eq!(stats_ids(&all), [id.as_str(), ordinary.as_str()]);
    assert_eq!(all[0].attributes.as_ref(), Some(attributes));

    // Label selectors see the pod's labels, not the placeholder's...
    let uid = [("io.kubernetes.pod.uid", "uid-web")];
    assert_eq!(ids(&list(&mut shim, by_labels(&uid)).await), [id.as_str()]);
    let both = [("app", "web"), ("io.kubernetes.pod.namespace", "default")];
    assert_eq!(ids(&list(&mut shim, by_labels(&both)).await), [id.as_str()]);
    assert_eq!(
        stats_ids(&list_stats(&mut shim, stats_by_labels(&uid)).await),
        [id.as_str()]
    );
    for placeholder in [
        &[(SLOT_LABEL, "unclaimed")][..],
        &[(POOL_LABEL, "runc-default")],
        &[(SLOT_TOKEN_LABEL, TOKEN)],
        &[("app", "other"), ("io.kubernetes.pod.uid", "uid-web")],
    ] {
        assert!(list(&mut shim, by_labels(placeholder)).await.is_empty());
        assert!(list_stats(&mut shim, stats_by_labels(placeholder))
            .await
            .is_empty());
    }
    // ...because the selector never reaches upstream (id and state do).
    let filter = Some(cri::PodSandboxFilter {
        id: id[..8].into(),
        state: Some(cri::PodSandboxStateValue { state: 0 }),
        label_selector: labels(&uid),
    });
    assert_eq!(ids(&list(&mut shim, filter).await), [id.as_str()]);
    let sent = rig.pods.store().list_filters.last().cloned().flatten();
    let sent = sent.expect("a filter");
    assert!(sent.label_selector.is_empty());
    assert_eq!(sent.id, id[..8]);
    assert_eq!(sent.state, Some(cri::PodSandboxStateValue { state: 0 }));

    // Upstream still holds the placeholder identity (what the shim hides).
    let upstream = list(&mut direct, by_labels(&[(SLOT_LABEL, "unclaimed")])).await;
    assert_eq!(ids(&upstream), [id.as_str()]);
    rig.stop().await;
}

#[tokio::test]
async fn plain_shim_forwards_selectors() {
    let rig = SlotsRig::start().await;
    let slots = rig.fill(&runc_key(), 1).await;
    let mut plain = rig.plain.runtime();
    let selector = [(SLOT_LABEL, "unclaimed")];
    let items = list(&mut plain, by_labels(&selector)).await;
    assert_eq!(ids(&items), [slots[0].as_str()], "no slots: no hiding");
    let sent = rig.pods.store().list_filters.last().cloned().flatten();
    assert_eq!(sent.expect("filter").label_selector, labels(&selector));
    rig.stop().await;
}

#[tokio::test]
async fn a_dead_slot_does_not_fail_sandbox_stats() {
    let rig = SlotsRig::start().await;
    let slots = rig.fill(&runc_key(), 1).await;
    let mut direct = rig.direct();
    let mut shim = rig.shim.runtime();
    let ordinary = run(&mut shim, "runc", kubelet_pod("web")).await;
    direct
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: slots[0].clone(),
        })
        .await
        .expect("stopped");

    // Upstream, without a filter, fails naming the dead slot...
    let err = direct
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None })
        .await
        .expect_err("containerd 1.6 quirk");
    assert!(err.message().contains(&slots[0]));
    // ...the shim always sends one, so the slot stays invisible.
    let stats = list_stats(&mut shim, None).await;
    assert_eq!(stats_ids(&stats), [ordinary.as_str()]);
    let sent = rig.pods.store().stats_filters.last().cloned().flatten();
    assert_eq!(sent, Some(Default::default()));
    rig.stop().await;
}

/// Kubelet selects a pod's sandbox stats by uid. Upstream only knows
/// placeholder labels, so the shim selects on the labels kubelet sees and
/// then asks upstream for those sandboxes by id only: a failure of any other
/// sandbox's stats must not fail the call.
#[tokio::test]
async fn selected_sandbox_stats_ask_upstream_only_for_the_selected() {
    let rig = SlotsRig::start().await;
    rig.fill(&runc_key(), 2).await;
    let mut shim = rig.shim.runtime();
    let warm = run(&mut shim, "fast-runc", kubelet_pod("warm")).await;
    let cold = run(&mut shim, "runc", kubelet_pod("cold")).await;
    rig.pods.store().stats_filters.clear();

    for (uid, id) in [("uid-warm", &warm), ("uid-cold", &cold)] {
        let stats = list_stats(
            &mut shim,
            Some(cri::PodSandboxStatsFilter {
                label_selector: labels(&[("io.kubernetes.pod.uid", uid)]),
                ..Default::default()
            }),
        )
        .await;
        assert_eq!(stats_ids(&stats), [id.as_str()], "selected by {uid}");
        let attributes = stats[0].attributes.as_ref().expect("attributes");
        assert_eq!(
            attributes
                .labels
                .get("io.kubernetes.pod.uid")
                .map(String::as_str),
            Some(uid)
        );
    }
    let sent = rig.pods.store().stats_filters.clone();
    assert_eq!(
        sent.len(),
        2,
        "one upstream stats call per selected sandbox: {sent:?}"
    );
    for (f, id) in sent.iter().zip([&warm, &cold]) {
        let f = f.as_ref().expect("a filter");
        assert_eq!(&f.id, id, "asked by id");
        assert!(f.label_selector.is_empty(), "never by the pod's labels");
    }
    rig.stop().await;
}

#[tokio::test]
async fn remove_notifies_the_source() {
    let rig = SlotsRig::start().await;
    let slots = rig.fill(&runc_key(), 2).await;
    let mut shim = rig.shim.runtime();
    let id = run(&mut shim, "fast-runc", kubelet_pod("web")).await;
    let remove = |id: &str| cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.to_owned(),
    };

    // A failed removal is not one.
    rig.pods.refuse_remove.store(true, Ordering::SeqCst);
    shim.remove_pod_sandbox(remove(&id))
        .await
        .expect_err("refused");
    assert!(rig.slots.record().removed.is_empty());
    assert!(rig.slots.claimed(&id).is_some());

    rig.pods.refuse_remove.store(false, Ordering::SeqCst);
    shim.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .expect("stopped");
    // Stopped but not removed: still the pod's.
    let items = list(&mut shim, None).await;
    assert_eq!(ids(&items), [id.as_str()]);
    assert_eq!(items[0].state, cri::PodSandboxState::SandboxNotready as i32);

    shim.remove_pod_sandbox(remove(&id)).await.expect("removed");
    assert_eq!(rig.slots.record().removed, std::slice::from_ref(&id));
    assert!(list(&mut shim, None).await.is_empty());
    let free: Vec<String> = slots.into_iter().filter(|s| *s != id).collect();
    assert_eq!(rig.pods.ids(), free, "the free slot is left");
    rig.stop().await;
}

async fn status(client: &mut Client, id: &str, verbose: bool) -> cri::PodSandboxStatusResponse {
    client
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
}

/// A status without what differs between any two sandboxes of one pod.
fn sans_identity(status: Option<cri::PodSandboxStatus>) -> cri::PodSandboxStatus {
    cri::PodSandboxStatus {
        id: String::new(),
        created_at: 0,
        network: None,
        ..status.expect("status")
    }
}

fn verbose(response: &cri::PodSandboxStatusResponse) -> serde_json::Value {
    let info = &response.info["info"];
    assert!(!info.contains(RUNTIME_HANDLER_LABEL), "leaks: {info}");
    serde_json::from_str(info).expect("verbose info")
}

#[tokio::test]
async fn warm_and_cold_starts_look_the_same() {
    let rig = SlotsRig::start().await;
    let slots = rig.fill(&runc_key(), 1).await;
    let mut shim = rig.shim.runtime();
    let pod = kubelet_pod("web");
    let warm = run(&mut shim, "fast-runc", pod.clone()).await;
    assert_eq!(warm, slots[0]);
    let cold = run(&mut shim, "fast-runc", pod.clone()).await;
    assert_eq!(rig.slots.misses(), [MissReason::PoolEmpty]);

    // Upstream runs the cold one with runc and keeps what was asked for.
    let mut direct = rig.direct();
    let upstream = status(&mut direct, &cold, false).await.status;
    let upstream = upstream.expect("status");
    assert_eq!(upstream.runtime_handler, "runc");
    assert_eq!(upstream.labels[RUNTIME_HANDLER_LABEL], "fast-runc");

    // Status: the same but for id, creation time and IP, verbose or not.
    for verbose_status in [false, true] {
        let w = status(&mut shim, &warm, verbose_status).await;
        let c = status(&mut shim, &cold, verbose_status).await;
        assert_eq!(w.info.is_empty(), !verbose_status);
        let (w_info, c_info) = (
            verbose_status.then(|| verbose(&w)),
            verbose_status.then(|| verbose(&c)),
        );
        let c = sans_identity(c.status);
        assert_eq!(sans_identity(w.status), c);
        assert_eq!(c.runtime_handler, "fast-runc");
        assert_eq!(c.labels, pod.labels);
        if let (Some(w), Some(c)) = (w_info, c_info) {
            assert_eq!(w["runtimeHandler"], "fast-runc");
            assert_eq!(c["runtimeHandler"], "fast-runc");
            assert_eq!(w["config"]["labels"], c["config"]["labels"]);
            assert_eq!(c["config"]["labels"], serde_json::json!(pod.labels));
        }
    }

    // Lists: the same items but for id and creation time.
    let items = list(&mut shim, None).await;
    assert_eq!(ids(&items), [warm.as_str(), cold.as_str()]);
    let sans = |item: &cri::PodSandbox| cri::PodSandbox {
        id: String::new(),
        created_at: 0,
        ..item.clone()
    };
    assert_eq!(sans(&items[0]), sans(&items[1]));
    assert_eq!(items[1].runtime_handler, "fast-runc");
    assert_eq!(items[1].labels, pod.labels);

    // Stats attributes too.
    let stats = list_stats(&mut shim, Some(Default::default())).await;
    assert_eq!(stats_ids(&stats), [warm.as_str(), cold.as_str()]);
    let sans = |s: &cri::PodSandboxStats| cri::PodSandboxAttributes {
        id: String::new(),
        ..s.attributes.clone().expect("attributes")
    };
    assert_eq!(sans(&stats[0]), sans(&stats[1]));
    let one = shim
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: cold.clone(),
        })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(
        one.stats.and_then(|s| s.attributes).map(|a| a.labels),
        Some(pod.labels.clone())
    );

    // Selectors see the pod's labels and never the reserved one.
    let uid = [("io.kubernetes.pod.uid", "uid-web")];
    assert_eq!(
        ids(&list(&mut shim, by_labels(&uid)).await),
        [warm.as_str(), cold.as_str()]
    );
    for value in ["fast-runc", "runc", "fast-crun"] {
        let reserved = [(RUNTIME_HANDLER_LABEL, value)];
        assert!(list(&mut shim, by_labels(&reserved)).await.is_empty());
        assert!(list_stats(&mut shim, stats_by_labels(&reserved))
            .await
            .is_empty());
    }
    let by_id = Some(cri::PodSandboxFilter {
        id: cold[..10].into(),
        ..Default::default()
    });
    assert_eq!(list(&mut shim, by_id).await[0].runtime_handler, "fast-runc");

    // Durable: a shim restarted with no memory of anything (a new slot
    // source) still reports what kubelet asked for.
    let fresh: std::sync::Arc<dyn fast_sandbox_shim::slots::SlotSource> =
        std::sync::Arc::new(support::slots::FakeSlots::default());
    let restarted = support::ShimUnderTest::start_shim(
        &support::upstream_config(&rig.dir.path().join("upstream.sock")),
        rig.dir.path().join("restarted.sock"),
        |upstream| fast_sandbox_shim::Shim::with_slots(upstream, support::slots::handlers(), fresh),
    )
    .await;
    let mut again = restarted.runtime();
    let c = status(&mut again, &cold, true).await;
    verbose(&c);
    assert_eq!(
        sans_identity(c.status),
        sans_identity(status(&mut shim, &cold, false).await.status)
    );
    restarted.stop().await.expect("served");
    rig.stop().await;
}

#[tokio::test]
async fn the_reserved_label_is_the_shims() {
    let rig = SlotsRig::start().await;
    let mut shim = rig.shim.runtime();
    let with_label = |name: &str, value: &str| {
        let mut pod = kubelet_pod(name);
        pod.labels
            .insert(RUNTIME_HANDLER_LABEL.into(), value.into());
        pod
    };
    let own_labels = |name: &str| kubelet_pod(name).labels;

    // On a fast handler, the pod's value is replaced, cold or warm, and
    // never shown.
    let cold = run(&mut shim, "fast-runc", with_label("cold", "fast-crun")).await;
    let forwarded = rig.pods.store().runs.last().cloned().expect("run");
    assert_eq!(
        forwarded,
        run_request("runc", cold_config(kubelet_pod("cold"), "fast-runc"))
    );
    rig.fill(&runc_key(), 1).await;
    let warm = run(&mut shim, "fast-runc", with_label("warm", "fast-crun")).await;
    let claimed = rig.slots.record().claims.last().cloned().expect("claim");
    assert_eq!(claimed.config, kubelet_pod("warm"));
    for (id, name) in [(&cold, "cold"), (&warm, "warm")] {
        let s = status(&mut shim, id, true).await;
        verbose(&s);
        let s = s.status.expect("status");
        assert_eq!(s.runtime_handler, "fast-runc");
        assert_eq!(s.labels, own_labels(name));
    }

    // Other handlers are forwarded untouched. A value naming an exposed
    // handler is never shown either; it sets the reported handler only to
    // an exposed alias of the sandbox's own runtime.
    let alias = with_label("alias", "fast-runc");
    let alias_id = run(&mut shim, "runc", alias.clone()).await;
    let other_id = run(&mut shim, "runc", with_label("other", "fast-crun")).await;
    let mine = with_label("mine", "mine");
    let mine_id = run(&mut shim, "runc", mine.clone()).await;
    assert_eq!(
        // After the cold run and the placeholder.
        rig.pods.store().runs[2..].to_vec(),
        [
            run_request("runc", alias),
            run_request("runc", with_label("other", "fast-crun")),
            run_request("runc", mine.clone()),
        ]
    );
    let reported = |items: &[cri::PodSandbox], id: &str| {
        let item = items.iter().find(|i| i.id == id).expect("listed");
        (item.runtime_handler.clone(), item.labels.clone())
    };
    let items = list(&mut shim, None).await;
    assert_eq!(
        reported(&items, &alias_id),
        ("fast-runc".into(), own_labels("alias"))
    );
    assert_eq!(
        reported(&items, &other_id),
        ("runc".into(), own_labels("other"))
    );
    assert_eq!(reported(&items, &mine_id), ("runc".into(), mine.labels));
    let s = status(&mut shim, &other_id, true).await;
    assert_eq!(verbose(&s)["runtimeHandler"], "runc");
    assert_eq!(s.status.map(|s| s.labels), Some(own_labels("other")));
    assert_eq!(
        ids(&list(&mut shim, by_labels(&[(RUNTIME_HANDLER_LABEL, "mine")])).await),
        [mine_id.as_str()]
    );
    rig.stop().await;
}

#[tokio::test]
async fn container_events_hide_slots_and_report_pods() {
    let rig = SlotsRig::start().await;
    rig.fill(&runc_key(), 2).await;
    let mut shim = rig.shim.runtime();
    let warm = run(&mut shim, "fast-runc", kubelet_pod("warm")).await;
    let cold = run(&mut shim, "fast-crun", kubelet_pod("cold")).await;
    let ordinary = run(&mut shim, "runc", kubelet_pod("plain")).await;

    let mut stream = shim
        .get_container_events(cri::GetEventsRequest::default())
        .await
        .expect("events")
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.expect("event") {
        events.push(event);
    }
    let statuses: Vec<cri::PodSandboxStatus> = events
        .into_iter()
        .map(|e| e.pod_sandbox_status.expect("status"))
        .collect();
    let seen: Vec<(&str, &str)> = statuses
        .iter()
        .map(|s| (s.id.as_str(), s.runtime_handler.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (warm.as_str(), "fast-runc"),
            (cold.as_str(), "fast-crun"),
            (ordinary.as_str(), "runc"),
        ],
        "the free slot is not there"
    );
    for (status, name) in statuses.iter().zip(["warm", "cold", "plain"]) {
        assert_eq!(status.labels, kubelet_pod(name).labels);
        assert_eq!(status.metadata, kubelet_pod(name).metadata);
    }
    rig.stop().await;
}
