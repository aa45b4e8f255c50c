//! What kubelet sees of slots: unclaimed slots are hidden from every sandbox
//! list, status, stats and event answer; claimed slots are reported with
//! their pod's own identity; cold-started sandboxes of an exposed handler
//! are reported with that handler.
//!
//! For every sandbox in a `ListPodSandbox`, `PodSandboxStatus`,
//! `ListPodSandboxStats` or `PodSandboxStats` answer, or in a container
//! event's sandbox status, the shim asks [`SlotSource::view`], by the id
//! upstream reports (so prefix lookups are covered too):
//! - [`SlotView::NotASlot`]: upstream's item, whatever `fast-sandbox.io/*`
//!   slot labels it carries (a pod's own labels make nothing a slot), except
//!   for the reserved [`RUNTIME_HANDLER_LABEL`] (below);
//! - [`SlotView::Unclaimed`]: dropped from lists and event streams; a status
//!   or stats call for it answers exactly what containerd 1.6 answers for an
//!   unknown id;
//! - [`SlotView::Claimed`]: metadata, labels and annotations from the pod's
//!   config; in lists and status also `runtime_handler` (the exposed one)
//!   and `created_at` (the claim time); in status also
//!   `linux.namespaces.options` (network, pid, ipc: what containerd copies
//!   from the config) and the verbose info ([`verbose`]).
//!
//! Cold misses: a `RunPodSandbox` of an exposed handler that starts cold is
//! forwarded with the upstream handler and the label
//! `RUNTIME_HANDLER_LABEL=<exposed>` (intercept.rs; a pod's own value is
//! replaced). In every answer about an ordinary sandbox whose labels carry
//! that label with a value that is an exposed handler:
//! - the label is taken out of `labels` (and of `config.labels` in the
//!   verbose info), so it never shows and never matches a selector;
//! - `runtime_handler` (and the verbose `runtimeHandler`) becomes that value
//!   only if the [`HandlerMap`] maps it to the handler upstream runs the
//!   sandbox with. A pod that sets the label itself on a handler the shim
//!   does not expose is forwarded untouched; its label then still never
//!   shows, and it can at most make its sandbox report an exposed alias of
//!   its own runtime, never another runtime. Stats carry no handler, so
//!   there only the label is taken out.
//!
//! Label selectors: upstream would filter claimed slots on their
//! placeholder labels, so the shim takes the selector off the request
//! ([`take_sandbox_selector`]), forwards the rest (id, state) and applies
//! the selector itself to the rewritten items, with containerd's
//! exact-match semantics.
//!
//! Not rewritten: `network` in status (the slot's IP: right for the `keep`
//! network mode), `state`, and the CPU, memory, network and process numbers
//! of sandbox stats (see [`pod_sandbox_stats`]). Container calls need
//! nothing: containers carry their own config, labels and annotations, and
//! containerd builds their spec from the `sandbox_config` kubelet sends.
//! Calls that only *name* a sandbox are refused or forwarded before upstream
//! sees them (server.rs).

mod verbose;

use std::collections::HashMap;

use fast_sandbox_proto::cri;

use crate::{
    error::ShimError,
    slots::{ClaimedPod, HandlerMap, SlotView, Slots, RUNTIME_HANDLER_LABEL},
};

/// Key of containerd's verbose JSON in `PodSandboxStatusResponse.info`.
const VERBOSE_INFO_KEY: &str = "info";

/// A label selector taken off a list request; empty matches everything.
pub(crate) type Selector = HashMap<String, String>;

/// Takes the label selector off a `ListPodSandbox` filter, leaving id and
/// state for upstream.
pub(crate) fn take_sandbox_selector(filter: &mut Option<cri::PodSandboxFilter>) -> Selector {
    filter
        .as_mut()
        .map(|f| std::mem::take(&mut f.label_selector))
        .unwrap_or_default()
}

/// Takes the label selector off a `ListPodSandboxStats` filter, leaving the
/// id for upstream. A missing filter becomes an empty one: with none,
/// containerd 1.6 fails the whole call if any sandbox (an invisible dead
/// slot too) is not ready, naming it; with one it skips such sandboxes.
/// kubelet always sends one.
pub(crate) fn take_stats_selector(filter: &mut Option<cri::PodSandboxStatsFilter>) -> Selector {
    std::mem::take(&mut filter.get_or_insert_with(Default::default).label_selector)
}

fn selected(selector: &Selector, labels: &HashMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|got| got == v))
}

/// What an ordinary sandbox's labels say about a cold start.
#[derive(Debug, PartialEq, Eq)]
enum Cold {
    /// No [`RUNTIME_HANDLER_LABEL`] naming an exposed handler: untouched.
    No,
    /// The label was taken out; `Some(exposed)` is the handler to report.
    Stripped(Option<String>),
}

/// Takes [`RUNTIME_HANDLER_LABEL`] out of `labels` if its value is an
/// exposed handler, and returns that handler to report if it maps to
/// `upstream_handler` (`None`: unknown, as in stats).
fn take_cold_label(
    handlers: &HandlerMap,
    labels: &mut HashMap<String, String>,
    upstream_handler: Option<&str>,
) -> Cold {
    let Some(exposed) = labels.get(RUNTIME_HANDLER_LABEL) else {
        return Cold::No;
    };
    let Some(mapped) = handlers.upstream_for(exposed) else {
        return Cold::No;
    };
    let reports = upstream_handler == Some(mapped);
    let exposed = labels.remove(RUNTIME_HANDLER_LABEL);
    Cold::Stripped(exposed.filter(|_| reports))
}

/// Hides unclaimed slots, rewrites claimed ones and cold starts, then
/// applies `selector`. In place: no allocation but the claimed items' new
/// identity.
pub(crate) fn list_pod_sandbox(
    slots: &Slots,
    items: &mut Vec<cri::PodSandbox>,
    selector: &Selector,
) {
    items.retain_mut(|item| sandbox_item(slots, item, selector));
}

/// One item of a `ListPodSandbox` answer: rewritten, and whether it stays
/// (see [`list_pod_sandbox`]).
pub(crate) fn sandbox_item(slots: &Slots, item: &mut cri::PodSandbox, selector: &Selector) -> bool {
    match slots.source.view(&item.id, &item.labels) {
        SlotView::NotASlot => {
            let cold = take_cold_label(
                &slots.handlers,
                &mut item.labels,
                Some(&item.runtime_handler),
            );
            if let Cold::Stripped(Some(exposed)) = cold {
                item.runtime_handler = exposed;
            }
            selected(selector, &item.labels)
        }
        SlotView::Unclaimed => false,
        SlotView::Claimed(pod) => {
            if !selected(selector, &pod.config.labels) {
                return false;
            }
            item.metadata.clone_from(&pod.config.metadata);
            item.labels.clone_from(&pod.config.labels);
            item.annotations.clone_from(&pod.config.annotations);
            item.runtime_handler.clone_from(&pod.exposed_handler);
            item.created_at = pod.claimed_at_ns;
            true
        }
    }
}

/// Rewrites a `PodSandboxStatus` answer; an unclaimed slot becomes
/// containerd's not-found error.
pub(crate) fn pod_sandbox_status(
    slots: &Slots,
    response: &mut cri::PodSandboxStatusResponse,
) -> Result<(), ShimError> {
    match response.status.as_mut() {
        None => Ok(()),
        Some(status) => sandbox_status(slots, status, &mut response.info),
    }
}

/// Rewrites one sandbox status and its verbose `info` (empty if none).
fn sandbox_status(
    slots: &Slots,
    status: &mut cri::PodSandboxStatus,
    info: &mut HashMap<String, String>,
) -> Result<(), ShimError> {
    let pod = match slots.source.view(&status.id, &status.labels) {
        SlotView::NotASlot => {
            cold_status(&slots.handlers, status, info);
            return Ok(());
        }
        SlotView::Unclaimed => return Err(ShimError::HiddenSandboxStatus),
        SlotView::Claimed(pod) => pod,
    };
    status.metadata.clone_from(&pod.config.metadata);
    status.labels.clone_from(&pod.config.labels);
    status.annotations.clone_from(&pod.config.annotations);
    status.runtime_handler.clone_from(&pod.exposed_handler);
    status.created_at = pod.claimed_at_ns;
    // containerd reports no IP once the sandbox's network is torn down
    // (stopped): the pod's own IPs replace the slot's only while there is one.
    let has_ip = status.network.as_ref().is_some_and(|n| !n.ip.is_empty());
    if let (Some(ips), true) = (&pod.network, has_ip) {
        status.network = Some(cri::PodSandboxNetworkStatus {
            ip: ips.ip.clone(),
            additional_ips: ips
                .additional
                .iter()
                .map(|ip| cri::PodIp { ip: ip.clone() })
                .collect(),
        });
    }
    let ns = pod
        .config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref());
    status.linux = Some(cri::LinuxPodSandboxStatus {
        namespaces: Some(cri::Namespace {
            options: Some(cri::NamespaceOption {
                network: ns.map_or(0, |n| n.network),
                pid: ns.map_or(0, |n| n.pid),
                ipc: ns.map_or(0, |n| n.ipc),
                ..Default::default()
            }),
        }),
    });
    if let Some(raw) = info.get_mut(VERBOSE_INFO_KEY) {
        match verbose::rewrite_info(raw, &status.id, &pod) {
            Ok(rewritten) => *raw = rewritten,
            Err(err) => {
                // Better no verbose info than the placeholder's.
                tracing::warn!(
                    sandbox_id = %status.id,
                    error = %err,
                    "cannot rewrite the verbose info of a claimed slot; dropping it"
                );
                info.remove(VERBOSE_INFO_KEY);
            }
        }
    }
    Ok(())
}

/// The status of an ordinary sandbox: a cold start of an exposed handler
/// loses the reserved label and reports that handler, in the verbose info
/// too.
fn cold_status(
    handlers: &HandlerMap,
    status: &mut cri::PodSandboxStatus,
    info: &mut HashMap<String, String>,
) {
    let exposed = match take_cold_label(handlers, &mut status.labels, Some(&status.runtime_handler))
    {
        Cold::No => return,
        Cold::Stripped(exposed) => exposed,
    };
    if let Some(exposed) = &exposed {
        status.runtime_handler.clone_from(exposed);
    }
    if let Some(raw) = info.get_mut(VERBOSE_INFO_KEY) {
        match verbose::rewrite_cold_info(raw, exposed.as_deref()) {
            Ok(rewritten) => *raw = rewritten,
            Err(err) => {
                // Better no verbose info than one that tells it apart.
                tracing::warn!(
                    sandbox_id = %status.id,
                    error = %err,
                    "cannot rewrite the verbose info of a cold start; dropping it"
                );
                info.remove(VERBOSE_INFO_KEY);
            }
        }
    }
}

fn rewrite_attributes(attributes: &mut cri::PodSandboxAttributes, pod: &ClaimedPod) {
    attributes.metadata.clone_from(&pod.config.metadata);
    attributes.labels.clone_from(&pod.config.labels);
    attributes.annotations.clone_from(&pod.config.annotations);
}

/// A claimed slot's stats: the pod's attributes, and CPU and memory of the
/// pod's cgroup when the slot source measured them (upstream's describe the
/// placeholder's cgroup).
fn rewrite_claimed_stats(slots: &Slots, stats: &mut cri::PodSandboxStats, pod: &ClaimedPod) {
    let Some(attributes) = stats.attributes.as_mut() else {
        return;
    };
    rewrite_attributes(attributes, pod);
    if let Some(linux) = stats.linux.as_mut() {
        if let Some(usage) = slots.source.pod_usage(&attributes.id, pod) {
            let mut cpu = usage.cpu;
            // containerd 2.x reports no pod-level `usage_nano_cores` on
            // Linux (1.6 does): a cold pod's answer has none, so neither
            // does a warm one's.
            if linux
                .cpu
                .as_ref()
                .is_some_and(|c| c.usage_nano_cores.is_none())
            {
                cpu.usage_nano_cores = None;
            }
            linux.cpu = Some(cpu);
            linux.memory = Some(usage.memory);
        }
    }
}

/// What a stats item is: `None` for an item without attributes (reported
/// untouched).
fn view_stats(slots: &Slots, stats: &cri::PodSandboxStats) -> Option<SlotView> {
    let attributes = stats.attributes.as_ref()?;
    Some(slots.source.view(&attributes.id, &attributes.labels))
}

/// Hides unclaimed slots, rewrites the attributes of claimed ones (see
/// [`pod_sandbox_stats`]) and cold starts, then applies `selector`.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn list_pod_sandbox_stats(
    slots: &Slots,
    stats: &mut Vec<cri::PodSandboxStats>,
    selector: &Selector,
) {
    stats.retain_mut(|item| stats_item(slots, item, selector));
}

/// One item of a `ListPodSandboxStats` answer: rewritten, and whether it
/// stays (see [`list_pod_sandbox_stats`]).
pub(crate) fn stats_item(
    slots: &Slots,
    item: &mut cri::PodSandboxStats,
    selector: &Selector,
) -> bool {
    match view_stats(slots, item) {
        None => selector.is_empty(),
        Some(SlotView::Unclaimed) => false,
        Some(SlotView::NotASlot) => item.attributes.as_mut().is_some_and(|a| {
            take_cold_label(&slots.handlers, &mut a.labels, None);
            selected(selector, &a.labels)
        }),
        Some(SlotView::Claimed(pod)) => {
            if !selected(selector, &pod.config.labels) {
                return false;
            }
            rewrite_claimed_stats(slots, item, &pod);
            true
        }
    }
}

/// Rewrites a `PodSandboxStats` answer: attributes (metadata, labels,
/// annotations) of a claimed slot become the pod's, a cold start loses the
/// reserved label; an unclaimed slot becomes containerd's not-found error
/// for `requested_id`.
///
/// containerd reads CPU and memory from the stored `cgroup_parent`, which
/// for a slot is the placeholder's per-slot cgroup, not the pod's: for a
/// claimed slot those come from the slot source's reading of the pod's
/// cgroup ([`SlotSource::pod_usage`](crate::slots::SlotSource::pod_usage)).
/// Network, process and container numbers are upstream's (the slot's netns
/// and containers are the pod's).
pub(crate) fn pod_sandbox_stats(
    slots: &Slots,
    response: &mut cri::PodSandboxStatsResponse,
    requested_id: &str,
) -> Result<(), ShimError> {
    let Some(stats) = response.stats.as_mut() else {
        return Ok(());
    };
    match view_stats(slots, stats) {
        None => Ok(()),
        Some(SlotView::NotASlot) => {
            if let Some(attributes) = stats.attributes.as_mut() {
                take_cold_label(&slots.handlers, &mut attributes.labels, None);
            }
            Ok(())
        }
        Some(SlotView::Unclaimed) => Err(ShimError::HiddenSandboxStats {
            requested_id: requested_id.to_owned(),
        }),
        Some(SlotView::Claimed(pod)) => {
            rewrite_claimed_stats(slots, stats, &pod);
            Ok(())
        }
    }
}

/// Rewrites one container event (containerd 1.7 and later send them; 1.6
/// answers `Unimplemented`): its sandbox status as in `PodSandboxStatus`.
/// `false`: the event is about an unclaimed slot and is dropped.
pub(crate) fn container_event(slots: &Slots, event: &mut cri::ContainerEventResponse) -> bool {
    match event.pod_sandbox_status.as_mut() {
        Some(status) => sandbox_status(slots, status, &mut HashMap::new()).is_ok(),
        // A sandbox's own events name it as the container.
        None => !matches!(
            slots.source.view(&event.container_id, &HashMap::new()),
            SlotView::Unclaimed
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::slots::{Claim, ClaimFailed, ClaimedSlot, NoSlot, SlotSource, SLOT_LABEL};

    /// Ids starting `u` are unclaimed slots, `c` claimed ones.
    #[derive(Debug)]
    struct ByPrefix(Arc<ClaimedPod>);

    #[tonic::async_trait]
    impl SlotSource for ByPrefix {
        async fn claim(&self, _: &Claim) -> Result<Result<ClaimedSlot, NoSlot>, ClaimFailed> {
            Ok(Err(NoSlot::NoPool))
        }

        fn view(&self, id: &str, _: &HashMap<String, String>) -> SlotView {
            match id.as_bytes().first() {
                Some(b'u') => SlotView::Unclaimed,
                Some(b'c') => SlotView::Claimed(Arc::clone(&self.0)),
                _ => SlotView::NotASlot,
            }
        }

        async fn removed(&self, _: &str) {}
    }

    fn slots() -> Slots {
        Slots {
            handlers: HandlerMap::new([("fast-runc", "runc"), ("fast-gvisor", "runsc")]),
            source: Arc::new(ByPrefix(pod())),
        }
    }

    fn claimed_pod(slots: &Slots) -> Arc<ClaimedPod> {
        match slots.source.view("c", &HashMap::new()) {
            SlotView::Claimed(pod) => pod,
            other => panic!("{other:?}"),
        }
    }

    fn pod() -> Arc<ClaimedPod> {
        Arc::new(ClaimedPod {
            config: verbose::tests::probe_config(),
            exposed_handler: "fast-runc".into(),
            claimed_at_ns: 42,
            network: None,
        })
    }

    fn placeholder_labels() -> HashMap<String, String> {
        HashMap::from([
            (SLOT_LABEL.into(), "unclaimed".into()),
            ("fast-sandbox.io/pool".into(), "p".into()),
            ("fast-sandbox.io/slot-token".into(), "t".into()),
        ])
    }

    fn item(id: &str) -> cri::PodSandbox {
        cri::PodSandbox {
            id: id.into(),
            metadata: Some(cri::PodSandboxMetadata {
                name: format!("name-{id}"),
                uid: format!("uid-{id}"),
                namespace: "ns".into(),
                attempt: 0,
            }),
            state: 0,
            created_at: 7,
            labels: placeholder_labels(),
            annotations: HashMap::from([("a".into(), "b".into())]),
            runtime_handler: "runc".into(),
        }
    }

    #[test]
    fn lists_hide_rewrite_and_select() {
        let slots = slots();
        let pod = claimed_pod(&slots);
        let mut items = vec![item("o1"), item("u1"), item("c1")];
        list_pod_sandbox(&slots, &mut items, &Selector::new());
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["o1", "c1"]);
        assert_eq!(items[0], item("o1"));
        let claimed = &items[1];
        assert_eq!(claimed.metadata, pod.config.metadata);
        assert_eq!(claimed.labels, pod.config.labels);
        assert_eq!(claimed.annotations, pod.config.annotations);
        assert_eq!(claimed.runtime_handler, "fast-runc");
        assert_eq!(claimed.created_at, 42);

        // A placeholder label selects the ordinary sandbox carrying it, not
        // the claimed slot.
        let mut items = vec![item("o1"), item("u1"), item("c1")];
        let selector = Selector::from([(SLOT_LABEL.into(), "unclaimed".into())]);
        list_pod_sandbox(&slots, &mut items, &selector);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].id, "o1");

        let mut items = vec![item("o1"), item("u1"), item("c1")];
        let selector = Selector::from([("app".into(), "probe".into())]);
        list_pod_sandbox(&slots, &mut items, &selector);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].id, "c1");
    }

    /// An ordinary sandbox `id` with `labels`, run with `handler` upstream.
    fn cold_item(id: &str, handler: &str, labels: &[(&str, &str)]) -> cri::PodSandbox {
        cri::PodSandbox {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            runtime_handler: handler.into(),
            ..item(id)
        }
    }

    #[test]
    fn cold_starts_report_the_exposed_handler() {
        let slots = slots();
        let app = ("app", "web");
        let mut items = vec![
            // A cold miss of fast-runc, as the shim forwarded it.
            cold_item("o1", "runc", &[app, (RUNTIME_HANDLER_LABEL, "fast-runc")]),
            // The label claims another runtime: the handler stays.
            cold_item("o2", "runc", &[app, (RUNTIME_HANDLER_LABEL, "fast-gvisor")]),
            // Not an exposed handler: a pod's own label, untouched.
            cold_item("o3", "runc", &[app, (RUNTIME_HANDLER_LABEL, "mine")]),
            cold_item("o4", "runc", &[app]),
        ];
        list_pod_sandbox(&slots, &mut items, &Selector::new());
        let handlers: Vec<&str> = items.iter().map(|i| i.runtime_handler.as_str()).collect();
        assert_eq!(handlers, ["fast-runc", "runc", "runc", "runc"]);
        let only_app = HashMap::from([("app".to_owned(), "web".to_owned())]);
        assert_eq!(items[0].labels, only_app);
        assert_eq!(items[1].labels, only_app);
        assert_eq!(items[2].labels.len(), 2);
        assert_eq!(items[3].labels, only_app);

        // The reserved label never matches once it is taken out.
        for value in ["fast-runc", "fast-gvisor"] {
            let mut items = vec![
                cold_item("o1", "runc", &[(RUNTIME_HANDLER_LABEL, "fast-runc")]),
                cold_item("o2", "runc", &[(RUNTIME_HANDLER_LABEL, "fast-gvisor")]),
            ];
            let selector = Selector::from([(RUNTIME_HANDLER_LABEL.into(), value.into())]);
            list_pod_sandbox(&slots, &mut items, &selector);
            assert!(items.is_empty(), "{value}");
        }

        // Status: the verbose info too.
        let info = concat!(
            r#"{"pid":1,"runtimeHandler":"runc","config":{"metadata":{"name":"web"},"#,
            r#""labels":{"app":"web","fast-sandbox.io/runtime-handler":"fast-runc"}}}"#
        )
        .to_owned();
        let mut response = cri::PodSandboxStatusResponse {
            status: Some(cri::PodSandboxStatus {
                id: "o1".into(),
                labels: items_labels(&[app, (RUNTIME_HANDLER_LABEL, "fast-runc")]),
                runtime_handler: "runc".into(),
                ..Default::default()
            }),
            info: HashMap::from([(VERBOSE_INFO_KEY.into(), info)]),
            ..Default::default()
        };
        pod_sandbox_status(&slots, &mut response).expect("visible");
        let status = response.status.as_ref().expect("status");
        assert_eq!(status.runtime_handler, "fast-runc");
        assert_eq!(status.labels, only_app);
        assert_eq!(
            response.info[VERBOSE_INFO_KEY],
            r#"{"pid":1,"runtimeHandler":"fast-runc","config":{"metadata":{"name":"web"},"labels":{"app":"web"}}}"#
        );

        // Stats: no handler to check, the label goes.
        let stats = |labels| cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: "o1".into(),
                labels,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut all = vec![stats(items_labels(&[
            app,
            (RUNTIME_HANDLER_LABEL, "fast-runc"),
        ]))];
        list_pod_sandbox_stats(&slots, &mut all, &Selector::new());
        assert_eq!(
            all[0].attributes.as_ref().map(|a| &a.labels),
            Some(&only_app)
        );
        let mut one = cri::PodSandboxStatsResponse {
            stats: Some(stats(items_labels(&[
                app,
                (RUNTIME_HANDLER_LABEL, "fast-gvisor"),
            ]))),
        };
        pod_sandbox_stats(&slots, &mut one, "o1").expect("visible");
        let attributes = one.stats.and_then(|s| s.attributes).expect("attributes");
        assert_eq!(attributes.labels, only_app);
    }

    fn items_labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn events_of_unclaimed_slots_are_dropped() {
        let slots = slots();
        let event = |id: &str, status: Option<cri::PodSandboxStatus>| cri::ContainerEventResponse {
            container_id: id.into(),
            pod_sandbox_status: status,
            ..Default::default()
        };
        let status = |id: &str, labels: &[(&str, &str)]| cri::PodSandboxStatus {
            id: id.into(),
            labels: items_labels(labels),
            runtime_handler: "runc".into(),
            ..Default::default()
        };
        assert!(!container_event(&slots, &mut event("u1", None)));
        assert!(!container_event(
            &slots,
            &mut event("x", Some(status("u1", &[])))
        ));
        assert!(container_event(&slots, &mut event("o1", None)));

        let mut claimed = event("x", Some(status("c1", &[])));
        assert!(container_event(&slots, &mut claimed));
        let got = claimed.pod_sandbox_status.expect("status");
        assert_eq!(got.runtime_handler, "fast-runc");
        assert_eq!(got.labels, claimed_pod(&slots).config.labels);

        let mut cold = event(
            "x",
            Some(status("o1", &[(RUNTIME_HANDLER_LABEL, "fast-runc")])),
        );
        assert!(container_event(&slots, &mut cold));
        let got = cold.pod_sandbox_status.expect("status");
        assert_eq!(got.runtime_handler, "fast-runc");
        assert!(got.labels.is_empty());
    }

    #[test]
    fn a_rebound_pods_ips_replace_the_slots_while_it_has_one() {
        let rebound = Arc::new(ClaimedPod {
            network: Some(crate::slots::PodIps {
                ip: "10.0.0.9".into(),
                additional: vec!["fd00::9".into()],
            }),
            ..ClaimedPod::clone(&pod())
        });
        let slots = Slots {
            handlers: HandlerMap::new([("fast-runc", "runc")]),
            source: Arc::new(ByPrefix(rebound)),
        };
        let status = |ip: &str| cri::PodSandboxStatusResponse {
            status: Some(cri::PodSandboxStatus {
                id: "c1".into(),
                network: Some(cri::PodSandboxNetworkStatus {
                    ip: ip.into(),
                    additional_ips: Vec::new(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut ready = status("10.0.0.5");
        pod_sandbox_status(&slots, &mut ready).expect("rewritten");
        let net = ready.status.and_then(|s| s.network).expect("network");
        assert_eq!(net.ip, "10.0.0.9");
        assert_eq!(
            net.additional_ips,
            vec![cri::PodIp {
                ip: "fd00::9".into()
            }]
        );

        // Stopped: containerd reports no IP, and neither does the shim.
        let mut stopped = status("");
        pod_sandbox_status(&slots, &mut stopped).expect("rewritten");
        let net = stopped.status.and_then(|s| s.network).expect("network");
        assert_eq!(net.ip, "");
        assert!(net.additional_ips.is_empty());
    }

    #[test]
    fn status_of_unclaimed_is_not_found() {
        let slots = slots();
        let mut response = cri::PodSandboxStatusResponse {
            status: Some(cri::PodSandboxStatus {
                id: "u1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = pod_sandbox_status(&slots, &mut response).expect_err("hidden");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(
            status.message(),
            "an error occurred when try to find sandbox: not found"
        );

        let mut stats = cri::PodSandboxStatsResponse {
            stats: Some(cri::PodSandboxStats {
                attributes: Some(cri::PodSandboxAttributes {
                    id: "u1234".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let err = pod_sandbox_stats(&slots, &mut stats, "u12").expect_err("hidden");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(
            status.message(),
            "an error occurred when trying to find sandbox u12: not found"
        );
    }

    #[test]
    fn verbose_info_that_cannot_be_rewritten_is_dropped() {
        let slots = slots();
        let mut response = cri::PodSandboxStatusResponse {
            status: Some(cri::PodSandboxStatus {
                id: "c1".into(),
                ..Default::default()
            }),
            info: HashMap::from([
                (VERBOSE_INFO_KEY.into(), "not json".into()),
                ("other".into(), "kept".into()),
            ]),
            ..Default::default()
        };
        pod_sandbox_status(&slots, &mut response).expect("claimed");
        assert_eq!(
            response.info,
            HashMap::from([("other".into(), "kept".into())])
        );
    }
}
