//! Prometheus metrics of the node plugin (OpenMetrics text via
//! `prometheus-client`).
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `fast_sandbox_claims_total` | `pool`, `outcome` (`hit`, `failed`) | claims served from a pool |
//! | `fast_sandbox_misses_total` | `handler`, `reason` | fast-handler pods that started cold, and why |
//! | `fast_sandbox_claim_duration_seconds` | `pool` | claim latency (take + record + fix-ups) |
//! | `fast_sandbox_slots` | `pool`, `state` (`free`, `claimed`, `desired`) | pool sizes, read at scrape time |
//! | `fast_sandbox_slot_creations_total` | `pool`, `outcome` (`ok`, `failed`) | refill attempts |

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolOutcome {
    pub pool: String,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Miss {
    pub handler: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolState {
    pub pool: String,
    pub state: &'static str,
}

fn claim_histogram() -> Histogram {
    // 100 µs … ~1.6 s, doubling: a warm claim is ~1 ms, a stuck one is not.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 15,
    ))
}

/// Every metric the node plugin exports.
#[derive(Debug)]
pub struct Metrics {
    pub claims: Family<PoolOutcome, Counter>,
    pub misses: Family<Miss, Counter>,
    pub claim_duration: Family<PoolLabel, Histogram, fn() -> Histogram>,
    pub slots: Family<PoolState, Gauge>,
    pub creations: Family<PoolOutcome, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            claims: Family::default(),
            misses: Family::default(),
            claim_duration: Family::new_with_constructor(claim_histogram),
            slots: Family::default(),
            creations: Family::default(),
        }
    }
}

impl Metrics {
    /// A registry exporting `metrics`.
    pub fn registry(metrics: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("fast_sandbox");
        r.register(
            "claims",
            "Claims served from a warm pool",
            metrics.claims.clone(),
        );
        r.register(
            "misses",
            "Fast-handler pods that started cold, by reason",
            metrics.misses.clone(),
        );
        r.register(
            "claim_duration_seconds",
            "Time to claim a warm slot (take, durable record, fix-ups)",
            metrics.claim_duration.clone(),
        );
        r.register("slots", "Slots per pool and state", metrics.slots.clone());
        r.register(
            "slot_creations",
            "Slot creations by the refill task",
            metrics.creations.clone(),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_text_names_each_metric() {
        let m = Arc::new(Metrics::default());
        m.claims
            .get_or_create(&PoolOutcome {
                pool: "fast-runc".into(),
                outcome: "hit",
            })
            .inc();
        m.misses
            .get_or_create(&Miss {
                handler: "fast-runc".into(),
                reason: "pool_empty",
            })
            .inc();
        m.claim_duration
            .get_or_create(&PoolLabel {
                pool: "fast-runc".into(),
            })
            .observe(0.001);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &Metrics::registry(&m)).unwrap();
        assert!(
            out.contains("fast_sandbox_claims_total{pool=\"fast-runc\",outcome=\"hit\"} 1"),
            "{out}"
        );
        assert!(
            out.contains(
                "fast_sandbox_misses_total{handler=\"fast-runc\",reason=\"pool_empty\"} 1"
            ),
            "{out}"
        );
        assert!(
            out.contains("fast_sandbox_claim_duration_seconds_count{pool=\"fast-runc\"} 1"),
            "{out}"
        );
    }
}
