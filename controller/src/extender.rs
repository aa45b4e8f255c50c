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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use k8s_openapi::api::core::v1::{Node, Pod, PodSecurityContext};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::scoring::{Policy, Rejection, Request, RequestedImage, Scorer, Snapshot, MAX_SCORE};

/// `MaxExtenderPriority` of the v1 extender API: answers are 0..=10.
pub const MAX_EXTENDER_PRIORITY: i64 = 10;

/// `ExtenderArgs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExtenderArgs {
    #[serde(alias = "Pod", default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Pod>,
    /// Candidates when the extender is not node-cache capable.
    #[serde(alias = "Nodes", default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeList>,
    /// Candidates in node-name cache mode.
    #[serde(
        rename = "nodenames",
        alias = "NodeNames",
        alias = "nodeNames",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub node_names: Option<Vec<String>>,
}

/// The parts of a `v1.NodeList` the extender reads and echoes back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeList {
    #[serde(default)]
    pub items: Vec<Node>,
}

/// Rejected nodes with their reasons, serialized as a `FailedNodesMap`
/// (`{"node": "reason"}`) straight from the rejections: a filter over
/// thousands of nodes then allocates no message per rejected node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailedNodes(Vec<(String, Rejection)>);

impl FailedNodes {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Why `node` was rejected.
    pub fn get(&self, node: &str) -> Option<&Rejection> {
        self.0.iter().find(|(n, _)| n == node).map(|(_, r)| r)
    }
}

impl Serialize for FailedNodes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (node, reason) in &self.0 {
            map.serialize_entry(node, &format_args!("{reason}"))?;
        }
        map.end()
    }
}

/// `ExtenderFilterResult`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ExtenderFilterResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeList>,
    #[serde(rename = "nodenames", skip_serializing_if = "Option::is_none")]
    pub node_names: Option<Vec<String>>,
    /// Never used: every rejection is unresolvable by preemption.
    #[serde(rename = "failedNodes", skip_serializing_if = "FailedNodes::is_empty")]
    pub failed_nodes: FailedNodes,
    #[serde(
        rename = "failedAndUnresolvableNodes",
        skip_serializing_if = "FailedNodes::is_empty"
    )]
    pub failed_and_unresolvable_nodes: FailedNodes,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// One entry of a `HostPriorityList`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPriority {
    #[serde(alias = "Host")]
    pub host: String,
    #[serde(alias = "Score")]
    pub score: i64,
}

/// What the extender judges and how.
#[derive(Debug, Clone)]
pub struct ExtenderConfig {
    /// RuntimeClass name → the handler it names (its `handler` field).
    pub fast_classes: HashMap<String, String>,
    pub policy: Policy,
    /// The seccomp shape of a pod that sets none: what kubelet gives the
    /// sandbox (`unconfined`, or `runtime-default` with `seccompDefault`).
    pub default_seccomp: String,
}

impl Default for ExtenderConfig {
    fn default() -> Self {
        ExtenderConfig {
            fast_classes: ["fast-runc", "fast-crun", "fast-gvisor", "fast-kata"]
                .iter()
                .map(|c| ((*c).to_owned(), (*c).to_owned()))
                .collect(),
            policy: Policy::default(),
            default_seccomp: "unconfined".into(),
        }
    }
}

/// The extender's state: its configuration and the latest snapshot, which
/// a node-status watch (or a reload) swaps whole.
#[derive(Debug)]
pub struct Extender {
    config: ExtenderConfig,
    snapshot: RwLock<Arc<Snapshot>>,
}

impl Extender {
    pub fn new(config: ExtenderConfig, snapshot: Snapshot) -> Self {
        Extender {
            config,
            snapshot: RwLock::new(Arc::new(snapshot)),
        }
    }

    /// Makes `snapshot` the one later calls are judged against.
    pub fn replace_snapshot(&self, snapshot: Snapshot) {
        let mut current = self
            .snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = Arc::new(snapshot);
    }

    fn current(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
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
    pub fn filter(&self, args: ExtenderArgs, now_ms: u64) -> ExtenderFilterResult {
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
        let snapshot = self.current();
        let scorer = Scorer::new(&snapshot, &request, self.config.policy, now_ms);
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
                    Err(reason) => failed.push((name.to_owned(), reason)),
                }
            }
            result.nodes = Some(NodeList { items });
        }
        tracing::debug!(
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
    pub fn prioritize(&self, args: ExtenderArgs, now_ms: u64) -> Option<Vec<HostPriority>> {
        let pod = args.pod.as_ref()?;
        let names: Vec<String> = match (args.node_names, args.nodes) {
            (Some(names), _) => names,
            (None, Some(list)) => list
                .items
                .into_iter()
                .filter_map(|n| n.metadata.name)
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
        let snapshot = self.current();
        let scorer = Scorer::new(&snapshot, &request, self.config.policy, now_ms);
        Some(
            names
                .into_iter()
                .map(|host| {
                    let score = scorer.score(&host).map_or(0, to_extender_priority);
                    HostPriority { host, score }
                })
                .collect(),
        )
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
/// change once it runs (see the shim's `Shape`), from the pod-level
/// security context as kubelet passes it to the sandbox. `fsGroup` joins the
/// supplemental groups, as kubelet does.
pub fn pod_shape(security: Option<&PodSecurityContext>, default_seccomp: &str) -> String {
    let seccomp = security
        .and_then(|s| s.seccomp_profile.as_ref())
        .map(|p| match p.type_.as_str() {
            "Unconfined" => "unconfined".to_owned(),
            "RuntimeDefault" => "runtime-default".to_owned(),
            "Localhost" => format!(
                "localhost/{}",
                p.localhost_profile.as_deref().unwrap_or_default()
            ),
            other => other.to_ascii_lowercase(),
        })
        .unwrap_or_else(|| default_seccomp.to_owned());
    let mut shape = format!("seccomp={seccomp}");
    let Some(security) = security else {
        return shape;
    };
    if let Some(uid) = security.run_as_user {
        shape.push_str(&format!(";uid={uid}"));
    }
    if let Some(gid) = security.run_as_group {
        shape.push_str(&format!(";gid={gid}"));
    }
    let mut groups: Vec<i64> = security.supplemental_groups.clone().unwrap_or_default();
    groups.extend(security.fs_group);
    if !groups.is_empty() {
        let list: Vec<String> = groups.iter().map(i64::to_string).collect();
        shape.push_str(&format!(";groups={}", list.join(",")));
    }
    if let Some(se) = &security.se_linux_options {
        shape.push_str(&format!(
            ";selinux={}:{}:{}:{}",
            se.user.as_deref().unwrap_or_default(),
            se.role.as_deref().unwrap_or_default(),
            se.type_.as_deref().unwrap_or_default(),
            se.level.as_deref().unwrap_or_default()
        ));
    }
    shape
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

/// The HTTP routes: `POST /filter`, `POST /prioritize`, `GET /healthz`.
pub fn router(extender: Arc<Extender>) -> Router {
    Router::new()
        .route("/filter", post(filter))
        .route("/prioritize", post(prioritize))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(extender)
}

async fn filter(
    State(extender): State<Arc<Extender>>,
    args: Result<Json<ExtenderArgs>, JsonRejection>,
) -> Response {
    match args {
        Ok(Json(args)) => Json(extender.filter(args, now_ms())).into_response(),
        Err(rejection) => {
            let result = ExtenderFilterResult {
                error: format!("bad extender arguments: {}", rejection.body_text()),
                ..Default::default()
            };
            (rejection.status(), Json(result)).into_response()
        }
    }
}

async fn prioritize(
    State(extender): State<Arc<Extender>>,
    args: Result<Json<ExtenderArgs>, JsonRejection>,
) -> Response {
    match args {
        Ok(Json(args)) => match extender.prioritize(args, now_ms()) {
            Some(priorities) => Json(priorities).into_response(),
            None => (StatusCode::BAD_REQUEST, "no pod in the extender arguments").into_response(),
        },
        Err(rejection) => (
            rejection.status(),
            format!("bad extender arguments: {}", rejection.body_text()),
        )
            .into_response(),
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
        assert_eq!(
            pod_shape(Some(&security), "unconfined"),
            "seccomp=localhost/profiles/agent.json;uid=1000;gid=3000;groups=4000,2000;selinux=:::s0:c1,c2"
        );
    }
}
