//! Leader election over a `coordination.k8s.io/v1` Lease, the way
//! client-go's `leaderelection` does it, used directly through kube (no
//! extra dependency).
//!
//! Every replica runs an [`Elector`]: it reads the Lease every
//! `retry_period`; the holder renews it, the others take it once its record
//! has not changed for `lease_duration` **by their own clock** (the
//! `renewTime` written in the Lease is never compared with local time, so
//! clock skew between replicas does not matter). Every write is an update
//! with the read `resourceVersion`, so two replicas racing for an expired
//! lease cannot both win: the loser gets 409. A leader that cannot renew
//! for `renew_deadline` (shorter than `lease_duration`) steps down before
//! anyone else may take over; one that stops gracefully releases the lease
//! so the next replica takes over within one `retry_period`.
//!
//! [`lead`] runs the work only the leader may do (the reconcilers, which
//! write) while this replica leads, and stops it when leadership is lost.

use std::future::Future;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

/// The Lease's name in the controller's namespace.
pub const DEFAULT_LEASE_NAME: &str = "fast-sandbox-controller";

/// Timing and identity of an [`Elector`]. The defaults are client-go's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name): the Lease's `holderIdentity`.
    pub identity: String,
    /// How long a lease whose record does not change stays taken.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often every replica reads (and the leader renews) the Lease.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// A configuration with client-go's timing: 15 s, 10 s, 2 s.
    pub fn new(namespace: &str, identity: &str) -> Self {
        LeaseConfig {
            namespace: namespace.to_owned(),
            name: DEFAULT_LEASE_NAME.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Checks the identity and that `retry_period < renew_deadline <
    /// lease_duration` (a leader must step down before others take over).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.identity.is_empty() {
            return Err(ConfigError::NoIdentity);
        }
        if self.lease_duration.as_secs() == 0 {
            return Err(ConfigError::Timing("lease duration must be at least 1 s"));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(ConfigError::Timing(
                "renew deadline must be shorter than the lease duration",
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(ConfigError::Timing(
                "retry period must be positive and shorter than the renew deadline",
            ));
        }
        Ok(())
    }
}

/// A [`LeaseConfig`] that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("leader election: no identity (set POD_NAME or --leader-elect-identity)")]
    NoIdentity,
    #[error("leader election: {0}")]
    Timing(&'static str),
}

/// The part of a Lease record whose change shows its holder is alive.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
}

/// One replica's view of the Lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The record last read and when (local clock) it last changed.
    observed: Option<(Record, Instant)>,
    /// The Lease as this replica last wrote it, while it holds it.
    held: Option<Lease>,
}

fn record_of(spec: &LeaseSpec) -> Record {
    Record {
        holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
        renew_time: spec.renew_time.clone(),
        transitions: spec.lease_transitions,
    }
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            held: None,
        })
    }

    /// Whether this replica held the lease after its last attempt.
    pub fn is_leader(&self) -> bool {
        self.held.is_some()
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// Remembers `spec` as read now; its change time moves only when it
    /// differs from the last record read.
    fn observe(&mut self, spec: &LeaseSpec) -> Instant {
        let record = record_of(spec);
        match &self.observed {
            Some((last, at)) if *last == record => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record, at));
                at
            }
        }
    }

    /// One attempt to take or renew the lease; `Ok(true)` when this replica
    /// holds it afterwards. Losing a race (409) is `Ok(false)`.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let result = self.attempt().await;
        if !matches!(result, Ok(true)) {
            self.held = None;
        }
        result
    }

    async fn attempt(&mut self) -> Result<bool, kube::Error> {
        let me = self.config.identity.clone();
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            let created = self.api.create(&PostParams::default(), &lease).await;
            return self.write(created);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let changed_at = self.observe(&spec);
        let holder = record_of(&spec).holder;
        let theirs = holder.as_ref().is_some_and(|h| *h != me);
        let their_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.config.lease_duration, Duration::from_secs);
        if theirs && changed_at.elapsed() < their_duration {
            return Ok(false);
        }
        let mut next = spec;
        if holder.as_deref() != Some(me.as_str()) {
            next.acquire_time = Some(now());
            next.lease_transitions = Some(next.lease_transitions.unwrap_or(0).saturating_add(1));
            tracing::info!(previous = ?holder, "taking the leader lease");
        }
        next.holder_identity = Some(me);
        next.lease_duration_seconds = Some(self.duration_seconds());
        next.renew_time = Some(now());
        lease.spec = Some(next);
        // `lease` carries the resourceVersion read: the update is
        // conditional on nobody having written since.
        let written = self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await;
        self.write(written)
    }

    /// The outcome of a create or update of the Lease.
    fn write(&mut self, written: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
        match written {
            Ok(lease) => {
                if let Some(spec) = &lease.spec {
                    self.observe(spec);
                }
                self.held = Some(lease);
                Ok(true)
            }
            Err(error) if conflict(&error) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Gives the lease up (holder cleared, 1 s duration) so another replica
    /// takes over at its next attempt. Nothing when it is not held.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.held.take() else {
            return Ok(());
        };
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now());
        }
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Err(error) if !conflict(&error) => Err(error),
            _ => Ok(()),
        }
    }

    /// Tries every `retry_period` and publishes on `leading` whether this
    /// replica leads, until `shutdown` resolves; then returns the elector
    /// (still holding the lease, if it did: the caller stops the leader's
    /// work first, then [`release`](Self::release)s it).
    pub async fn run(
        mut self,
        leading: watch::Sender<bool>,
        shutdown: impl Future<Output = ()>,
    ) -> Self {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut renewed: Option<Instant> = None;
        loop {
            let attempt =
                tokio::time::timeout(self.config.renew_deadline, self.try_acquire_or_renew()).await;
            let leads = match attempt {
                Ok(Ok(true)) => {
                    renewed = Some(Instant::now());
                    true
                }
                Ok(Ok(false)) => false,
                failed => {
                    let error = match failed {
                        Ok(Err(error)) => error.to_string(),
                        _ => "timed out".to_owned(),
                    };
                    tracing::warn!(%error, "leader lease not read or renewed");
                    // Keep leading until the renew deadline: a blip must not
                    // restart the reconcilers.
                    renewed.is_some_and(|at| at.elapsed() < self.config.renew_deadline)
                }
            };
            if !leads {
                renewed = None;
            }
            leading.send_if_modified(|was| {
                let changed = *was != leads;
                if changed {
                    tracing::info!(leader = leads, identity = %self.config.identity, "leadership changed");
                }
                *was = leads;
                changed
            });
            tokio::select! {
                () = tokio::time::sleep(self.config.retry_period) => {}
                () = &mut shutdown => return self,
            }
        }
    }
}

/// A stop signal several futures can wait on.
pub type Shutdown = Shared<BoxFuture<'static, ()>>;

/// Runs `work` while `leading` is true, again each time it becomes true,
/// until `shutdown`. `work` gets a future that resolves when it must stop
/// (leadership lost, or shutdown) and is awaited to the end, so the
/// reconcilers finish what they do before another replica can lead.
pub async fn lead<W, F>(mut leading: watch::Receiver<bool>, shutdown: Shutdown, mut work: W)
where
    W: FnMut(Shutdown) -> F,
    F: Future<Output = ()>,
{
    loop {
        tokio::select! {
            became = leading.wait_for(|l| *l) => if became.is_err() { return },
            () = shutdown.clone() => return,
        }
        let mut lost = leading.clone();
        let stop_on_shutdown = shutdown.clone();
        let stop: Shutdown = async move {
            tokio::select! {
                _ = lost.wait_for(|l| !*l) => {}
                () = stop_on_shutdown => {}
            }
        }
        .boxed()
        .shared();
        work(stop.clone()).await;
        // Work that ends early (no CRD served) is not restarted until
        // leadership is lost and regained.
        stop.await;
        if shutdown.peek().is_some() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_must_let_a_leader_step_down_first() {
        let ok = LeaseConfig::new("ns", "a");
        assert_eq!(ok.validate(), Ok(()));
        let named = |identity: &str| LeaseConfig::new("ns", identity).validate();
        assert_eq!(named(""), Err(ConfigError::NoIdentity));
        let late = LeaseConfig {
            renew_deadline: Duration::from_secs(15),
            ..ok.clone()
        };
        assert!(matches!(late.validate(), Err(ConfigError::Timing(m)) if m.contains("renew")));
        let busy = LeaseConfig {
            retry_period: Duration::from_secs(10),
            ..ok
        };
        assert!(matches!(busy.validate(), Err(ConfigError::Timing(m)) if m.contains("retry")));
    }
}
