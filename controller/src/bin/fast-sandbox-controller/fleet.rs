//! Synthetic clusters and requests for the benchmark: deterministic from a
//! seed, shaped like a real fleet (shared base images on almost every node,
//! tens of application images per node drawn by popularity, four runtime
//! handlers on differently sized node groups).

use fast_sandbox_controller::scoring::{
    CachedImage, NodeState, PoolState, Request, RequestedImage,
};
use fast_sandbox_controller::synth::Rng;

const MIB: u64 = 1024 * 1024;

/// The exposed handlers and the share of nodes that serve each.
pub const HANDLERS: [(&str, &str, f64); 4] = [
    ("fast-runc", "runc", 1.0),
    ("fast-crun", "crun", 0.5),
    ("fast-gvisor", "runsc", 0.3),
    ("fast-kata", "kata", 0.2),
];

/// Shapes a pool can be built for, in the extender's encoding
/// ([`fast_sandbox_controller::extender::pod_shape`]): kubelet's default, and `runAsUser: 1000`.
pub const SHAPES: [&str; 2] = [
    "seccomp=runtime-default",
    "seccomp=runtime-default;uid=1000",
];

/// An image of the catalog.
#[derive(Debug, Clone)]
pub struct CatalogImage {
    pub tag: String,
    pub digest: String,
    pub size_bytes: u64,
}

/// Base images (on ~90% of nodes each) and application images drawn by a
/// Zipf-like popularity.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub base: Vec<CatalogImage>,
    pub apps: Vec<CatalogImage>,
    /// Cumulative popularity weights of `apps`.
    cumulative: Vec<f64>,
}

impl Catalog {
    pub fn new(rng: &mut Rng, apps: usize) -> Self {
        let base = [
            ("registry.k8s.io/pause:3.9", 1),
            ("docker.io/library/busybox:1.36", 4),
            ("docker.io/library/alpine:3.20", 8),
            ("docker.io/library/debian:bookworm-slim", 75),
            ("docker.io/library/ubuntu:24.04", 78),
            ("docker.io/library/python:3.12-slim", 130),
            ("docker.io/library/node:22-slim", 240),
            ("docker.io/library/golang:1.23", 820),
        ]
        .iter()
        .enumerate()
        .map(|(i, (tag, mib))| image(tag, i, mib * MIB))
        .collect();
        let apps: Vec<CatalogImage> = (0..apps)
            .map(|i| {
                // Log-uniform 30 MiB .. 3 GiB.
                let size = (30.0 * MIB as f64) * (100f64).powf(rng.unit());
                let tag = format!("registry.example/team-{}/app-{i}:v{}", i % 17, i % 5);
                image(&tag, 1000 + i, size as u64)
            })
            .collect();
        let mut total = 0.0;
        let cumulative = (0..apps.len())
            .map(|i| {
                total += 1.0 / (i as f64 + 1.0);
                total
            })
            .collect();
        Catalog {
            base,
            apps,
            cumulative,
        }
    }

    /// An application image index, popular ones more often.
    pub fn pick_app(&self, rng: &mut Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = rng.unit() * total;
        self.cumulative
            .partition_point(|&c| c <= x)
            .min(self.apps.len().saturating_sub(1))
    }
}

fn image(tag: &str, salt: usize, size_bytes: u64) -> CatalogImage {
    let repo = tag.rsplit_once(':').map_or(tag, |(repo, _)| repo);
    CatalogImage {
        tag: tag.to_owned(),
        digest: format!("{repo}@sha256:{salt:064x}"),
        size_bytes,
    }
}

fn cached(image: &CatalogImage) -> CachedImage {
    CachedImage {
        tags: vec![image.tag.clone()],
        digests: vec![image.digest.clone()],
        size_bytes: image.size_bytes,
    }
}

/// `count` nodes, each with pools for the handlers its group serves (8
/// slots, a random number free) and 30..60 application images besides the
/// base images.
pub fn cluster(rng: &mut Rng, catalog: &Catalog, count: usize, now_ms: u64) -> Vec<NodeState> {
    (0..count)
        .map(|i| {
            let mut pools = Vec::new();
            let group = rng.unit();
            for (handler, upstream, share) in HANDLERS {
                if group < share {
                    for (s, shape) in SHAPES.iter().enumerate() {
                        if s == 0 || rng.unit() < 0.3 {
                            let total = 8;
                            pools.push(PoolState {
                                handler: handler.into(),
                                upstream_handler: upstream.into(),
                                shape: (*shape).into(),
                                free: u32::try_from(rng.below(9)).unwrap_or(0),
                                total,
                            });
                        }
                    }
                }
            }
            let mut images: Vec<CachedImage> = catalog
                .base
                .iter()
                .filter(|_| rng.unit() < 0.9)
                .map(cached)
                .collect();
            let apps = 30 + rng.below(31);
            let mut chosen: Vec<usize> = (0..apps).map(|_| catalog.pick_app(rng)).collect();
            chosen.sort_unstable();
            chosen.dedup();
            images.extend(chosen.iter().map(|&a| cached(&catalog.apps[a])));
            NodeState {
                name: format!("node-{i:05}"),
                ready: rng.unit() > 0.01,
                pools,
                images,
                last_seen_unix_ms: now_ms,
            }
        })
        .collect()
}

/// A pod: a handler weighted towards runc, mostly the default shape, a base
/// image (90%) and one or two application images.
pub fn request(rng: &mut Rng, catalog: &Catalog) -> Request {
    let handler = match rng.unit() {
        x if x < 0.5 => 0,
        x if x < 0.75 => 1,
        x if x < 0.9 => 2,
        _ => 3,
    };
    let shape = usize::from(rng.unit() < 0.2);
    let mut images = Vec::new();
    if rng.unit() < 0.9 {
        let base = &catalog.base[rng.below(catalog.base.len())];
        images.push(RequestedImage {
            reference: base.tag.clone(),
            size_bytes: None,
        });
    }
    for _ in 0..1 + rng.below(2) {
        let app = &catalog.apps[catalog.pick_app(rng)];
        images.push(RequestedImage {
            reference: app.tag.clone(),
            size_bytes: Some(app.size_bytes),
        });
    }
    Request {
        handler: HANDLERS[handler].0.into(),
        shape: SHAPES[shape].into(),
        images,
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_builds_the_same_cluster() {
        let build = || {
            let mut rng = Rng::new(7);
            let catalog = Catalog::new(&mut rng, 100);
            cluster(&mut rng, &catalog, 20, 0)
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn nodes_look_like_a_fleet() {
        let mut rng = Rng::new(1);
        let catalog = Catalog::new(&mut rng, 300);
        let nodes = cluster(&mut rng, &catalog, 200, 0);
        for node in &nodes {
            assert!(node.pools.iter().any(|p| p.handler == "fast-runc"));
            assert!(node.images.len() >= 20, "{} images", node.images.len());
            assert!(node.pools.iter().all(|p| p.free <= p.total));
        }
        for (handler, _, _) in HANDLERS {
            assert!(nodes
                .iter()
                .any(|n| n.pools.iter().any(|p| p.handler == handler)));
        }
    }
}
