//! Prometheus metrics of the controller (OpenMetrics text via
//! `prometheus-client`), served at `GET /metrics` on the extender's
//! listener.
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `fast_sandbox_controller_reconciles_total` | `controller` (`sandboxpool`, `sandbox`), `outcome` (`ok`, `error`) | reconciles run |
//! | `fast_sandbox_controller_reconcile_duration_seconds` | `controller` | reconcile latency |
//! | `fast_sandbox_controller_placements_total` | `outcome` | `Sandbox` placement decisions |
//! | `fast_sandbox_controller_extender_request_duration_seconds` | `verb` (`filter`, `prioritize`) | extender request latency |
//! | `fast_sandbox_controller_events_total` | `outcome` (`published`, `failed`, `dropped`) | Kubernetes Events |
//! | `fast_sandbox_controller_leader` | | 1 while this replica leads |

use std::future::Future;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerOutcome {
    pub controller: &'static str,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Verb {
    pub verb: &'static str,
}

fn reconcile_histogram() -> Histogram {
    // 1 ms … ~16 s, doubling: a reconcile is a few API calls and pushes.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

fn extender_histogram() -> Histogram {
    // 50 µs … ~0.8 s, doubling: a decision is well under a millisecond.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 15))
}

/// Every metric the controller exports, with the registry exporting them.
#[derive(Debug)]
pub struct Metrics {
    pub reconciles: Family<ControllerOutcome, Counter>,
    pub reconcile_duration: Family<ControllerLabel, Histogram, fn() -> Histogram>,
    pub placements: Family<Outcome, Counter>,
    pub extender_duration: Family<Verb, Histogram, fn() -> Histogram>,
    pub events: Family<Outcome, Counter>,
    pub leader: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Family::<ControllerOutcome, Counter>::default();
        let reconcile_duration: Family<ControllerLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(reconcile_histogram);
        let placements = Family::<Outcome, Counter>::default();
        let extender_duration: Family<Verb, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(extender_histogram);
        let events = Family::<Outcome, Counter>::default();
        let leader = Gauge::default();
        let mut r = Registry::with_prefix("fast_sandbox_controller");
        r.register("reconciles", "Reconciles run", reconciles.clone());
        r.register(
            "reconcile_duration_seconds",
            "Reconcile latency",
            reconcile_duration.clone(),
        );
        r.register(
            "placements",
            "Sandbox placement decisions by outcome",
            placements.clone(),
        );
        r.register(
            "extender_request_duration_seconds",
            "Scheduler extender request latency",
            extender_duration.clone(),
        );
        r.register("events", "Kubernetes Events by outcome", events.clone());
        r.register("leader", "1 while this replica leads", leader.clone());
        Metrics {
            reconciles,
            reconcile_duration,
            placements,
            extender_duration,
            events,
            leader,
            registry: r,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Counts one placement decision of `outcome`.
    pub fn placed(&self, outcome: &'static str) {
        self.placements.get_or_create(&Outcome { outcome }).inc();
    }

    /// Counts one Event of `outcome`.
    pub fn event(&self, outcome: &'static str) {
        self.events.get_or_create(&Outcome { outcome }).inc();
    }

    /// Runs the reconcile `work` of `controller`, counting it by outcome
    /// and timing it.
    pub async fn reconcile<T, E>(
        &self,
        controller: &'static str,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let start = Instant::now();
        let result = work.await;
        self.reconcile_duration
            .get_or_create(&ControllerLabel { controller })
            .observe(start.elapsed().as_secs_f64());
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ControllerOutcome {
                controller,
                outcome,
            })
            .inc();
        result
    }

    /// Times one extender request of `verb`.
    pub fn extender_request(&self, verb: &'static str, start: Instant) {
        self.extender_duration
            .get_or_create(&Verb { verb })
            .observe(start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reconciles_are_counted_by_outcome_and_timed() {
        let m = Metrics::default();
        let ok: Result<(), ()> = m.reconcile("sandbox", async { Ok(()) }).await;
        assert!(ok.is_ok());
        let failed: Result<(), ()> = m.reconcile("sandbox", async { Err(()) }).await;
        assert!(failed.is_err());
        m.placed("no_eligible_node");
        m.extender_request("filter", Instant::now());
        m.leader.set(1);
        let text = m.encode().unwrap();
        for line in [
            "fast_sandbox_controller_reconciles_total{controller=\"sandbox\",outcome=\"ok\"} 1",
            "fast_sandbox_controller_reconciles_total{controller=\"sandbox\",outcome=\"error\"} 1",
            "fast_sandbox_controller_reconcile_duration_seconds_count{controller=\"sandbox\"} 2",
            "fast_sandbox_controller_placements_total{outcome=\"no_eligible_node\"} 1",
            "fast_sandbox_controller_extender_request_duration_seconds_count{verb=\"filter\"} 1",
            "fast_sandbox_controller_leader 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
