//! How long one placement decision takes on a large synthetic cluster.
//!
//! Two measurements per request: `place` (the direct path: score every node,
//! keep the best) and `by-name` (the extender's path: look each candidate up
//! by name and score it, as a filter or prioritize call over all nodes does).

use std::fmt;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::extender::{Extender, ExtenderArgs, ExtenderConfig};
use crate::scoring::{Policy, Request, Scorer, Snapshot, SnapshotError};
use crate::synth::{self, Catalog, Rng};

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct BenchConfig {
    pub nodes: usize,
    pub decisions: usize,
    pub apps: usize,
    pub seed: u64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            nodes: 5_000,
            decisions: 5_000,
            apps: 400,
            seed: 1,
        }
    }
}

/// Latency quantiles of one measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quantiles {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Quantiles {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).saturating_sub(1);
            samples.get(i).copied().unwrap_or_default()
        };
        Quantiles {
            p50: at(0.50),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

/// The figures.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub config: BenchConfig,
    pub images_per_node: f64,
    pub pools_per_node: f64,
    pub index_build: Duration,
    pub place: Quantiles,
    pub by_name: Quantiles,
    /// The extender's filter verb over every node, JSON in and out.
    pub filter: Quantiles,
    /// The extender's prioritize verb over every node, JSON in and out.
    pub prioritize: Quantiles,
    /// Decisions that found a node (the rest had every node filtered out).
    pub placed: usize,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        writeln!(
            f,
            "nodes {}  images/node {:.1}  pools/node {:.2}  decisions {} (placed {})",
            self.config.nodes,
            self.images_per_node,
            self.pools_per_node,
            self.config.decisions,
            self.placed
        )?;
        writeln!(
            f,
            "snapshot index build: {:.1} ms",
            self.index_build.as_secs_f64() * 1e3
        )?;
        for (name, q) in [
            ("place", self.place),
            ("by-name", self.by_name),
            ("filter", self.filter),
            ("prioritize", self.prioritize),
        ] {
            writeln!(
                f,
                "{name:10} p50 {:8.1} us  p99 {:8.1} us  max {:8.1} us",
                us(q.p50),
                us(q.p99),
                us(q.max)
            )?;
        }
        Ok(())
    }
}

/// Builds the cluster, then times `config.decisions` random requests.
pub fn run(config: BenchConfig) -> Result<BenchReport, SnapshotError> {
    let mut rng = Rng::new(config.seed);
    let catalog = Catalog::new(&mut rng, config.apps);
    let now_ms = 1_000_000;
    let nodes = synth::cluster(&mut rng, &catalog, config.nodes, now_ms);
    let count = nodes.len().max(1) as f64;
    let images_per_node = nodes.iter().map(|n| n.images.len()).sum::<usize>() as f64 / count;
    let pools_per_node = nodes.iter().map(|n| n.pools.len()).sum::<usize>() as f64 / count;
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();

    let started = Instant::now();
    let snapshot = Snapshot::new(nodes)?;
    let index_build = started.elapsed();

    let policy = Policy {
        stale_after_ms: Some(60_000),
        ..Policy::default()
    };
    let extender = Extender::new(
        ExtenderConfig {
            policy,
            // The filter's cost is what is measured.
            filter_nodes: true,
            ..ExtenderConfig::default()
        },
        snapshot.clone(),
    );
    let mut filter = Vec::with_capacity(config.decisions);
    let mut prioritize = Vec::with_capacity(config.decisions);
    let mut place = Vec::with_capacity(config.decisions);
    let mut by_name = Vec::with_capacity(config.decisions);
    let mut placed = 0;
    for decision in 0..config.decisions {
        let request = synth::request(&mut rng, &catalog);
        // One pod every 3 ms for the extender, so its assumed placements
        // (DEFAULT_ASSUME_TTL_MS) stay as many as at ~330 pods/s.
        let call_ms = now_ms + 3 * decision as u64;

        let started = Instant::now();
        let best = Scorer::new(&snapshot, &request, policy, now_ms).best();
        place.push(started.elapsed());
        placed += usize::from(best.is_some());

        let started = Instant::now();
        let scorer = Scorer::new(&snapshot, &request, policy, now_ms);
        let passing = names
            .iter()
            .filter(|name| scorer.score(name).is_ok())
            .count();
        by_name.push(started.elapsed());
        std::hint::black_box(passing);

        let body = extender_args(&request, &names, decision).to_string();
        for (verb, samples) in [("filter", &mut filter), ("prioritize", &mut prioritize)] {
            let started = Instant::now();
            let args: ExtenderArgs =
                serde_json::from_str(&body).expect("the bench's own arguments parse");
            let answer = match verb {
                "filter" => serde_json::to_string(&extender.filter(args, call_ms)),
                _ => serde_json::to_string(&extender.prioritize(args, call_ms)),
            }
            .expect("answers serialize");
            samples.push(started.elapsed());
            std::hint::black_box(answer);
        }
    }
    Ok(BenchReport {
        config,
        images_per_node,
        pools_per_node,
        index_build,
        place: Quantiles::of(place),
        by_name: Quantiles::of(by_name),
        filter: Quantiles::of(filter),
        prioritize: Quantiles::of(prioritize),
        placed,
    })
}

/// The body kube-scheduler sends in node-name cache mode for a pod that
/// makes `request`.
fn extender_args(request: &Request, names: &[String], uid: usize) -> serde_json::Value {
    let containers: Vec<serde_json::Value> = request
        .images
        .iter()
        .enumerate()
        .map(|(i, image)| json!({"name": format!("c{i}"), "image": image.reference}))
        .collect();
    let mut spec = json!({"runtimeClassName": request.handler, "containers": containers});
    if request.shape.contains("uid=1000") {
        spec["securityContext"] = json!({"runAsUser": 1000});
    }
    json!({
        "Pod": {"metadata": {"name": "bench", "namespace": "default", "uid": format!("pod-{uid}")}, "spec": spec},
        "NodeNames": names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_the_right_samples() {
        let samples = (1..=100).map(Duration::from_micros).collect();
        let q = Quantiles::of(samples);
        assert_eq!(q.p50, Duration::from_micros(50));
        assert_eq!(q.p99, Duration::from_micros(99));
        assert_eq!(q.max, Duration::from_micros(100));
        assert_eq!(Quantiles::of(Vec::new()), Quantiles::default());
    }

    #[test]
    fn a_small_run_places_most_requests() {
        let report = run(BenchConfig {
            nodes: 200,
            decisions: 50,
            apps: 100,
            seed: 2,
        })
        .unwrap();
        assert_eq!(report.config.decisions, 50);
        assert!(report.placed >= 45, "placed {}", report.placed);
        assert!(report.images_per_node >= 20.0);
        assert!(report.to_string().contains("p99"));
    }

    #[test]
    fn the_extender_sees_the_pods_the_scorer_sees() {
        let mut rng = Rng::new(5);
        let catalog = Catalog::new(&mut rng, 50);
        let nodes = synth::cluster(&mut rng, &catalog, 50, 0);
        let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let snapshot = Snapshot::new(nodes).unwrap();
        let config = ExtenderConfig {
            filter_nodes: true,
            ..ExtenderConfig::default()
        };
        let extender = Extender::new(config, snapshot.clone());
        for _ in 0..20 {
            let request = synth::request(&mut rng, &catalog);
            let args: ExtenderArgs =
                serde_json::from_value(extender_args(&request, &names, 0)).unwrap();
            let pod = args.pod.as_ref().unwrap();
            let seen = extender.request_for(pod).unwrap();
            assert_eq!(
                (&seen.handler, &seen.shape),
                (&request.handler, &request.shape)
            );
            let references = |r: &Request| -> Vec<String> {
                r.images.iter().map(|i| i.reference.clone()).collect()
            };
            assert_eq!(references(&seen), references(&request));
            let passed = extender.filter(args, 0).node_names.unwrap().len();
            let scorer = Scorer::new(&snapshot, &request, Policy::default(), 0);
            assert_eq!(passed, scorer.verdicts().filter(|v| v.1.is_ok()).count());
        }
    }
}
