//! Named fault-injection points in the claim and refill paths.
//!
//! Compiled in only with the `failpoints` feature (the tests turn it on;
//! release builds do not have it, and then every point is a no-op). At
//! start-up, [`setup`] reads `FAST_SANDBOX_FAILPOINTS`, a `;`-separated list
//! of `name=actions` in the `fail` crate's syntax, for example
//!
//! ```text
//! FAST_SANDBOX_FAILPOINTS="claim.recorded=2*off->return(2000)"
//! ```
//!
//! which lets two claims through and then holds every later one for two
//! seconds right after its record is written. Points take `return(<ms>)` (a
//! delay, awaited without blocking the runtime) or `return(error)` (the step
//! fails as if its system call had).
//!
//! The points, in the order a claim or refill passes them:
//! - [`CLAIM_RECORDED`]: the claim record is on disk, the fix-up not applied.
//! - [`CLAIM_APPLIED`]: the fix-up is applied, kubelet not yet answered.
//! - [`REFILL_CREATED`]: a new slot exists upstream, not yet in the pool.

use std::time::Duration;

/// After a claim's record is written, before its fix-up.
pub const CLAIM_RECORDED: &str = "claim.recorded";
/// After a claim's fix-up, before kubelet is answered.
pub const CLAIM_APPLIED: &str = "claim.applied";
/// After a refill's `RunPodSandbox` returned, before the slot is free.
pub const REFILL_CREATED: &str = "refill.created";

/// Every point, for validating the configuration.
pub const POINTS: [&str; 3] = [CLAIM_RECORDED, CLAIM_APPLIED, REFILL_CREATED];

/// What an armed point does this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Wait this long, then go on.
    Delay(Duration),
    /// Fail the step.
    Error,
}

/// Arms the points named in `FAST_SANDBOX_FAILPOINTS`. Without the
/// `failpoints` feature a non-empty variable is an error, so a test that
/// relies on a point cannot pass by accident.
pub fn setup() -> anyhow::Result<()> {
    let Ok(spec) = std::env::var("FAST_SANDBOX_FAILPOINTS") else {
        return Ok(());
    };
    configure(&spec)
}

fn configure(spec: &str) -> anyhow::Result<()> {
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) = entry.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("FAST_SANDBOX_FAILPOINTS: {entry:?} is not name=actions")
        })?;
        if !POINTS.contains(&name) {
            anyhow::bail!("FAST_SANDBOX_FAILPOINTS: unknown point {name:?} (known: {POINTS:?})");
        }
        arm(name, actions)?;
    }
    Ok(())
}

#[cfg(feature = "failpoints")]
fn arm(name: &str, actions: &str) -> anyhow::Result<()> {
    fail::cfg(name, actions)
        .map_err(|e| anyhow::anyhow!("FAST_SANDBOX_FAILPOINTS: point {name:?}: {e}"))
}

#[cfg(not(feature = "failpoints"))]
fn arm(name: &str, _actions: &str) -> anyhow::Result<()> {
    anyhow::bail!(
        "FAST_SANDBOX_FAILPOINTS: point {name:?} set, but this build has no fault injection \
         (build with --features failpoints)"
    )
}

/// The fault armed at `point` for this pass, if any.
pub fn check(point: &'static str) -> Option<Fault> {
    fail::fail_point!(point, |arg: Option<String>| parse(arg.as_deref()));
    let _ = point;
    None
}

#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn parse(arg: Option<&str>) -> Option<Fault> {
    match arg {
        Some("error") => Some(Fault::Error),
        Some(ms) => ms
            .parse()
            .ok()
            .map(|ms| Fault::Delay(Duration::from_millis(ms))),
        None => None,
    }
}

/// Passes `point`: waits out an injected delay; an injected error is
/// returned for the caller to fail the step with.
pub async fn pass(point: &'static str) -> Result<(), Injected> {
    match check(point) {
        None => Ok(()),
        Some(Fault::Delay(d)) => {
            tracing::warn!(point, delay_ms = d.as_millis() as u64, "injected delay");
            tokio::time::sleep(d).await;
            Ok(())
        }
        Some(Fault::Error) => {
            tracing::warn!(point, "injected failure");
            Err(Injected(point))
        }
    }
}

/// A failure injected at a named point.
#[derive(Debug, thiserror::Error)]
#[error("fault injected at {0}")]
pub struct Injected(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_to_faults() {
        assert_eq!(parse(Some("error")), Some(Fault::Error));
        assert_eq!(
            parse(Some("250")),
            Some(Fault::Delay(Duration::from_millis(250)))
        );
        assert_eq!(parse(Some("soon")), None);
        assert_eq!(parse(None), None);
    }

    #[test]
    fn unknown_points_and_malformed_entries_are_refused() {
        let err = configure("claim.nowhere=return(1)")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown point \"claim.nowhere\""), "{err}");
        let err = configure("claim.recorded").unwrap_err().to_string();
        assert!(err.contains("not name=actions"), "{err}");
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn an_armed_point_fires_then_is_cleared() {
        // A point no other test arms, so tests running in parallel do not mix.
        configure("refill.created=1*return(error)").expect("arm");
        assert_eq!(check(REFILL_CREATED), Some(Fault::Error));
        assert_eq!(check(REFILL_CREATED), None, "1* fires once");
        fail::remove(REFILL_CREATED);
    }
}
