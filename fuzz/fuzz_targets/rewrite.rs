//! The shim's status/list rewriting (`shim/src/rewrite.rs`) over arbitrary
//! upstream answers: sandboxes that are unclaimed slots, claimed slots of
//! arbitrary pods, ordinary sandboxes with arbitrary (reserved too) labels
//! and annotations, arbitrary selectors and verbose info. The slot source
//! is a model of the node plugin's: slots by id, and otherwise the secret
//! token label. Checked on every answer:
//! - an unclaimed slot is never in a list, a stats list or an event, and
//!   its status and stats are containerd's not-found errors;
//! - the node's token never appears in anything returned (pods cannot
//!   know it; only slots carry it);
//! - a claimed slot is reported with exactly its pod's metadata, labels,
//!   annotations and exposed handler;
//! - the reserved runtime-handler label naming an exposed handler is never
//!   returned, and an ordinary sandbox only ever reports its own runtime
//!   or an exposed alias of it;
//! - lists keep upstream's order, drop nothing visible that matches the
//!   selector, and return only items that match it;
//! - verbose info is valid JSON when upstream's was.

#![no_main]

use std::{collections::HashMap, sync::Arc};

use arbitrary::Arbitrary;
use fast_sandbox_fuzz::{handlers, pod_map, pod_string, ArbPod, Str, TOKEN};
use fast_sandbox_proto::cri;
use fast_sandbox_shim::{
    fuzzing::Rewriter,
    slots::{
        Claim, ClaimFailed, ClaimedPod, ClaimedSlot, NoSlot, PodIps, SlotSource, SlotView,
        POOL_LABEL, RUNTIME_HANDLER_LABEL, SLOT_LABEL, SLOT_TOKEN_LABEL, SLOT_UNCLAIMED,
    },
    ShimError,
};
use libfuzzer_sys::fuzz_target;

const EXPOSED: [&str; 4] = ["fast-runc", "fast-crun", "fast-gvisor", ""];
const IDS: usize = 12;

fn id(n: u8) -> String {
    format!("{:064x}", usize::from(n) % IDS)
}

/// The model slot source: slots by id; otherwise the token label.
#[derive(Debug, Default)]
struct ModelSlots {
    slots: HashMap<String, SlotView>,
}

#[tonic::async_trait]
impl SlotSource for ModelSlots {
    async fn claim(&self, _: &Claim) -> Result<Result<ClaimedSlot, NoSlot>, ClaimFailed> {
        Ok(Err(NoSlot::NoPool))
    }

    fn view(&self, sandbox_id: &str, labels: &HashMap<String, String>) -> SlotView {
        match self.slots.get(sandbox_id) {
            Some(view) => view.clone(),
            None if labels.get(SLOT_TOKEN_LABEL).is_some_and(|t| t == TOKEN) => SlotView::Unclaimed,
            None => SlotView::NotASlot,
        }
    }

    async fn removed(&self, _: &str) {}
}

#[derive(Debug, Arbitrary)]
enum ArbSlot {
    Unclaimed,
    Claimed {
        exposed: u8,
        pod: Box<ArbPod>,
        claimed_at_ns: i64,
        /// The pod's own IPs (`network = "rebind"`).
        network: Option<(Str, Vec<Str>)>,
    },
}

#[derive(Debug, Arbitrary)]
enum Verbose {
    /// containerd's verbose info of a placeholder.
    Placeholder,
    /// containerd's verbose info of a real pod: its `config.labels` carry
    /// the reserved label exactly when the item's labels do (upstream keeps
    /// one config).
    Cold,
    /// `Placeholder` or `Cold` with `len` bytes at `at` replaced.
    Mutated {
        cold: bool,
        at: u16,
        len: u8,
        with: String,
    },
    Any(String),
}

#[derive(Debug, Arbitrary)]
struct Item {
    id: u8,
    /// Upstream labels: a slot's placeholder labels, or pod-controlled ones.
    placeholder_labels: bool,
    labels: Vec<(Str, Str)>,
    annotations: Vec<(Str, Str)>,
    handler: Str,
    /// The reserved label, with an exposed handler as its value.
    cold_label: Option<u8>,
    verbose: Option<Verbose>,
    stats_without_attributes: bool,
    /// The IPs upstream reports (the slot's); `None` or empty: stopped.
    ip: Option<(Str, Vec<Str>)>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    slots: Vec<(u8, ArbSlot)>,
    items: Vec<Item>,
    selector: Vec<(Str, Str)>,
}

fn placeholder_labels() -> HashMap<String, String> {
    [
        (SLOT_LABEL, SLOT_UNCLAIMED),
        (SLOT_TOKEN_LABEL, TOKEN),
        (POOL_LABEL, "fuzz"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn placeholder_info(id: &str) -> String {
    format!(
        concat!(
            r#"{{"pid":29505,"processStatus":"running","netNamespaceClosed":false,"#,
            r#""image":"localhost/fast-sandbox/pause:v1","snapshotKey":"{id}","snapshotter":"overlayfs","#,
            r#""runtimeHandler":"runc","runtimeType":"io.containerd.runc.v2","#,
            r#""runtimeOptions":{{"binary_name":"/usr/bin/runc"}},"#,
            r#""config":{{"metadata":{{"name":"slot-1","uid":"slot-uid-1","namespace":"fast-sandbox-slots"}},"#,
            r#""hostname":"slot-1","dns_config":{{}},"labels":{{"fast-sandbox.io/pool":"fuzz","#,
            r#""fast-sandbox.io/slot":"unclaimed","fast-sandbox.io/slot-token":"{token}"}},"#,
            r#""linux":{{"cgroup_parent":"/fast-sandbox/slot-1","security_context":{{"namespace_options":{{"pid":1}},"seccomp":{{}}}}}}}},"#,
            r#""runtimeSpec":{{"ociVersion":"1.0.2-dev","process":{{"user":{{"uid":0,"gid":0}},"args":["/pause"]}},"#,
            r#""root":{{"path":"rootfs","readonly":true}},"hostname":"slot-1","#,
            r#""annotations":{{"io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"{id}","#,
            r#""io.kubernetes.cri.sandbox-log-directory":"","io.kubernetes.cri.sandbox-name":"slot-1","#,
            r#""io.kubernetes.cri.sandbox-namespace":"fast-sandbox-slots","io.kubernetes.cri.sandbox-uid":"slot-uid-1"}},"#,
            r#""linux":{{"resources":{{"cpu":{{"shares":2}}}},"#,
            r#""cgroupsPath":"/fast-sandbox/slot-1/{id}","namespaces":[{{"type":"pid"}}]}}}},"#,
            r#""cniResult":{{"Interfaces":{{"eth0":{{"IPConfigs":[{{"IP":"10.209.0.72"}}]}}}}}}}}"#
        ),
        id = id,
        token = TOKEN,
    )
}

/// containerd 1.6.20's verbose info of a real pod, with the reserved label
/// when `exposed` is given.
fn cold_info(exposed: Option<&str>) -> String {
    let real = include_str!("../../shim/src/rewrite/testdata/containerd-1.6.20-verbose-info.json");
    let Some(exposed) = exposed else {
        return real.to_owned();
    };
    real.replacen(
        r#""labels":{"app":"probe""#,
        &format!(r#""labels":{{"{RUNTIME_HANDLER_LABEL}":"{exposed}","app":"probe""#),
        1,
    )
}

fn verbose_info(v: &Verbose, id: &str, cold_label: Option<&str>) -> String {
    match v {
        Verbose::Placeholder => placeholder_info(id),
        Verbose::Cold => cold_info(cold_label),
        Verbose::Mutated {
            cold,
            at,
            len,
            with,
        } => {
            let base = if *cold {
                cold_info(cold_label)
            } else {
                placeholder_info(id)
            };
            let mut bytes = base.into_bytes();
            let at = usize::from(*at) % bytes.len();
            let end = (at + usize::from(*len)).min(bytes.len());
            bytes.splice(at..end, with.bytes());
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Verbose::Any(s) => s.clone(),
    }
}

fn matches(selector: &HashMap<String, String>, labels: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A cold label names an exposed handler: it must never be returned.
fn assert_no_cold_label(labels: &HashMap<String, String>) {
    if let Some(v) = labels.get(RUNTIME_HANDLER_LABEL) {
        assert!(
            handlers().upstream_for(v).is_none(),
            "the reserved label naming an exposed handler leaked: {v:?}"
        );
    }
}

fn assert_no_token<T: std::fmt::Debug>(what: &T) {
    assert!(
        !format!("{what:?}").contains(TOKEN),
        "the slot token leaked: {what:?}"
    );
}

struct Case {
    rewriter: Rewriter,
    model: Arc<ModelSlots>,
    items: Vec<cri::PodSandbox>,
    /// Verbose info, and whether it is consistent with the item.
    infos: Vec<Option<(String, bool)>>,
    /// The network status upstream reports for each item.
    networks: Vec<Option<cri::PodSandboxNetworkStatus>>,
    stats_without_attributes: Vec<bool>,
    selector: HashMap<String, String>,
}

fn build(input: &Input) -> Case {
    let mut model = ModelSlots::default();
    for (n, slot) in &input.slots {
        let view = match slot {
            ArbSlot::Unclaimed => SlotView::Unclaimed,
            ArbSlot::Claimed {
                exposed,
                pod,
                claimed_at_ns,
                network,
            } => {
                let mut config = pod.build();
                // What a claim records (Claim::from_request).
                config.labels.remove(RUNTIME_HANDLER_LABEL);
                SlotView::Claimed(Arc::new(ClaimedPod {
                    config,
                    exposed_handler: EXPOSED[usize::from(*exposed) % EXPOSED.len()].to_owned(),
                    claimed_at_ns: *claimed_at_ns,
                    network: network.as_ref().map(|(ip, additional)| PodIps {
                        ip: pod_string(ip),
                        additional: additional.iter().map(pod_string).collect(),
                    }),
                }))
            }
        };
        model.slots.insert(id(*n), view);
    }
    let mut items = Vec::new();
    let mut infos = Vec::new();
    let mut without = Vec::new();
    let mut networks = Vec::new();
    for item in &input.items {
        let id = id(item.id);
        // Upstream never lists one id twice.
        if items.iter().any(|i: &cri::PodSandbox| i.id == id) {
            continue;
        }
        let mut labels = if item.placeholder_labels {
            placeholder_labels()
        } else {
            pod_map(&item.labels)
        };
        let cold_label = item
            .cold_label
            .map(|e| EXPOSED[usize::from(e) % EXPOSED.len()]);
        if let Some(exposed) = cold_label {
            labels.insert(RUNTIME_HANDLER_LABEL.to_owned(), exposed.to_owned());
        }
        let upstream_sent_valid = |s: &str| serde_json::from_str::<serde_json::Value>(s).is_ok();
        infos.push(item.verbose.as_ref().map(|v| {
            let info = verbose_info(v, &id, cold_label);
            // Valid JSON that agrees with the item (upstream keeps one
            // config per sandbox); mutated or arbitrary info is only
            // checked for not breaking the rewriting.
            let consistent =
                matches!(v, Verbose::Placeholder | Verbose::Cold) && upstream_sent_valid(&info);
            (info, consistent)
        }));
        without.push(item.stats_without_attributes);
        networks.push(item.ip.as_ref().map(|(ip, additional)| {
            cri::PodSandboxNetworkStatus {
                ip: pod_string(ip),
                additional_ips: additional
                    .iter()
                    .map(|ip| cri::PodIp { ip: pod_string(ip) })
                    .collect(),
            }
        }));
        items.push(cri::PodSandbox {
            id,
            metadata: Some(cri::PodSandboxMetadata {
                name: "slot-1".into(),
                uid: "slot-uid-1".into(),
                namespace: "fast-sandbox-slots".into(),
                attempt: 0,
            }),
            state: 0,
            created_at: 1,
            labels,
            annotations: pod_map(&item.annotations),
            runtime_handler: pod_string(&item.handler),
        });
    }
    let model = Arc::new(model);
    Case {
        rewriter: Rewriter::new(handlers(), model.clone()),
        model,
        items,
        infos,
        networks,
        stats_without_attributes: without,
        selector: pod_map(&input.selector),
    }
}

/// What one upstream item must look like once returned.
fn check_returned(
    model: &ModelSlots,
    before: &cri::PodSandbox,
    metadata: &Option<cri::PodSandboxMetadata>,
    labels: &HashMap<String, String>,
    annotations: &HashMap<String, String>,
    handler: Option<&str>,
) {
    match model.view(&before.id, &before.labels) {
        SlotView::Unclaimed => panic!("an unclaimed slot was returned: {}", before.id),
        SlotView::Claimed(pod) => {
            assert_eq!(metadata, &pod.config.metadata);
            assert_eq!(labels, &pod.config.labels);
            assert_eq!(annotations, &pod.config.annotations);
            if let Some(handler) = handler {
                assert_eq!(handler, pod.exposed_handler);
            }
        }
        SlotView::NotASlot => {
            assert_eq!(metadata, &before.metadata);
            assert_eq!(annotations, &before.annotations);
            let mut expected = before.labels.clone();
            if expected
                .get(RUNTIME_HANDLER_LABEL)
                .is_some_and(|v| handlers().upstream_for(v).is_some())
            {
                expected.remove(RUNTIME_HANDLER_LABEL);
            }
            assert_eq!(labels, &expected, "only the reserved label is taken out");
            if let Some(handler) = handler {
                // Its own runtime, or an exposed alias of exactly that runtime.
                assert!(
                    handler == before.runtime_handler
                        || handlers().upstream_for(handler) == Some(&before.runtime_handler),
                    "{:?} reported as {handler:?}",
                    before.runtime_handler
                );
            }
        }
    }
    assert_no_cold_label(labels);
    assert_no_token(&(metadata, labels, annotations));
}

fn check_list(case: &Case) {
    let mut request = cri::ListPodSandboxRequest {
        filter: Some(cri::PodSandboxFilter {
            id: String::new(),
            state: None,
            label_selector: case.selector.clone(),
        }),
    };
    let mut items = case.items.clone();
    case.rewriter.list_pod_sandbox(&mut request, &mut items);
    assert!(
        request
            .filter
            .as_ref()
            .is_some_and(|f| f.label_selector.is_empty()),
        "the selector is the shim's, never upstream's"
    );
    // A subsequence of upstream's items, in order.
    let mut upstream = case.items.iter();
    for item in &items {
        let before = upstream
            .by_ref()
            .find(|b| b.id == item.id)
            .expect("returned items are upstream's, in order");
        check_returned(
            &case.model,
            before,
            &item.metadata,
            &item.labels,
            &item.annotations,
            Some(&item.runtime_handler),
        );
        assert!(matches(&case.selector, &item.labels), "selector applied");
    }
    // Nothing visible and selected is dropped.
    let kept = case
        .items
        .iter()
        .filter(|b| match case.model.view(&b.id, &b.labels) {
            SlotView::Unclaimed => false,
            SlotView::Claimed(pod) => matches(&case.selector, &pod.config.labels),
            SlotView::NotASlot => {
                let mut labels = b.labels.clone();
                if labels
                    .get(RUNTIME_HANDLER_LABEL)
                    .is_some_and(|v| handlers().upstream_for(v).is_some())
                {
                    labels.remove(RUNTIME_HANDLER_LABEL);
                }
                matches(&case.selector, &labels)
            }
        })
        .count();
    assert_eq!(items.len(), kept);
}

fn status_of(
    item: &cri::PodSandbox,
    network: Option<cri::PodSandboxNetworkStatus>,
) -> cri::PodSandboxStatus {
    cri::PodSandboxStatus {
        id: item.id.clone(),
        metadata: item.metadata.clone(),
        state: item.state,
        created_at: item.created_at,
        network,
        linux: None,
        labels: item.labels.clone(),
        annotations: item.annotations.clone(),
        runtime_handler: item.runtime_handler.clone(),
    }
}

fn check_status(case: &Case) {
    for ((item, info), network) in case.items.iter().zip(&case.infos).zip(&case.networks) {
        let mut response = cri::PodSandboxStatusResponse {
            status: Some(status_of(item, network.clone())),
            info: info
                .iter()
                .map(|(raw, _)| ("info".to_owned(), raw.clone()))
                .collect(),
            ..Default::default()
        };
        let view = case.model.view(&item.id, &item.labels);
        match case.rewriter.pod_sandbox_status(&mut response) {
            Err(ShimError::HiddenSandboxStatus) => {
                assert!(matches!(view, SlotView::Unclaimed));
                continue;
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(()) => assert!(!matches!(view, SlotView::Unclaimed), "unclaimed slot shown"),
        }
        let status = response.status.as_ref().expect("status kept");
        // The IPs: the pod's own when it has some and upstream reports any
        // (a stopped sandbox reports none), else upstream's.
        let has_ip = network.as_ref().is_some_and(|n| !n.ip.is_empty());
        match (&view, has_ip) {
            (SlotView::Claimed(pod), true) if pod.network.is_some() => {
                let ips = pod.network.as_ref().expect("some");
                let out = status.network.as_ref().expect("network reported");
                assert_eq!(out.ip, ips.ip);
                let additional: Vec<&str> =
                    out.additional_ips.iter().map(|i| i.ip.as_str()).collect();
                assert_eq!(additional, ips.additional);
            }
            _ => assert_eq!(&status.network, network, "upstream's IPs"),
        }
        check_returned(
            &case.model,
            item,
            &status.metadata,
            &status.labels,
            &status.annotations,
            Some(&status.runtime_handler),
        );
        if let (Some(out), Some((raw, consistent))) = (response.info.get("info"), info) {
            if serde_json::from_str::<serde_json::Value>(raw).is_ok() {
                serde_json::from_str::<serde_json::Value>(out)
                    .expect("valid verbose info stays valid JSON");
            }
            if *consistent {
                let json: serde_json::Value =
                    serde_json::from_str(out).expect("rewritten verbose info is JSON");
                if let Some(labels) = json.pointer("/config/labels").and_then(|l| l.as_object()) {
                    if let Some(v) = labels.get(RUNTIME_HANDLER_LABEL).and_then(|v| v.as_str()) {
                        assert!(handlers().upstream_for(v).is_none(), "cold label in info");
                    }
                }
                if let SlotView::Claimed(pod) = &view {
                    // The placeholder's config is replaced by the pod's.
                    if json.get("config").is_some() {
                        assert!(!out.contains(TOKEN), "slot token in verbose info");
                        let labels: HashMap<String, String> = json
                            .pointer("/config/labels")
                            .map(|l| serde_json::from_value(l.clone()).expect("labels"))
                            .unwrap_or_default();
                        assert_eq!(labels, pod.config.labels);
                    }
                }
            }
        }
    }
}

fn stats_of(item: &cri::PodSandbox, without_attributes: bool) -> cri::PodSandboxStats {
    cri::PodSandboxStats {
        attributes: (!without_attributes).then(|| cri::PodSandboxAttributes {
            id: item.id.clone(),
            metadata: item.metadata.clone(),
            labels: item.labels.clone(),
            annotations: item.annotations.clone(),
        }),
        linux: None,
        windows: None,
    }
}

fn check_stats(case: &Case) {
    let mut request = cri::ListPodSandboxStatsRequest {
        filter: Some(cri::PodSandboxStatsFilter {
            id: String::new(),
            label_selector: case.selector.clone(),
        }),
    };
    let mut stats: Vec<_> = case
        .items
        .iter()
        .zip(&case.stats_without_attributes)
        .map(|(item, without)| stats_of(item, *without))
        .collect();
    case.rewriter
        .list_pod_sandbox_stats(&mut request, &mut stats);
    for s in &stats {
        match &s.attributes {
            None => assert!(case.selector.is_empty()),
            Some(a) => {
                assert!(
                    !matches!(case.model.view(&a.id, &HashMap::new()), SlotView::Unclaimed),
                    "an unclaimed slot's stats were returned"
                );
                assert_no_cold_label(&a.labels);
                assert_no_token(a);
                assert!(matches(&case.selector, &a.labels));
            }
        }
    }
    for (item, without) in case.items.iter().zip(&case.stats_without_attributes) {
        let mut response = cri::PodSandboxStatsResponse {
            stats: Some(stats_of(item, *without)),
        };
        let view = case.model.view(&item.id, &item.labels);
        match case.rewriter.pod_sandbox_stats(&mut response, &item.id) {
            Err(ShimError::HiddenSandboxStats { requested_id }) => {
                assert!(matches!(view, SlotView::Unclaimed) && !without);
                assert_eq!(requested_id, item.id);
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(()) => {
                assert!(*without || !matches!(view, SlotView::Unclaimed));
                if let Some(a) = response.stats.as_ref().and_then(|s| s.attributes.as_ref()) {
                    check_returned(
                        &case.model,
                        item,
                        &a.metadata,
                        &a.labels,
                        &a.annotations,
                        None,
                    );
                }
            }
        }
    }
}

fn check_events(case: &Case) {
    for (item, network) in case.items.iter().zip(&case.networks) {
        let view = case.model.view(&item.id, &item.labels);
        let mut event = cri::ContainerEventResponse {
            container_id: item.id.clone(),
            pod_sandbox_status: Some(status_of(item, network.clone())),
            ..Default::default()
        };
        let kept = case.rewriter.container_event(&mut event);
        assert_eq!(kept, !matches!(view, SlotView::Unclaimed));
        if kept {
            let status = event.pod_sandbox_status.as_ref().expect("status kept");
            check_returned(
                &case.model,
                item,
                &status.metadata,
                &status.labels,
                &status.annotations,
                Some(&status.runtime_handler),
            );
        }
        // A sandbox's own event without a status names it as the container.
        let mut bare = cri::ContainerEventResponse {
            container_id: item.id.clone(),
            ..Default::default()
        };
        let by_id = case.model.view(&item.id, &HashMap::new());
        assert_eq!(
            case.rewriter.container_event(&mut bare),
            !matches!(by_id, SlotView::Unclaimed)
        );
    }
}

fuzz_target!(|input: Input| {
    let case = build(&input);
    check_list(&case);
    check_status(&case);
    check_stats(&case);
    check_events(&case);
});
