//! The pool reconcile's decision, apart from its calls: from what was
//! observed (the pool, its old status, each matching node as the
//! directory sees it, the nodes it left) to what to push and the status to
//! write. Pure: no API server, no node directory, no clock of its own.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{NodePoolStatus, SandboxPoolStatus, SlotRange};
use crate::events::{self, Note};
use crate::nodes::NodeError;
use crate::reconcile::condition;
use crate::scoring::PoolState;

/// Re-check a pool this often even when nothing triggers it.
pub(crate) const RESYNC: Duration = Duration::from_secs(300);
/// Retry pushes to nodes that refused or did not answer this soon.
pub(crate) const PUSH_RETRY: Duration = Duration::from_secs(10);

/// The free slots to ask of one node: `min` when the pool is idle, plus
/// the slots pods hold (`total − free` as last reported: the agent reports
/// `total` as free + claimed), capped at `max`. A node whose pods use the
/// pool keeps that much more headroom, up to `max`; when they end it goes
/// back to `min`. Slots the node has not built yet count for nothing, so a
/// raised size is pushed once, not grown on its own shortfall.
pub fn desired_size(range: SlotRange, reported: Option<&PoolState>) -> u32 {
    let in_flight = reported.map_or(0, |p| p.total.saturating_sub(p.free));
    range
        .min
        .saturating_add(in_flight)
        .clamp(range.min, range.max)
}

/// One matching node as the node directory sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Seen {
    /// Ready, with the pool's report there if it has one.
    Ready(Option<PoolState>),
    /// Not ready, or not reporting: why, when the directory knows
    /// (reason, message).
    Problem(&'static str, String),
    /// Reporting, but its node plugin is not ready.
    NotReady,
    /// No report at all.
    Unknown,
}

/// What one reconcile of a valid pool observed.
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    pub range: SlotRange,
    pub old: SandboxPoolStatus,
    pub generation: Option<i64>,
    pub now: Time,
    /// The matching nodes, sorted, each as seen.
    pub matching: Vec<(String, Seen)>,
}

/// What to do: a size per node that can take one, and each node's status
/// entry as it stands before the push.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    /// One per matching node, in order.
    pub nodes: Vec<Step>,
    outcome: Outcome,
}

/// One matching node's part of the plan.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    /// Its status entry, before the push.
    pub entry: NodePoolStatus,
    /// The size to push; `None`: the node cannot take a push now.
    pub push: Option<u32>,
    /// Whether the node reports the pool (a push then makes it ready).
    reported: bool,
}

/// What went wrong across a pool's nodes, for its `Ready` condition.
#[derive(Debug, Default, Clone, PartialEq)]
struct Outcome {
    push_failed: bool,
    /// The most telling reason seen: a node-side problem or a missing pool.
    reason: Option<&'static str>,
}

impl Outcome {
    fn saw(&mut self, reason: &'static str) {
        // A rejected token explains every other symptom: it wins.
        if self.reason != Some("AgentTokenRejected") {
            self.reason = Some(reason);
        }
    }
}

/// The plan for `observed`: every ready node gets its desired size.
pub(crate) fn plan(observed: &Observed) -> Plan {
    let mut outcome = Outcome::default();
    let nodes = observed
        .matching
        .iter()
        .map(|(node, seen)| {
            let before = observed.old.nodes.iter().find(|n| &n.node == node);
            let reported = match seen {
                Seen::Ready(reported) => reported.as_ref(),
                _ => None,
            };
            let desired = desired_size(observed.range, reported);
            let mut entry = NodePoolStatus {
                node: node.clone(),
                ready: false,
                free: reported.map_or(0, |p| p.free),
                total: reported.map_or(0, |p| p.total),
                desired,
                // Still ours until a push to the node changes it.
                pushed: before.and_then(|b| b.pushed),
                message: None,
            };
            entry.message = match seen {
                Seen::Ready(reported) => {
                    let reported = reported.is_some();
                    return Step {
                        entry,
                        push: Some(desired),
                        reported,
                    };
                }
                Seen::Problem(reason, message) => {
                    outcome.saw(reason);
                    Some(message.clone())
                }
                Seen::NotReady => Some("node plugin not ready".into()),
                Seen::Unknown => Some("no report from a node plugin on this node".into()),
            };
            Step {
                entry,
                push: None,
                reported: false,
            }
        })
        .collect();
    Plan { nodes, outcome }
}

impl Plan {
    /// Records the answer of the push to entry `index`.
    pub(crate) fn pushed(&mut self, index: usize, answer: Result<(), &NodeError>) {
        let Some(Step {
            entry,
            push: Some(size),
            reported,
        }) = self.nodes.get_mut(index)
        else {
            return;
        };
        match answer {
            Ok(()) if *reported => {
                entry.pushed = Some(*size);
                entry.ready = true;
            }
            Ok(()) => {
                entry.pushed = Some(*size);
                entry.message = Some("waiting for the node to report the pool".into());
            }
            Err(error) => {
                match error {
                    NodeError::NoSuchPool { .. } => self.outcome.saw("PoolMissingOnNode"),
                    _ => self.outcome.push_failed = true,
                }
                entry.message = Some(error.to_string());
            }
        }
    }

    /// A node the pool left could not be drained: retry soon.
    pub(crate) fn drain_failed(&mut self) {
        self.outcome.push_failed = true;
    }

    /// The status to write, the Events it makes, and when to look again.
    pub(crate) fn status(self, observed: &Observed) -> (SandboxPoolStatus, Vec<Note>, Duration) {
        let Observed {
            old,
            generation,
            now,
            matching,
            ..
        } = observed;
        let nodes: Vec<NodePoolStatus> = self.nodes.into_iter().map(|step| step.entry).collect();
        let ready_nodes = nodes.iter().filter(|n| n.ready).count();
        let (ok, reason, message) = ready_condition(&nodes, matching.is_empty(), &self.outcome);
        let ready = condition(
            &old.conditions,
            "Ready",
            ok,
            reason,
            message,
            *generation,
            now,
        );
        let status = SandboxPoolStatus {
            observed_generation: *generation,
            ready_nodes: u32::try_from(ready_nodes).unwrap_or(u32::MAX),
            free: nodes.iter().map(|n| n.free).fold(0, u32::saturating_add),
            total: nodes.iter().map(|n| n.total).fold(0, u32::saturating_add),
            conditions: vec![ready],
            nodes,
        };
        let notes = events::scaled(&old.nodes, &status.nodes)
            .into_iter()
            .chain(events::condition_changes(
                &old.conditions,
                &status.conditions,
            ))
            .collect();
        let retry = if self.outcome.push_failed {
            PUSH_RETRY
        } else {
            RESYNC
        };
        (status, notes, retry)
    }
}

/// The status of a pool whose spec is invalid: `Ready=False, InvalidSpec`
/// with `message` naming the field, and its Events.
pub(crate) fn invalid(
    old: &SandboxPoolStatus,
    generation: Option<i64>,
    now: &Time,
    message: String,
) -> (SandboxPoolStatus, Vec<Note>) {
    let ready = condition(
        &old.conditions,
        "Ready",
        false,
        "InvalidSpec",
        message,
        generation,
        now,
    );
    let status = SandboxPoolStatus {
        observed_generation: generation,
        conditions: vec![ready],
        ..Default::default()
    };
    let notes = events::condition_changes(&old.conditions, &status.conditions);
    (status, notes)
}

/// The pool's `Ready` condition: (status, reason, message).
fn ready_condition(
    nodes: &[NodePoolStatus],
    none_match: bool,
    outcome: &Outcome,
) -> (bool, &'static str, String) {
    let ready_nodes = nodes.iter().filter(|n| n.ready).count();
    if none_match {
        return (
            false,
            "NoMatchingNodes",
            "no node matches spec.nodeSelector".to_owned(),
        );
    }
    if ready_nodes == nodes.len() {
        return (
            true,
            "PoolServed",
            format!("{ready_nodes} nodes serve the pool"),
        );
    }
    let missing: Vec<String> = nodes
        .iter()
        .filter(|n| !n.ready)
        .take(5)
        .map(|n| {
            format!(
                "{} ({})",
                n.node,
                n.message.as_deref().unwrap_or("not ready")
            )
        })
        .collect();
    let reason = match outcome.reason {
        Some(reason) => reason,
        None if outcome.push_failed => "PushFailed",
        None => "NodesNotReady",
    };
    let more = nodes.len() - ready_nodes;
    (
        false,
        reason,
        format!(
            "{more} of {} nodes do not serve the pool: {}",
            nodes.len(),
            missing.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reported(free: u32, total: u32) -> PoolState {
        PoolState {
            handler: "fast-runc".into(),
            upstream_handler: "runc".into(),
            shape: "seccomp=unconfined".into(),
            free,
            total,
        }
    }

    fn observed(matching: Vec<(&str, Seen)>) -> Observed {
        Observed {
            range: SlotRange { min: 2, max: 6 },
            old: SandboxPoolStatus::default(),
            generation: Some(3),
            now: Time(k8s_openapi::jiff::Timestamp::from_second(1_000).expect("a time")),
            matching: matching
                .into_iter()
                .map(|(n, s)| (n.to_owned(), s))
                .collect(),
        }
    }

    fn ready_condition_of(status: &SandboxPoolStatus) -> (&str, &str, &str) {
        let ready = &status.conditions[0];
        (
            ready.status.as_str(),
            ready.reason.as_str(),
            ready.message.as_str(),
        )
    }

    #[test]
    fn desired_size_follows_demand_within_bounds() {
        let range = SlotRange { min: 2, max: 6 };
        assert_eq!(desired_size(range, None), 2);
        assert_eq!(desired_size(range, Some(&reported(2, 2))), 2);
        assert_eq!(desired_size(range, Some(&reported(0, 2))), 4);
        assert_eq!(desired_size(range, Some(&reported(0, 9))), 6);
        assert_eq!(
            desired_size(SlotRange { min: 0, max: 0 }, Some(&reported(0, 3))),
            0
        );
    }

    /// Only ready nodes are pushed to; each other node's entry says why.
    #[test]
    fn only_ready_nodes_get_a_size_and_the_others_say_why() {
        let seen = observed(vec![
            ("a", Seen::Ready(Some(reported(1, 2)))),
            ("b", Seen::Ready(None)),
            ("c", Seen::NotReady),
            ("d", Seen::Unknown),
            ("e", Seen::Problem("AgentUnreachable", "no stream".into())),
        ]);
        let plan = plan(&seen);
        let pushes: Vec<(&str, Option<u32>)> = plan
            .nodes
            .iter()
            .map(|s| (s.entry.node.as_str(), s.push))
            .collect();
        assert_eq!(
            pushes,
            [
                ("a", Some(3)),
                ("b", Some(2)),
                ("c", None),
                ("d", None),
                ("e", None)
            ]
        );
        let messages: Vec<Option<&str>> = plan
            .nodes
            .iter()
            .map(|s| s.entry.message.as_deref())
            .collect();
        assert_eq!(
            messages,
            [
                None,
                None,
                Some("node plugin not ready"),
                Some("no report from a node plugin on this node"),
                Some("no stream")
            ]
        );
        let (status, _, retry) = plan.status(&seen);
        assert_eq!(ready_condition_of(&status).1, "AgentUnreachable");
        // Nothing pushed failed: the regular resync.
        assert_eq!(retry, RESYNC);
    }

    /// A pushed node that reports the pool is ready; one that does not yet
    /// waits for its report; both count as pushed.
    #[test]
    fn a_push_makes_a_reporting_node_ready_and_a_silent_one_wait() {
        let seen = observed(vec![
            ("a", Seen::Ready(Some(reported(1, 2)))),
            ("b", Seen::Ready(None)),
        ]);
        let mut plan = plan(&seen);
        plan.pushed(0, Ok(()));
        plan.pushed(1, Ok(()));
        let (status, notes, retry) = plan.status(&seen);
        let entries: Vec<(bool, Option<u32>, Option<&str>)> = status
            .nodes
            .iter()
            .map(|n| (n.ready, n.pushed, n.message.as_deref()))
            .collect();
        assert_eq!(
            entries,
            [
                (true, Some(3), None),
                (
                    false,
                    Some(2),
                    Some("waiting for the node to report the pool")
                )
            ]
        );
        assert_eq!((status.ready_nodes, status.free, status.total), (1, 1, 2));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(ready_condition_of(&status).1, "NodesNotReady");
        assert_eq!(retry, RESYNC);
        let reasons: Vec<&str> = notes.iter().map(|n| n.reason.as_str()).collect();
        assert_eq!(reasons, ["Scaled", "NodesNotReady"]);
    }

    /// A refused or lost push retries soon; a missing pool on the node is
    /// the reason an administrator sees, and a rejected token beats both.
    #[test]
    fn failed_pushes_set_the_reason_and_the_retry() {
        let seen = observed(vec![
            ("a", Seen::Ready(Some(reported(1, 2)))),
            ("b", Seen::Ready(None)),
            ("c", Seen::Problem("AgentTokenRejected", "bad token".into())),
        ]);
        let unreachable = NodeError::Unreachable {
            node: "a".into(),
            reason: "reset".into(),
        };
        let missing = NodeError::NoSuchPool {
            node: "b".into(),
            reason: "none".into(),
        };
        let mut only_missing = plan(&observed(vec![("b", Seen::Ready(None))]));
        only_missing.pushed(0, Err(&missing));
        let (status, _, retry) = only_missing.status(&observed(vec![("b", Seen::Ready(None))]));
        assert_eq!(ready_condition_of(&status).1, "PoolMissingOnNode");
        assert_eq!(status.nodes[0].pushed, None);
        assert_eq!(retry, RESYNC);
        let mut plan = plan(&seen);
        plan.pushed(0, Err(&unreachable));
        plan.pushed(1, Err(&missing));
        let (status, _, retry) = plan.status(&seen);
        assert_eq!(retry, PUSH_RETRY);
        let (ok, reason, message) = ready_condition_of(&status);
        assert_eq!((ok, reason), ("False", "AgentTokenRejected"));
        assert!(
            message.starts_with(
                "3 of 3 nodes do not serve the pool: a (node \"a\" is unreachable: reset)"
            ),
            "{message}"
        );
    }

    #[test]
    fn no_matching_node_and_all_served_are_their_own_conditions() {
        let none = observed(vec![]);
        let (status, _, _) = plan(&none).status(&none);
        assert_eq!(
            ready_condition_of(&status),
            (
                "False",
                "NoMatchingNodes",
                "no node matches spec.nodeSelector"
            )
        );
        let one = observed(vec![("a", Seen::Ready(Some(reported(2, 2))))]);
        let mut served = plan(&one);
        served.pushed(0, Ok(()));
        served.drain_failed();
        let (status, _, retry) = served.status(&one);
        assert_eq!(
            ready_condition_of(&status),
            ("True", "PoolServed", "1 nodes serve the pool")
        );
        // A node the pool left could not be drained: look again soon.
        assert_eq!(retry, PUSH_RETRY);
    }

    #[test]
    fn an_invalid_spec_is_a_condition_naming_the_field() {
        let old = SandboxPoolStatus {
            ready_nodes: 2,
            ..Default::default()
        };
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(5).expect("a time"));
        let message = "spec.slotsPerNode: min 9 is above max 2".to_owned();
        let (status, notes) = invalid(&old, Some(4), &now, message.clone());
        assert_eq!(status.ready_nodes, 0);
        assert_eq!(status.observed_generation, Some(4));
        assert_eq!(
            ready_condition_of(&status),
            ("False", "InvalidSpec", message.as_str())
        );
        assert_eq!(notes.len(), 1);
        assert!(notes[0].warning);
    }
}
