//! Where the controller learns node states and pushes pool sizes.
//!
//! The reconcilers only see [`NodeDirectory`]: the latest [`Snapshot`] of
//! every node plugin's report, a way to count a placement at once, and a way
//! to set a pool's desired size on one node. The gRPC client to the node
//! plugins implements it ([`AgentDirectory`](crate::agent::AgentDirectory));
//! [`StaticNodes`] is the in-memory one that tests and the snapshot-file mode
//! use.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use async_trait::async_trait;
use fast_sandbox_proto::shape::ShapeKey;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::scoring::Snapshot;

/// Where the controller learns node states and pushes pool sizes.
///
/// Object safe: the controller holds an `Arc<dyn NodeDirectory>`.
#[async_trait]
pub trait NodeDirectory: Send + Sync + 'static {
    /// The latest snapshot of every known node.
    fn snapshot(&self) -> Arc<Snapshot>;

    /// Counts a placement on `node`'s pool (`handler`, `shape` key) at once,
    /// until the node's next report confirms it (or it expires). Unknown
    /// nodes and pools are ignored: the next report is the truth.
    fn assume(&self, node: &str, handler: &str, shape: &str);

    /// Sets the desired free-slot count of a pool on one node.
    async fn set_pool_size(&self, node: &str, pool: &PoolSize) -> Result<(), NodeError>;

    /// A counter that moves whenever the snapshot changed (a node came, went,
    /// or reported different pools): the pool reconciler re-runs on it.
    fn subscribe(&self) -> watch::Receiver<u64>;

    /// Why a node the directory knows is not ready, when it knows why.
    fn problem(&self, _node: &str) -> Option<NodeProblem> {
        None
    }
}

/// Why a node's plugin does not serve pools, as the directory knows it;
/// reconcilers put it in status conditions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeProblem {
    /// The node agent refused the controller's bearer token.
    #[error("{0}")]
    TokenRejected(String),
    /// No status stream from the node agent.
    #[error("{0}")]
    AgentUnreachable(String),
    /// The node agent reports that it is not ready, or cannot reach its
    /// containerd.
    #[error("{0}")]
    AgentNotReady(String),
}

impl NodeProblem {
    /// The condition reason for it.
    pub fn reason(&self) -> &'static str {
        match self {
            NodeProblem::TokenRejected(_) => "AgentTokenRejected",
            NodeProblem::AgentUnreachable(_) => "AgentUnreachable",
            NodeProblem::AgentNotReady(_) => "NodeNotReady",
        }
    }
}

/// The sandbox fields a warm slot fixes once its pause runs: a pod only
/// takes a slot of exactly its shape. Mirrors the node plugin's
/// `[pools.shape]` (`node-plugin/src/config.rs` `ShapeSection`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxShape {
    /// `unconfined`, `runtime-default` or `localhost/<profile>`; unset:
    /// the controller's default, `runtime-default` (kubelet always asks
    /// RuntimeDefault for a pod sandbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<String>,
    /// The pod's `securityContext.runAsUser`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<i64>,
    /// The pod's `securityContext.runAsGroup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_group: Option<i64>,
    /// The pod's `securityContext.supplementalGroups`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supplemental_groups: Vec<i64>,
}

/// Why a shape is not one a pool can be built for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("seccomp {0:?}: expected unconfined, runtime-default or localhost/<profile>")]
    Seccomp(String),
    #[error("{field} {value}: must not be negative")]
    Negative { field: &'static str, value: i64 },
}

impl ShapeError {
    /// The shape field at fault, relative to the shape.
    pub fn field(&self) -> &'static str {
        match self {
            ShapeError::Seccomp(_) => "seccomp",
            ShapeError::Negative { field, .. } => field,
        }
    }
}

impl SandboxShape {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ShapeError> {
        if let Some(seccomp) = &self.seccomp {
            let ok = matches!(seccomp.as_str(), "unconfined" | "runtime-default")
                || seccomp
                    .strip_prefix("localhost/")
                    .is_some_and(|p| !p.is_empty());
            if !ok {
                return Err(ShapeError::Seccomp(seccomp.clone()));
            }
        }
        let ids = [
            ("runAsUser", self.run_as_user),
            ("runAsGroup", self.run_as_group),
        ];
        let groups = self
            .supplemental_groups
            .iter()
            .map(|g| ("supplementalGroups", Some(*g)));
        for (field, value) in ids.into_iter().chain(groups) {
            if let Some(value) = value.filter(|v| *v < 0) {
                return Err(ShapeError::Negative { field, value });
            }
        }
        Ok(())
    }

    /// The pool key's shape, in the encoding the node plugin reports and
    /// the extender derives from a pod ([`ShapeKey`], shared with the node
    /// plugin): `seccomp=<profile>[;uid=N][;gid=N][;groups=A,B]`, groups
    /// sorted.
    pub fn key(&self, default_seccomp: &str) -> String {
        ShapeKey {
            seccomp: self.seccomp.as_deref().unwrap_or(default_seccomp),
            run_as_user: self.run_as_user,
            run_as_group: self.run_as_group,
            supplemental_groups: &self.supplemental_groups,
            selinux: None,
        }
        .encode()
    }
}

/// A pool's desired size on one node, as the controller pushes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSize {
    /// The `SandboxPool` asking for it.
    pub pool: String,
    /// The exposed runtime handler (what the RuntimeClass names).
    pub handler: String,
    /// The slots' shape.
    pub shape: SandboxShape,
    /// [`SandboxShape::key`] of `shape`, as node status reports it.
    pub shape_key: String,
    /// Free slots the node should keep.
    pub size: u32,
}

/// Why a node call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("node {0:?} is not known to the node directory")]
    UnknownNode(String),
    #[error("node {node:?} is unreachable: {reason}")]
    Unreachable { node: String, reason: String },
    #[error("node {node:?} refused the pool size: {reason}")]
    Refused { node: String, reason: String },
    #[error(
        "node {node:?} has no pool of this handler and shape (its node plugin's config \
         defines the pools the controller can size): {reason}"
    )]
    NoSuchPool { node: String, reason: String },
    #[error("node {node:?} did not answer within {timeout_ms} ms")]
    Timeout { node: String, timeout_ms: u64 },
}

/// An in-memory [`NodeDirectory`]: a snapshot swapped whole (from a file or
/// by a test), pool sizes recorded instead of sent.
pub struct StaticNodes {
    snapshot: RwLock<Arc<Snapshot>>,
    pushed: Mutex<Vec<(String, PoolSize)>>,
    /// Pushes to these nodes fail with the error (tests).
    refusals: Mutex<HashMap<String, NodeError>>,
    problems: Mutex<HashMap<String, NodeProblem>>,
    changes: watch::Sender<u64>,
}

impl fmt::Debug for StaticNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticNodes")
            .field("nodes", &self.snapshot().len())
            .field("generation", &*self.changes.borrow())
            .finish()
    }
}

impl StaticNodes {
    /// A directory serving `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        StaticNodes {
            snapshot: RwLock::new(Arc::new(snapshot)),
            pushed: Mutex::new(Vec::new()),
            refusals: Mutex::new(HashMap::new()),
            problems: Mutex::new(HashMap::new()),
            changes: watch::channel(0).0,
        }
    }

    /// Swaps in a new snapshot (assumptions are dropped: it is the truth)
    /// and tells subscribers.
    pub fn replace(&self, snapshot: Snapshot) {
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// Every pool size pushed so far, as (node, size), oldest first.
    pub fn pushed(&self) -> Vec<(String, PoolSize)> {
        self.pushed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sets (or clears) what [`NodeDirectory::problem`] says of `node`
    /// (tests).
    pub fn set_problem(&self, node: &str, problem: Option<NodeProblem>) {
        let mut problems = self.problems.lock().unwrap_or_else(PoisonError::into_inner);
        match problem {
            Some(p) => problems.insert(node.to_owned(), p),
            None => problems.remove(node),
        };
    }

    /// Makes pushes to `node` fail as if it were unreachable (tests).
    pub fn set_unreachable(&self, node: &str, unreachable: bool) {
        let error = NodeError::Unreachable {
            node: node.to_owned(),
            reason: "marked unreachable".into(),
        };
        self.refuse(node, unreachable.then_some(error));
    }

    /// Makes pushes to `node` fail with `error` (or work again) (tests).
    pub fn refuse(&self, node: &str, error: Option<NodeError>) {
        let mut refusals = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        match error {
            Some(error) => refusals.insert(node.to_owned(), error),
            None => refusals.remove(node),
        };
    }
}

#[async_trait]
impl NodeDirectory for StaticNodes {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn assume(&self, node: &str, handler: &str, shape: &str) {
        let mut guard = self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Err(error) = Arc::make_mut(&mut guard).assume(node, handler, shape) {
            tracing::debug!(%error, "placement not assumed");
        }
    }

    async fn set_pool_size(&self, node: &str, pool: &PoolSize) -> Result<(), NodeError> {
        if self.snapshot().node(node).is_none() {
            return Err(NodeError::UnknownNode(node.to_owned()));
        }
        if let Some(error) = self
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
        {
            return Err(error.clone());
        }
        self.pushed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((node.to_owned(), pool.clone()));
        Ok(())
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn problem(&self, node: &str) -> Option<NodeProblem> {
        self.problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::{NodeState, PoolState};

    fn snapshot(free: u32) -> Snapshot {
        Snapshot::new(vec![NodeState {
            name: "a".into(),
            ready: true,
            pools: vec![PoolState {
                handler: "fast-runc".into(),
                upstream_handler: "runc".into(),
                shape: "seccomp=unconfined".into(),
                free,
                total: 4,
            }],
            images: vec![],
            last_seen_unix_ms: 0,
        }])
        .unwrap()
    }

    #[test]
    fn shape_key_matches_the_extenders_encoding() {
        use k8s_openapi::api::core::v1::{PodSecurityContext, SeccompProfile};
        // A pool of the default seccomp serves the pod whatever its own
        // profile: kubelet asks RuntimeDefault for every sandbox.
        let shape = SandboxShape {
            seccomp: None,
            run_as_user: Some(1000),
            run_as_group: Some(1001),
            supplemental_groups: vec![5, 6],
        };
        let pod = PodSecurityContext {
            seccomp_profile: Some(SeccompProfile {
                type_: "Localhost".into(),
                localhost_profile: Some("p.json".into()),
            }),
            run_as_user: Some(1000),
            run_as_group: Some(1001),
            supplemental_groups: Some(vec![5, 6]),
            ..Default::default()
        };
        assert_eq!(
            shape.key("runtime-default"),
            crate::extender::pod_shape(Some(&pod), "runtime-default")
        );
        assert_eq!(
            SandboxShape::default().key("runtime-default"),
            "seccomp=runtime-default"
        );
    }

    #[test]
    fn shape_validation_names_the_field() {
        let bad = SandboxShape {
            seccomp: Some("localhost/".into()),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field(), "seccomp");
        let bad = SandboxShape {
            supplemental_groups: vec![1, -2],
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field(), "supplementalGroups");
        let good = SandboxShape {
            seccomp: Some("runtime-default".into()),
            run_as_user: Some(0),
            ..Default::default()
        };
        assert_eq!(good.validate(), Ok(()));
    }

    #[tokio::test]
    async fn static_nodes_assume_replace_and_push() {
        let nodes = StaticNodes::new(snapshot(1));
        let mut changes = nodes.subscribe();
        nodes.assume("a", "fast-runc", "seccomp=unconfined");
        nodes.assume("gone", "fast-runc", "seccomp=unconfined");
        assert_eq!(
            nodes
                .snapshot()
                .assumed("a", "fast-runc", "seccomp=unconfined"),
            Ok(1)
        );
        nodes.replace(snapshot(0));
        changes.changed().await.unwrap();
        assert_eq!(
            nodes
                .snapshot()
                .assumed("a", "fast-runc", "seccomp=unconfined"),
            Ok(0)
        );
        let size = PoolSize {
            pool: "p".into(),
            handler: "fast-runc".into(),
            shape: SandboxShape::default(),
            shape_key: "seccomp=unconfined".into(),
            size: 3,
        };
        nodes.set_pool_size("a", &size).await.unwrap();
        assert_eq!(
            nodes.set_pool_size("b", &size).await,
            Err(NodeError::UnknownNode("b".into()))
        );
        nodes.set_unreachable("a", true);
        assert!(matches!(
            nodes.set_pool_size("a", &size).await,
            Err(NodeError::Unreachable { .. })
        ));
        assert_eq!(nodes.pushed(), vec![("a".to_owned(), size)]);
    }
}
