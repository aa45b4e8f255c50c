//! What kubelet sees of slots: unclaimed slots are hidden from every sandbox
//! list, status and stats answer; claimed slots are reported with their
//! pod's own identity.
//!
//! For every sandbox in a `ListPodSandbox`, `PodSandboxStatus`,
//! `ListPodSandboxStats` or `PodSandboxStats` answer the shim asks
//! [`SlotSource::view`], by the id upstream reports (so prefix lookups are
//! covered too):
//! - [`SlotView::NotASlot`]: upstream's item, untouched, whatever labels it
//!   carries (a pod's own `fast-sandbox.io/*` labels make nothing a slot);
//! - [`SlotView::Unclaimed`]: dropped from lists; a status or stats call
//!   for it answers exactly what containerd 1.6 answers for an unknown id;
//! - [`SlotView::Claimed`]: metadata, labels and annotations from the pod's
//!   config; in lists and status also `runtime_handler` (the exposed one)
//!   and `created_at` (the claim time); in status also
//!   `linux.namespaces.options` (network, pid, ipc: what containerd copies
//!   from the config) and the verbose info ([`verbose`]).
//!
//! Label selectors: upstream would filter claimed slots on their
//! placeholder labels, so the shim takes the selector off the request
//! ([`take_selector`]), forwards the rest (id, state) and applies the
//! selector itself to the rewritten items, with containerd's exact-match
//! semantics.
//!
//! Not rewritten: `network` in status (the slot's IP: right for the `keep`
//! network mode), `state`, and the CPU, memory, network and process numbers
//! of sandbox stats (see [`pod_sandbox_stats`]). Container calls need
//! nothing: containers carry their own config, labels and annotations, and
//! containerd builds their spec from the `sandbox_config` kubelet sends.

mod verbose;

use std::collections::HashMap;

use fast_sandbox_proto::cri;

use crate::{
    error::ShimError,
    slots::{ClaimedPod, SlotSource, SlotView},
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

/// Hides unclaimed slots, rewrites claimed ones, then applies `selector`.
/// In place: no allocation but the claimed items' new identity.
pub(crate) fn list_pod_sandbox(
    slots: &dyn SlotSource,
    items: &mut Vec<cri::PodSandbox>,
    selector: &Selector,
) {
    items.retain_mut(|item| match slots.view(&item.id, &item.labels) {
        SlotView::NotASlot => selected(selector, &item.labels),
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
    });
}

/// Rewrites a `PodSandboxStatus` answer; an unclaimed slot becomes
/// containerd's not-found error.
pub(crate) fn pod_sandbox_status(
    slots: &dyn SlotSource,
    response: &mut cri::PodSandboxStatusResponse,
) -> Result<(), ShimError> {
    let Some(status) = response.status.as_mut() else {
        return Ok(());
    };
    let pod = match slots.view(&status.id, &status.labels) {
        SlotView::NotASlot => return Ok(()),
        SlotView::Unclaimed => return Err(ShimError::HiddenSandboxStatus),
        SlotView::Claimed(pod) => pod,
    };
    status.metadata.clone_from(&pod.config.metadata);
    status.labels.clone_from(&pod.config.labels);
    status.annotations.clone_from(&pod.config.annotations);
    status.runtime_handler.clone_from(&pod.exposed_handler);
    status.created_at = pod.claimed_at_ns;
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
    if let Some(info) = response.info.get_mut(VERBOSE_INFO_KEY) {
        match verbose::rewrite_info(info, &status.id, &pod) {
            Ok(rewritten) => *info = rewritten,
            Err(err) => {
                // Better no verbose info than the placeholder's.
                tracing::warn!(
                    sandbox_id = %status.id,
                    error = %err,
                    "cannot rewrite the verbose info of a claimed slot; dropping it"
                );
                response.info.remove(VERBOSE_INFO_KEY);
            }
        }
    }
    Ok(())
}

fn rewrite_attributes(attributes: &mut cri::PodSandboxAttributes, pod: &ClaimedPod) {
    attributes.metadata.clone_from(&pod.config.metadata);
    attributes.labels.clone_from(&pod.config.labels);
    attributes.annotations.clone_from(&pod.config.annotations);
}

/// What a stats item is: `None` for an item without attributes (reported
/// untouched).
fn view_stats(slots: &dyn SlotSource, stats: &cri::PodSandboxStats) -> Option<SlotView> {
    let attributes = stats.attributes.as_ref()?;
    Some(slots.view(&attributes.id, &attributes.labels))
}

/// Hides unclaimed slots, rewrites the attributes of claimed ones (see
/// [`pod_sandbox_stats`]), then applies `selector`.
pub(crate) fn list_pod_sandbox_stats(
    slots: &dyn SlotSource,
    stats: &mut Vec<cri::PodSandboxStats>,
    selector: &Selector,
) {
    stats.retain_mut(|item| match view_stats(slots, item) {
        None => selector.is_empty(),
        Some(SlotView::Unclaimed) => false,
        Some(SlotView::NotASlot) => item
            .attributes
            .as_ref()
            .is_some_and(|a| selected(selector, &a.labels)),
        Some(SlotView::Claimed(pod)) => {
            if !selected(selector, &pod.config.labels) {
                return false;
            }
            if let Some(attributes) = item.attributes.as_mut() {
                rewrite_attributes(attributes, &pod);
            }
            true
        }
    });
}

/// Rewrites a `PodSandboxStats` answer: attributes (metadata, labels,
/// annotations) of a claimed slot become the pod's; an unclaimed slot
/// becomes containerd's not-found error for `requested_id`.
///
/// The numbers stay upstream's: containerd reads CPU and memory from the
/// stored `cgroup_parent`, which for a slot is the placeholder's per-slot
/// cgroup, not the pod's, so for a claimed slot they describe that cgroup
/// (the pause process only, once the claim moved it). Synthesizing them
/// from the pod's cgroup is a later change.
pub(crate) fn pod_sandbox_stats(
    slots: &dyn SlotSource,
    response: &mut cri::PodSandboxStatsResponse,
    requested_id: &str,
) -> Result<(), ShimError> {
    let Some(stats) = response.stats.as_mut() else {
        return Ok(());
    };
    match view_stats(slots, stats) {
        None | Some(SlotView::NotASlot) => Ok(()),
        Some(SlotView::Unclaimed) => Err(ShimError::HiddenSandboxStats {
            requested_id: requested_id.to_owned(),
        }),
        Some(SlotView::Claimed(pod)) => {
            if let Some(attributes) = stats.attributes.as_mut() {
                rewrite_attributes(attributes, &pod);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::slots::{Claim, ClaimFailed, ClaimedSlot, NoSlot, SLOT_LABEL};

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

    fn pod() -> Arc<ClaimedPod> {
        Arc::new(ClaimedPod {
            config: verbose::tests::probe_config(),
            exposed_handler: "fast-runc".into(),
            claimed_at_ns: 42,
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
        let slots = ByPrefix(pod());
        let mut items = vec![item("o1"), item("u1"), item("c1")];
        list_pod_sandbox(&slots, &mut items, &Selector::new());
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["o1", "c1"]);
        assert_eq!(items[0], item("o1"));
        let claimed = &items[1];
        assert_eq!(claimed.metadata, slots.0.config.metadata);
        assert_eq!(claimed.labels, slots.0.config.labels);
        assert_eq!(claimed.annotations, slots.0.config.annotations);
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

    #[test]
    fn status_of_unclaimed_is_not_found() {
        let slots = ByPrefix(pod());
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
        let slots = ByPrefix(pod());
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
