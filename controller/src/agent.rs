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
//!   rewrites that node's index entries only ([`Snapshot::update_node`]);
//!   only a node joining or leaving re-indexes every node (once per Node
//!   relist, not once per node listed). Each bumps
//!   [`NodeDirectory::subscribe`].
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

mod discovery;
mod report;
mod state;
mod stream;
mod tls;
pub use discovery::{node_address, opted_in, OPT_IN_LABEL};
use report::unknown_state;
use state::{millis, Assumed, Entry, Inner, Nodes};
pub use state::{AgentConfig, AgentError, AgentToken, NodeHealth, TokenError};
use stream::follow;
pub use tls::{ClientTls, DialError};

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fast_sandbox_proto::nodeagent::{node_agent_client::NodeAgentClient, SetPoolSizeRequest};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tonic::transport::Endpoint;
use tonic::Code;

use crate::nodes::{NodeDirectory, NodeError, NodeProblem, PoolSize};
use crate::scoring::Snapshot;

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
    use fast_sandbox_proto::token::TokenProblem;
    use std::path::Path;

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
}
