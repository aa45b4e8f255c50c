//! The linear scorer: the decision as it was made before the node index
//! ([`super::Scorer`]), kept as the reference the indexed search is tested
//! against (`same_decisions_as_the_linear_scorer` below) and measured
//! against (`fast-sandbox-controller bench`).
//!
//! It walks every node: the holders of each requested image into a
//! per-node byte sum, then every node's columns. Same filter, same score,
//! same tie-break (smallest name) as [`super::Scorer`]; only slower, its
//! cost growing with the cluster instead of with the answer.

use super::{normalize_image, verdict, Placement, Policy, Rejection, Request, Snapshot, NO_POOL};

/// A request resolved against one snapshot, scored by walking every node.
#[derive(Debug)]
pub struct LinearScorer<'s> {
    snapshot: &'s Snapshot,
    policy: Policy,
    now_ms: u64,
    /// Reported free slots and assumed placements per node of the request's
    /// pool key; `None` when no node has such a pool.
    free: Option<(&'s [u32], &'s [u32])>,
    /// Per node: the spread-scaled bytes of requested images it holds.
    scaled: Vec<u64>,
    requested: usize,
}

impl<'s> LinearScorer<'s> {
    pub fn new(snapshot: &'s Snapshot, request: &Request, policy: Policy, now_ms: u64) -> Self {
        let total = snapshot.len().max(1) as f64;
        let mut scaled: Vec<u64> = Vec::new();
        for image in &request.images {
            let Some(&id) = snapshot.image_ids.get(&normalize_image(&image.reference)) else {
                continue;
            };
            if scaled.is_empty() {
                scaled = vec![0; snapshot.len()];
            }
            let holders = &snapshot.image_nodes[id];
            let spread = holders.len() as f64 / total;
            for &(node, on_node) in holders {
                let size = if on_node > 0 {
                    on_node
                } else {
                    image.size_bytes.unwrap_or(0)
                };
                let slot = &mut scaled[node as usize];
                *slot = slot.saturating_add((size as f64 * spread) as u64);
            }
        }
        let key = (request.handler.clone(), request.shape.clone());
        let free = snapshot.pool_keys.get(&key).map(|&id| {
            (
                snapshot.pool_free[id].as_slice(),
                snapshot.pool_assumed[id].as_slice(),
            )
        });
        LinearScorer {
            snapshot,
            policy,
            now_ms,
            free,
            scaled,
            requested: request.images.len(),
        }
    }

    /// The node's score, or why it is filtered out.
    pub fn score(&self, node: &str) -> Result<u8, Rejection> {
        self.score_index(self.snapshot.index_of(node)?)
    }

    fn score_index(&self, index: usize) -> Result<u8, Rejection> {
        verdict(self.snapshot, &self.policy, self.now_ms, index, || {
            let free = match self
                .free
                .map(|(free, assumed)| (free[index], assumed[index]))
            {
                None | Some((NO_POOL, _)) => None,
                Some((free, assumed)) => Some(free.saturating_sub(assumed)),
            };
            let scaled = self.scaled.get(index).copied().unwrap_or(0);
            (free, scaled, self.requested)
        })
    }

    /// Every node with its verdict, by node name.
    pub fn verdicts(&self) -> impl Iterator<Item = (&'s str, Result<u8, Rejection>)> + '_ {
        self.snapshot.verdicts_by(move |i| self.score_index(i))
    }

    /// The best node: highest score, then smallest name.
    pub fn best(&self) -> Option<Placement<'s>> {
        self.best_where(|_| true)
    }

    /// The best node among those `keep` accepts (by name).
    pub fn best_where(&self, mut keep: impl FnMut(&str) -> bool) -> Option<Placement<'s>> {
        let mut best: Option<Placement<'s>> = None;
        for i in 0..self.snapshot.nodes.len() {
            if !keep(&self.snapshot.nodes[i].name) {
                continue;
            }
            if let Ok(score) = self.score_index(i) {
                if best.as_ref().is_none_or(|b| score > b.score) {
                    best = Some(Placement {
                        node: &self.snapshot.nodes[i].name,
                        score,
                    });
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::SlotPolicy;
    use crate::scoring::{CachedImage, NodeState, RequestedImage, Scorer};
    use crate::synth::Rng;

    const HANDLERS: [&str; 3] = ["fast-runc", "fast-gvisor", "fast-kata"];
    const SHAPES: [&str; 2] = ["default", "uid=1000"];
    const MIB: u64 = 1024 * 1024;
    const NOW_MS: u64 = 10_000;

    /// An image of the random catalogue: how common, how big, and whether
    /// nodes disagree on its size (a re-pushed tag) or report none.
    struct Image {
        tag: String,
        digest: String,
        share: f64,
        size: u64,
        uneven: bool,
    }

    fn catalogue(rng: &mut Rng) -> Vec<Image> {
        let count = 1 + rng.below(30);
        (0..count)
            .map(|i| Image {
                // Image 0 is a Docker Hub short name, requested as `python:3.12`.
                tag: match i {
                    0 => "docker.io/library/python:3.12".to_owned(),
                    _ => format!("registry.example/app-{i}:v1"),
                },
                digest: format!("registry.example/app-{i}@sha256:{i:064x}"),
                share: [0.95, 0.6, 0.2, 0.03, 0.005][rng.below(5)],
                size: [0, 4, 200, 900, 2500][rng.below(5)] * MIB,
                uneven: rng.unit() < 0.2,
            })
            .collect()
    }

    fn random_node(rng: &mut Rng, name: String, images: &[Image]) -> NodeState {
        let keys = HANDLERS
            .iter()
            .flat_map(|&h| SHAPES.iter().map(move |&s| (h, s)));
        let pools = crate::scoring::testing::random_pools(rng, keys, 12);
        let mut cached = Vec::new();
        for image in images {
            if rng.unit() >= image.share {
                continue;
            }
            cached.push(CachedImage {
                tags: vec![image.tag.clone()],
                digests: if rng.unit() < 0.5 {
                    vec![image.digest.clone()]
                } else {
                    vec![]
                },
                size_bytes: if image.uneven {
                    rng.below(3) as u64 * image.size
                } else {
                    image.size
                },
            });
        }
        NodeState {
            name,
            ready: rng.unit() < 0.95,
            pools,
            images: cached,
            last_seen_unix_ms: NOW_MS - rng.below(2_000) as u64,
        }
    }

    fn random_request(rng: &mut Rng, images: &[Image]) -> Request {
        let reference = |rng: &mut Rng| match rng.below(images.len() + 1) {
            0 => "python:3.12".to_owned(),
            i if i == images.len() => "registry.example/unknown:1".to_owned(),
            i if rng.unit() < 0.3 => images[i].digest.clone(),
            i => images[i].tag.clone(),
        };
        Request {
            handler: ["fast-runc", "fast-gvisor", "fast-kata", "fast-none"][rng.below(4)].into(),
            shape: SHAPES[rng.below(2)].into(),
            images: (0..rng.below(5))
                .map(|_| RequestedImage {
                    reference: reference(rng),
                    size_bytes: (rng.unit() < 0.5).then(|| rng.below(3000) as u64 * MIB),
                })
                .collect(),
        }
    }

    fn random_policy(rng: &mut Rng) -> Policy {
        Policy {
            slots: if rng.unit() < 0.5 {
                SlotPolicy::Require
            } else {
                SlotPolicy::Prefer
            },
            stale_after_ms: (rng.unit() < 0.5).then(|| rng.below(2_500) as u64),
        }
    }

    /// A claim, a refill or an assumed placement (or its settling) on a
    /// random node's pool, as the node-status watch and the extender apply
    /// them between decisions.
    fn random_change(rng: &mut Rng, snapshot: &mut Snapshot) {
        let index = rng.below(snapshot.len());
        let state = &snapshot.nodes[index];
        let Some(pool) = state.pools.get(rng.below(state.pools.len().max(1))) else {
            return;
        };
        let (node, handler, shape) = (state.name.clone(), pool.handler.clone(), pool.shape.clone());
        let total = pool.total;
        let done = match rng.below(3) {
            0 => snapshot.assume(&node, &handler, &shape),
            1 => snapshot.settle(&node, &handler, &shape),
            _ => {
                // With the picked pool's total: a repeated key's first pool
                // may have another.
                let free = u32::try_from(rng.below(total as usize + 1)).unwrap_or(0);
                snapshot.set_pool_counts(&node, &handler, &shape, free, Some(total))
            }
        };
        assert_eq!(done, Ok(()), "{node} {handler}/{shape}");
    }

    /// The indexed search makes the decisions the linear scorer makes, on
    /// random clusters (up to 400 nodes, so that some images are rare and
    /// some common), random requests and policies, with claims, refills
    /// and assumed placements applied in place between decisions.
    #[test]
    fn same_decisions_as_the_linear_scorer() {
        let mut rng = Rng::new(14);
        let mut decisions = 0;
        let mut placed = 0;
        for cluster in 0..150 {
            let images = catalogue(&mut rng);
            let count = 1 + rng.below(if cluster % 3 == 0 { 400 } else { 40 });
            let nodes = (0..count)
                .map(|i| random_node(&mut rng, format!("node-{:03}", (i * 7919) % 1000), &images))
                .collect();
            let mut snapshot = Snapshot::new(nodes).expect("random clusters are valid");
            for _ in 0..30 {
                for _ in 0..rng.below(4) {
                    random_change(&mut rng, &mut snapshot);
                }
                let request = random_request(&mut rng, &images);
                let policy = random_policy(&mut rng);
                let new = Scorer::new(&snapshot, &request, policy, NOW_MS);
                let old = LinearScorer::new(&snapshot, &request, policy, NOW_MS);
                let context = format!("cluster {cluster}: {request:?} {policy:?}");
                assert!(new.verdicts().eq(old.verdicts()), "{context}");
                assert_eq!(new.best(), old.best(), "{context}");
                // A pool's node selector, as the Sandbox path passes it.
                let salt = rng.below(5);
                let keep = |name: &str| usize::from(name.as_bytes()[name.len() - 1]) % 5 != salt;
                assert_eq!(new.best_where(keep), old.best_where(keep), "{context}");
                decisions += 1;
                placed += usize::from(old.best().is_some());
            }
        }
        // The comparison means something only if most decisions place.
        assert!(placed * 2 > decisions, "{placed} of {decisions} placed");
    }
}
