//! Whether this node plugin is fit to take pods: its start-up recovery has
//! finished and upstream (containerd) answers `Version` within a short
//! deadline, checked every [`UPSTREAM_CHECK_INTERVAL`].
//!
//! One [`Health`] is shared by the admin endpoint's `/healthz` (the
//! DaemonSet's readiness probe) and the node agent's `Health` message (what
//! the controller reads before placing pods on the node).

use std::{future::Future, sync::Arc, time::Duration};

use fast_sandbox_proto::cri::{runtime_service_client::RuntimeServiceClient, VersionRequest};
use tokio::sync::watch;
use tonic::{transport::Channel, Request, Status};

/// How often upstream is asked for its `Version`.
pub const UPSTREAM_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// How long one `Version` may take before upstream counts as unreachable.
pub const UPSTREAM_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// What the last `Version` call to upstream found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum UpstreamState {
    /// Not asked yet.
    #[default]
    Unknown,
    Reachable,
    /// Why not: the call's error.
    Unreachable(String),
}

/// The facts health is derived from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthState {
    /// Start-up recovery (claim records reconciled with upstream) is done.
    pub recovered: bool,
    pub upstream: UpstreamState,
    /// Bumped on every change of the fields above.
    pub generation: u64,
}

/// What `/healthz` and the node agent report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Recovery finished and upstream answers.
    pub ready: bool,
    pub upstream_reachable: bool,
    /// Why not ready; empty when ready.
    pub message: String,
}

impl HealthState {
    pub fn readiness(&self) -> Readiness {
        let upstream_reachable = self.upstream == UpstreamState::Reachable;
        let mut reasons = Vec::new();
        if !self.recovered {
            reasons.push("start-up recovery of the warm pools has not finished".to_owned());
        }
        match &self.upstream {
            UpstreamState::Reachable => {}
            UpstreamState::Unknown => reasons.push("upstream has not been checked yet".to_owned()),
            UpstreamState::Unreachable(why) => {
                reasons.push(format!("upstream does not answer Version: {why}"));
            }
        }
        Readiness {
            ready: reasons.is_empty(),
            upstream_reachable,
            message: reasons.join("; "),
        }
    }
}

/// The node plugin's health, shared by everything that reports it.
#[derive(Debug, Clone)]
pub struct Health {
    tx: Arc<watch::Sender<HealthState>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Not ready: neither recovered nor checked upstream.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(HealthState::default()).0),
        }
    }

    /// Recovered and upstream reachable (rigs whose upstream is in-process).
    pub fn ready() -> Self {
        let health = Self::new();
        health.mark_recovered();
        health.set_upstream(Ok(()));
        health
    }

    /// Start-up recovery has finished.
    pub fn mark_recovered(&self) {
        self.tx.send_if_modified(|s| {
            if s.recovered {
                return false;
            }
            s.recovered = true;
            s.generation = s.generation.wrapping_add(1);
            true
        });
    }

    /// Records one upstream check; logs when reachability changes.
    pub fn set_upstream(&self, result: Result<(), Status>) {
        let next = match result {
            Ok(()) => UpstreamState::Reachable,
            Err(e) => UpstreamState::Unreachable(format!("{:?}: {}", e.code(), e.message())),
        };
        self.tx.send_if_modified(|s| {
            if s.upstream == next {
                return false;
            }
            match (&s.upstream, &next) {
                (_, UpstreamState::Unreachable(why)) => {
                    tracing::warn!(error = %why, "upstream does not answer: not ready");
                }
                (UpstreamState::Unreachable(_), UpstreamState::Reachable) => {
                    tracing::info!("upstream answers again");
                }
                _ => {}
            }
            s.upstream = next;
            s.generation = s.generation.wrapping_add(1);
            true
        });
    }

    pub fn readiness(&self) -> Readiness {
        self.tx.borrow().readiness()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<HealthState> {
        self.tx.subscribe()
    }
}

/// One reachability check of upstream.
pub trait UpstreamProbe: Send + Sync + 'static {
    fn check(&self) -> impl Future<Output = Result<(), Status>> + Send;
}

/// CRI `Version` on upstream, within a deadline.
#[derive(Debug, Clone)]
pub struct CriVersion {
    client: RuntimeServiceClient<Channel>,
    timeout: Duration,
}

impl CriVersion {
    pub fn new(channel: Channel, timeout: Duration) -> Self {
        Self {
            client: RuntimeServiceClient::new(channel),
            timeout,
        }
    }
}

impl UpstreamProbe for CriVersion {
    async fn check(&self) -> Result<(), Status> {
        let mut request = Request::new(VersionRequest::default());
        request.set_timeout(self.timeout);
        let mut client = self.client.clone();
        // The outer deadline also bounds connecting, which the gRPC
        // timeout does not cover.
        match tokio::time::timeout(self.timeout, client.version(request)).await {
            Ok(answer) => answer.map(drop),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }
}

/// Checks upstream now and then every `interval` until `stopped`.
pub async fn watch_upstream<P: UpstreamProbe>(
    probe: P,
    health: Health,
    interval: Duration,
    stopped: impl Future<Output = ()>,
) {
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            result = probe.check() => health.set_upstream(result),
            () = &mut stopped => return,
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = &mut stopped => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// An upstream switched up and down by the test; counts its checks.
    #[derive(Debug, Default)]
    struct FakeUpstream {
        up: AtomicBool,
        checks: AtomicUsize,
    }

    impl UpstreamProbe for Arc<FakeUpstream> {
        async fn check(&self) -> Result<(), Status> {
            self.checks.fetch_add(1, Ordering::SeqCst);
            if self.up.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(Status::unavailable("connection refused"))
            }
        }
    }

    async fn wait_until(
        rx: &mut watch::Receiver<HealthState>,
        want: impl Fn(&HealthState) -> bool,
    ) -> HealthState {
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|s| want(s)))
            .await
            .expect("health changes in time")
            .expect("health sender alive")
            .clone()
    }

    #[test]
    fn not_ready_until_recovered_and_reachable() {
        let health = Health::new();
        let r = health.readiness();
        assert!(!r.ready && !r.upstream_reachable);
        assert!(r.message.contains("recovery"), "{}", r.message);
        assert!(r.message.contains("not been checked"), "{}", r.message);

        health.set_upstream(Ok(()));
        let r = health.readiness();
        assert!(!r.ready && r.upstream_reachable, "{r:?}");
        assert!(r.message.contains("recovery"), "{}", r.message);

        health.mark_recovered();
        let r = health.readiness();
        assert!(r.ready && r.upstream_reachable, "{r:?}");
        assert_eq!(r.message, "");

        health.set_upstream(Err(Status::deadline_exceeded("no answer within 1s")));
        let r = health.readiness();
        assert!(!r.ready && !r.upstream_reachable, "{r:?}");
        assert_eq!(
            r.message,
            "upstream does not answer Version: DeadlineExceeded: no answer within 1s"
        );
    }

    #[test]
    fn unchanged_facts_wake_no_reader() {
        let health = Health::ready();
        let mut rx = health.subscribe();
        rx.mark_unchanged();
        health.mark_recovered();
        health.set_upstream(Ok(()));
        assert!(!rx.has_changed().expect("sender alive"));
        health.set_upstream(Err(Status::unavailable("down")));
        assert!(rx.has_changed().expect("sender alive"));
    }

    #[tokio::test]
    async fn the_watcher_follows_upstream_down_and_up() {
        let interval = Duration::from_millis(20);
        let started = std::time::Instant::now();
        let upstream = Arc::new(FakeUpstream::default());
        let health = Health::new();
        health.mark_recovered();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let watcher = tokio::spawn(watch_upstream(
            Arc::clone(&upstream),
            health.clone(),
            interval,
            async {
                let _ = stop_rx.await;
            },
        ));
        let mut rx = health.subscribe();
        let down = wait_until(&mut rx, |s| {
            matches!(s.upstream, UpstreamState::Unreachable(_))
        })
        .await;
        assert!(!down.readiness().ready);
        assert!(
            down.readiness().message.contains("connection refused"),
            "{down:?}"
        );

        upstream.up.store(true, Ordering::SeqCst);
        let up = wait_until(&mut rx, |s| s.upstream == UpstreamState::Reachable).await;
        assert!(up.readiness().ready, "{up:?}");

        upstream.up.store(false, Ordering::SeqCst);
        wait_until(&mut rx, |s| s.upstream != UpstreamState::Reachable).await;
        assert!(!health.readiness().ready);

        stop_tx.send(()).expect("watcher alive");
        watcher.await.expect("watcher ends when stopped");
        let checks = upstream.checks.load(Ordering::SeqCst);
        let most = started.elapsed().as_millis() / interval.as_millis() + 2;
        assert!(
            checks >= 3 && checks as u128 <= most,
            "checked once an interval, not in a busy loop: {checks} (at most {most})"
        );
    }
}
