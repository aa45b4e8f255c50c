//! How long one placement decision takes on a large synthetic cluster.
//!
//! Per request, the direct path's `place` (the indexed search, and the
//! linear scorer it replaced, which must choose the same node) and the
//! extender's `filter` and `prioritize` verbs, JSON in and out, over the
//! candidate list kube-scheduler would send: it stops filtering once it
//! has found [`nodes_to_find`] feasible nodes and calls the extender with
//! those only. The same verbs over every node's name are sampled too, to
//! show what JSON costs when `percentageOfNodesToScore` is 100.

use std::fmt;
use std::time::{Duration, Instant};

use serde_json::json;

use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderMap;

use fast_sandbox_controller::extender::{json_body, parse_args, Extender, ExtenderConfig};
use fast_sandbox_controller::scoring::linear::LinearScorer;
use fast_sandbox_controller::scoring::{
    NodeState, Policy, Request, Scorer, Snapshot, SnapshotError,
};
use fast_sandbox_controller::synth::Rng;

use crate::fleet::{self, Catalog};

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct BenchConfig {
    pub nodes: usize,
    pub decisions: usize,
    pub apps: usize,
    pub seed: u64,
    /// kube-scheduler's `percentageOfNodesToScore`; 0 is its adaptive
    /// default.
    pub percentage_of_nodes_to_score: u32,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            nodes: 5_000,
            decisions: 5_000,
            apps: 400,
            seed: 1,
            percentage_of_nodes_to_score: 0,
        }
    }
}

/// Every this many decisions, the extender verbs are also timed over every
/// node's name (slow at 65,000 nodes, so sampled).
const ALL_NAMES_EVERY: usize = 10;
/// Node status changes timed (each a node's readiness, pools and images).
const NODE_UPDATES: usize = 1_000;

/// How many feasible nodes kube-scheduler finds before it stops filtering
/// and calls the extenders with them (`numFeasibleNodesToFind` in
/// pkg/scheduler/schedule_one.go): every node below 100 nodes, else
/// `percentage`% of them, at least 100; `percentage` 0 is adaptive,
/// 50% − 1% per 125 nodes, at least 5% (500 of 5,000 nodes, 3,250 of
/// 65,000).
pub fn nodes_to_find(nodes: usize, percentage: u32) -> usize {
    const MIN_NODES: usize = 100;
    const MIN_PERCENT: usize = 5;
    if nodes < MIN_NODES {
        return nodes;
    }
    let percent = match percentage {
        0 => 50usize.saturating_sub(nodes / 125).max(MIN_PERCENT),
        p => (p as usize).min(100),
    };
    (nodes * percent / 100).max(MIN_NODES)
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
    /// Node names in each extender call ([`nodes_to_find`]).
    pub candidates: usize,
    /// Measurement name → quantiles, in report order.
    pub timings: Vec<(&'static str, Quantiles)>,
    /// `/proc/loadavg` before and after the run (what else the machine
    /// was doing), when readable.
    pub load: (Option<String>, Option<String>),
    /// Decisions that found a node (the rest had every node filtered out).
    pub placed: usize,
    /// Decisions where the indexed search and the linear scorer differed
    /// (node or score); must be 0.
    pub disagreements: usize,
}

impl BenchReport {
    /// The quantiles of a measurement, by its name in the report.
    #[cfg(test)]
    pub fn timing(&self, name: &str) -> Option<Quantiles> {
        self.timings.iter().find(|t| t.0 == name).map(|t| t.1)
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        writeln!(
            f,
            "nodes {}  images/node {:.1}  pools/node {:.2}  decisions {} (placed {}, \
             disagreements with the linear scorer {})",
            self.config.nodes,
            self.images_per_node,
            self.pools_per_node,
            self.config.decisions,
            self.placed,
            self.disagreements
        )?;
        writeln!(
            f,
            "snapshot index build: {:.1} ms; extender candidates per call: {}",
            self.index_build.as_secs_f64() * 1e3,
            self.candidates
        )?;
        let load = |l: &Option<String>| l.clone().unwrap_or_else(|| "unknown".into());
        writeln!(
            f,
            "load average before: {}; after: {}",
            load(&self.load.0),
            load(&self.load.1)
        )?;
        for (name, q) in &self.timings {
            writeln!(
                f,
                "{name:28} p50 {:9.1} us  p99 {:9.1} us  max {:9.1} us",
                us(q.p50),
                us(q.p99),
                us(q.max)
            )?;
        }
        Ok(())
    }
}

/// Samples of each measurement.
#[derive(Default)]
struct Samples(Vec<(&'static str, Vec<Duration>)>);

impl Samples {
    fn time<T>(&mut self, name: &'static str, f: impl FnOnce() -> T) -> (T, Duration) {
        let started = Instant::now();
        let out = std::hint::black_box(f());
        let took = started.elapsed();
        self.add(name, took);
        (out, took)
    }

    fn add(&mut self, name: &'static str, took: Duration) {
        match self.0.iter_mut().find(|s| s.0 == name) {
            Some(samples) => samples.1.push(took),
            None => self.0.push((name, vec![took])),
        }
    }
}

fn loadavg() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Times [`NODE_UPDATES`] node status changes folded in place
/// ([`Snapshot::update_node`]: readiness flipped, a pool's counts and an
/// image dropped or re-added), and copying the whole snapshot (what a
/// reader holding the previous one costs the next change).
fn node_updates(samples: &mut Samples, rng: &mut Rng, snapshot: &Snapshot) {
    let mut updated = snapshot.clone();
    for _ in 0..NODE_UPDATES {
        let index = rng.below(updated.len().max(1));
        let Some(mut state) = updated.nodes().nth(index).cloned() else {
            return;
        };
        state.ready = !state.ready;
        if let Some(pool) = state.pools.first_mut() {
            pool.total += 1;
            pool.free = rng.below(pool.total as usize + 1) as u32;
        }
        if state.images.len() > 1 && rng.unit() < 0.5 {
            state.images.swap_remove(rng.below(state.images.len()));
        }
        samples.time("node status change, in place", || {
            updated.update_node(state).expect("a known node")
        });
    }
    for _ in 0..5 {
        samples.time("snapshot copy", || snapshot.clone());
    }
}

/// Images and pools per node, on average.
fn per_node(nodes: &[NodeState]) -> (f64, f64) {
    let count = nodes.len().max(1) as f64;
    let mean = |f: fn(&NodeState) -> usize| nodes.iter().map(f).sum::<usize>() as f64 / count;
    (mean(|n| n.images.len()), mean(|n| n.pools.len()))
}

/// Builds the cluster, then times `config.decisions` random requests.
pub fn run(config: BenchConfig) -> Result<BenchReport, SnapshotError> {
    let load_before = loadavg();
    let mut rng = Rng::new(config.seed);
    let catalog = Catalog::new(&mut rng, config.apps);
    let now_ms = 1_000_000;
    let nodes = fleet::cluster(&mut rng, &catalog, config.nodes, now_ms);
    let (images_per_node, pools_per_node) = per_node(&nodes);
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let started = Instant::now();
    let snapshot = Snapshot::new(nodes)?;
    let index_build = started.elapsed();

    let policy = Policy {
        stale_after_ms: Some(60_000),
        ..Policy::default()
    };
    let config_for = || ExtenderConfig {
        policy,
        // The filter's cost is what is measured.
        filter_nodes: true,
        ..ExtenderConfig::default()
    };
    let extender = Extender::new(config_for(), snapshot.clone());
    // Calls over every name assume placements of their own.
    let all_names_extender = Extender::new(config_for(), snapshot.clone());
    let candidates = nodes_to_find(names.len(), config.percentage_of_nodes_to_score);
    let mut samples = Samples::default();
    let (mut placed, mut disagreements) = (0, 0);
    for decision in 0..config.decisions {
        let request = fleet::request(&mut rng, &catalog);
        // One pod every 3 ms for the extender, so its assumed placements
        // (DEFAULT_ASSUME_TTL_MS) stay as many as at ~330 pods/s.
        let call_ms = now_ms + 3 * decision as u64;

        let (best, _) = samples.time("place", || {
            Scorer::new(&snapshot, &request, policy, now_ms).best()
        });
        let (linear, _) = samples.time("place (linear, before)", || {
            LinearScorer::new(&snapshot, &request, policy, now_ms).best()
        });
        placed += usize::from(best.is_some());
        disagreements += usize::from(best != linear);

        // kube-scheduler's window of feasible nodes moves on each cycle.
        let window: Vec<String> = (0..candidates)
            .map(|i| names[(decision * candidates + i) % names.len()].clone())
            .collect();
        samples.time("names to nodes, candidates", || {
            window.iter().filter(|n| snapshot.node(n).is_some()).count()
        });
        samples.time("by-name, candidates", || {
            let scorer = Scorer::new(&snapshot, &request, policy, now_ms);
            window.iter().filter(|n| scorer.score(n).is_ok()).count()
        });
        samples.time("by-name, candidates (linear)", || {
            let scorer = LinearScorer::new(&snapshot, &request, policy, now_ms);
            window.iter().filter(|n| scorer.score(n).is_ok()).count()
        });
        let body = extender_args(&request, &window, decision).to_string();
        extender_calls(&mut samples, &extender, &body, call_ms, false);
        if decision % ALL_NAMES_EVERY == 0 {
            let body = extender_args(&request, &names, decision).to_string();
            extender_calls(&mut samples, &all_names_extender, &body, call_ms, true);
        }
    }
    node_updates(&mut samples, &mut rng, &snapshot);
    Ok(BenchReport {
        config,
        images_per_node,
        pools_per_node,
        index_build,
        candidates,
        timings: samples
            .0
            .into_iter()
            .map(|(name, s)| (name, Quantiles::of(s)))
            .collect(),
        placed,
        disagreements,
        load: (load_before, loadavg()),
    })
}

/// Times the extender's verbs on one request body: parsing it alone, each
/// verb with parsing and writing its answer, and both verbs together (what
/// one pod's scheduling cycle spends in the extender).
fn extender_calls(samples: &mut Samples, extender: &Extender, body: &str, now_ms: u64, all: bool) {
    let [parse, filter, prioritize, both] = if all {
        [
            "parse, all names",
            "filter, all names",
            "prioritize, all names",
            "filter+prioritize, all names",
        ]
    } else {
        ["parse", "filter", "prioritize", "filter+prioritize"]
    };
    // What the HTTP handlers do, less the socket: parse (names borrowed
    // from the body), decide, write the answer.
    let headers =
        HeaderMap::from_iter([(CONTENT_TYPE, "application/json".parse().expect("ASCII"))]);
    let parsed = || parse_args(&headers, body.as_bytes()).expect("the bench's own arguments parse");
    let entries = parsed().node_names.map_or(0, |n| n.len());
    samples.time(parse, parsed);
    let (_, filtered) = samples.time(filter, || {
        json_body(&extender.filter(parsed(), now_ms), entries)
    });
    if !all {
        let result = extender.filter(parsed(), now_ms);
        samples.time("filter: writing the answer", || json_body(&result, entries));
    }
    let (_, prioritized) = samples.time(prioritize, || {
        json_body(&extender.prioritize(parsed(), now_ms), entries)
    });
    samples.add(both, filtered + prioritized);
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
    fn a_small_run_places_most_requests_as_the_linear_scorer_does() {
        let report = run(BenchConfig {
            nodes: 200,
            decisions: 50,
            apps: 100,
            seed: 2,
            percentage_of_nodes_to_score: 0,
        })
        .unwrap();
        assert_eq!(report.config.decisions, 50);
        assert!(report.placed >= 45, "placed {}", report.placed);
        assert_eq!(report.disagreements, 0);
        assert_eq!(report.candidates, 100, "49% of 200 nodes, at least 100");
        assert!(report.images_per_node >= 20.0);
        assert!(report.timing("filter+prioritize").is_some());
        assert!(report.timing("parse, all names").is_some());
        assert!(report.timing("node status change, in place").is_some());
        assert!(report.to_string().contains("p99"));
    }

    #[test]
    fn candidates_as_kube_scheduler_finds_them() {
        assert_eq!(nodes_to_find(50, 0), 50);
        assert_eq!(nodes_to_find(120, 10), 100);
        assert_eq!(nodes_to_find(1_000, 0), 420);
        assert_eq!(nodes_to_find(5_000, 0), 500);
        assert_eq!(nodes_to_find(65_000, 0), 3_250);
        assert_eq!(nodes_to_find(65_000, 100), 65_000);
        assert_eq!(nodes_to_find(65_000, 250), 65_000);
    }

    #[test]
    fn the_extender_sees_the_pods_the_scorer_sees() {
        let mut rng = Rng::new(5);
        let catalog = Catalog::new(&mut rng, 50);
        let nodes = fleet::cluster(&mut rng, &catalog, 50, 0);
        let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let snapshot = Snapshot::new(nodes).unwrap();
        let config = ExtenderConfig {
            filter_nodes: true,
            ..ExtenderConfig::default()
        };
        let extender = Extender::new(config, snapshot.clone());
        for _ in 0..20 {
            let request = fleet::request(&mut rng, &catalog);
            let args = <fast_sandbox_controller::extender::ExtenderArgs<'_> as serde::Deserialize>::deserialize(
                extender_args(&request, &names, 0),
            )
            .unwrap();
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
