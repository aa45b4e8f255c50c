//! kube-scheduler extender: `POST /filter` and `POST /prioritize`.
//!
//! Wire format: `k8s.io/kube-scheduler/extender/v1`. Its Go structs carry no
//! JSON tags, so kube-scheduler sends the Go field names (`Pod`, `Nodes`,
//! `NodeNames`) and decodes answers case-insensitively; older releases and
//! most extenders use lower-case names (`pod`, `nodes`, `nodenames`). We
//! accept both and answer in the lower-case form.
//!
//! Only pods whose `runtimeClassName` is a configured fast class are
//! judged; any other pod passes through unfiltered with equal scores, so
//! the extender can be configured for every pod without `managedResources`.
//! Node-name cache mode (`nodeCacheCapable: true`, names only) and full
//! node lists are both served. Rejected nodes are reported as
//! `failedAndUnresolvableNodes`: preempting pods never creates a pool or
//! frees a single-use warm slot, so the scheduler should not try.
//!
//! **Assumptions are bounded by real pods.** A prioritize call counts a
//! slot as taken only for a pod the controller's own watch holds
//! ([`PendingPods`]) under the same namespace, name and UID, still unbound
//! (no `nodeName`) and of a fast runtime class; the slot is judged from
//! that cached pod, not from the caller's copy. One assumption per pod
//! UID. So a caller inventing pods (or without a watch) assumes nothing,
//! and no caller holds more slots than there are pods waiting to be placed.

mod body;
mod tls;
use body::json_response;
pub use body::{json_body, parse_args, ArgsRejection, ExtenderArgs, NodeList, NodeName};
pub use tls::serve_tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use k8s_openapi::api::core::v1::{Pod, PodSecurityContext};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

use fast_sandbox_proto::shape::{ShapeKey, KUBELET_SANDBOX_SECCOMP};

use crate::scoring::{Policy, Rejection, Request, RequestedImage, Scorer, Snapshot, MAX_SCORE};

/// `MaxExtenderPriority` of the v1 extender API: answers are 0..=10.
pub const MAX_EXTENDER_PRIORITY: i64 = 10;

/// Rejected nodes with their reasons, serialized as a `FailedNodesMap`
/// (`{"node": "reason"}`) straight from the rejections: a filter over
/// thousands of nodes then allocates no message per rejected node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailedNodes<'a>(Vec<(NodeName<'a>, Rejection)>);

impl FailedNodes<'_> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Why `node` was rejected.
    pub fn get(&self, node: &str) -> Option<&Rejection> {
        self.0.iter().find(|(n, _)| **n == *node).map(|(_, r)| r)
    }
}

impl Serialize for FailedNodes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (node, reason) in &self.0 {
            // The fixed reasons as plain strings: no formatting machinery
            // for each of thousands of rejected nodes.
            match reason {
                Rejection::Stale { .. } => {
                    map.serialize_entry(&**node, &format_args!("{reason}"))?
                }
                fixed => map.serialize_entry(&**node, fixed_reason(fixed))?,
            }
        }
        map.end()
    }
}

/// The message of a rejection that carries no value (its `Display`).
fn fixed_reason(rejection: &Rejection) -> &'static str {
    match rejection {
        Rejection::UnknownNode => "no fast-sandbox status for this node",
        Rejection::NotReady => "fast-sandbox node plugin not ready",
        Rejection::NoPool => "no warm pool for this runtime handler and shape",
        Rejection::NoFreeSlot => "warm pool has no free slot",
        Rejection::Stale { .. } => "fast-sandbox status is too old",
    }
}

/// `ExtenderFilterResult`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ExtenderFilterResult<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeList>,
    #[serde(rename = "nodenames", skip_serializing_if = "Option::is_none")]
    pub node_names: Option<Vec<NodeName<'a>>>,
    /// Never used: every rejection is unresolvable by preemption.
    #[serde(rename = "failedNodes", skip_serializing_if = "FailedNodes::is_empty")]
    pub failed_nodes: FailedNodes<'a>,
    #[serde(
        rename = "failedAndUnresolvableNodes",
        skip_serializing_if = "FailedNodes::is_empty"
    )]
    pub failed_and_unresolvable_nodes: FailedNodes<'a>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// One entry of a `HostPriorityList`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPriority<'a> {
    #[serde(alias = "Host", borrow)]
    pub host: NodeName<'a>,
    #[serde(alias = "Score")]
    pub score: i64,
}

/// What the extender judges and how.
#[derive(Debug, Clone)]
pub struct ExtenderConfig {
    /// RuntimeClass name → the handler it names (its `handler` field).
    pub fast_classes: HashMap<String, String>,
    pub policy: Policy,
    /// Whether the filter verb removes nodes at all (`--extender-filter`).
    /// Off (the default), every candidate passes and nodes are only
    /// scored, so a fast pod is placed wherever it would be without the
    /// extender, and at worst starts cold. On, nodes the scoring rejects
    /// ([`Rejection`]: no warm pool of the pod's handler and shape, node
    /// plugin not ready or stale, and under [`crate::scoring::SlotPolicy::Require`]
    /// no free slot) are filtered out: a pod that no warm slot fits then
    /// stays Pending although it could start cold.
    pub filter_nodes: bool,
    /// The seccomp shape of every pod's sandbox: kubelet (v1.26 on) always
    /// asks `RuntimeDefault` for it, whatever the pod's own profile
    /// (docs/warm-slots.md, "What kubelet sends"), so `runtime-default`.
    pub default_seccomp: String,
    /// After a fast pod's prioritize call, count a slot of the node it
    /// scored highest as taken for this long (ms), so the next pods are not
    /// all sent to the same node before its status shows the claim. It
    /// should be close to the time from decision to status report (see
    /// docs/scheduling.md). `None`: never.
    pub assume_ttl_ms: Option<u64>,
}

impl Default for ExtenderConfig {
    fn default() -> Self {
        ExtenderConfig {
            fast_classes: ["fast-runc", "fast-crun", "fast-gvisor", "fast-kata"]
                .iter()
                .map(|c| ((*c).to_owned(), (*c).to_owned()))
                .collect(),
            policy: Policy::default(),
            filter_nodes: false,
            default_seccomp: KUBELET_SANDBOX_SECCOMP.into(),
            assume_ttl_ms: Some(DEFAULT_ASSUME_TTL_MS),
        }
    }
}

/// Default of [`ExtenderConfig::assume_ttl_ms`].
pub const DEFAULT_ASSUME_TTL_MS: u64 = 500;

/// The pods waiting to be scheduled, as the controller's watch caches
/// them: what assumptions are checked against.
pub trait PendingPods: Send + Sync + 'static {
    /// The cached pod `namespace`/`name`, if any.
    fn get(&self, namespace: &str, name: &str) -> Option<Arc<Pod>>;
}

impl PendingPods for kube::runtime::reflector::Store<Pod> {
    fn get(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        kube::runtime::reflector::Store::get(
            self,
            &kube::runtime::reflector::ObjectRef::new(name).within(namespace),
        )
    }
}

/// The extender's state: its configuration, the latest snapshot (which a
/// node-status watch or a reload swaps whole) and the placements it assumed.
pub struct Extender {
    config: ExtenderConfig,
    state: Mutex<Ledger>,
    /// Without it, no placement is assumed.
    pods: std::sync::OnceLock<Arc<dyn PendingPods>>,
    /// Request latencies go here; `GET /metrics` serves all of it.
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Extender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extender")
            .field("config", &self.config)
            .field("state", &self.state)
            .field("pods", &self.pods.get().is_some())
            .field("metrics", &self.metrics)
            .finish()
    }
}

#[derive(Debug)]
struct Ledger {
    snapshot: Snapshot,
    assumed: Vec<Assumption>,
}

/// A slot counted as taken on `node` for the pod `pod` until `expires_ms`.
#[derive(Debug, Clone)]
struct Assumption {
    pod: String,
    node: String,
    handler: String,
    shape: String,
    expires_ms: u64,
}

impl Ledger {
    /// Settles assumptions that ran out, and the earlier one of `pod` (a
    /// retry of its scheduling replaces it).
    fn settle(&mut self, now_ms: u64, pod: Option<&str>) {
        let snapshot = &mut self.snapshot;
        self.assumed.retain(|a| {
            let keep = a.expires_ms > now_ms && Some(a.pod.as_str()) != pod;
            if !keep {
                // The pool is gone only if the snapshot was replaced, and
                // then the assumption was not carried over: nothing to undo.
                let _ = snapshot.settle(&a.node, &a.handler, &a.shape);
            }
            keep
        });
    }
}

impl Extender {
    pub fn new(config: ExtenderConfig, snapshot: Snapshot) -> Self {
        Extender {
            config,
            state: Mutex::new(Ledger {
                snapshot,
                assumed: Vec::new(),
            }),
            metrics: Arc::default(),
            pods: std::sync::OnceLock::new(),
        }
    }

    /// Times requests into `metrics` and serves it at `GET /metrics` (the
    /// controller's metrics, shared with the reconcilers).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Where pending pods are looked up before a placement is assumed
    /// (once; later calls are ignored).
    pub fn set_pending_pods(&self, pods: Arc<dyn PendingPods>) {
        let _ = self.pods.set(pods);
    }

    /// The request to assume a slot for: `pod`'s, judged from the cached
    /// copy of the same pod (namespace, name and UID), only while it is
    /// unbound and of a fast class; `None` for any other caller's pod.
    fn assumable(&self, pod: &Pod) -> Option<(String, Request)> {
        let uid = pod.metadata.uid.as_deref().filter(|u| !u.is_empty())?;
        let cached = self.pods.get()?.get(
            pod.metadata.namespace.as_deref()?,
            pod.metadata.name.as_deref()?,
        )?;
        let unbound = cached
            .spec
            .as_ref()
            .is_some_and(|s| s.node_name.as_deref().unwrap_or_default().is_empty());
        if cached.metadata.uid.as_deref() != Some(uid) || !unbound {
            return None;
        }
        Some((uid.to_owned(), self.request_for(&cached)?))
    }

    /// Makes `snapshot` the one later calls are judged against; live
    /// assumptions carry over to pools it still has.
    pub fn replace_snapshot(&self, mut snapshot: Snapshot) {
        let mut state = self.lock();
        let mut assumed = std::mem::take(&mut state.assumed);
        assumed.retain(|a| snapshot.assume(&a.node, &a.handler, &a.shape).is_ok());
        *state = Ledger { snapshot, assumed };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The placement request for `pod`, or `None` when its runtime class is
    /// not a fast one.
    pub fn request_for(&self, pod: &Pod) -> Option<Request> {
        let spec = pod.spec.as_ref()?;
        let class = spec.runtime_class_name.as_deref()?;
        let handler = self.config.fast_classes.get(class)?;
        let images = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .filter_map(|c| c.image.clone())
            .map(|reference| RequestedImage {
                reference,
                size_bytes: None,
            })
            .collect();
        Some(Request {
            handler: handler.clone(),
            shape: pod_shape(spec.security_context.as_ref(), &self.config.default_seccomp),
            images,
        })
    }

    /// The filter verb.
    pub fn filter<'a>(&self, args: ExtenderArgs<'a>, now_ms: u64) -> ExtenderFilterResult<'a> {
        let Some(pod) = args.pod.as_ref() else {
            return ExtenderFilterResult {
                error: "no pod in the extender arguments".into(),
                ..Default::default()
            };
        };
        let Some(request) = self.request_for(pod) else {
            return ExtenderFilterResult {
                nodes: args.nodes,
                node_names: args.node_names,
                ..Default::default()
            };
        };
        if !self.config.filter_nodes {
            let passed = args
                .node_names
                .as_ref()
                .map_or(0, Vec::len)
                .max(args.nodes.as_ref().map_or(0, |l| l.items.len()));
            tracing::info!(
                pod = %pod_name(pod),
                handler = %request.handler,
                shape = %request.shape,
                passed,
                "filter: every node passes (--extender-filter is off)"
            );
            return ExtenderFilterResult {
                nodes: args.nodes,
                node_names: args.node_names,
                ..Default::default()
            };
        }
        let mut state = self.lock();
        state.settle(now_ms, None);
        let scorer = Scorer::new(&state.snapshot, &request, self.config.policy, now_ms);
        let mut failed = Vec::new();
        let mut result = ExtenderFilterResult::default();
        if let Some(names) = args.node_names {
            let mut passed = Vec::with_capacity(names.len());
            for name in names {
                match scorer.score(&name) {
                    Ok(_) => passed.push(name),
                    Err(reason) => failed.push((name, reason)),
                }
            }
            result.node_names = Some(passed);
        }
        if let Some(list) = args.nodes {
            let mut items = Vec::with_capacity(list.items.len());
            for node in list.items {
                let name = node.metadata.name.as_deref().unwrap_or_default();
                match scorer.score(name) {
                    Ok(_) => items.push(node),
                    Err(reason) => failed.push((name.to_owned().into(), reason)),
                }
            }
            result.nodes = Some(NodeList { items });
        }
        tracing::info!(
            pod = %pod_name(pod),
            handler = %request.handler,
            shape = %request.shape,
            rejected = failed.len(),
            "filter"
        );
        result.failed_and_unresolvable_nodes = FailedNodes(failed);
        result
    }

    /// The prioritize verb: every candidate, scored 0..=10; `None` without
    /// a pod.
    pub fn prioritize<'a>(
        &self,
        args: ExtenderArgs<'a>,
        now_ms: u64,
    ) -> Option<Vec<HostPriority<'a>>> {
        let pod = args.pod.as_ref()?;
        let names: Vec<NodeName<'a>> = match (args.node_names, args.nodes) {
            (Some(names), _) => names,
            (None, Some(list)) => list
                .items
                .into_iter()
                .filter_map(|n| n.metadata.name.map(NodeName::from))
                .collect(),
            (None, None) => Vec::new(),
        };
        let Some(request) = self.request_for(pod) else {
            return Some(
                names
                    .into_iter()
                    .map(|host| HostPriority { host, score: 0 })
                    .collect(),
            );
        };
        let assumable = self.assumable(pod);
        let mut state = self.lock();
        if let Some((uid, _)) = &assumable {
            state.settle(now_ms, Some(uid));
        } else {
            state.settle(now_ms, None);
        }
        let scorer = Scorer::new(&state.snapshot, &request, self.config.policy, now_ms);
        // The node this pod most likely goes to: best score, then smallest
        // name (as `Scorer::best`), among nodes with a free slot.
        let mut top: Option<(u8, usize)> = None;
        let mut priorities: Vec<HostPriority<'a>> = Vec::with_capacity(names.len());
        for host in names {
            let (score, free) = scorer.score_and_free(&host);
            if let Ok(score) = score {
                let better = top
                    .is_none_or(|(s, at)| score > s || (score == s && host < priorities[at].host));
                if better && free > 0 {
                    top = Some((score, priorities.len()));
                }
            }
            priorities.push(HostPriority {
                host,
                score: score.map_or(0, to_extender_priority),
            });
        }
        let top = top.map(|(_, at)| priorities[at].host.to_string());
        tracing::info!(
            pod = %pod_name(pod),
            handler = %request.handler,
            shape = %request.shape,
            nodes = priorities.len(),
            best = top.as_deref().unwrap_or("none with a free slot"),
            "prioritize"
        );
        drop(scorer);
        if let (Some(node), Some(ttl), Some((uid, cached))) =
            (top, self.config.assume_ttl_ms, assumable)
        {
            if state
                .snapshot
                .assume(&node, &cached.handler, &cached.shape)
                .is_ok()
            {
                state.assumed.push(Assumption {
                    pod: uid,
                    node,
                    handler: cached.handler,
                    shape: cached.shape,
                    expires_ms: now_ms.saturating_add(ttl),
                });
            }
        }
        Some(priorities)
    }

    /// Placements currently assumed, as (pod, node).
    pub fn assumed(&self) -> Vec<(String, String)> {
        self.lock()
            .assumed
            .iter()
            .map(|a| (a.pod.clone(), a.node.clone()))
            .collect()
    }
}

/// Why a snapshot file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("not a JSON list of node states: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Snapshot(#[from] crate::scoring::SnapshotError),
}

/// A snapshot from a JSON list of [`crate::scoring::NodeState`] (what the
/// `extender --snapshot FILE` mode serves until the node-status watch lands).
pub fn parse_snapshot(json: &[u8]) -> Result<Snapshot, SnapshotFileError> {
    let nodes: Vec<crate::scoring::NodeState> = serde_json::from_slice(json)?;
    Ok(Snapshot::new(nodes)?)
}

impl Extender {
    /// Re-reads a snapshot file and swaps it in; on any error the current
    /// snapshot stays.
    pub fn reload(&self, path: &std::path::Path) -> Result<usize, ReloadError> {
        let json = std::fs::read(path).map_err(|source| ReloadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let snapshot = parse_snapshot(&json).map_err(|source| ReloadError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let nodes = snapshot.len();
        self.replace_snapshot(snapshot);
        Ok(nodes)
    }
}

/// Why a snapshot file could not be reloaded.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("reading {path}: {source}", path = path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("loading {path}: {source}", path = path.display())]
    Parse {
        path: std::path::PathBuf,
        source: SnapshotFileError,
    },
}

/// 0..=100 → 0..=10, rounding half up.
pub fn to_extender_priority(score: u8) -> i64 {
    let scaled = (i64::from(score) * MAX_EXTENDER_PRIORITY * 2 + i64::from(MAX_SCORE))
        / (2 * i64::from(MAX_SCORE));
    scaled.clamp(0, MAX_EXTENDER_PRIORITY)
}

/// The pool shape key of a pod: the sandbox fields a warm slot cannot
/// change once it runs, derived as kubelet builds the sandbox's
/// `LinuxSandboxSecurityContext` (docs/warm-slots.md, "What kubelet sends")
/// and encoded as the node plugin reports pools ([`ShapeKey`]):
/// - seccomp is always `sandbox_seccomp`: kubelet gives every pod sandbox
///   `RuntimeDefault` whatever the pod's `seccompProfile` says (that
///   profile applies to its containers);
/// - `runAsUser`, `runAsGroup` and `seLinuxOptions` are the pod's;
/// - the groups are `fsGroup` and `supplementalGroups` (kubelet sends
///   `fsGroup` first; the key sorts them, as the node plugin does).
pub fn pod_shape(security: Option<&PodSecurityContext>, sandbox_seccomp: &str) -> String {
    let Some(security) = security else {
        return ShapeKey {
            seccomp: sandbox_seccomp,
            ..Default::default()
        }
        .encode();
    };
    let mut groups: Vec<i64> = security.fs_group.into_iter().collect();
    groups.extend(security.supplemental_groups.iter().flatten());
    let selinux = security.se_linux_options.as_ref().map(|se| {
        [&se.user, &se.role, &se.type_, &se.level].map(|part| part.as_deref().unwrap_or_default())
    });
    ShapeKey {
        seccomp: sandbox_seccomp,
        run_as_user: security.run_as_user,
        run_as_group: security.run_as_group,
        supplemental_groups: &groups,
        // All-empty options are no options, as the node plugin reads them.
        selinux: selinux.filter(|parts| parts.iter().any(|p| !p.is_empty())),
    }
    .encode()
}

fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The HTTP routes: `POST /filter`, `POST /prioritize`, `GET /healthz`,
/// `GET /metrics`.
pub fn router(extender: Arc<Extender>) -> Router {
    Router::new()
        .route("/filter", post(filter))
        .route("/prioritize", post(prioritize))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .with_state(extender)
}

async fn metrics(State(extender): State<Arc<Extender>>) -> Response {
    match extender.metrics.encode() {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {error}"),
        )
            .into_response(),
    }
}

async fn filter(
    State(extender): State<Arc<Extender>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let start = Instant::now();
    match parse_args(&headers, &body) {
        Ok(args) => {
            let entries = args.node_names.as_ref().map_or(0, Vec::len);
            let result = extender.filter(args, now_ms());
            let body = json_body(&result, entries);
            extender.metrics.extender_request("filter", start);
            json_response(body)
        }
        Err(rejection) => {
            let result = ExtenderFilterResult {
                error: rejection.message,
                ..Default::default()
            };
            (rejection.status, Json(result)).into_response()
        }
    }
}

async fn prioritize(
    State(extender): State<Arc<Extender>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let start = Instant::now();
    match parse_args(&headers, &body) {
        Ok(args) => match extender.prioritize(args, now_ms()) {
            Some(priorities) => {
                let body = json_body(&priorities, priorities.len());
                extender.metrics.extender_request("prioritize", start);
                json_response(body)
            }
            None => (StatusCode::BAD_REQUEST, "no pod in the extender arguments").into_response(),
        },
        Err(rejection) => (rejection.status, rejection.message).into_response(),
    }
}

/// Serves the extender on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, extender: Arc<Extender>) -> std::io::Result<()> {
    axum::serve(listener, router(extender)).await
}

/// Binds `addr` and serves; the bound address is logged.
pub async fn listen(addr: SocketAddr, extender: Arc<Extender>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "scheduler extender listening");
    serve(listener, extender).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{SELinuxOptions, SeccompProfile};

    use crate::scoring::{NodeState, PoolState};

    fn two_nodes() -> Snapshot {
        let node = |name: &str| NodeState {
            name: name.into(),
            ready: true,
            pools: vec![PoolState {
                handler: "fast-runc".into(),
                upstream_handler: "runc".into(),
                shape: "seccomp=runtime-default".into(),
                free: 1,
                total: 4,
            }],
            images: vec![],
            last_seen_unix_ms: 0,
        };
        Snapshot::new(vec![node("a"), node("b")]).unwrap()
    }

    fn args(uid: &str) -> ExtenderArgs<'static> {
        ExtenderArgs::deserialize(serde_json::json!({
            "pod": {
                "metadata": {"name": uid, "namespace": "ns", "uid": uid},
                "spec": {"runtimeClassName": "fast-runc", "containers": [{"name": "c"}]}
            },
            "nodenames": ["a", "b"]
        }))
        .unwrap()
    }

    /// The controller's pod cache, as a map.
    #[derive(Debug, Default)]
    struct Cache(std::collections::BTreeMap<(String, String), Arc<Pod>>);

    impl PendingPods for Cache {
        fn get(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
            self.0.get(&(namespace.into(), name.into())).cloned()
        }
    }

    /// A cache holding `args(name)`'s pod for each name.
    fn cache(names: &[&str]) -> Cache {
        Cache(
            names
                .iter()
                .filter_map(|n| args(n).pod)
                .map(|p| {
                    let key = (p.metadata.namespace.clone(), p.metadata.name.clone());
                    (
                        (key.0.unwrap_or_default(), key.1.unwrap_or_default()),
                        Arc::new(p),
                    )
                })
                .collect(),
        )
    }

    /// An extender whose pod cache holds pods p1..p9.
    fn with_pods(config: ExtenderConfig) -> Extender {
        let extender = Extender::new(config, two_nodes());
        let names: Vec<String> = (1..10).map(|i| format!("p{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        extender.set_pending_pods(Arc::new(cache(&names)));
        extender
    }

    fn scores(extender: &Extender, uid: &str, now_ms: u64) -> Vec<i64> {
        let answer = extender.prioritize(args(uid), now_ms).unwrap();
        answer.iter().map(|h| h.score).collect()
    }

    #[test]
    fn the_next_pod_sees_the_slot_the_last_one_will_take() {
        let extender = with_pods(ExtenderConfig::default());
        // Equal: the tie goes to a, which is then assumed taken.
        assert_eq!(scores(&extender, "p1", 0), [6, 6]);
        assert_eq!(extender.assumed(), [("p1".into(), "a".into())]);
        // p2 sees a full: b is better and is assumed in turn.
        assert_eq!(scores(&extender, "p2", 10), [0, 6]);
        // Both full now; nothing left to assume.
        assert_eq!(scores(&extender, "p3", 20), [0, 0]);
        assert_eq!(extender.assumed().len(), 2);
        // p1 again (a retry) replaces its own assumption, not adds to it.
        assert_eq!(scores(&extender, "p1", 30), [6, 0]);
        assert_eq!(extender.assumed().len(), 2);
        // The filter sees the assumptions too under require.
        let require = with_pods(ExtenderConfig {
            policy: Policy {
                slots: crate::scoring::SlotPolicy::Require,
                stale_after_ms: None,
            },
            filter_nodes: true,
            ..ExtenderConfig::default()
        });
        scores(&require, "p1", 0);
        let filtered = require.filter(args("p2"), 1);
        assert_eq!(filtered.node_names, Some(vec![NodeName::from("b")]));
        // Once the TTL runs out, the slots count as free again.
        let later = 30 + DEFAULT_ASSUME_TTL_MS;
        assert_eq!(scores(&extender, "p4", later), [6, 6]);
        assert_eq!(extender.assumed(), [("p4".into(), "a".into())]);
    }

    #[test]
    fn assumptions_survive_a_new_snapshot_and_can_be_turned_off() {
        let extender = with_pods(ExtenderConfig::default());
        scores(&extender, "p1", 0);
        extender.replace_snapshot(two_nodes());
        assert_eq!(scores(&extender, "p2", 1), [0, 6]);

        let off = Extender::new(
            ExtenderConfig {
                assume_ttl_ms: None,
                ..ExtenderConfig::default()
            },
            two_nodes(),
        );
        assert_eq!(scores(&off, "p1", 0), [6, 6]);
        assert_eq!(scores(&off, "p2", 1), [6, 6]);
        assert!(off.assumed().is_empty());
    }

    /// Invented pods hold no slot: a UID no pod in the cache has, a pod of
    /// the same name with another UID, a bound pod, a pod the cache knows
    /// as not fast, and any pod when there is no cache at all.
    #[test]
    fn a_bogus_pod_uid_holds_no_slot() {
        let extender = Extender::new(ExtenderConfig::default(), two_nodes());
        let mut pods = cache(&["p1"]);
        let mut renamed = args("p2").pod.expect("pod");
        renamed.metadata.uid = Some("other-uid".into());
        let mut bound = args("p3").pod.expect("pod");
        bound.spec.as_mut().expect("spec").node_name = Some("a".into());
        let mut slow = args("p4").pod.expect("pod");
        slow.spec.as_mut().expect("spec").runtime_class_name = Some("runc".into());
        for pod in [renamed, bound, slow] {
            let name = pod.metadata.name.clone().expect("name");
            pods.0.insert(("ns".into(), name), Arc::new(pod));
        }
        // No cache yet: nothing is assumed, however many calls.
        for i in 0..20 {
            assert_eq!(scores(&extender, &format!("bogus-{i}"), i), [6, 6]);
        }
        assert!(extender.assumed().is_empty());
        extender.set_pending_pods(Arc::new(pods));
        for uid in ["bogus", "p2", "p3", "p4"] {
            assert_eq!(scores(&extender, uid, 100), [6, 6], "{uid}");
        }
        assert!(extender.assumed().is_empty());
        // The cached, unbound, fast pod is assumed, once however often it
        // is prioritized.
        for t in 0..5 {
            scores(&extender, "p1", 200 + t);
        }
        assert_eq!(extender.assumed(), [("p1".into(), "a".into())]);
    }

    #[test]
    fn fixed_reasons_are_the_rejections_messages() {
        for rejection in [
            Rejection::UnknownNode,
            Rejection::NotReady,
            Rejection::NoPool,
            Rejection::NoFreeSlot,
        ] {
            assert_eq!(fixed_reason(&rejection), rejection.to_string());
        }
        let failed = FailedNodes(vec![
            ("a".into(), Rejection::NoPool),
            ("b".into(), Rejection::Stale { age_ms: 7 }),
        ]);
        assert_eq!(
            serde_json::to_value(&failed).unwrap(),
            serde_json::json!({
                "a": "no warm pool for this runtime handler and shape",
                "b": "fast-sandbox status is 7 ms old",
            })
        );
    }

    #[test]
    fn priorities_span_zero_to_ten() {
        assert_eq!(to_extender_priority(0), 0);
        assert_eq!(to_extender_priority(4), 0);
        assert_eq!(to_extender_priority(5), 1);
        assert_eq!(to_extender_priority(64), 6);
        assert_eq!(to_extender_priority(MAX_SCORE), MAX_EXTENDER_PRIORITY);
        assert_eq!(to_extender_priority(u8::MAX), MAX_EXTENDER_PRIORITY);
    }

    #[test]
    fn shape_of_a_pod_without_security_context() {
        assert_eq!(
            pod_shape(None, &ExtenderConfig::default().default_seccomp),
            "seccomp=runtime-default",
            "kubelet's sandbox seccomp"
        );
        assert_eq!(pod_shape(None, "unconfined"), "seccomp=unconfined");
        let empty = PodSecurityContext::default();
        assert_eq!(
            pod_shape(Some(&empty), "runtime-default"),
            "seccomp=runtime-default"
        );
    }

    #[test]
    fn shape_carries_every_sandbox_field() {
        let security = PodSecurityContext {
            seccomp_profile: Some(SeccompProfile {
                type_: "Localhost".into(),
                localhost_profile: Some("profiles/agent.json".into()),
            }),
            run_as_user: Some(1000),
            run_as_group: Some(3000),
            supplemental_groups: Some(vec![4000]),
            fs_group: Some(2000),
            se_linux_options: Some(SELinuxOptions {
                level: Some("s0:c1,c2".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        // The pod's own seccomp profile is its containers', not the
        // sandbox's: kubelet asks RuntimeDefault for the sandbox anyway.
        assert_eq!(
            pod_shape(Some(&security), "runtime-default"),
            "seccomp=runtime-default;uid=1000;gid=3000;groups=2000,4000;selinux=:::s0:c1,c2"
        );
    }
}
