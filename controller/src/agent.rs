//! The gRPC node directory: one `WatchNodeStatus` stream per node agent
//! (`proto/proto/nodeagent.proto`), its reports folded into the shared
//! [`Snapshot`], and `SetPoolSize` calls for the pool reconciler.
//!
//! - **Which nodes.** [`AgentDirectory::discover`] follows the Kubernetes
//!   Node list/watch (label selector: the node plugin's DaemonSet
//!   `nodeSelector`); a node's agent is its `InternalIP` and the agent port
//!   (the DaemonSet runs on the host network). Tests and development clusters
//!   add nodes by hand instead ([`AgentDirectory::upsert`],
//!   `run --agent NODE=ADDR`). A node that leaves (Node deleted, no longer
//!   selected, removed from the static list) is dropped from the snapshot at
//!   once.
//! - **Freshness.** A report is in [`NodeDirectory::snapshot`] as soon as it
//!   is decoded: a claim or refill only changes free counts in place
//!   ([`Snapshot::set_pool_free`]); a change of pools, images or health
//!   re-indexes. Either bumps [`NodeDirectory::subscribe`].
//! - **Health.** A node is ready while its stream is up and the agent says
//!   it is ready. When the stream breaks the node is marked not ready at
//!   once (its last report kept, its last-seen time frozen) and the stream
//!   is re-opened with exponential backoff and jitter; a wrong token
//!   (`Unauthenticated`) is logged as such, the token file re-read, and
//!   retried the same way. While connected, a node's last-seen time is
//!   refreshed every [`AgentConfig::refresh`], so `--stale-after-ms` must be
//!   longer than that.
//! - **Assumed placements** ([`NodeDirectory::assume`]) are settled when a
//!   report of that pool shows more claimed slots than the previous one
//!   (oldest first, one per new claim), or after [`AgentConfig::assume_ttl`]
//!   when no claim shows (the pod went elsewhere, or started cold).
//! - **Pool sizes** are pushed with `SetPoolSize`, and not again while the
//!   node's reports agree with the last value pushed.
//!
//! Connections are mutual TLS when [`AgentConfig::tls`] is set ([`tls`]):
//! the agent's certificate must name the node dialled. Every call carries
//! `authorization: Bearer <token>` when a token is configured.

mod tls;
pub use tls::{ClientTls, DialError};

use fast_sandbox_proto::token::{
    parse_token, read_token_file, TokenFileError, TokenProblem, BEARER_PREFIX,
};
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use fast_sandbox_proto::nodeagent::{
    node_agent_client::NodeAgentClient, NodeStatus, SetPoolSizeRequest, WatchNodeStatusRequest,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

use crate::nodes::{NodeDirectory, NodeError, NodeProblem, PoolSize};
use crate::scoring::{CachedImage, NodeState, PoolState, Snapshot};
use crate::synth::Rng;

/// The port node agents serve `NodeAgent` on (`deploy/node-plugin`).
pub const DEFAULT_AGENT_PORT: u16 = 9465;
/// Where the controller's Deployment mounts the agent token Secret.
pub const DEFAULT_TOKEN_FILE: &str = "/etc/fast-sandbox-agent/token";
/// The nodes that run a node plugin (the DaemonSet's `nodeSelector`): a
/// label in the `node-restriction.kubernetes.io/` prefix, which the
/// NodeRestriction admission plugin forbids a kubelet to set on its own
/// Node, so only an administrator opts a node in.
pub const DEFAULT_NODE_SELECTOR: &str = "node-restriction.kubernetes.io/fast-sandbox=true";
/// The opt-in label of earlier releases. A kubelet can set it on itself,
/// so it is not trusted any more: a Node with only this label is not
/// dialled (and is named in a warning, so its administrator relabels it).
pub const DEPRECATED_NODE_LABEL: &str = "fast-sandbox.io/node";
/// Largest status message accepted (a node with many images).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The bearer token every agent call carries, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentToken(MetadataValue<Ascii>);

impl fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentToken(<redacted>)")
    }
}

/// Why a token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    File(#[from] TokenFileError),
    #[error("the agent token (given) {0}")]
    Given(TokenProblem),
}

impl AgentToken {
    /// A token from its text, without surrounding whitespace.
    pub fn new(token: &str) -> Result<AgentToken, TokenError> {
        parse_token(token.as_bytes())
            .map_err(TokenError::Given)
            .and_then(|t| Self::header(t).map_err(TokenError::Given))
    }

    /// The token in `path`, without surrounding whitespace (a Secret made
    /// with `echo` ends in a newline), as the node plugin reads it.
    pub fn from_file(path: &Path) -> Result<AgentToken, TokenError> {
        let token = read_token_file(path)?;
        Self::header(&token).map_err(|problem| {
            TokenError::File(TokenFileError::Invalid {
                path: path.to_owned(),
                problem,
            })
        })
    }

    fn header(token: &[u8]) -> Result<AgentToken, TokenProblem> {
        let mut value = BEARER_PREFIX.as_bytes().to_vec();
        value.extend_from_slice(token);
        MetadataValue::try_from(value)
            .map(AgentToken)
            .map_err(|_| TokenProblem::NotAHeaderValue)
    }
}

/// How the directory talks to node agents.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// A bearer token every call carries, if any.
    pub token: Option<AgentToken>,
    /// Mutual TLS; `None`: cleartext (development only).
    pub tls: Option<ClientTls>,
    /// Re-read after an `Unauthenticated` answer (a rotated Secret).
    pub token_file: Option<PathBuf>,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Deadline of a `SetPoolSize` call, and of a watch's first answer.
    pub call_timeout: Duration,
    /// First reconnect delay; doubled after each failure, up to
    /// `backoff_max`, each delay drawn from its upper half (jitter).
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// HTTP/2 ping interval on an idle stream; a ping unanswered for as
    /// long breaks the stream (a node that vanished without a FIN).
    pub keepalive: Duration,
    /// How often connected nodes' last-seen times are refreshed and
    /// expired assumptions dropped.
    pub refresh: Duration,
    /// An assumed placement no report confirms is dropped after this.
    pub assume_ttl: Duration,
}

impl AgentConfig {
    /// Production defaults with `token`.
    pub fn new(token: AgentToken) -> AgentConfig {
        AgentConfig::with_credentials(Some(token), None)
    }

    /// Production defaults over mutual TLS, with a bearer token or not.
    pub fn with_credentials(token: Option<AgentToken>, tls: Option<ClientTls>) -> AgentConfig {
        AgentConfig {
            token,
            tls,
            token_file: None,
            connect_timeout: Duration::from_secs(3),
            call_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            keepalive: Duration::from_secs(10),
            refresh: Duration::from_secs(10),
            assume_ttl: Duration::from_secs(10),
        }
    }
}

/// Why a node's agent gives no status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("agent address {address:?}: {reason}")]
    BadAddress { address: String, reason: String },
    #[error(
        "the node agent refused the token (Unauthenticated: {message}); the controller's \
         and the node plugin's fast-sandbox-agent-token differ"
    )]
    Unauthenticated { message: String },
    #[error("the node agent is unreachable: {reason}")]
    Unreachable { reason: String },
    #[error("the node agent did not answer within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("the node agent ended the status stream")]
    StreamEnded,
    #[error("the agent at this address reports node {reported:?}")]
    WrongNode { reported: String },
    #[error("the node agent answered {code:?}: {message}")]
    Rejected { code: Code, message: String },
}

impl AgentError {
    fn from_status(status: &tonic::Status) -> AgentError {
        match status.code() {
            Code::Unauthenticated => AgentError::Unauthenticated {
                message: status.message().to_owned(),
            },
            Code::Unavailable | Code::Unknown | Code::Cancelled => AgentError::Unreachable {
                reason: with_sources(status),
            },
            code => AgentError::Rejected {
                code,
                message: status.message().to_owned(),
            },
        }
    }
}

/// `status`'s message and the errors under it (a failed TLS handshake is
/// only named there), `: `-separated.
fn with_sources(status: &tonic::Status) -> String {
    let mut reason = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    // Bounded: an error chain is short, but never trust its length.
    for _ in 0..8 {
        let Some(error) = source else { break };
        let text = error.to_string();
        if !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        source = error.source();
    }
    reason
}

/// What the directory knows about one node's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHealth {
    /// `host:port` of the agent.
    pub address: String,
    /// The status stream is up and has delivered a report.
    pub connected: bool,
    /// Reports received since the node was added.
    pub reports: u64,
    /// Streams that ended or failed since the last report (each one is
    /// retried after a backoff).
    pub failures: u64,
    /// Why the last stream ended (kept after a reconnect, for the record).
    pub last_error: Option<AgentError>,
}

/// A placement counted before a report shows it.
#[derive(Debug, Clone)]
struct Assumed {
    handler: String,
    shape: String,
    at: Instant,
}

type PoolKey = (String, String);

/// One node as the directory tracks it.
#[derive(Debug)]
struct Entry {
    address: String,
    /// Tells this entry's stream task from one of a replaced entry.
    epoch: u64,
    channel: Channel,
    task: AbortHandle,
    /// What the snapshot holds for the node.
    state: NodeState,
    connected: bool,
    reports: u64,
    failures: u64,
    last_error: Option<AgentError>,
    /// The reporting process (claim counts restart with it).
    boot_id: String,
    /// Claimed slots per pool in the last report.
    claimed: HashMap<PoolKey, u32>,
    /// Health as last reported.
    health: Option<fast_sandbox_proto::nodeagent::Health>,
    /// The last size pushed per pool, while reports agree with it.
    pushed: HashMap<PoolKey, u32>,
    assumed: Vec<Assumed>,
}

#[derive(Debug, Default)]
struct Nodes {
    map: BTreeMap<String, Entry>,
    next_epoch: u64,
}

struct Inner {
    config: AgentConfig,
    token: RwLock<Option<AgentToken>>,
    nodes: Mutex<Nodes>,
    snapshot: RwLock<Arc<Snapshot>>,
    changes: watch::Sender<u64>,
    seeds: RandomState,
}

/// A [`NodeDirectory`] fed by the node agents' status streams.
///
/// Create it inside a Tokio runtime: it spawns a task per node and one
/// refresh task, all stopped when it is dropped.
pub struct AgentDirectory {
    inner: Arc<Inner>,
    ticker: AbortHandle,
}

impl fmt::Debug for AgentDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentDirectory")
            .field("nodes", &self.inner.lock().map.len())
            .field("generation", &*self.inner.changes.borrow())
            .finish()
    }
}

impl Drop for AgentDirectory {
    fn drop(&mut self) {
        self.ticker.abort();
        for entry in self.inner.lock().map.values() {
            entry.task.abort();
        }
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A node's state as the controller scores it, from its agent's report.
/// `total` is the pool's slots, free or held by pods (`free + claimed`),
/// so `total − free` is exactly the slots pods hold, as the pool
/// reconciler reads it; slots the node has yet to build (a raised size
/// not reached yet) are in neither. A node is ready when its agent says
/// so and can reach containerd. A pool key reported twice keeps its first
/// entry.
fn node_state(name: &str, status: &NodeStatus, now_ms: u64) -> NodeState {
    let mut keys = std::collections::HashSet::new();
    NodeState {
        name: name.to_owned(),
        ready: status
            .health
            .as_ref()
            .is_some_and(|h| h.ready && h.upstream_reachable),
        pools: status
            .pools
            .iter()
            .filter(|p| keys.insert((p.handler.as_str(), p.shape.as_str())))
            .map(|p| PoolState {
                handler: p.handler.clone(),
                upstream_handler: p.upstream_handler.clone(),
                shape: p.shape.clone(),
                free: p.free,
                total: p.free.saturating_add(p.claimed),
            })
            .collect(),
        images: status
            .images
            .iter()
            .map(|i| CachedImage {
                tags: i.repo_tags.clone(),
                digests: i.repo_digests.clone(),
                size_bytes: i.size_bytes,
            })
            .collect(),
        last_seen_unix_ms: now_ms,
    }
}

/// The state of a node with no (usable) report.
fn unknown_state(name: &str) -> NodeState {
    NodeState {
        name: name.to_owned(),
        ready: false,
        pools: Vec::new(),
        images: Vec::new(),
        last_seen_unix_ms: 0,
    }
}

/// Whether `new` differs from `old` in slot counts only (and last-seen
/// time), so the snapshot can be updated in place.
fn free_counts_only(old: &NodeState, new: &NodeState) -> bool {
    old.ready == new.ready
        && old.images == new.images
        && old.pools.len() == new.pools.len()
        && old.pools.iter().zip(&new.pools).all(|(a, b)| {
            a.handler == b.handler && a.upstream_handler == b.upstream_handler && a.shape == b.shape
        })
}

/// The label of [`DEFAULT_NODE_SELECTOR`].
pub const OPT_IN_LABEL: &str = "node-restriction.kubernetes.io/fast-sandbox";

/// Whether an administrator opted `node` in: it carries [`OPT_IN_LABEL`]
/// = `true`. Discovery checks it whatever the selector, so a selector can
/// only narrow the set of nodes, never admit a self-labelled one.
pub fn opted_in(node: &Node) -> bool {
    node.labels().get(OPT_IN_LABEL).map(String::as_str) == Some("true")
}

/// The agent address of a Node: its `InternalIP` and `port`.
pub fn node_address(node: &Node, port: u16) -> Option<String> {
    let ip = node
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")?
        .address
        .parse::<std::net::IpAddr>()
        .ok()?;
    Some(std::net::SocketAddr::new(ip, port).to_string())
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Nodes> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let token = self
            .token
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", token.0);
        }
        request
    }

    /// Re-reads the token file (after the agent refused the token).
    fn reload_token(&self) {
        let Some(path) = &self.config.token_file else {
            return;
        };
        match AgentToken::from_file(path) {
            Ok(token) => {
                let mut current = self.token.write().unwrap_or_else(PoisonError::into_inner);
                if current.as_ref() != Some(&token) {
                    tracing::info!(path = %path.display(), "agent token re-read: it changed");
                    *current = Some(token);
                }
            }
            Err(error) => tracing::warn!(%error, "agent token not re-read"),
        }
    }

    fn bump(&self) {
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Re-indexes every node's state and re-applies the assumptions.
    fn rebuild(&self, nodes: &mut Nodes) {
        let states = nodes.map.values().map(|e| e.state.clone()).collect();
        let mut snapshot = match Snapshot::new(states) {
            Ok(snapshot) => snapshot,
            Err(error) => {
                tracing::error!(%error, "node reports do not index; snapshot kept");
                return;
            }
        };
        for (name, entry) in &mut nodes.map {
            entry
                .assumed
                .retain(|a| snapshot.assume(name, &a.handler, &a.shape).is_ok());
        }
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
        self.bump();
    }

    /// Folds a report into the node's entry and the snapshot. An error
    /// means the stream must be dropped.
    fn report(&self, node: &str, epoch: u64, status: &NodeStatus) -> Result<(), AgentError> {
        if status.node_name != node {
            return Err(AgentError::WrongNode {
                reported: status.node_name.clone(),
            });
        }
        let mut guard = self.lock();
        let nodes = &mut *guard;
        let Some(entry) = nodes.map.get_mut(node).filter(|e| e.epoch == epoch) else {
            return Ok(());
        };
        let new = node_state(node, status, now_unix_ms());
        if !entry.connected {
            tracing::info!(node, address = %entry.address, "node agent connected");
        }
        entry.connected = true;
        entry.health.clone_from(&status.health);
        entry.reports = entry.reports.saturating_add(1);
        entry.failures = 0;

        // Settle assumptions the new claims cover; a new process starts
        // counting again (and forgot the sizes pushed to the old one).
        let claimed: HashMap<PoolKey, u32> = status
            .pools
            .iter()
            .map(|p| ((p.handler.clone(), p.shape.clone()), p.claimed))
            .collect();
        let mut settled = Vec::new();
        if entry.boot_id == status.boot_id {
            for (key, &now) in &claimed {
                let before = entry.claimed.get(key).copied().unwrap_or(0);
                for _ in 0..now.saturating_sub(before) {
                    let oldest = entry
                        .assumed
                        .iter()
                        .position(|a| (&a.handler, &a.shape) == (&key.0, &key.1));
                    match oldest {
                        Some(i) => settled.push(entry.assumed.remove(i)),
                        None => break,
                    }
                }
            }
        } else {
            entry.boot_id.clone_from(&status.boot_id);
            entry.pushed.clear();
        }
        entry.claimed = claimed;
        entry.pushed.retain(|key, size| {
            status
                .pools
                .iter()
                .any(|p| (&p.handler, &p.shape) == (&key.0, &key.1) && p.desired == *size)
        });

        let in_place = free_counts_only(&entry.state, &new)
            && self
                .snapshot
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .node(node)
                .is_some();
        let changed_free: Vec<(String, String, u32, u32)> = new
            .pools
            .iter()
            .zip(&entry.state.pools)
            .filter(|(n, o)| (n.free, n.total) != (o.free, o.total))
            .map(|(n, _)| (n.handler.clone(), n.shape.clone(), n.free, n.total))
            .collect();
        let last_seen = entry.state.last_seen_unix_ms;
        entry.state = new;
        if in_place {
            // Last-seen times move with the periodic refresh.
            entry.state.last_seen_unix_ms = last_seen;
            if changed_free.is_empty() && settled.is_empty() {
                return Ok(());
            }
            let mut snapshot = self
                .snapshot
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let snapshot = Arc::make_mut(&mut snapshot);
            for (handler, shape, free, total) in &changed_free {
                if let Err(error) =
                    snapshot.set_pool_counts(node, handler, shape, *free, Some(*total))
                {
                    tracing::warn!(node, %error, "free count not recorded");
                }
            }
            for a in &settled {
                let _ = snapshot.settle(node, &a.handler, &a.shape);
            }
            self.bump();
        } else {
            self.rebuild(nodes);
        }
        Ok(())
    }

    /// The node's stream ended: not ready until it reports again.
    fn disconnected(&self, node: &str, epoch: u64, error: AgentError) {
        let mut guard = self.lock();
        let nodes = &mut *guard;
        let Some(entry) = nodes.map.get_mut(node).filter(|e| e.epoch == epoch) else {
            return;
        };
        let news = entry.connected || entry.last_error.as_ref() != Some(&error);
        if news {
            match &error {
                AgentError::Unauthenticated { .. } | AgentError::WrongNode { .. } => {
                    tracing::error!(node, address = %entry.address, %error, "node agent refused")
                }
                _ => tracing::warn!(node, address = %entry.address, %error, "node agent lost"),
            }
        } else {
            tracing::debug!(node, %error, "node agent still unavailable");
        }
        let was_ready = entry.state.ready;
        entry.connected = false;
        entry.failures = entry.failures.saturating_add(1);
        entry.last_error = Some(error);
        if was_ready {
            entry.state.ready = false;
            self.rebuild(nodes);
        }
    }

    /// Refreshes connected nodes' last-seen times and drops expired
    /// assumptions.
    fn tick(&self) {
        let mut guard = self.lock();
        let nodes = &mut *guard;
        let now = Instant::now();
        let now_ms = now_unix_ms();
        let ttl = self.config.assume_ttl;
        let mut changed = false;
        for entry in nodes.map.values_mut() {
            let before = entry.assumed.len();
            entry.assumed.retain(|a| now.duration_since(a.at) < ttl);
            changed |= entry.assumed.len() != before;
            if entry.connected {
                entry.state.last_seen_unix_ms = now_ms;
                changed = true;
            }
        }
        if changed {
            self.rebuild(nodes);
        }
    }
}

/// Exponential backoff with jitter: each delay is drawn from the upper half
/// of `initial × 2ⁿ`, capped at `max`.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    rng: Rng,
}

impl Backoff {
    fn new(initial: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
            rng: Rng::new(seed),
        }
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }

    fn delay(&mut self) -> Duration {
        let base = self.next.min(self.max);
        self.next = base.saturating_mul(2).min(self.max);
        base.mul_f64(0.5 + 0.5 * self.rng.unit())
    }
}

/// Keeps `node`'s status stream open until the task is aborted.
async fn follow(inner: Arc<Inner>, node: String, epoch: u64, channel: Channel) {
    let config = &inner.config;
    let seed = inner.seeds.hash_one((&node, epoch));
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max, seed);
    loop {
        let (delivered, error) = watch_once(&inner, &node, epoch, channel.clone()).await;
        if delivered {
            backoff.reset();
        }
        let refused = matches!(error, AgentError::Unauthenticated { .. });
        inner.disconnected(&node, epoch, error);
        if refused {
            inner.reload_token();
        }
        tokio::time::sleep(backoff.delay()).await;
    }
}

/// One status stream: whether it delivered a report, and why it ended.
async fn watch_once(inner: &Inner, node: &str, epoch: u64, channel: Channel) -> (bool, AgentError) {
    let mut client = NodeAgentClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let request = inner.request(WatchNodeStatusRequest {});
    let timeout = inner.config.call_timeout;
    let mut stream = match tokio::time::timeout(timeout, client.watch_node_status(request)).await {
        Err(_) => {
            return (
                false,
                AgentError::Timeout {
                    timeout_ms: millis(timeout),
                },
            )
        }
        Ok(Err(status)) => return (false, AgentError::from_status(&status)),
        Ok(Ok(response)) => response.into_inner(),
    };
    let mut delivered = false;
    loop {
        match stream.message().await {
            Ok(Some(status)) => {
                if let Err(error) = inner.report(node, epoch, &status) {
                    return (delivered, error);
                }
                delivered = true;
            }
            Ok(None) => return (delivered, AgentError::StreamEnded),
            Err(status) => return (delivered, AgentError::from_status(&status)),
        }
    }
}

impl AgentDirectory {
    /// An empty directory; add nodes with [`AgentDirectory::upsert`] or
    /// [`AgentDirectory::discover`].
    pub fn new(config: AgentConfig) -> AgentDirectory {
        let inner = Arc::new(Inner {
            token: RwLock::new(config.token.clone()),
            config,
            nodes: Mutex::new(Nodes::default()),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            changes: watch::channel(0).0,
            seeds: RandomState::new(),
        });
        let weak = Arc::downgrade(&inner);
        let period = inner.config.refresh.max(Duration::from_millis(10));
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                interval.tick().await;
                match weak.upgrade() {
                    Some(inner) => inner.tick(),
                    None => return,
                }
            }
        })
        .abort_handle();
        AgentDirectory { inner, ticker }
    }

    /// Follows `node`'s agent at `address` (`host:port`). A known node at
    /// the same address is left alone; at another address its stream is
    /// re-opened there.
    pub fn upsert(&self, node: &str, address: &str) -> Result<(), AgentError> {
        let bad = |reason: String| AgentError::BadAddress {
            address: address.to_owned(),
            reason,
        };
        let endpoint =
            Endpoint::from_shared(format!("http://{address}")).map_err(|e| bad(e.to_string()))?;
        if endpoint.uri().port_u16().is_none() || endpoint.uri().path() != "/" {
            return Err(bad("expected HOST:PORT".into()));
        }
        let config = &self.inner.config;
        let endpoint = endpoint
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(config.keepalive)
            .keep_alive_timeout(config.keepalive)
            .keep_alive_while_idle(true);
        let channel = match &config.tls {
            Some(tls) => {
                tls::channel(endpoint, tls.clone(), node).map_err(|e| bad(e.to_string()))?
            }
            None => endpoint.connect_lazy(),
        };
        let mut guard = self.inner.lock();
        let nodes = &mut *guard;
        if let Some(old) = nodes.map.get(node) {
            if old.address == address {
                return Ok(());
            }
            old.task.abort();
        }
        nodes.next_epoch += 1;
        let epoch = nodes.next_epoch;
        let task = tokio::spawn(follow(
            self.inner.clone(),
            node.to_owned(),
            epoch,
            channel.clone(),
        ))
        .abort_handle();
        tracing::info!(node, address, "following the node agent");
        nodes.map.insert(
            node.to_owned(),
            Entry {
                address: address.to_owned(),
                epoch,
                channel,
                task,
                state: unknown_state(node),
                connected: false,
                reports: 0,
                failures: 0,
                last_error: None,
                boot_id: String::new(),
                claimed: HashMap::new(),
                health: None,
                pushed: HashMap::new(),
                assumed: Vec::new(),
            },
        );
        self.inner.rebuild(nodes);
        Ok(())
    }

    /// Stops following `node` and drops it from the snapshot; whether it
    /// was known.
    pub fn remove(&self, node: &str) -> bool {
        let mut guard = self.inner.lock();
        let nodes = &mut *guard;
        let Some(entry) = nodes.map.remove(node) else {
            return false;
        };
        entry.task.abort();
        tracing::info!(node, "node agent no longer followed");
        self.inner.rebuild(nodes);
        true
    }

    /// The nodes followed, by name.
    pub fn node_names(&self) -> Vec<String> {
        self.inner.lock().map.keys().cloned().collect()
    }

    /// How `node`'s agent is doing; `None` for an unknown node.
    pub fn health(&self, node: &str) -> Option<NodeHealth> {
        self.inner.lock().map.get(node).map(|e| NodeHealth {
            address: e.address.clone(),
            connected: e.connected,
            reports: e.reports,
            failures: e.failures,
            last_error: e.last_error.clone(),
        })
    }

    /// Applies one Node watch event: `seen` collects the names of a
    /// (re)list, whose end drops every node it did not list.
    fn on_node_event(
        &self,
        event: watcher::Event<Node>,
        port: u16,
        seen: &mut Option<BTreeSet<String>>,
    ) {
        match event {
            watcher::Event::Init => *seen = Some(BTreeSet::new()),
            watcher::Event::InitApply(node) => {
                if let Some(seen) = seen.as_mut() {
                    seen.insert(node.name_any());
                }
                self.on_node(&node, port);
            }
            watcher::Event::InitDone => {
                let Some(listed) = seen.take() else { return };
                for name in self.node_names() {
                    if !listed.contains(&name) {
                        self.remove(&name);
                    }
                }
            }
            watcher::Event::Apply(node) => self.on_node(&node, port),
            watcher::Event::Delete(node) => {
                self.remove(&node.name_any());
            }
        }
    }

    fn on_node(&self, node: &Node, port: u16) {
        let name = node.name_any();
        if node.metadata.deletion_timestamp.is_some() {
            self.remove(&name);
            return;
        }
        if !opted_in(node) {
            if node.labels().contains_key(DEPRECATED_NODE_LABEL) {
                tracing::warn!(
                    node = %name,
                    "node labelled only {DEPRECATED_NODE_LABEL}, which a kubelet can set on \
                     itself: not trusted; label it {OPT_IN_LABEL}=true to opt it in"
                );
            }
            self.remove(&name);
            return;
        }
        match node_address(node, port) {
            Some(address) => {
                if let Err(error) = self.upsert(&name, &address) {
                    tracing::warn!(node = %name, %error, "node not followed");
                }
            }
            None => {
                tracing::warn!(node = %name, "node has no InternalIP: its agent cannot be reached");
                self.remove(&name);
            }
        }
    }

    /// Follows the agents of the Nodes `selector` matches (all Nodes when
    /// `None`) at their `InternalIP` and `port`, until the future is
    /// dropped. Needs `list` and `watch` on nodes.
    pub async fn discover(&self, nodes: Api<Node>, selector: Option<&str>, port: u16) {
        let mut config = watcher::Config::default();
        if let Some(selector) = selector.filter(|s| !s.is_empty()) {
            config = config.labels(selector);
        }
        let mut events = watcher(nodes, config).default_backoff().boxed();
        let mut seen = None;
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => self.on_node_event(event, port, &mut seen),
                Err(error) => tracing::warn!(%error, "node watch (agent discovery)"),
            }
        }
    }
}

#[async_trait]
impl NodeDirectory for AgentDirectory {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.inner
            .snapshot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn assume(&self, node: &str, handler: &str, shape: &str) {
        let mut nodes = self.inner.lock();
        let Some(entry) = nodes.map.get_mut(node) else {
            return;
        };
        let mut snapshot = self
            .inner
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match Arc::make_mut(&mut snapshot).assume(node, handler, shape) {
            Ok(()) => entry.assumed.push(Assumed {
                handler: handler.to_owned(),
                shape: shape.to_owned(),
                at: Instant::now(),
            }),
            Err(error) => tracing::debug!(%error, "placement not assumed"),
        }
    }

    async fn set_pool_size(&self, node: &str, pool: &PoolSize) -> Result<(), NodeError> {
        let key = (pool.handler.clone(), pool.shape_key.clone());
        let (channel, epoch) = {
            let nodes = self.inner.lock();
            let entry = nodes
                .map
                .get(node)
                .ok_or_else(|| NodeError::UnknownNode(node.to_owned()))?;
            if entry.pushed.get(&key) == Some(&pool.size) {
                return Ok(());
            }
            (entry.channel.clone(), entry.epoch)
        };
        let timeout = self.inner.config.call_timeout;
        let mut request = self.inner.request(SetPoolSizeRequest {
            handler: pool.handler.clone(),
            shape: pool.shape_key.clone(),
            size: pool.size,
        });
        request.set_timeout(timeout);
        let mut client = NodeAgentClient::new(channel);
        let answer = tokio::time::timeout(timeout, client.set_pool_size(request)).await;
        let node_error = |reason: String| NodeError::Refused {
            node: node.to_owned(),
            reason,
        };
        match answer {
            Err(_) => Err(NodeError::Timeout {
                node: node.to_owned(),
                timeout_ms: millis(timeout),
            }),
            Ok(Err(status)) => {
                let error = AgentError::from_status(&status);
                if let AgentError::Unauthenticated { .. } = error {
                    tracing::error!(node, %error, "pool size not pushed");
                }
                Err(match (status.code(), error) {
                    (Code::DeadlineExceeded, _) => NodeError::Timeout {
                        node: node.to_owned(),
                        timeout_ms: millis(timeout),
                    },
                    (_, AgentError::Unreachable { reason }) => NodeError::Unreachable {
                        node: node.to_owned(),
                        reason,
                    },
                    (Code::NotFound, _) => NodeError::NoSuchPool {
                        node: node.to_owned(),
                        reason: status.message().to_owned(),
                    },
                    (_, error) => node_error(error.to_string()),
                })
            }
            Ok(Ok(answer)) => {
                tracing::debug!(node, pool = %answer.get_ref().pool, size = pool.size, "pool size pushed");
                let mut nodes = self.inner.lock();
                if let Some(entry) = nodes.map.get_mut(node).filter(|e| e.epoch == epoch) {
                    entry.pushed.insert(key, pool.size);
                }
                Ok(())
            }
        }
    }

    fn problem(&self, node: &str) -> Option<NodeProblem> {
        let nodes = self.inner.lock();
        let entry = nodes.map.get(node)?;
        if !entry.connected {
            return Some(match &entry.last_error {
                Some(error @ AgentError::Unauthenticated { .. }) => {
                    NodeProblem::TokenRejected(error.to_string())
                }
                Some(error) => NodeProblem::AgentUnreachable(error.to_string()),
                None => NodeProblem::AgentUnreachable(format!(
                    "no status from the node agent at {} yet",
                    entry.address
                )),
            });
        }
        if entry.state.ready {
            return None;
        }
        let health = entry.health.clone().unwrap_or_default();
        let detail = if health.message.is_empty() {
            String::new()
        } else {
            format!(": {}", health.message)
        };
        Some(NodeProblem::AgentNotReady(if health.ready {
            format!("the node plugin cannot reach its containerd{detail}")
        } else {
            format!("the node plugin reports not ready{detail}")
        }))
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fast_sandbox_proto::nodeagent::{Health, PoolStatus};
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus as K8sNodeStatus};
    use kube::api::ObjectMeta;

    fn status(free: u32, desired: u32, claimed: u32) -> NodeStatus {
        NodeStatus {
            node_name: "a".into(),
            generation: 1,
            boot_id: "b1".into(),
            pools: vec![PoolStatus {
                name: "p".into(),
                handler: "fast-runc".into(),
                upstream_handler: "runc".into(),
                shape: "seccomp=unconfined".into(),
                free,
                desired,
                claimed,
            }],
            images: vec![],
            health: Some(Health {
                ready: true,
                upstream_reachable: true,
                message: String::new(),
            }),
            observed_unix_ms: 1,
        }
    }

    #[test]
    fn token_is_trimmed_checked_and_redacted() {
        let token = AgentToken::new(" s3cret\n").unwrap();
        assert_eq!(token.0.to_str().unwrap(), "Bearer s3cret");
        assert_eq!(format!("{token:?}"), "AgentToken(<redacted>)");
        assert!(matches!(
            AgentToken::new(" \n"),
            Err(TokenError::Given(TokenProblem::Empty))
        ));
        assert!(matches!(
            AgentToken::new("a b"),
            Err(TokenError::Given(TokenProblem::NotAHeaderValue))
        ));
        let missing = Path::new("/nonexistent/fast-sandbox/token");
        let error = AgentToken::from_file(missing).unwrap_err().to_string();
        assert!(error.contains("/nonexistent/fast-sandbox/token"), "{error}");
    }

    #[test]
    fn a_report_maps_to_a_node_state() {
        let mut s = status(2, 3, 1);
        s.images.push(fast_sandbox_proto::nodeagent::CachedImage {
            repo_tags: vec!["busybox:1".into()],
            repo_digests: vec!["busybox@sha256:1".into()],
            size_bytes: 7,
        });
        let state = node_state("a", &s, 42);
        assert!(state.ready);
        assert_eq!(state.last_seen_unix_ms, 42);
        assert_eq!(
            (state.pools[0].free, state.pools[0].total),
            (2, 3),
            "free + claimed"
        );
        assert_eq!(state.images[0].tags, ["busybox:1"]);
        assert_eq!(state.images[0].size_bytes, 7);
        // A lowered size being trimmed: free above desired stays valid.
        let trimming = node_state("a", &status(5, 1, 0), 0);
        assert_eq!((trimming.pools[0].free, trimming.pools[0].total), (5, 5));
        // A raised size not built yet: the missing slots are not taken.
        let building = node_state("a", &status(3, 10, 0), 0);
        assert_eq!((building.pools[0].free, building.pools[0].total), (3, 3));
        assert!(Snapshot::new(vec![trimming]).is_ok());
        // The same pool twice: the first counts.
        let mut twice = status(1, 3, 0);
        twice.pools.push(status(3, 3, 0).pools[0].clone());
        let state = node_state("a", &twice, 0);
        assert_eq!(state.pools.len(), 1);
        assert_eq!(state.pools[0].free, 1);
        // No health: not ready.
        let mut unhealthy = status(1, 1, 0);
        unhealthy.health = None;
        assert!(!node_state("a", &unhealthy, 0).ready);
        // An agent that cannot reach containerd: not ready either.
        let mut cut_off = status(1, 1, 0);
        if let Some(h) = cut_off.health.as_mut() {
            h.upstream_reachable = false;
        }
        assert!(!node_state("a", &cut_off, 0).ready);
    }

    /// A node agent as the pool reconciler sees it: it takes the size
    /// pushed, builds one slot per report towards it (trims at once), and
    /// reports; the controller pushes a size only when it changes (the
    /// directory does not repeat a size the reports agree with).
    struct SizedNode {
        desired: u32,
        free: u32,
        claimed: u32,
        pushes: Vec<u32>,
    }

    impl SizedNode {
        fn settle(&mut self, range: crate::crd::SlotRange) {
            for _ in 0..100 {
                let report = node_state("a", &status(self.free, self.desired, self.claimed), 0);
                let want = crate::pool::desired_size(range, report.pools.first());
                if want != self.desired {
                    self.pushes.push(want);
                    self.desired = want;
                }
                if self.free < self.desired {
                    self.free += 1;
                } else {
                    self.free = self.desired;
                }
            }
        }
    }

    #[test]
    fn scaling_pushes_each_size_once() {
        use crate::crd::SlotRange;
        let mut node = SizedNode {
            desired: 3,
            free: 3,
            claimed: 0,
            pushes: vec![],
        };
        node.settle(SlotRange { min: 3, max: 20 });
        assert_eq!(node.pushes, [] as [u32; 0]);
        // min 3 → 10: one push of 10, however slowly the node builds.
        node.settle(SlotRange { min: 10, max: 20 });
        assert_eq!(node.pushes, [10]);
        assert_eq!(node.free, 10);
        // Two pods take slots: 2 more, once; they end: back to min.
        node.free -= 2;
        node.claimed = 2;
        node.settle(SlotRange { min: 10, max: 20 });
        assert_eq!(node.pushes, [10, 12]);
        node.claimed = 0;
        node.settle(SlotRange { min: 10, max: 20 });
        assert_eq!(node.pushes, [10, 12, 10]);
        // Lower bounds: straight to the new size.
        node.settle(SlotRange { min: 2, max: 5 });
        assert_eq!(node.pushes, [10, 12, 10, 2]);
        // Pods beyond max: capped.
        node.claimed = 9;
        node.settle(SlotRange { min: 2, max: 5 });
        assert_eq!(node.pushes, [10, 12, 10, 2, 5]);
    }

    #[test]
    fn in_place_updates_only_for_free_count_changes() {
        let old = node_state("a", &status(2, 3, 1), 1);
        assert!(free_counts_only(
            &old,
            &node_state("a", &status(1, 3, 2), 2)
        ));
        // A refill (one more slot) too: counts only.
        assert!(free_counts_only(
            &old,
            &node_state("a", &status(3, 4, 1), 2)
        ));
        let mut not_ready = status(2, 3, 1);
        not_ready.health = None;
        assert!(!free_counts_only(&old, &node_state("a", &not_ready, 2)));
        let mut more = status(2, 3, 1);
        let mut other = more.pools[0].clone();
        other.shape = "seccomp=runtime-default".into();
        more.pools.push(other);
        assert!(!free_counts_only(&old, &node_state("a", &more, 2)));
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_bounded() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 7);
        let delays: Vec<Duration> = (0..8).map(|_| b.delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = Duration::from_millis(100 * (1 << i.min(10))).min(Duration::from_secs(1));
            assert!(*d >= base / 2 && *d <= base, "delay {i}: {d:?} vs {base:?}");
        }
        b.reset();
        assert!(b.delay() <= Duration::from_millis(100));
    }

    #[test]
    fn node_address_is_the_internal_ip_and_port() {
        let node = |addresses: Vec<(&str, &str)>| Node {
            metadata: ObjectMeta {
                name: Some("n".into()),
                ..Default::default()
            },
            status: Some(K8sNodeStatus {
                addresses: Some(
                    addresses
                        .into_iter()
                        .map(|(t, a)| NodeAddress {
                            type_: t.into(),
                            address: a.into(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let n = node(vec![("Hostname", "n"), ("InternalIP", "10.0.0.7")]);
        assert_eq!(node_address(&n, 9465).as_deref(), Some("10.0.0.7:9465"));
        let v6 = node(vec![("InternalIP", "fd00::7")]);
        assert_eq!(node_address(&v6, 9465).as_deref(), Some("[fd00::7]:9465"));
        assert_eq!(
            node_address(&node(vec![("ExternalIP", "1.2.3.4")]), 1),
            None
        );
        assert_eq!(node_address(&node(vec![("InternalIP", "nope")]), 1), None);
        assert_eq!(node_address(&Node::default(), 1), None);
    }

    #[tokio::test]
    async fn node_events_add_move_and_drop_nodes() {
        let directory = AgentDirectory::new(AgentConfig::new(AgentToken::new("t").unwrap()));
        let node = |name: &str, ip: Option<&str>| Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([(OPT_IN_LABEL.to_owned(), "true".to_owned())].into()),
                ..Default::default()
            },
            status: Some(K8sNodeStatus {
                addresses: ip.map(|ip| {
                    vec![NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.into(),
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut seen = None;
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(node("a", Some("127.0.0.2"))),
            watcher::Event::InitApply(node("b", Some("127.0.0.3"))),
            watcher::Event::InitDone,
        ] {
            directory.on_node_event(event, 1, &mut seen);
        }
        assert_eq!(directory.node_names(), ["a", "b"]);
        assert_eq!(directory.snapshot().len(), 2);
        assert!(!directory.snapshot().node("a").unwrap().ready);
        directory.on_node_event(
            watcher::Event::Apply(node("a", Some("127.0.0.4"))),
            1,
            &mut seen,
        );
        assert_eq!(directory.health("a").unwrap().address, "127.0.0.4:1");
        directory.on_node_event(watcher::Event::Apply(node("b", None)), 1, &mut seen);
        assert_eq!(directory.node_names(), ["a"]);
        // A relist that no longer shows a: dropped.
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(node("c", Some("127.0.0.5"))),
            watcher::Event::InitDone,
        ] {
            directory.on_node_event(event, 1, &mut seen);
        }
        assert_eq!(directory.node_names(), ["c"]);
        directory.on_node_event(watcher::Event::Delete(node("c", None)), 1, &mut seen);
        assert!(directory.node_names().is_empty());
        assert!(directory.snapshot().is_empty());
        assert!(directory.upsert("x", "no port").is_err());
        assert!(directory.upsert("x", "127.0.0.1:1/path").is_err());
    }

    #[tokio::test]
    async fn assumptions_settle_when_a_claim_shows_or_expire() {
        let mut config = AgentConfig::new(AgentToken::new("t").unwrap());
        config.assume_ttl = Duration::from_millis(0);
        config.refresh = Duration::from_secs(3600);
        let directory = AgentDirectory::new(config);
        directory.upsert("a", "127.0.0.1:1").unwrap();
        let epoch = directory.inner.lock().map["a"].epoch;
        let (h, s) = ("fast-runc", "seccomp=unconfined");
        directory
            .inner
            .report("a", epoch, &status(3, 3, 0))
            .unwrap();
        directory.assume("a", h, s);
        directory.assume("a", h, s);
        assert_eq!(directory.snapshot().assumed("a", h, s), Ok(2));
        // One claim shows: one assumption settled, in place.
        directory
            .inner
            .report("a", epoch, &status(2, 3, 1))
            .unwrap();
        assert_eq!(directory.snapshot().assumed("a", h, s), Ok(1));
        assert_eq!(directory.snapshot().node("a").unwrap().pools[0].free, 2);
        // A refill alone settles nothing.
        directory
            .inner
            .report("a", epoch, &status(3, 3, 1))
            .unwrap();
        assert_eq!(directory.snapshot().assumed("a", h, s), Ok(1));
        // The rest expires.
        directory.inner.tick();
        assert_eq!(directory.snapshot().assumed("a", h, s), Ok(0));
        // A report from another node is refused; a stale epoch is ignored.
        let mut other = status(3, 3, 0);
        other.node_name = "b".into();
        assert_eq!(
            directory.inner.report("a", epoch, &other),
            Err(AgentError::WrongNode {
                reported: "b".into()
            })
        );
        directory
            .inner
            .report("a", epoch + 1, &status(0, 3, 3))
            .unwrap();
        assert_eq!(directory.snapshot().node("a").unwrap().pools[0].free, 3);
    }
}
