//! The hit-rate figures in docs/ are what the simulation computes today:
//! change the model or the placement and this fails until they are
//! regenerated.

use fast_sandbox_controller::sim::{self, Placer, SimConfig};

const REGENERATE: &str =
    "regenerate with `cargo run --release -p fast-sandbox-controller -- simulate`";

#[test]
fn docs_hit_rate_figures_are_current() {
    let config = SimConfig::default();
    let points = sim::run(&config).expect("the simulated snapshot builds");
    // The claim docs/scheduling.md makes: >= 95% warm hits while pools are
    // <= 80% used, ahead of slot-blind placement once load is high.
    let at = |placer: Placer, load: f64| {
        points
            .iter()
            .find(|p| p.placer == placer && (p.load - load).abs() < 1e-9)
            .expect("a point per placer and load")
    };
    for p in points.iter().filter(|p| p.placer == Placer::Ours) {
        if p.pool_used <= 0.8 {
            assert!(p.hit_rate >= 0.95, "{p:?}");
        }
        if p.load >= 0.6 {
            assert!(p.hit_rate > at(Placer::LeastAllocated, p.load).hit_rate);
            assert!(p.hit_rate > at(Placer::Random, p.load).hit_rate);
        }
    }
    assert!(
        sim::csv(&points) == include_str!("../../docs/scheduling-hit-rate.csv"),
        "docs/scheduling-hit-rate.csv is stale: {REGENERATE}"
    );
    assert!(
        sim::svg(&points, &config) == include_str!("../../docs/scheduling-hit-rate.svg"),
        "docs/scheduling-hit-rate.svg is stale: {REGENERATE}"
    );
}
