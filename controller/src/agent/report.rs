//! Node agent reports folded into the directory's entries and snapshot:
//! a claim or refill in place, any other change of one node through
//! [`Snapshot::update_node`], a node joining or leaving by a re-index.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::Instant;

use fast_sandbox_proto::nodeagent::NodeStatus;

use tonic::Request;

use super::state::{now_unix_ms, AgentError, AgentToken, Assumed, Entry, Inner, Nodes, PoolKey};
use crate::scoring::{CachedImage, NodeState, PoolState, Snapshot};

/// A node's state as the controller scores it, from its agent's report.
/// `total` is the pool's slots, free or held by pods (`free + claimed`),
/// so `total − free` is exactly the slots pods hold, as the pool
/// reconciler reads it; slots the node has yet to build (a raised size
/// not reached yet) are in neither. A node is ready when its agent says
/// so and can reach containerd. A pool key reported twice keeps its first
/// entry.
pub(super) fn node_state(name: &str, status: &NodeStatus, now_ms: u64) -> NodeState {
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
pub(super) fn unknown_state(name: &str) -> NodeState {
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

/// Settles the entry's assumptions that the report's new claims cover
/// (oldest first, one per new claim) and returns them; a new process
/// starts counting again (and forgot the sizes pushed to the old one).
fn settle_claims(entry: &mut Entry, status: &NodeStatus) -> Vec<Assumed> {
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
    settled
}

impl Inner {
    pub(super) fn lock(&self) -> MutexGuard<'_, Nodes> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn request<T>(&self, message: T) -> Request<T> {
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
    pub(super) fn reload_token(&self) {
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

    pub(super) fn bump(&self) {
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Applies `change` to the snapshot in place (a copy only while a
    /// reader still holds the previous one).
    pub(super) fn edit_snapshot<R>(&self, change: impl FnOnce(&mut Snapshot) -> R) -> R {
        let mut snapshot = self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        change(Arc::make_mut(&mut snapshot))
    }

    /// Folds one known node's new state into the snapshot without
    /// re-indexing the others, keeping its assumptions on pools it still
    /// has; a node the snapshot does not hold yet (or a state that does
    /// not index) re-indexes everything.
    pub(super) fn update(&self, nodes: &mut Nodes, node: &str) {
        let Some(entry) = nodes.map.get_mut(node) else {
            return;
        };
        let state = entry.state.clone();
        let updated = self.edit_snapshot(|snapshot| {
            let result = snapshot.update_node(state);
            if result.is_ok() {
                entry
                    .assumed
                    .retain(|a| snapshot.assumed(node, &a.handler, &a.shape).is_ok());
            }
            result
        });
        match updated {
            Ok(_) => self.bump(),
            Err(error) => {
                tracing::debug!(node, %error, "node not updated in place: re-indexing");
                self.rebuild(nodes);
            }
        }
    }

    /// Re-indexes every node's state and re-applies the assumptions (a
    /// node joined or left); during a relist, once at its end.
    pub(super) fn rebuild(&self, nodes: &mut Nodes) {
        if nodes.relisting {
            nodes.dirty = true;
            return;
        }
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
    pub(super) fn report(
        &self,
        node: &str,
        epoch: u64,
        status: &NodeStatus,
    ) -> Result<(), AgentError> {
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

        let settled = settle_claims(entry, status);
        self.fold(nodes, node, new, &settled);
        Ok(())
    }

    /// Puts the node's new state in its entry and the snapshot, with the
    /// assumptions `settled` dropped: free counts in place when only they
    /// changed, else the node's index entries, or a re-index for a node
    /// the snapshot does not hold yet.
    fn fold(&self, nodes: &mut Nodes, node: &str, new: NodeState, settled: &[Assumed]) {
        let Some(entry) = nodes.map.get_mut(node) else {
            return;
        };
        let indexed = self
            .snapshot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .node(node)
            .is_some();
        let in_place = indexed && free_counts_only(&entry.state, &new);
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
                return;
            }
        }
        if indexed {
            self.edit_snapshot(|snapshot| {
                for (handler, shape, free, total) in changed_free.iter().filter(|_| in_place) {
                    if let Err(error) =
                        snapshot.set_pool_counts(node, handler, shape, *free, Some(*total))
                    {
                        tracing::warn!(node, %error, "free count not recorded");
                    }
                }
                for a in settled {
                    let _ = snapshot.settle(node, &a.handler, &a.shape);
                }
            });
        }
        match (in_place, indexed) {
            (true, _) => self.bump(),
            (false, true) => self.update(nodes, node),
            (false, false) => self.rebuild(nodes),
        }
    }

    /// The node's stream ended: not ready until it reports again.
    pub(super) fn disconnected(&self, node: &str, epoch: u64, error: AgentError) {
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
            self.update(nodes, node);
        }
    }

    /// Refreshes connected nodes' last-seen times and drops expired
    /// assumptions.
    pub(super) fn tick(&self) {
        let mut guard = self.lock();
        let nodes = &mut *guard;
        let now = Instant::now();
        let now_ms = now_unix_ms();
        let ttl = self.config.assume_ttl;
        let mut changed = false;
        self.edit_snapshot(|snapshot| {
            for (name, entry) in &mut nodes.map {
                entry.assumed.retain(|a| {
                    let live = now.duration_since(a.at) < ttl;
                    if !live {
                        let _ = snapshot.settle(name, &a.handler, &a.shape);
                        changed = true;
                    }
                    live
                });
                if entry.connected {
                    entry.state.last_seen_unix_ms = now_ms;
                    let _ = snapshot.set_last_seen(name, now_ms);
                    changed = true;
                }
            }
        });
        if changed {
            self.bump();
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AgentConfig, AgentDirectory};
    use crate::nodes::NodeDirectory;
    use fast_sandbox_proto::nodeagent::{Health, PoolStatus};
    use std::time::Duration;

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
    /// A report changing a node's pools, images and health is folded into
    /// that node's entries: the snapshot shows it, and assumptions on a
    /// pool the node no longer has are dropped, the others kept.
    #[tokio::test]
    async fn a_changed_report_updates_the_node_in_place() {
        let mut config = AgentConfig::new(AgentToken::new("t").unwrap());
        config.refresh = Duration::from_secs(3600);
        let directory = AgentDirectory::new(config);
        directory.upsert("a", "127.0.0.1:1").unwrap();
        directory.upsert("b", "127.0.0.1:2").unwrap();
        let epoch = directory.inner.lock().map["a"].epoch;
        let mut two = status(3, 3, 0);
        let mut other = two.pools[0].clone();
        other.shape = "seccomp=runtime-default".into();
        two.pools.push(other);
        directory.inner.report("a", epoch, &two).unwrap();
        let (h, kept, gone) = ("fast-runc", "seccomp=unconfined", "seccomp=runtime-default");
        directory.assume("a", h, kept);
        directory.assume("a", h, gone);
        let generation = *directory.subscribe().borrow();

        let mut changed = status(3, 3, 0);
        changed
            .images
            .push(fast_sandbox_proto::nodeagent::CachedImage {
                repo_tags: vec!["busybox:1".into()],
                repo_digests: vec![],
                size_bytes: 7,
            });
        if let Some(health) = changed.health.as_mut() {
            health.upstream_reachable = false;
        }
        directory.inner.report("a", epoch, &changed).unwrap();
        let snapshot = directory.snapshot();
        let a = snapshot.node("a").unwrap();
        assert!(!a.ready);
        assert_eq!((a.pools.len(), a.images.len()), (1, 1));
        assert_eq!(snapshot.assumed("a", h, kept), Ok(1));
        assert!(snapshot.assumed("a", h, gone).is_err());
        assert_eq!(directory.inner.lock().map["a"].assumed.len(), 1);
        assert_eq!(*directory.subscribe().borrow(), generation + 1);
        assert!(snapshot.node("b").is_some());
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
