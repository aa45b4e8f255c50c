//! Where a sandbox should go: a pure function over a snapshot of node states.
//!
//! The decision is the seed design's pool filter → health/free-slot filter →
//! image-affinity score, shared by the scheduler extender (transparent pods)
//! and, later, the direct `Sandbox` path.
//!
//! **Filter.** A node is a candidate when it is ready, its status is fresh
//! (seen within [`Policy::stale_after_ms`]), it has a pool for the request's
//! exposed handler *and* shape, and — under [`SlotPolicy::Require`] — that
//! pool has a free slot.
//!
//! **Score** (0..=100) = slot term (0 or 60..80) + image term (0..=20):
//!
//! - slot term: `0` when the pool has no free slot, else
//!   `60 + ⌊20·free / (free + 4)⌋` — more free slots is better (headroom for
//!   claims the controller has not heard about yet), with diminishing
//!   returns, and a node with one free slot (≥ 64) always beats every node
//!   with none (≤ 20).
//! - image term: kube-scheduler's `ImageLocality`, scaled to 0..=20. For each
//!   requested image present on the node, its size on the node (or the size
//!   given in the request when the node reports none) times its *spread*, the
//!   fraction of snapshot nodes holding it (so an image every node has counts
//!   fully, one few nodes have counts little: this avoids piling pods onto
//!   the few nodes that have a rare image, the "node heating problem"). The
//!   sum is clamped to `[23 MiB, 1000 MiB × images]` and mapped linearly to
//!   `0..=20`.
//!
//! Ties are broken by node name (smallest first), so a decision depends only
//! on the snapshot's content, never on the order nodes were added in.
//!
//! **Cost.** Neither verb scores every node: [`Scorer::score`] reads one
//! node's columns and its requested images, and [`Scorer::best`] searches an
//! index of the nodes by pool key and free slots and of the holders of
//! common images (`scoring/index.rs`), so its cost follows the answer, not
//! the cluster. [`linear::LinearScorer`] is the same decision made by
//! scoring every node, kept as the reference the index is tested against.

mod index;
pub mod linear;
mod names;
#[cfg(test)]
mod testing;
mod update;

pub use update::Touched;

use std::collections::HashMap;
use std::sync::Arc;

use foldhash::fast::RandomState;

use index::{ImageIndex, SlotBuckets};
use names::NameIndex;

use serde::{Deserialize, Serialize};

const MIB: u64 = 1024 * 1024;
/// The highest score a node can get.
pub const MAX_SCORE: u8 = 100;
/// Below this many (spread-scaled) bytes of cached images, the image term is 0.
pub const IMAGE_MIN_THRESHOLD: u64 = 23 * MIB;
/// Per requested image: at this many bytes the image term is at its maximum.
pub const IMAGE_MAX_THRESHOLD_PER_CONTAINER: u64 = 1000 * MIB;

/// The slot term of a node with at least one free slot starts here.
const SLOT_FLOOR: u64 = 60;
/// The slot term rises by at most this much above [`SLOT_FLOOR`].
const SLOT_RANGE: u64 = 20;
/// Free slots at which the slot term has risen by half of [`SLOT_RANGE`].
const SLOT_HALF: u64 = 4;
/// The image term's maximum.
const IMAGE_RANGE: u64 = 20;

/// What a node reported about itself, as a watch of node status will fill
/// it in (one entry per node; the whole entry is replaced on each update).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeState {
    /// The Kubernetes node name.
    pub name: String,
    /// The node plugin answers and its pools are being served.
    pub ready: bool,
    #[serde(default)]
    pub pools: Vec<PoolState>,
    /// Images in the node's CRI image store (`ListImages`).
    #[serde(default)]
    pub images: Vec<CachedImage>,
    /// When the controller last heard from the node (Unix time, ms).
    pub last_seen_unix_ms: u64,
}

/// One warm pool on a node, keyed by (exposed handler, upstream handler,
/// shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolState {
    /// The handler kubelet asks for (`fast-runc`); what a RuntimeClass names.
    pub handler: String,
    /// The containerd handler the slots were created with (`runc`).
    pub upstream_handler: String,
    /// The pool's sandbox shape, as an opaque key compared for equality (the
    /// node plugin and the controller derive it the same way).
    pub shape: String,
    pub free: u32,
    pub total: u32,
}

/// One image in a node's image store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachedImage {
    /// `repo:tag` names (CRI `repo_tags`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// `repo@sha256:…` names (CRI `repo_digests`).
    #[serde(default)]
    pub digests: Vec<String>,
    pub size_bytes: u64,
}

/// What is being placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The exposed runtime handler (the RuntimeClass's `handler`).
    pub handler: String,
    /// The sandbox shape key, as in [`PoolState::shape`].
    pub shape: String,
    /// The pod's container images.
    pub images: Vec<RequestedImage>,
}

/// A container image of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestedImage {
    /// As written in the pod spec (`python:3.12`, `ghcr.io/a/b@sha256:…`).
    pub reference: String,
    /// Used when a node holding the image reports no size for it.
    pub size_bytes: Option<u64>,
}

/// What to do when a node's pool has no free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SlotPolicy {
    /// Filter the node out: the pod waits for a warm slot somewhere.
    Require,
    /// Keep the node, scored low: the pod may start cold.
    #[default]
    Prefer,
}

/// Knobs of the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    pub slots: SlotPolicy,
    /// A node not heard from for longer than this is filtered out; `None`
    /// trusts any status however old.
    pub stale_after_ms: Option<u64>,
}

/// Why a node cannot take the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("no fast-sandbox status for this node")]
    UnknownNode,
    #[error("fast-sandbox node plugin not ready")]
    NotReady,
    #[error("fast-sandbox status is {age_ms} ms old")]
    Stale { age_ms: u64 },
    #[error("no warm pool for this runtime handler and shape")]
    NoPool,
    #[error("warm pool has no free slot")]
    NoFreeSlot,
}

/// Why a snapshot cannot be built or updated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("node {0:?} appears twice")]
    DuplicateNode(String),
    #[error("node {node:?}: pool {handler:?}/{shape:?} has {free} free of {total}")]
    FreeExceedsTotal {
        node: String,
        handler: String,
        shape: String,
        free: u32,
        total: u32,
    },
    #[error("node {0:?} is not in the snapshot")]
    UnknownNode(String),
    #[error("node {node:?} has no pool {handler:?}/{shape:?}")]
    UnknownPool {
        node: String,
        handler: String,
        shape: String,
    },
}

/// Node states indexed for scoring. Nodes are sorted by name; what a
/// decision reads is kept in columns indexed by node position (readiness,
/// last-seen time, free slots per pool key) and per image the nodes holding
/// it, so scoring 5,000 nodes walks a few dense arrays instead of chasing
/// every node's heap-allocated lists.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Shared with copies of the snapshot (a reader holding the previous
    /// one while a report is folded in copies it): a node's state is
    /// copied only when it changes.
    nodes: Vec<Arc<NodeState>>,
    /// Name → position, looked up once per candidate in every extender
    /// call (names.rs).
    names: NameIndex,
    ready: Vec<bool>,
    last_seen: Vec<u64>,
    /// (handler, shape) → index into `pool_free`.
    pool_keys: HashMap<(String, String), usize, RandomState>,
    /// Per pool key, per node: free slots as reported, or [`NO_POOL`].
    pool_free: Vec<Vec<u32>>,
    /// Per pool key, per node: placements made but not yet covered by a
    /// report (see [`Snapshot::assume`]).
    pool_assumed: Vec<Vec<u32>>,
    /// Normalized image name → index into `image_nodes`.
    image_ids: HashMap<String, usize, RandomState>,
    /// Per image name: (node position, size on that node), one entry per
    /// node holding it; its length is the image's spread.
    image_nodes: Vec<Vec<(u32, u64)>>,
    /// Per common image its holders as a bitset (index.rs).
    images: ImageIndex,
    /// Per pool key: ready nodes by the slot term of their free slots less
    /// assumed placements (index.rs).
    buckets: Vec<SlotBuckets>,
}

/// A node without a pool of that key.
const NO_POOL: u32 = u32::MAX;

impl Snapshot {
    /// Indexes `nodes`; fails on a duplicate name or an impossible pool.
    pub fn new(mut nodes: Vec<NodeState>) -> Result<Self, SnapshotError> {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = nodes.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(SnapshotError::DuplicateNode(pair[0].name.clone()));
        }
        let count = nodes.len();
        let mut snapshot = Snapshot {
            ready: nodes.iter().map(|n| n.ready).collect(),
            last_seen: nodes.iter().map(|n| n.last_seen_unix_ms).collect(),
            ..Snapshot::default()
        };
        for (index, state) in nodes.iter().enumerate() {
            check_pools(state)?;
            let position = u32::try_from(index).unwrap_or(u32::MAX);
            for pool in &state.pools {
                let key = (pool.handler.clone(), pool.shape.clone());
                let next = snapshot.pool_free.len();
                let id = *snapshot.pool_keys.entry(key).or_insert(next);
                if id == next {
                    snapshot.pool_free.push(vec![NO_POOL; count]);
                    snapshot.pool_assumed.push(vec![0; count]);
                }
                // A repeated (handler, shape) on one node: the first wins, as
                // in `set_pool_free`.
                if snapshot.pool_free[id][index] == NO_POOL {
                    snapshot.pool_free[id][index] = pool.free;
                }
            }
            for image in &state.images {
                for name in image.tags.iter().chain(&image.digests) {
                    let next = snapshot.image_nodes.len();
                    let id = *snapshot
                        .image_ids
                        .entry(normalize_image(name))
                        .or_insert(next);
                    if id == next {
                        snapshot.image_nodes.push(Vec::new());
                    }
                    let holders = &mut snapshot.image_nodes[id];
                    // One entry per node, with the largest size it reports.
                    match holders.last_mut() {
                        Some(last) if last.0 == position => last.1 = last.1.max(image.size_bytes),
                        _ => holders.push((position, image.size_bytes)),
                    }
                }
            }
        }
        snapshot.names = NameIndex::new(nodes.iter().map(|n| n.name.as_str()));
        snapshot.nodes = nodes.into_iter().map(Arc::new).collect();
        snapshot.images = ImageIndex::new(&snapshot.image_nodes, count);
        snapshot.buckets = snapshot
            .pool_free
            .iter()
            .map(|free| {
                let mut buckets = SlotBuckets::new(count);
                for (index, &free) in free.iter().enumerate() {
                    if free != NO_POOL && snapshot.ready[index] {
                        buckets.insert(index, free);
                    }
                }
                buckets
            })
            .collect();
        Ok(snapshot)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node's name with what `score` says of its column index.
    fn verdicts_by<'a, F>(
        &'a self,
        score: F,
    ) -> impl Iterator<Item = (&'a str, Result<u8, Rejection>)> + use<'a, F>
    where
        F: Fn(usize) -> Result<u8, Rejection>,
    {
        self.nodes
            .iter()
            .enumerate()
            .map(move |(i, n)| (n.name.as_str(), score(i)))
    }

    /// The node's column index, for scoring it.
    fn index_of(&self, name: &str) -> Result<usize, Rejection> {
        self.names.get(name).ok_or(Rejection::UnknownNode)
    }

    /// The node's state as last reported.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.names.get(name).map(|i| &*self.nodes[i])
    }

    /// All nodes, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeState> {
        self.nodes.iter().map(|n| &**n)
    }

    /// Records a pool's free count (a claim or a refill) without re-indexing.
    pub fn set_pool_free(
        &mut self,
        node: &str,
        handler: &str,
        shape: &str,
        free: u32,
    ) -> Result<(), SnapshotError> {
        self.set_pool_counts(node, handler, shape, free, None)
    }

    /// Records a pool's free count and, if given, its total (slots free or
    /// held by pods) without re-indexing.
    pub fn set_pool_counts(
        &mut self,
        node: &str,
        handler: &str,
        shape: &str,
        free: u32,
        total: Option<u32>,
    ) -> Result<(), SnapshotError> {
        let index = self
            .names
            .get(node)
            .ok_or_else(|| SnapshotError::UnknownNode(node.to_owned()))?;
        let state = Arc::make_mut(&mut self.nodes[index]);
        let pool = state
            .pools
            .iter_mut()
            .find(|p| p.handler == handler && p.shape == shape)
            .ok_or_else(|| SnapshotError::UnknownPool {
                node: node.to_owned(),
                handler: handler.to_owned(),
                shape: shape.to_owned(),
            })?;
        let total = total.unwrap_or(pool.total);
        if free > total {
            return Err(SnapshotError::FreeExceedsTotal {
                node: node.to_owned(),
                handler: handler.to_owned(),
                shape: shape.to_owned(),
                free,
                total,
            });
        }
        pool.free = free;
        pool.total = total;
        let key = (handler.to_owned(), shape.to_owned());
        if let Some(&id) = self.pool_keys.get(&key) {
            let old = std::mem::replace(&mut self.pool_free[id][index], free);
            let assumed = self.pool_assumed[id][index];
            self.buckets[id].moved(
                index,
                old.saturating_sub(assumed),
                free.saturating_sub(assumed),
            );
        }
        Ok(())
    }

    /// Counts a placement the node's reports do not show yet: the pool is
    /// scored with one free slot fewer until [`Snapshot::settle`]. Without
    /// this, every pod placed while reports lag goes to the same best node
    /// (see docs/scheduling.md).
    pub fn assume(&mut self, node: &str, handler: &str, shape: &str) -> Result<(), SnapshotError> {
        let (id, index) = self.locate(node, handler, shape)?;
        let assumed = self.pool_assumed[id][index];
        self.set_assumed(id, index, assumed.saturating_add(1));
        Ok(())
    }

    /// Drops one assumption: a report now covers the placement, or it
    /// expired (the pod was never bound there).
    pub fn settle(&mut self, node: &str, handler: &str, shape: &str) -> Result<(), SnapshotError> {
        let (id, index) = self.locate(node, handler, shape)?;
        let assumed = self.pool_assumed[id][index];
        self.set_assumed(id, index, assumed.saturating_sub(1));
        Ok(())
    }

    /// Records the placements assumed on a pool and moves the node to the
    /// bucket of its free slots less those.
    fn set_assumed(&mut self, id: usize, index: usize, assumed: u32) {
        let old = std::mem::replace(&mut self.pool_assumed[id][index], assumed);
        let free = self.pool_free[id][index];
        self.buckets[id].moved(
            index,
            free.saturating_sub(old),
            free.saturating_sub(assumed),
        );
    }

    /// Placements assumed on the pool and not settled yet.
    pub fn assumed(&self, node: &str, handler: &str, shape: &str) -> Result<u32, SnapshotError> {
        let (id, index) = self.locate(node, handler, shape)?;
        Ok(self.pool_assumed[id][index])
    }

    /// (pool key id, node position) of an existing pool.
    fn locate(
        &self,
        node: &str,
        handler: &str,
        shape: &str,
    ) -> Result<(usize, usize), SnapshotError> {
        let index = self
            .names
            .get(node)
            .ok_or_else(|| SnapshotError::UnknownNode(node.to_owned()))?;
        self.pool_keys
            .get(&(handler.to_owned(), shape.to_owned()))
            .copied()
            .filter(|&id| self.pool_free[id][index] != NO_POOL)
            .map(|id| (id, index))
            .ok_or_else(|| SnapshotError::UnknownPool {
                node: node.to_owned(),
                handler: handler.to_owned(),
                shape: shape.to_owned(),
            })
    }
}

fn check_pools(state: &NodeState) -> Result<(), SnapshotError> {
    match state.pools.iter().find(|p| p.free > p.total) {
        Some(p) => Err(SnapshotError::FreeExceedsTotal {
            node: state.name.clone(),
            handler: p.handler.clone(),
            shape: p.shape.clone(),
            free: p.free,
            total: p.total,
        }),
        None => Ok(()),
    }
}

/// An image reference in the form container runtimes report it: a missing
/// tag is `latest` (as kube-scheduler's `ImageLocality` does), and a Docker
/// Hub short name gets its registry and `library/` namespace (which
/// kube-scheduler does not do, so there `python:3.12` in a pod spec never
/// matches containerd's `docker.io/library/python:3.12`).
pub fn normalize_image(reference: &str) -> String {
    let (first, rest) = match reference.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (reference, None),
    };
    let has_registry =
        rest.is_some() && (first.contains('.') || first.contains(':') || first == "localhost");
    let mut name = match (has_registry, rest) {
        (true, _) => reference.to_owned(),
        (false, Some(_)) => format!("docker.io/{reference}"),
        (false, None) => format!("docker.io/library/{reference}"),
    };
    let last_slash = name.rfind('/');
    let has_tag_or_digest = name.contains('@') || name.rfind(':') > last_slash;
    if !has_tag_or_digest {
        name.push_str(":latest");
    }
    name
}

/// The slot term: 0 without a free slot, else 60..80 rising with `free`.
pub fn slot_term(free: u32) -> u8 {
    if free == 0 {
        return 0;
    }
    let free = u64::from(free);
    let term = SLOT_FLOOR + SLOT_RANGE * free / (free + SLOT_HALF);
    u8::try_from(term).unwrap_or(u8::MAX)
}

/// The image term from a spread-scaled byte sum, `ImageLocality`'s
/// `calculatePriority` mapped to 0..=20.
pub fn image_term(scaled_bytes: u64, images: usize) -> u8 {
    let containers = u64::try_from(images.max(1)).unwrap_or(u64::MAX);
    let max = IMAGE_MAX_THRESHOLD_PER_CONTAINER.saturating_mul(containers);
    let clamped = scaled_bytes.clamp(IMAGE_MIN_THRESHOLD, max);
    let term = IMAGE_RANGE * (clamped - IMAGE_MIN_THRESHOLD) / (max - IMAGE_MIN_THRESHOLD);
    u8::try_from(term).unwrap_or(u8::MAX)
}

/// A node's verdict, as both scorers decide it: filtered out when not
/// Ready or not seen within the policy's staleness bound, then by its pool
/// (`pool()` gives the request pool's free slots on the node, `None` for
/// no such pool, the spread-scaled bytes of requested images it holds and
/// the number of requested images), else its slot and image terms.
fn verdict(
    snapshot: &Snapshot,
    policy: &Policy,
    now_ms: u64,
    index: usize,
    pool: impl FnOnce() -> (Option<u32>, u64, usize),
) -> Result<u8, Rejection> {
    if !snapshot.ready[index] {
        return Err(Rejection::NotReady);
    }
    if let Some(limit) = policy.stale_after_ms {
        let age_ms = now_ms.saturating_sub(snapshot.last_seen[index]);
        if age_ms > limit {
            return Err(Rejection::Stale { age_ms });
        }
    }
    let (free, scaled, requested) = pool();
    let free = free.ok_or(Rejection::NoPool)?;
    if free == 0 && policy.slots == SlotPolicy::Require {
        return Err(Rejection::NoFreeSlot);
    }
    Ok(slot_term(free) + image_term(scaled, requested))
}

/// A request resolved against one snapshot: score many nodes with it.
///
/// Scoring one node reads its columns and looks its requested images up
/// (no per-request work over all nodes, so an extender call costs what its
/// candidate list costs); [`Scorer::best`] searches the node index
/// (`scoring/index.rs`) instead of scoring every node. The decisions are
/// those of [`linear::LinearScorer`], which scores every node.
#[derive(Debug)]
pub struct Scorer<'s> {
    snapshot: &'s Snapshot,
    policy: Policy,
    now_ms: u64,
    /// The request's pool key; `None` when no node has such a pool.
    pool: Option<usize>,
    /// The requested images the snapshot knows, in request order.
    entries: Vec<ImageEntry>,
    requested: usize,
}

/// One requested image known to the snapshot.
#[derive(Debug, Clone, Copy)]
struct ImageEntry {
    id: u32,
    /// The fraction of snapshot nodes holding it.
    spread: f64,
    /// Used for a node that reports no size.
    request_size: Option<u64>,
}

impl ImageEntry {
    /// Its spread-scaled bytes on a node reporting `on_node` bytes.
    fn contribution(&self, on_node: u64) -> u64 {
        let size = if on_node > 0 {
            on_node
        } else {
            self.request_size.unwrap_or(0)
        };
        (size as f64 * self.spread) as u64
    }
}

impl<'s> Scorer<'s> {
    pub fn new(snapshot: &'s Snapshot, request: &Request, policy: Policy, now_ms: u64) -> Self {
        let total = snapshot.len().max(1) as f64;
        let entries = request
            .images
            .iter()
            .filter_map(|image| {
                let id = *snapshot.image_ids.get(&normalize_image(&image.reference))?;
                Some(ImageEntry {
                    id: u32::try_from(id).ok()?,
                    spread: snapshot.image_nodes[id].len() as f64 / total,
                    request_size: image.size_bytes,
                })
            })
            .collect();
        let key = (request.handler.clone(), request.shape.clone());
        Scorer {
            snapshot,
            policy,
            now_ms,
            pool: snapshot.pool_keys.get(&key).copied(),
            entries,
            requested: request.images.len(),
        }
    }

    /// The node's score, or why it is filtered out.
    pub fn score(&self, node: &str) -> Result<u8, Rejection> {
        self.score_index(self.snapshot.index_of(node)?)
    }

    fn score_index(&self, index: usize) -> Result<u8, Rejection> {
        verdict(self.snapshot, &self.policy, self.now_ms, index, || {
            (
                self.free_at(index),
                self.scaled_bytes(index),
                self.requested,
            )
        })
    }

    /// Whether the node's status is recent enough under the policy.
    fn fresh(&self, index: usize) -> bool {
        self.policy
            .stale_after_ms
            .is_none_or(|limit| self.now_ms.saturating_sub(self.snapshot.last_seen[index]) <= limit)
    }

    /// Free slots less assumed placements of the request's pool on the node.
    fn free_at(&self, index: usize) -> Option<u32> {
        let id = self.pool?;
        match self.snapshot.pool_free[id][index] {
            NO_POOL => None,
            free => Some(free.saturating_sub(self.snapshot.pool_assumed[id][index])),
        }
    }

    /// The spread-scaled bytes of the requested images the node holds.
    fn scaled_bytes(&self, index: usize) -> u64 {
        let snapshot = self.snapshot;
        let mut scaled = 0u64;
        for entry in &self.entries {
            let holders = &snapshot.image_nodes[entry.id as usize];
            if let Some(on_node) = snapshot.images.size_on(index, entry.id, holders) {
                scaled = scaled.saturating_add(entry.contribution(on_node));
            }
        }
        scaled
    }

    /// [`Scorer::score`] and [`Scorer::free_slots`] (0 without the pool)
    /// with one name lookup: what the extender's prioritize asks of every
    /// candidate.
    pub fn score_and_free(&self, node: &str) -> (Result<u8, Rejection>, u32) {
        match self.snapshot.index_of(node) {
            Ok(index) => (self.score_index(index), self.free_at(index).unwrap_or(0)),
            Err(rejection) => (Err(rejection), 0),
        }
    }

    /// Free slots of the request's pool on `node` less assumed placements;
    /// `None` when the node is unknown or has no such pool.
    pub fn free_slots(&self, node: &str) -> Option<u32> {
        self.free_at(self.snapshot.names.get(node)?)
    }

    /// Every node with its verdict, by node name.
    pub fn verdicts(&self) -> impl Iterator<Item = (&'s str, Result<u8, Rejection>)> + '_ {
        self.snapshot.verdicts_by(move |i| self.score_index(i))
    }

    /// The best node: highest score, then smallest name.
    pub fn best(&self) -> Option<Placement<'s>> {
        self.best_where(|_| true)
    }

    /// The best node among those `keep` accepts (by name): the direct path's
    /// pool filter, which restricts candidates to a pool's nodes. `keep` is
    /// asked only about nodes that would be the best so far.
    pub fn best_where(&self, mut keep: impl FnMut(&str) -> bool) -> Option<Placement<'s>> {
        let (score, index) = self.search(&mut keep)?;
        Some(Placement {
            node: &self.snapshot.nodes[index].name,
            score,
        })
    }
}

/// A chosen node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement<'s> {
    pub node: &'s str,
    pub score: u8,
}

/// Chooses a node for `request`, or none when every node is filtered out.
pub fn place<'s>(
    snapshot: &'s Snapshot,
    request: &Request,
    policy: Policy,
    now_ms: u64,
) -> Option<Placement<'s>> {
    Scorer::new(snapshot, request, policy, now_ms).best()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool(handler: &str, shape: &str, free: u32, total: u32) -> PoolState {
        PoolState {
            handler: handler.into(),
            upstream_handler: handler.trim_start_matches("fast-").into(),
            shape: shape.into(),
            free,
            total,
        }
    }

    fn image(tag: &str, mib: u64) -> CachedImage {
        CachedImage {
            tags: vec![tag.into()],
            digests: vec![],
            size_bytes: mib * MIB,
        }
    }

    fn node(name: &str, pools: Vec<PoolState>, images: Vec<CachedImage>) -> NodeState {
        NodeState {
            name: name.into(),
            ready: true,
            pools,
            images,
            last_seen_unix_ms: 1_000,
        }
    }

    fn request(images: &[&str]) -> Request {
        Request {
            handler: "fast-runc".into(),
            shape: "default".into(),
            images: images
                .iter()
                .map(|r| RequestedImage {
                    reference: (*r).into(),
                    size_bytes: None,
                })
                .collect(),
        }
    }

    #[test]
    fn normalizes_like_the_runtime_reports() {
        assert_eq!(normalize_image("python"), "docker.io/library/python:latest");
        assert_eq!(
            normalize_image("python:3.12"),
            "docker.io/library/python:3.12"
        );
        assert_eq!(normalize_image("me/app"), "docker.io/me/app:latest");
        assert_eq!(
            normalize_image("localhost:5000/app"),
            "localhost:5000/app:latest"
        );
        assert_eq!(
            normalize_image("ghcr.io/a/b@sha256:00"),
            "ghcr.io/a/b@sha256:00"
        );
        assert_eq!(normalize_image("quay.io/a/b:1"), "quay.io/a/b:1");
    }

    #[test]
    fn image_term_follows_image_locality_thresholds() {
        assert_eq!(image_term(0, 1), 0);
        assert_eq!(image_term(IMAGE_MIN_THRESHOLD, 1), 0);
        assert_eq!(image_term(1000 * MIB, 1), 20);
        assert_eq!(image_term(u64::MAX, 1), 20);
        // (500 − 23) / (1000 − 23) × 20 = 9.76
        assert_eq!(image_term(500 * MIB, 1), 9);
        // Two containers: the maximum doubles, so the same bytes count less.
        assert_eq!(image_term(1000 * MIB, 2), 9);
    }

    #[test]
    fn slot_term_separates_some_from_none() {
        assert_eq!(slot_term(0), 0);
        assert_eq!(slot_term(1), 64);
        assert_eq!(slot_term(4), 70);
        assert!(slot_term(u32::MAX) < 80);
    }

    #[test]
    fn image_spread_scales_the_score() {
        // 1000 MiB image on a and b of four nodes: spread 1/2 → 500 MiB.
        let big = || image("registry.example/big:1", 1000);
        let nodes = vec![
            node("a", vec![pool("fast-runc", "default", 2, 4)], vec![big()]),
            node("b", vec![pool("fast-runc", "default", 2, 4)], vec![big()]),
            node("c", vec![pool("fast-runc", "default", 2, 4)], vec![]),
            node("d", vec![pool("fast-runc", "default", 2, 4)], vec![]),
        ];
        let snapshot = Snapshot::new(nodes).unwrap();
        let req = request(&["registry.example/big:1"]);
        let scorer = Scorer::new(&snapshot, &req, Policy::default(), 1_000);
        assert_eq!(scorer.score("a"), Ok(slot_term(2) + 9));
        assert_eq!(scorer.score("c"), Ok(slot_term(2)));
    }

    #[test]
    fn short_names_match_what_containerd_reports() {
        let nodes = vec![node(
            "a",
            vec![pool("fast-runc", "default", 1, 1)],
            vec![image("docker.io/library/python:3.12", 1000)],
        )];
        let snapshot = Snapshot::new(nodes).unwrap();
        let req = request(&["python:3.12"]);
        let scorer = Scorer::new(&snapshot, &req, Policy::default(), 0);
        assert_eq!(scorer.score("a"), Ok(slot_term(1) + 20));
    }

    #[test]
    fn request_size_is_used_when_the_node_reports_none() {
        let mut cached = image("registry.example/x:1", 0);
        cached.digests.push("registry.example/x@sha256:ab".into());
        let nodes = vec![node(
            "a",
            vec![pool("fast-runc", "default", 1, 1)],
            vec![cached],
        )];
        let snapshot = Snapshot::new(nodes).unwrap();
        let mut req = request(&["registry.example/x@sha256:ab"]);
        req.images[0].size_bytes = Some(1000 * MIB);
        let scorer = Scorer::new(&snapshot, &req, Policy::default(), 0);
        assert_eq!(scorer.score("a"), Ok(slot_term(1) + 20));
    }

    #[test]
    fn filter_reasons() {
        let mut down = node("down", vec![pool("fast-runc", "default", 3, 3)], vec![]);
        down.ready = false;
        let mut old = node("old", vec![pool("fast-runc", "default", 3, 3)], vec![]);
        old.last_seen_unix_ms = 0;
        let nodes = vec![
            down,
            old,
            node("gvisor", vec![pool("fast-gvisor", "default", 3, 3)], vec![]),
            node(
                "other-shape",
                vec![pool("fast-runc", "uid=1000", 3, 3)],
                vec![],
            ),
            node("empty", vec![pool("fast-runc", "default", 0, 3)], vec![]),
        ];
        let snapshot = Snapshot::new(nodes).unwrap();
        let req = request(&[]);
        let policy = Policy {
            slots: SlotPolicy::Require,
            stale_after_ms: Some(500),
        };
        let scorer = Scorer::new(&snapshot, &req, policy, 1_000);
        assert_eq!(scorer.score("down"), Err(Rejection::NotReady));
        assert_eq!(scorer.score("old"), Err(Rejection::Stale { age_ms: 1_000 }));
        assert_eq!(scorer.score("gvisor"), Err(Rejection::NoPool));
        assert_eq!(scorer.score("other-shape"), Err(Rejection::NoPool));
        assert_eq!(scorer.score("empty"), Err(Rejection::NoFreeSlot));
        assert_eq!(scorer.score("absent"), Err(Rejection::UnknownNode));
        assert_eq!(scorer.best(), None);

        let prefer = Policy {
            slots: SlotPolicy::Prefer,
            ..policy
        };
        let scorer = Scorer::new(&snapshot, &req, prefer, 1_000);
        assert_eq!(scorer.score("empty"), Ok(0));
        assert_eq!(scorer.best().map(|p| p.node), Some("empty"));
    }

    #[test]
    fn snapshot_rejects_duplicates_and_impossible_pools() {
        let a = node("a", vec![], vec![]);
        assert_eq!(
            Snapshot::new(vec![a.clone(), a]).unwrap_err(),
            SnapshotError::DuplicateNode("a".into())
        );
        let bad = node("b", vec![pool("fast-runc", "default", 5, 4)], vec![]);
        assert!(matches!(
            Snapshot::new(vec![bad]),
            Err(SnapshotError::FreeExceedsTotal { free: 5, .. })
        ));
    }

    #[test]
    fn set_pool_free_updates_in_place() {
        let nodes = vec![
            node("a", vec![pool("fast-runc", "default", 1, 4)], vec![]),
            node("b", vec![pool("fast-runc", "default", 2, 4)], vec![]),
        ];
        let mut snapshot = Snapshot::new(nodes).unwrap();
        let req = request(&[]);
        assert_eq!(
            place(&snapshot, &req, Policy::default(), 0).map(|p| p.node),
            Some("b")
        );
        snapshot
            .set_pool_free("a", "fast-runc", "default", 4)
            .unwrap();
        assert_eq!(
            place(&snapshot, &req, Policy::default(), 0).map(|p| p.node),
            Some("a")
        );
        assert!(snapshot
            .set_pool_free("a", "fast-runc", "default", 5)
            .is_err());
        assert!(snapshot
            .set_pool_free("a", "fast-kata", "default", 1)
            .is_err());
        assert!(snapshot
            .set_pool_free("z", "fast-runc", "default", 1)
            .is_err());
    }

    #[test]
    fn assumed_placements_count_against_free_slots() {
        let nodes = vec![
            node("a", vec![pool("fast-runc", "default", 2, 4)], vec![]),
            node("b", vec![pool("fast-runc", "default", 1, 4)], vec![]),
            node("c", vec![pool("fast-gvisor", "default", 1, 4)], vec![]),
        ];
        let mut snapshot = Snapshot::new(nodes).unwrap();
        let req = request(&[]);
        let require = Policy {
            slots: SlotPolicy::Require,
            stale_after_ms: None,
        };
        let chosen = |s: &Snapshot| place(s, &req, require, 0).map(|p| p.node.to_owned());
        assert_eq!(chosen(&snapshot).as_deref(), Some("a"));
        snapshot.assume("a", "fast-runc", "default").unwrap();
        // a and b now both show one free slot: the tie goes to a.
        assert_eq!(chosen(&snapshot).as_deref(), Some("a"));
        snapshot.assume("a", "fast-runc", "default").unwrap();
        assert_eq!(chosen(&snapshot).as_deref(), Some("b"));
        snapshot.assume("b", "fast-runc", "default").unwrap();
        assert_eq!(chosen(&snapshot), None);
        assert_eq!(snapshot.assumed("a", "fast-runc", "default"), Ok(2));
        // The report catches up with a's first placement.
        snapshot
            .set_pool_free("a", "fast-runc", "default", 1)
            .unwrap();
        snapshot.settle("a", "fast-runc", "default").unwrap();
        assert_eq!(snapshot.assumed("a", "fast-runc", "default"), Ok(1));
        assert_eq!(chosen(&snapshot), None);
        snapshot.settle("a", "fast-runc", "default").unwrap();
        snapshot.settle("a", "fast-runc", "default").unwrap();
        assert_eq!(snapshot.assumed("a", "fast-runc", "default"), Ok(0));
        assert_eq!(chosen(&snapshot).as_deref(), Some("a"));
        // A pool the node does not have, even if another node has the key.
        assert!(snapshot.assume("c", "fast-runc", "default").is_err());
        assert!(snapshot.assume("a", "fast-gvisor", "default").is_err());
    }

    const HANDLERS: [&str; 2] = ["fast-runc", "fast-gvisor"];
    const SHAPES: [&str; 2] = ["default", "uid=1000"];
    const IMAGES: [(&str, u64); 4] = [
        ("docker.io/library/python:3.12", 400),
        ("docker.io/library/busybox:latest", 4),
        ("ghcr.io/acme/agent:7", 900),
        ("quay.io/acme/tool:1", 60),
    ];

    fn arb_node(name: String) -> impl Strategy<Value = NodeState> {
        (
            any::<bool>(),
            proptest::collection::vec((0..2usize, 0..2usize, 0..6u32, 0..6u32), 0..3),
            proptest::collection::vec(0..IMAGES.len(), 0..4),
            0..2_000u64,
        )
            .prop_map(move |(down, pools, images, seen)| {
                let mut pool_states: Vec<PoolState> = Vec::new();
                for (h, s, a, b) in pools {
                    if !pool_states
                        .iter()
                        .any(|p| p.handler == HANDLERS[h] && p.shape == SHAPES[s])
                    {
                        pool_states.push(pool(HANDLERS[h], SHAPES[s], a.min(b), a.max(b)));
                    }
                }
                NodeState {
                    name: name.clone(),
                    ready: !down,
                    pools: pool_states,
                    images: images
                        .into_iter()
                        .map(|i| image(IMAGES[i].0, IMAGES[i].1))
                        .collect(),
                    last_seen_unix_ms: seen,
                }
            })
    }

    fn arb_nodes() -> impl Strategy<Value = Vec<NodeState>> {
        (1..12usize).prop_flat_map(|n| {
            (0..n)
                .map(|i| arb_node(format!("node-{i:02}")))
                .collect::<Vec<_>>()
        })
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        (
            0..2usize,
            0..2usize,
            proptest::collection::vec(0..IMAGES.len(), 0..3),
        )
            .prop_map(|(h, s, images)| Request {
                handler: HANDLERS[h].into(),
                shape: SHAPES[s].into(),
                images: images
                    .into_iter()
                    .map(|i| RequestedImage {
                        reference: IMAGES[i].0.into(),
                        size_bytes: None,
                    })
                    .collect(),
            })
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (any::<bool>(), proptest::option::of(0..2_000u64)).prop_map(|(require, stale)| Policy {
            slots: if require {
                SlotPolicy::Require
            } else {
                SlotPolicy::Prefer
            },
            stale_after_ms: stale,
        })
    }

    fn pool_of<'a>(state: &'a NodeState, req: &Request) -> Option<&'a PoolState> {
        state
            .pools
            .iter()
            .find(|p| p.handler == req.handler && p.shape == req.shape)
    }

    proptest! {
        #[test]
        fn scores_stay_in_range_and_the_best_is_a_maximum(
            nodes in arb_nodes(), req in arb_request(), policy in arb_policy()
        ) {
            let snapshot = Snapshot::new(nodes).unwrap();
            let scorer = Scorer::new(&snapshot, &req, policy, 1_000);
            let verdicts: Vec<_> = scorer.verdicts().collect();
            for (_, verdict) in &verdicts {
                if let Ok(score) = verdict {
                    prop_assert!(*score <= MAX_SCORE);
                }
            }
            let top = verdicts.iter().filter_map(|(_, v)| v.as_ref().ok()).max();
            prop_assert_eq!(scorer.best().map(|p| p.score), top.copied());
        }

        #[test]
        fn a_node_without_the_pool_is_never_chosen(
            nodes in arb_nodes(), req in arb_request(), policy in arb_policy()
        ) {
            let snapshot = Snapshot::new(nodes).unwrap();
            if let Some(chosen) = place(&snapshot, &req, policy, 1_000) {
                let state = snapshot.node(chosen.node).unwrap();
                prop_assert!(state.ready);
                let pool = pool_of(state, &req);
                prop_assert!(pool.is_some());
                if policy.slots == SlotPolicy::Require {
                    prop_assert!(pool.unwrap().free > 0);
                }
            }
        }

        #[test]
        fn a_free_slot_beats_any_node_without_one(
            nodes in arb_nodes(), req in arb_request(), policy in arb_policy()
        ) {
            let snapshot = Snapshot::new(nodes).unwrap();
            let scorer = Scorer::new(&snapshot, &req, policy, 1_000);
            let scored: Vec<(u32, u8)> = scorer
                .verdicts()
                .filter_map(|(name, v)| {
                    let free = pool_of(snapshot.node(name)?, &req)?.free;
                    Some((free, v.ok()?))
                })
                .collect();
            for (free_a, a) in &scored {
                for (free_b, b) in &scored {
                    if *free_a > 0 && *free_b == 0 {
                        prop_assert!(a > b);
                    }
                }
            }
        }

        #[test]
        fn more_free_slots_never_lower_a_score(
            nodes in arb_nodes(), req in arb_request(), policy in arb_policy(),
            pick in any::<prop::sample::Index>(), extra in 1..10u32
        ) {
            let mut snapshot = Snapshot::new(nodes.clone()).unwrap();
            let state = &nodes[pick.index(nodes.len())];
            let Some(p) = pool_of(state, &req) else { return Ok(()) };
            let before = Scorer::new(&snapshot, &req, policy, 1_000).score(&state.name);
            let mut grown = nodes.clone();
            let target = grown.iter_mut().find(|n| n.name == state.name).unwrap();
            let gp = target.pools.iter_mut()
                .find(|q| q.handler == p.handler && q.shape == p.shape).unwrap();
            gp.total += extra;
            gp.free += extra;
            snapshot = Snapshot::new(grown).unwrap();
            let after = Scorer::new(&snapshot, &req, policy, 1_000).score(&state.name);
            match (before, after) {
                (Ok(b), Ok(a)) => prop_assert!(a >= b),
                (Err(_), Ok(_)) => prop_assert_eq!(p.free, 0),
                (Ok(_), Err(e)) => prop_assert!(false, "became {e}"),
                (Err(_), Err(_)) => {}
            }
        }

        #[test]
        fn assumed_placements_never_raise_a_score(
            nodes in arb_nodes(), req in arb_request(), policy in arb_policy(),
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 1..6)
        ) {
            let before = Snapshot::new(nodes.clone()).unwrap();
            let mut after = before.clone();
            for pick in picks {
                let state = &nodes[pick.index(nodes.len())];
                // Only pools the node has can be assumed on.
                let _ = after.assume(&state.name, &req.handler, &req.shape);
            }
            let old = Scorer::new(&before, &req, policy, 1_000);
            let new = Scorer::new(&after, &req, policy, 1_000);
            for ((name, a), (_, b)) in old.verdicts().zip(new.verdicts()) {
                match (a, b) {
                    (Ok(a), Ok(b)) => prop_assert!(b <= a, "{name}: {a} -> {b}"),
                    (Err(_), Ok(_)) => prop_assert!(false, "{name} passes only after assuming"),
                    _ => {}
                }
            }
        }

        #[test]
        fn the_decision_ignores_input_order_and_ties_go_to_the_smallest_name(
            nodes in arb_nodes(), req in arb_request(), policy in arb_policy(),
            seed in any::<u64>()
        ) {
            let forward = Snapshot::new(nodes.clone()).unwrap();
            let mut shuffled = nodes.clone();
            // A deterministic permutation from the seed.
            let len = shuffled.len();
            let mut s = seed;
            for i in (1..len).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            let backward = Snapshot::new(shuffled).unwrap();
            let a = place(&forward, &req, policy, 1_000).map(|p| (p.node.to_owned(), p.score));
            let b = place(&backward, &req, policy, 1_000).map(|p| (p.node.to_owned(), p.score));
            prop_assert_eq!(&a, &b);
            if let Some((chosen, score)) = a {
                let scorer = Scorer::new(&forward, &req, policy, 1_000);
                for (name, verdict) in scorer.verdicts() {
                    if verdict == Ok(score) {
                        prop_assert!(chosen.as_str() <= name);
                    }
                }
            }
        }
    }
}
