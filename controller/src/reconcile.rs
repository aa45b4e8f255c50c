//! What both reconcilers share: the [`Context`] they run in, their
//! [`Error`], the retry policy, and condition bookkeeping.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};

use fast_sandbox_proto::shape::KUBELET_SANDBOX_SECCOMP;

use crate::admit::NodeUsage;
use crate::crd::{Sandbox, SandboxPool};
use crate::events::{EventSink, NoEvents, Note};
use crate::metrics::Metrics;
use crate::nodes::NodeDirectory;
use crate::scoring::{Policy, SlotPolicy};

/// The reconcilers' knobs.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// RuntimeClass name → the runtime handler it names.
    pub fast_classes: HashMap<String, String>,
    /// The seccomp shape of a pool or sandbox that sets none: what kubelet
    /// asks for every pod sandbox (`runtime-default`).
    pub default_seccomp: String,
    /// How the direct `Sandbox` path filters and scores nodes; under
    /// [`SlotPolicy::Require`] a `Sandbox` waits for a free warm slot.
    pub sandbox_policy: Policy,
    /// How long a `Sandbox`'s pod may fail to pull its image before the
    /// `Sandbox` fails and the pod is deleted (its warm slot released).
    pub image_pull_grace: Duration,
}

/// Default of [`ReconcileConfig::image_pull_grace`].
pub const DEFAULT_IMAGE_PULL_GRACE: Duration = Duration::from_secs(120);

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            fast_classes: ["fast-runc", "fast-crun", "fast-gvisor", "fast-kata"]
                .iter()
                .map(|c| ((*c).to_owned(), (*c).to_owned()))
                .collect(),
            default_seccomp: KUBELET_SANDBOX_SECCOMP.into(),
            sandbox_policy: Policy {
                slots: SlotPolicy::Require,
                stale_after_ms: None,
            },
            image_pull_grace: DEFAULT_IMAGE_PULL_GRACE,
        }
    }
}

impl ReconcileConfig {
    /// The fast classes, sorted, for messages.
    pub(crate) fn class_list(&self) -> String {
        let mut classes: Vec<&str> = self.fast_classes.keys().map(String::as_str).collect();
        classes.sort_unstable();
        classes.join(", ")
    }
}

/// Everything a reconcile reads besides its object.
pub struct Context {
    /// The API server.
    pub client: Client,
    /// Node states and pool-size pushes.
    pub nodes: Arc<dyn NodeDirectory>,
    /// The API server's Nodes: labels for pool selectors; taints, cordon
    /// and allocatable for the `Sandbox` path (a reflector over `nodes`
    /// with the image lists dropped).
    pub api_nodes: Store<Node>,
    /// What the bound pods request of each node (the `Sandbox` path's
    /// resource fit); empty until [`run`](crate::run) feeds it a pod watch.
    pub usage: Arc<NodeUsage>,
    /// Every `SandboxPool` (the pool controller's reflector).
    pub pools: Store<SandboxPool>,
    /// Knobs.
    pub config: ReconcileConfig,
    /// Where Events go ([`NoEvents`] unless [`Context::with_events`]).
    pub events: Arc<dyn EventSink>,
    /// Reconcile and placement counts.
    pub metrics: Arc<Metrics>,
    /// Held from reading the snapshot to assuming the placement, so two
    /// `Sandbox` reconciles never both take a pool's last free slot.
    pub(crate) placement: Mutex<()>,
    failures: Mutex<HashMap<String, u32>>,
    /// `Sandbox`es waiting for a free slot: reconciled again whenever the
    /// node directory changes ([`Context::waiting_on_nodes`]).
    waiting: Mutex<HashSet<ObjectRef<Sandbox>>>,
    /// (object, node) → the problem last logged at WARN for it.
    warned: Mutex<HashMap<(String, String), String>>,
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context reading the wall clock.
    pub fn new(
        client: Client,
        nodes: Arc<dyn NodeDirectory>,
        api_nodes: Store<Node>,
        pools: Store<SandboxPool>,
        config: ReconcileConfig,
    ) -> Self {
        Context {
            client,
            nodes,
            api_nodes,
            usage: Arc::default(),
            pools,
            config,
            events: Arc::new(NoEvents),
            metrics: Arc::default(),
            placement: Mutex::new(()),
            failures: Mutex::new(HashMap::new()),
            warned: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashSet::new()),
            clock: Box::new(unix_now_ms),
        }
    }

    /// Replaces the clock (Unix time, ms): tests pin time.
    pub fn with_clock(mut self, clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    /// Sends Events to `events` (the API server's, or a test's record).
    pub fn with_events(mut self, events: Arc<dyn EventSink>) -> Self {
        self.events = events;
        self
    }

    /// Counts into `metrics` (shared with `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Publishes `notes` about `object`, in the background.
    pub(crate) fn emit<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        notes: impl IntoIterator<Item = Note>,
    ) {
        for note in notes {
            self.events.publish(object.object_ref(&()), note);
        }
    }

    /// Now, Unix time in ms.
    pub fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    /// Now, as a Kubernetes timestamp.
    pub(crate) fn now(&self) -> Time {
        let ms = i64::try_from(self.now_ms()).unwrap_or(i64::MAX);
        Time(k8s_openapi::jiff::Timestamp::from_millisecond(ms).unwrap_or_default())
    }

    /// The API server's Node `node`, if there is one.
    pub(crate) fn api_node(&self, node: &str) -> Option<Arc<Node>> {
        self.api_nodes.get(&ObjectRef::new(node))
    }

    /// The node's labels, or `None` when the API server has no such node.
    pub(crate) fn labels_of(&self, node: &str) -> Option<BTreeMap<String, String>> {
        self.api_nodes
            .get(&ObjectRef::new(node))
            .map(|n| n.labels().clone())
    }

    /// Names of the API server's nodes whose labels contain `selector`,
    /// sorted.
    pub(crate) fn nodes_matching(&self, selector: &BTreeMap<String, String>) -> Vec<String> {
        let mut names: Vec<String> = self
            .api_nodes
            .state()
            .iter()
            .filter(|n| selector_matches(selector, n.labels()))
            .map(|n| n.name_any())
            .collect();
        names.sort_unstable();
        names
    }

    /// The retry delay after the `failures`-th failure in a row of `key`.
    fn next_backoff(&self, key: String) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let count = failures.entry(key).or_insert(0);
        *count = count.saturating_add(1);
        backoff_delay(*count)
    }

    /// Marks `sandbox` as waiting for a free slot.
    pub(crate) fn wait_for_slot(&self, sandbox: ObjectRef<Sandbox>) {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(sandbox);
    }

    /// `sandbox` no longer waits (placed, invalid or deleted).
    pub(crate) fn stop_waiting(&self, sandbox: &ObjectRef<Sandbox>) {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(sandbox);
    }

    /// The `Sandbox`es waiting for a slot, each time the node directory
    /// changes (a report with a freed or refilled slot): the `Sandbox`
    /// controller's extra trigger, so a waiting `Sandbox` is placed as soon
    /// as a slot frees instead of on its retry timer. One that no longer
    /// `exists` (deleted while waiting) is forgotten.
    pub fn waiting_on_nodes(
        self: &Arc<Self>,
        exists: impl Fn(&ObjectRef<Sandbox>) -> bool + Send + Sync + 'static,
    ) -> impl futures::Stream<Item = ObjectRef<Sandbox>> + Send + 'static {
        let ctx = self.clone();
        let exists = Arc::new(exists);
        futures::stream::unfold(
            (ctx.nodes.subscribe(), ctx, exists),
            |(mut changes, ctx, exists)| async move {
                changes.changed().await.ok()?;
                let waiting: Vec<ObjectRef<Sandbox>> = {
                    let mut waiting = ctx.waiting.lock().unwrap_or_else(PoisonError::into_inner);
                    waiting.retain(|sandbox| exists(sandbox));
                    waiting.iter().cloned().collect()
                };
                Some((futures::stream::iter(waiting), (changes, ctx, exists)))
            },
        )
        .flatten()
    }

    /// Whether `problem` of `object` on `node` is news (to log at WARN):
    /// the same problem again is not; `None` (it went away) forgets it.
    pub(crate) fn warned_once(&self, object: &str, node: &str, problem: Option<&str>) -> bool {
        warned_once(&self.warned, object, node, problem)
    }

    /// Forgets the failures of `key` (it reconciled).
    pub(crate) fn reset_backoff(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }
}

/// [`Context::warned_once`] over the map `warned`.
fn warned_once(
    warned: &Mutex<HashMap<(String, String), String>>,
    object: &str,
    node: &str,
    problem: Option<&str>,
) -> bool {
    let mut warned = warned.lock().unwrap_or_else(PoisonError::into_inner);
    let key = (object.to_owned(), node.to_owned());
    match problem {
        None => {
            warned.remove(&key);
            false
        }
        Some(p) => warned.insert(key, p.to_owned()).as_deref() != Some(p),
    }
}

/// Patches `.status` of object `name` to `status`, unless it is `old`
/// already (a reconcile that changes nothing writes nothing).
pub async fn write_status<K, S>(api: &Api<K>, name: &str, old: &S, status: S) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize + PartialEq,
{
    if &status == old {
        return Ok(());
    }
    let patch = serde_json::json!({ "status": status_patch(old, &status) });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// `new` as a merge patch over `old`: a field `new` leaves out (an empty
/// list, an unset option) is sent as `null`, or the API server would keep
/// the old value (a pool's node list would keep nodes it no longer has).
fn status_patch<S: serde::Serialize>(old: &S, new: &S) -> serde_json::Value {
    let mut patch = serde_json::to_value(new).unwrap_or_default();
    if let (Ok(serde_json::Value::Object(old)), serde_json::Value::Object(fields)) =
        (serde_json::to_value(old), &mut patch)
    {
        for key in old.keys() {
            fields.entry(key.clone()).or_insert(serde_json::Value::Null);
        }
    }
    patch
}

/// 1 s, 2 s, 4 s … capped at 5 minutes.
pub fn backoff_delay(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(9);
    Duration::from_secs(1u64 << exponent).min(Duration::from_secs(300))
}

/// Whether `labels` contain every pair of `selector` (an empty selector
/// matches every node).
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A key naming an object for the retry bookkeeping.
pub(crate) fn backoff_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

/// Why a reconcile failed; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("object has no {0}")]
    MissingMetadata(&'static str),
}

/// The `error_policy` of both controllers: log, then retry with a delay that
/// doubles with each failure in a row (1 s … 5 min).
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let key = backoff_key(obj.as_ref());
    let delay = ctx.next_backoff(key.clone());
    tracing::warn!(object = %key, %error, retry_in_ms = delay.as_millis() as u64, "reconcile failed");
    Action::requeue(delay)
}

/// A condition `type_` with `status`, keeping the previous transition time
/// when the status did not change.
pub(crate) fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_patch_clears_what_the_new_status_leaves_out() {
        use crate::crd::{NodePoolStatus, SandboxPoolStatus};
        let old = SandboxPoolStatus {
            ready_nodes: 1,
            nodes: vec![NodePoolStatus {
                node: "gone".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let new = SandboxPoolStatus::default();
        let patch = status_patch(&old, &new);
        assert_eq!(patch["nodes"], serde_json::Value::Null);
        assert!(patch.as_object().is_some_and(|o| o.contains_key("nodes")));
        assert_eq!(patch["readyNodes"], 0);
        // Nothing added for fields neither has.
        assert!(!patch
            .as_object()
            .is_some_and(|o| o.contains_key("conditions")));
    }

    #[test]
    fn a_problem_is_warned_once_until_it_changes_or_clears() {
        let ctx_warned = std::sync::Mutex::new(HashMap::new());
        let warn = |problem: Option<&str>| warned_once(&ctx_warned, "p", "a", problem);
        assert!(warn(Some("no pool")));
        assert!(!warn(Some("no pool")));
        assert!(warn(Some("unreachable")));
        assert!(!warn(None));
        assert!(warn(Some("unreachable")));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_delay(1), Duration::from_secs(1));
        assert_eq!(backoff_delay(2), Duration::from_secs(2));
        assert_eq!(backoff_delay(5), Duration::from_secs(16));
        assert_eq!(backoff_delay(50), Duration::from_secs(300));
    }

    #[test]
    fn selectors_need_every_pair() {
        let labels: BTreeMap<String, String> =
            [("a".into(), "1".into()), ("b".into(), "2".into())].into();
        assert!(selector_matches(&BTreeMap::new(), &labels));
        assert!(selector_matches(
            &[("a".into(), "1".into())].into(),
            &labels
        ));
        assert!(!selector_matches(
            &[("a".into(), "2".into())].into(),
            &labels
        ));
        assert!(!selector_matches(
            &[("c".into(), "1".into())].into(),
            &labels
        ));
    }

    #[test]
    fn transition_time_is_kept_while_status_holds() {
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(10).unwrap());
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(20).unwrap());
        let first = condition(&[], "Ready", true, "Ok", "m".into(), Some(1), &t0);
        let same = condition(
            std::slice::from_ref(&first),
            "Ready",
            true,
            "Ok",
            "m2".into(),
            Some(2),
            &t1,
        );
        assert_eq!(same.last_transition_time, t0);
        let flipped = condition(&[first], "Ready", false, "Bad", "m".into(), Some(2), &t1);
        assert_eq!(flipped.last_transition_time, t1);
    }
}
