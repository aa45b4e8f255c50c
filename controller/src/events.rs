//! Kubernetes Events on `SandboxPool`s and `Sandbox`es: what `kubectl
//! describe` shows an administrator.
//!
//! The reconcilers emit an [`Note`] for every state change they write:
//! each condition whose status or reason changes ([`condition_changes`]:
//! a pool served, not served and why — push failed, node unreachable, agent
//! token rejected —; a `Sandbox` bound, waiting for a node, failed, its pod
//! running or gone), a pool's size pushed to nodes ([`scaled`]), a push
//! that fails on a node, and a deleted pool drained.
//!
//! Events are published in the background ([`KubeEvents`], kube-runtime's
//! [`Recorder`], which folds repeats into a series): a slow or failing
//! Events API never holds a reconcile up, and a full queue drops events
//! (counted in `fast_sandbox_controller_events_total{outcome="dropped"}`).

use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use tokio::sync::mpsc;

use crate::crd::NodePoolStatus;
use crate::metrics::Metrics;

/// The `reportingController` of the controller's Events.
pub const REPORTING_CONTROLLER: &str = "fast-sandbox.io/controller";
/// Events waiting to be published beyond this many are dropped.
const QUEUE: usize = 1024;
/// Nodes named in one `Scaled` event at most.
const NODES_NAMED: usize = 5;

/// One Event, before it is published about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    /// PascalCase, e.g. `PushFailed`.
    pub reason: String,
    /// What was done, e.g. `Ready`, `Scheduled`, `Scale`.
    pub action: String,
    pub message: String,
}

impl Note {
    pub fn normal(reason: &str, action: &str, message: String) -> Self {
        Note {
            warning: false,
            reason: reason.to_owned(),
            action: action.to_owned(),
            message,
        }
    }

    pub fn warning(reason: &str, action: &str, message: String) -> Self {
        Note {
            warning: true,
            ..Note::normal(reason, action, message)
        }
    }
}

/// Where the reconcilers' Events go.
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Publishes `note` about `regarding`, without waiting.
    fn publish(&self, regarding: ObjectReference, note: Note);
}

/// Drops every Event (tools and tests that do not look at Events).
#[derive(Debug, Default)]
pub struct NoEvents;

impl EventSink for NoEvents {
    fn publish(&self, _: ObjectReference, _: Note) {}
}

/// Keeps every Event in memory, as (object name, note): tests assert on it.
#[derive(Debug, Default)]
pub struct RecordedEvents(Mutex<Vec<(String, Note)>>);

impl RecordedEvents {
    /// The Events recorded since the last call.
    pub fn take(&self) -> Vec<(String, Note)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl EventSink for RecordedEvents {
    fn publish(&self, regarding: ObjectReference, note: Note) {
        let name = regarding.name.unwrap_or_default();
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name, note));
    }
}

/// Publishes through the Events API (`events.k8s.io/v1`) from a background
/// task; Events of cluster-scoped objects (`SandboxPool`) land in the
/// `default` namespace, as kube-runtime's [`Recorder`] does.
#[derive(Debug)]
pub struct KubeEvents {
    queue: mpsc::Sender<(ObjectReference, Note)>,
    metrics: Arc<Metrics>,
}

impl KubeEvents {
    /// Starts the publishing task (needs a Tokio runtime); `instance` is
    /// this replica (its pod name).
    pub fn start(client: Client, instance: Option<String>, metrics: Arc<Metrics>) -> Self {
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: REPORTING_CONTROLLER.to_owned(),
                instance,
            },
        );
        let (queue, mut pending) = mpsc::channel::<(ObjectReference, Note)>(QUEUE);
        let counted = metrics.clone();
        tokio::spawn(async move {
            while let Some((regarding, note)) = pending.recv().await {
                let event = Event {
                    type_: if note.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: note.reason,
                    note: Some(note.message),
                    action: note.action,
                    secondary: None,
                };
                match recorder.publish(&event, &regarding).await {
                    Ok(()) => counted.event("published"),
                    Err(error) => {
                        counted.event("failed");
                        tracing::debug!(%error, reason = %event.reason, "event not published");
                    }
                }
            }
        });
        KubeEvents { queue, metrics }
    }
}

impl EventSink for KubeEvents {
    fn publish(&self, regarding: ObjectReference, note: Note) {
        if self.queue.try_send((regarding, note)).is_err() {
            self.metrics.event("dropped");
        }
    }
}

/// Condition reasons that are `False` in the normal course of things
/// (a `Sandbox`'s pod starting or done), not worth a warning.
const NORMAL_WHEN_FALSE: &[&str] = &["PodPending", "PodSucceeded"];

/// An Event for each condition of `new` whose status or reason differs
/// from `old`'s condition of the same type (or that is new).
pub fn condition_changes(old: &[Condition], new: &[Condition]) -> Vec<Note> {
    new.iter()
        .filter(|c| {
            !old.iter()
                .any(|o| o.type_ == c.type_ && o.status == c.status && o.reason == c.reason)
        })
        .map(|c| {
            let normal = c.status == "True" || NORMAL_WHEN_FALSE.contains(&c.reason.as_str());
            let note = if normal { Note::normal } else { Note::warning };
            note(&c.reason, &c.type_, c.message.clone())
        })
        .collect()
}

/// A `Scaled` Event when the sizes pushed to nodes changed between the
/// `old` and `new` node lists of a pool (none when they did not).
pub fn scaled(old: &[NodePoolStatus], new: &[NodePoolStatus]) -> Option<Note> {
    let changes: Vec<String> = new
        .iter()
        .filter_map(|n| {
            let before = old.iter().find(|o| o.node == n.node).and_then(|o| o.pushed);
            match (before, n.pushed) {
                (Some(b), Some(a)) if a != b => Some(format!("{} {b}→{a}", n.node)),
                (None, Some(a)) => Some(format!("{} →{a}", n.node)),
                _ => None,
            }
        })
        .collect();
    if changes.is_empty() {
        return None;
    }
    let more = changes.len().saturating_sub(NODES_NAMED);
    let mut message = format!(
        "free warm slots asked of {} nodes: {}",
        changes.len(),
        changes[..changes.len().min(NODES_NAMED)].join(", ")
    );
    if more > 0 {
        message.push_str(&format!(" and {more} more"));
    }
    Some(Note::normal("Scaled", "Scale", message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn cond(type_: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: format!("{reason} message"),
            observed_generation: None,
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn a_condition_change_is_one_event_and_no_change_is_none() {
        let served = cond("Ready", "True", "PoolServed");
        let failing = cond("Ready", "False", "PushFailed");
        assert_eq!(
            condition_changes(
                std::slice::from_ref(&served),
                std::slice::from_ref(&failing)
            ),
            [Note::warning(
                "PushFailed",
                "Ready",
                "PushFailed message".into()
            )]
        );
        assert_eq!(
            condition_changes(&[failing], std::slice::from_ref(&served)),
            [Note::normal(
                "PoolServed",
                "Ready",
                "PoolServed message".into()
            )]
        );
        let same = std::slice::from_ref(&served);
        assert!(condition_changes(same, same).is_empty());
        // A pending pod is not a warning; a failed one is.
        let notes = condition_changes(
            &[],
            &[
                cond("Scheduled", "True", "Bound"),
                cond("Ready", "False", "PodPending"),
            ],
        );
        assert!(notes.iter().all(|n| !n.warning), "{notes:?}");
        assert!(condition_changes(&[], &[cond("Ready", "False", "PodFailed")])[0].warning);
    }

    #[test]
    fn scaled_names_the_nodes_whose_size_changed() {
        let node = |name: &str, pushed: Option<u32>| NodePoolStatus {
            node: name.into(),
            pushed,
            ..Default::default()
        };
        let old = [node("a", Some(2)), node("b", Some(2))];
        assert_eq!(scaled(&old, &old), None);
        let new = [node("a", Some(3)), node("b", Some(2)), node("c", Some(2))];
        let note = scaled(&old, &new).unwrap();
        assert_eq!(note.reason, "Scaled");
        assert_eq!(
            note.message,
            "free warm slots asked of 2 nodes: a 2→3, c →2"
        );
        let many: Vec<NodePoolStatus> = (0..8).map(|i| node(&format!("n{i}"), Some(1))).collect();
        assert!(scaled(&[], &many).unwrap().message.ends_with("and 3 more"));
    }
}
