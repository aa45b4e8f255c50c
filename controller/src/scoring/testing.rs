//! Random node states for the scoring tests.

use super::PoolState;
use crate::synth::Rng;

/// Pools of random counts (`total` below `max_total`) for some of `keys`
/// (handler, shape), a key sometimes twice (the first counts).
pub(super) fn random_pools<'a>(
    rng: &mut Rng,
    keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    max_total: usize,
) -> Vec<PoolState> {
    let mut pools = Vec::new();
    for (handler, shape) in keys {
        for _ in 0..usize::from(rng.unit() < 0.6) + usize::from(rng.unit() < 0.05) {
            let total = u32::try_from(rng.below(max_total)).unwrap_or(0);
            pools.push(PoolState {
                handler: handler.into(),
                upstream_handler: "runc".into(),
                shape: shape.into(),
                free: u32::try_from(rng.below(total as usize + 1)).unwrap_or(0),
                total,
            });
        }
    }
    pools
}
