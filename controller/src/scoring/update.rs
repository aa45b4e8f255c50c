//! A node's new status folded into the snapshot without re-indexing the
//! others: [`Snapshot::update_node`] rewrites that node's column entries,
//! moves it between the slot buckets of the pool keys it had or has, and
//! edits the holder lists (and holder bitsets) of the images it had or has.
//! Its cost follows the node (its pools and images, plus a shift of each
//! touched holder list), not the cluster; a full re-index of 65,000 nodes
//! takes ~0.6 s. Only a node joining or leaving changes node positions
//! (which are name order, the tie-break), so that still needs
//! [`Snapshot::new`].

use std::collections::HashMap;
use std::sync::Arc;

use super::index::SlotBuckets;
use super::{check_pools, normalize_image, NodeState, Snapshot, SnapshotError, NO_POOL};

/// What one [`Snapshot::update_node`] rewrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Touched {
    /// (pool key, node) entries: pools the node had or has.
    pub pools: usize,
    /// (image, node) entries: images the node had or has.
    pub images: usize,
}

impl Snapshot {
    /// Replaces a known node's state (readiness, last-seen time, pools and
    /// images) in place, keeping the placements assumed on pools it still
    /// has; the index ends as [`Snapshot::new`] would build it from the
    /// same states. Fails, changing nothing, on an unknown node or an
    /// impossible pool.
    pub fn update_node(&mut self, state: NodeState) -> Result<Touched, SnapshotError> {
        let index = self
            .names
            .get(&state.name)
            .ok_or_else(|| SnapshotError::UnknownNode(state.name.clone()))?;
        check_pools(&state)?;
        let old = std::mem::replace(&mut self.nodes[index], Arc::new(state));
        let was_ready = std::mem::replace(&mut self.ready[index], self.nodes[index].ready);
        self.last_seen[index] = self.nodes[index].last_seen_unix_ms;
        let pools = self.update_pools(index, &old, was_ready);
        let images = self.update_images(index, &old);
        Ok(Touched { pools, images })
    }

    /// Sets the node's last-seen time as decisions read it (a periodic
    /// refresh of every connected node): only the column, so the node's
    /// [`NodeState`] (shared with copies of the snapshot) is not copied;
    /// [`Snapshot::node`] keeps the time of its last update.
    pub fn set_last_seen(&mut self, node: &str, unix_ms: u64) -> Result<(), SnapshotError> {
        let index = self
            .names
            .get(node)
            .ok_or_else(|| SnapshotError::UnknownNode(node.to_owned()))?;
        self.last_seen[index] = unix_ms;
        Ok(())
    }

    /// When the node was last heard from, as decisions read it.
    pub fn last_seen(&self, node: &str) -> Option<u64> {
        self.names.get(node).map(|i| self.last_seen[i])
    }

    /// The pool-key columns and slot buckets of node `index`, whose pools
    /// were `old`'s and readiness `was_ready`; how many entries it touched.
    fn update_pools(&mut self, index: usize, old: &NodeState, was_ready: bool) -> usize {
        let count = self.nodes.len();
        let ready = self.ready[index];
        // Every key the node had or has, with its new free count (the first
        // pool of a repeated key wins, as in `Snapshot::new`).
        let mut keys: Vec<(usize, u32)> = Vec::new();
        for (pool, is_new) in old
            .pools
            .iter()
            .map(|p| (p, false))
            .chain(self.nodes[index].pools.iter().map(|p| (p, true)))
        {
            let key = (pool.handler.clone(), pool.shape.clone());
            let id = match self.pool_keys.get(&key) {
                Some(&id) => id,
                None => {
                    let id = self.pool_free.len();
                    self.pool_keys.insert(key, id);
                    self.pool_free.push(vec![NO_POOL; count]);
                    self.pool_assumed.push(vec![0; count]);
                    self.buckets.push(SlotBuckets::new(count));
                    id
                }
            };
            match keys.iter_mut().find(|(k, _)| *k == id) {
                None => keys.push((id, if is_new { pool.free } else { NO_POOL })),
                Some(entry) if is_new && entry.1 == NO_POOL => entry.1 = pool.free,
                Some(_) => {}
            }
        }
        for &(id, free) in &keys {
            let old_free = self.pool_free[id][index];
            let old_assumed = self.pool_assumed[id][index];
            let assumed = if free == NO_POOL { 0 } else { old_assumed };
            self.pool_free[id][index] = free;
            self.pool_assumed[id][index] = assumed;
            let member = |ready: bool, free: u32, assumed: u32| {
                (ready && free != NO_POOL).then(|| free.saturating_sub(assumed))
            };
            self.buckets[id].replace(
                index,
                member(was_ready, old_free, old_assumed),
                member(ready, free, assumed),
            );
        }
        keys.len()
    }

    /// The holder lists and image index of node `index`, whose images were
    /// `old`'s; how many (image, node) entries it touched.
    fn update_images(&mut self, index: usize, old: &NodeState) -> usize {
        let before = image_sizes(old);
        let after = image_sizes(&self.nodes[index]);
        let count = self.nodes.len();
        let position = u32::try_from(index).unwrap_or(u32::MAX);
        let mut touched = 0;
        let names = before
            .keys()
            .chain(after.keys().filter(|n| !before.contains_key(*n)));
        for name in names {
            let change = (before.get(name).copied(), after.get(name).copied());
            if change.0 == change.1 {
                continue;
            }
            let id = match self.image_ids.get(name) {
                Some(&id) => id,
                None => {
                    let id = self.image_nodes.len();
                    self.image_ids.insert(name.clone(), id);
                    self.image_nodes.push(Vec::new());
                    self.images.push();
                    id
                }
            };
            let holders = &mut self.image_nodes[id];
            match (holders.binary_search_by_key(&position, |h| h.0), change.1) {
                (Ok(at), Some(size)) => holders[at].1 = size,
                (Ok(at), None) => {
                    holders.remove(at);
                }
                (Err(at), Some(size)) => holders.insert(at, (position, size)),
                (Err(_), None) => {}
            }
            self.images
                .holder_changed(id, index, change, &self.image_nodes[id], count);
            touched += 1;
        }
        touched
    }
}

/// A node's images by normalized name, with the largest size it reports
/// under that name (as [`Snapshot::new`] indexes them).
fn image_sizes(state: &NodeState) -> HashMap<String, u64> {
    let mut sizes = HashMap::new();
    for image in &state.images {
        for name in image.tags.iter().chain(&image.digests) {
            let size = sizes
                .entry(normalize_image(name))
                .or_insert(image.size_bytes);
            *size = (*size).max(image.size_bytes);
        }
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::{CachedImage, Policy, PoolState, Request, RequestedImage, Scorer};
    use crate::scoring::{SlotPolicy, MIB};
    use crate::synth::Rng;

    const KEYS: [(&str, &str); 4] = [
        ("fast-runc", "default"),
        ("fast-runc", "uid=1000"),
        ("fast-gvisor", "default"),
        ("fast-kata", "default"),
    ];
    /// (name, share of nodes holding it): common and rare images.
    const IMAGES: [(&str, f64); 6] = [
        ("docker.io/library/python:3.12", 0.9),
        ("busybox", 0.5),
        ("registry.example/a:1", 0.2),
        ("registry.example/b:1", 0.05),
        ("registry.example/c:1", 0.01),
        ("registry.example/d@sha256:00", 0.005),
    ];

    fn random_state(rng: &mut Rng, name: &str) -> NodeState {
        let pools = crate::scoring::testing::random_pools(rng, KEYS, 10);
        let mut images = Vec::new();
        for (tag, share) in IMAGES {
            if rng.unit() < share {
                images.push(CachedImage {
                    tags: vec![tag.into()],
                    digests: vec![],
                    // Mostly one size per image, sometimes another (re-pushed).
                    size_bytes: if rng.unit() < 0.9 { 300 } else { 7 } * MIB,
                });
            }
        }
        NodeState {
            name: name.into(),
            ready: rng.unit() < 0.9,
            pools,
            images,
            last_seen_unix_ms: rng.below(2_000) as u64,
        }
    }

    /// Everything a decision reads, by pool key and image name (ids and the
    /// keys or images no node has any more are internal).
    type PoolView = Vec<(u32, u32, Option<usize>)>;
    type ImageView = (Vec<(u32, u64)>, Option<Vec<usize>>, Option<u64>);
    type View = (Vec<(String, String, PoolView)>, Vec<(String, ImageView)>);

    fn view(s: &Snapshot) -> View {
        let mut pools: Vec<_> = s
            .pool_keys
            .iter()
            .filter(|(_, &id)| s.pool_free[id].iter().any(|&f| f != NO_POOL))
            .map(|((h, sh), &id)| {
                let per_node = (0..s.len())
                    .map(|i| {
                        let bucket = s.buckets[id].bucket_of_node(i);
                        (s.pool_free[id][i], s.pool_assumed[id][i], bucket)
                    })
                    .collect();
                (h.clone(), sh.clone(), per_node)
            })
            .collect();
        pools.sort();
        let mut images: Vec<_> = s
            .image_ids
            .iter()
            .filter(|(_, &id)| !s.image_nodes[id].is_empty())
            .map(|(name, &id)| {
                let id32 = u32::try_from(id).unwrap();
                let index = &s.images;
                let view = (
                    s.image_nodes[id].clone(),
                    index.dense_holders(id),
                    index.same_size(id32),
                );
                (name.clone(), view)
            })
            .collect();
        images.sort();
        (pools, images)
    }

    /// The snapshot `Snapshot::new` builds from `s`'s states, with `s`'s
    /// assumptions applied.
    fn rebuilt(s: &Snapshot) -> Snapshot {
        let mut fresh = Snapshot::new(s.nodes().cloned().collect()).unwrap();
        for ((handler, shape), &id) in &s.pool_keys {
            for (i, &n) in s.pool_assumed[id].iter().enumerate() {
                for _ in 0..n {
                    fresh.assume(&s.nodes[i].name, handler, shape).unwrap();
                }
            }
        }
        fresh
    }

    fn random_request(rng: &mut Rng) -> Request {
        let (handler, shape) = KEYS[rng.below(KEYS.len())];
        Request {
            handler: handler.into(),
            shape: shape.into(),
            images: (0..rng.below(3))
                .map(|_| RequestedImage {
                    reference: IMAGES[rng.below(IMAGES.len())].0.into(),
                    size_bytes: None,
                })
                .collect(),
        }
    }

    /// After random status changes (pools, images, readiness), claims and
    /// assumed placements, the snapshot updated node by node holds exactly
    /// the index a full re-index of the same states (and assumptions)
    /// builds, and decides the same; each update touches only the changed
    /// node's entries.
    #[test]
    fn incremental_updates_match_a_full_reindex() {
        let mut rng = Rng::new(10);
        for cluster in 0..40 {
            let count = 1 + rng.below(if cluster % 2 == 0 { 300 } else { 30 });
            let names: Vec<String> = (0..count).map(|i| format!("node-{i:03}")).collect();
            let states = names.iter().map(|n| random_state(&mut rng, n)).collect();
            let mut snapshot = Snapshot::new(states).unwrap();
            for _ in 0..60 {
                let name = &names[rng.below(count)];
                let (handler, shape) = KEYS[rng.below(KEYS.len())];
                let _ = match rng.below(4) {
                    0 => snapshot.assume(name, handler, shape),
                    1 => snapshot.settle(name, handler, shape),
                    _ => {
                        let state = random_state(&mut rng, name);
                        // Bounded by the node's pools and images, whatever
                        // the cluster's size.
                        let touched = snapshot.update_node(state).unwrap();
                        assert!(touched.pools <= KEYS.len(), "{touched:?}");
                        assert!(touched.images <= IMAGES.len(), "{touched:?}");
                        Ok(())
                    }
                };
                let fresh = rebuilt(&snapshot);
                assert_eq!(view(&snapshot), view(&fresh), "cluster {cluster}");
                let request = random_request(&mut rng);
                let policy = Policy {
                    slots: [SlotPolicy::Require, SlotPolicy::Prefer][rng.below(2)],
                    stale_after_ms: Some(1_500),
                };
                let a = Scorer::new(&snapshot, &request, policy, 2_000);
                let b = Scorer::new(&fresh, &request, policy, 2_000);
                assert!(a.verdicts().eq(b.verdicts()), "cluster {cluster}");
                assert_eq!(a.best(), b.best(), "cluster {cluster}");
            }
        }
    }

    #[test]
    fn an_unchanged_node_touches_nothing_and_bad_input_changes_nothing() {
        let mut rng = Rng::new(3);
        let states: Vec<_> = ["a", "b"]
            .iter()
            .map(|n| random_state(&mut rng, n))
            .collect();
        let mut snapshot = Snapshot::new(states.clone()).unwrap();
        let touched = snapshot.update_node(states[0].clone()).unwrap();
        assert_eq!(touched.images, 0);
        let keys: std::collections::BTreeSet<_> = states[0]
            .pools
            .iter()
            .map(|p| (&p.handler, &p.shape))
            .collect();
        assert_eq!(touched.pools, keys.len());
        let before = view(&snapshot);
        let mut unknown = states[0].clone();
        unknown.name = "z".into();
        assert_eq!(
            snapshot.update_node(unknown),
            Err(SnapshotError::UnknownNode("z".into()))
        );
        let mut bad = states[1].clone();
        bad.pools.push(PoolState {
            handler: "fast-runc".into(),
            upstream_handler: "runc".into(),
            shape: "default".into(),
            free: 3,
            total: 2,
        });
        assert!(matches!(
            snapshot.update_node(bad),
            Err(SnapshotError::FreeExceedsTotal { .. })
        ));
        assert_eq!(view(&snapshot), before);
        assert_eq!(snapshot.node("b"), Some(&states[1]));
        snapshot.set_last_seen("a", 99).unwrap();
        assert_eq!(snapshot.last_seen("a"), Some(99));
        assert!(snapshot.set_last_seen("z", 1).is_err());
    }
}
