//! Keeping the pools full: creating slots one at a time, trimming excess
//! free ones, checking free slots' health and removing orphans.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use fast_sandbox_proto::cri::{
    ListPodSandboxRequest, PodSandbox, PodSandboxFilter, PodSandboxState, PodSandboxStatusRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StopPodSandboxRequest,
};
use fast_sandbox_shim::slots::SLOT_TOKEN_LABEL;

use super::{PoolError, PoolManager};
use crate::{blocking::chain, fault, fixup::SlotFacts, metrics::PoolOutcome};

/// Longest pause between two attempts of the start-up reconciliation.
const RECOVER_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the refill task does next.
enum Work {
    Create(usize),
    Trim(SlotFacts),
    /// Nothing to do before this instant (a refill is held after a claim).
    WaitUntil(Instant),
}

impl PoolManager {
    /// Keeps the pools at their desired size until `shutdown` resolves,
    /// once the pools' network modes are decided (`network_mode.rs`):
    /// creates missing slots one at a time (none in a pool whose `keep` was
    /// refused), removes excess free ones, and
    /// checks free slots' health periodically.
    pub async fn run(self: std::sync::Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        tokio::select! {
            () = self.recover_retrying() => {}
            () = &mut shutdown => return,
        }
        tokio::select! {
            () = self.await_network() => {}
            () = &mut shutdown => return,
        }
        let mut last_health = Instant::now();
        let mut failures = 0u32;
        loop {
            let pause = match self.next_work() {
                Some(Work::Create(i)) => {
                    failures = self.create_counted(i, failures).await;
                    // Back off exponentially on failures (up to ~30 s).
                    let pause = if failures == 0 {
                        self.cfg.refill_interval
                    } else {
                        self.cfg.refill_interval
                            + Duration::from_millis(100).saturating_mul(1 << failures.min(8))
                    };
                    tokio::time::sleep(pause)
                }
                Some(Work::Trim(facts)) => {
                    self.destroy_slot(&facts).await;
                    continue;
                }
                Some(Work::WaitUntil(until)) => tokio::time::sleep_until(until.into()),
                None if last_health.elapsed() >= self.cfg.health_interval => {
                    self.check_health().await;
                    last_health = Instant::now();
                    continue;
                }
                None => {
                    tokio::select! {
                        () = self.refill.notified() => continue,
                        () = tokio::time::sleep(self.cfg.health_interval) => continue,
                        () = &mut shutdown => return,
                    }
                }
            };
            tokio::select! {
                () = pause => {}
                () = &mut shutdown => return,
            }
        }
    }

    /// [`PoolManager::recover`] until it succeeds (upstream may be down at
    /// start), backing off up to [`RECOVER_BACKOFF_MAX`].
    async fn recover_retrying(&self) {
        let mut pause = Duration::from_millis(100);
        loop {
            match self.recover().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %chain(&e), retry_in = ?pause,
                        "reconciling with upstream failed; recovered claims are served meanwhile");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RECOVER_BACKOFF_MAX);
                }
            }
        }
        self.recovered.send_replace(true);
    }

    /// Creates a slot of pool `i`, counts it, and returns the number of
    /// consecutive failures after it.
    async fn create_counted(&self, i: usize, failures: u32) -> u32 {
        let started = Instant::now();
        let result = self.create_slot(i).await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.metrics
            .creations
            .get_or_create(&PoolOutcome {
                pool: self.specs[i].name.clone(),
                outcome,
            })
            .inc();
        match result {
            Ok(id) => {
                tracing::debug!(pool = %self.specs[i].name, sandbox = %id,
                    elapsed_ms = started.elapsed().as_millis(), "slot created");
                0
            }
            Err(e) => {
                tracing::warn!(pool = %self.specs[i].name, error = %chain(&e), "creating a slot failed");
                failures.saturating_add(1)
            }
        }
    }

    fn next_work(&self) -> Option<Work> {
        let mut t = self.table();
        let now = Instant::now();
        let mut wait: Option<Instant> = None;
        for i in 0..self.specs.len() {
            if t.free[i].len() < t.desired[i] && self.decided_mode(i).is_some() {
                match t.hold_until[i] {
                    Some(until) if until > now => {
                        wait = Some(wait.map_or(until, |w| w.min(until)));
                        continue;
                    }
                    _ => return Some(Work::Create(i)),
                }
            }
            if t.free[i].len() > t.desired[i] {
                let id = t.free[i].pop_front()?;
                if let Some(slot) = t.slots.remove(&id) {
                    self.changed();
                    return Some(Work::Trim(slot.facts));
                }
                continue;
            }
        }
        wait.map(Work::WaitUntil)
    }

    /// Creates one slot for pool `i` and adds it to the free list.
    async fn create_slot(&self, i: usize) -> Result<String, PoolError> {
        let uid = crate::random::hex(16)?;
        let config = self.placeholder(i, &uid);
        let cgroup_parent = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default();
        let id = self
            .upstream
            .clone()
            .run_pod_sandbox(self.request(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: self.specs[i].key.upstream_handler.clone(),
            }))
            .await
            .map_err(PoolError::Create)?
            .into_inner()
            .pod_sandbox_id;
        let mut facts = SlotFacts {
            sandbox_id: id.clone(),
            pause_pid: 0,
            placeholder_cgroup_parent: cgroup_parent,
            upstream_handler: self.specs[i].key.upstream_handler.clone(),
        };
        let ready = async {
            fault::pass(fault::REFILL_CREATED).await?;
            facts.pause_pid = self.pause_pid(&id).await?;
            if self.fixup.settles(&facts) {
                self.fixup
                    .prepare(&facts, &config)
                    .await
                    .map_err(|source| PoolError::Prepare {
                        id: id.clone(),
                        source,
                    })?;
            }
            Ok::<(), PoolError>(())
        }
        .await;
        match ready {
            Ok(()) => {
                self.table().add_free(i, facts);
                self.changed();
                Ok(id)
            }
            Err(e) => {
                self.destroy_slot(&facts).await;
                Err(e)
            }
        }
    }

    /// The pause PID from containerd's verbose status.
    async fn pause_pid(&self, id: &str) -> Result<i32, PoolError> {
        self.sandbox_info(id).await.map(|(pid, _)| pid)
    }

    /// The pause PID and the whole verbose info of ready sandbox `id`.
    pub(super) async fn sandbox_info(
        &self,
        id: &str,
    ) -> Result<(i32, serde_json::Value), PoolError> {
        let resp = self
            .upstream
            .clone()
            .pod_sandbox_status(self.request(PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: true,
            }))
            .await
            .map_err(|source| PoolError::Status {
                id: id.to_owned(),
                source,
            })?
            .into_inner();
        let ready = resp
            .status
            .as_ref()
            .is_some_and(|s| s.state == PodSandboxState::SandboxReady as i32);
        if !ready {
            return Err(PoolError::NotReady { id: id.to_owned() });
        }
        let info = resp.info.get("info").map(String::as_str).unwrap_or("{}");
        let v: serde_json::Value =
            serde_json::from_str(info).map_err(|source| PoolError::Info {
                id: id.to_owned(),
                source,
            })?;
        let pid = v
            .get("pid")
            .and_then(serde_json::Value::as_i64)
            .and_then(|pid| i32::try_from(pid).ok())
            .filter(|pid| *pid > 0)
            .ok_or_else(|| PoolError::NoPid { id: id.to_owned() })?;
        Ok((pid, v))
    }

    /// Stops and removes a slot's sandbox upstream and discards what the
    /// pool made for it, logging failures.
    pub(super) async fn destroy_slot(&self, facts: &SlotFacts) {
        self.destroy(&facts.sandbox_id).await;
        self.fixup.discard(facts).await;
    }

    /// Stops and removes a sandbox upstream, logging failures.
    pub(super) async fn destroy(&self, id: &str) {
        let mut up = self.upstream.clone();
        if let Err(e) = up
            .stop_pod_sandbox(self.request(StopPodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }))
            .await
        {
            tracing::warn!(sandbox = %id, error = %e, "stopping slot failed");
        }
        if let Err(e) = up
            .remove_pod_sandbox(self.request(RemovePodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }))
            .await
        {
            tracing::warn!(sandbox = %id, error = %e, "removing slot failed");
        }
    }

    /// Every sandbox upstream that carries this node's slot token.
    pub(super) async fn list_ours(&self) -> Result<Vec<PodSandbox>, PoolError> {
        let listed = self
            .upstream
            .clone()
            .list_pod_sandbox(self.request(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: HashMap::from([(
                        SLOT_TOKEN_LABEL.to_owned(),
                        self.token.clone(),
                    )]),
                    ..Default::default()
                }),
            }))
            .await
            .map_err(PoolError::List)?;
        Ok(listed.into_inner().items)
    }

    /// What is known of a placeholder found upstream without a table entry.
    pub(super) fn orphan_facts(&self, sb: &PodSandbox) -> SlotFacts {
        SlotFacts {
            sandbox_id: sb.id.clone(),
            pause_pid: 0,
            // Placeholders are created under `<root>/<their uid>`.
            placeholder_cgroup_parent: format!(
                "{}/{}",
                self.cfg.placeholder_cgroup_root,
                sb.metadata
                    .as_ref()
                    .map(|m| m.uid.as_str())
                    .unwrap_or_default()
            ),
            upstream_handler: sb.runtime_handler.clone(),
        }
    }

    /// Removes placeholders with this node's token that the table does not
    /// know: a slot whose creation was still in flight upstream when a
    /// previous run died appears only after that run's recovery listed
    /// upstream. Runs in the refill loop, so no creation of this run is in
    /// flight.
    async fn sweep_orphans(&self) {
        let Ok(listed) = self.list_ours().await else {
            return;
        };
        let orphans: Vec<SlotFacts> = {
            let t = self.table();
            listed
                .iter()
                .filter(|sb| !t.slots.contains_key(&sb.id))
                .map(|sb| self.orphan_facts(sb))
                .collect()
        };
        for facts in orphans {
            tracing::warn!(sandbox = %facts.sandbox_id, "removing an orphaned slot (created by a run that died)");
            self.destroy_slot(&facts).await;
        }
    }

    /// Removes free slots whose sandbox is no longer ready, and orphans.
    async fn check_health(&self) {
        self.sweep_orphans().await;
        let free: Vec<String> = {
            let t = self.table();
            t.free.iter().flatten().cloned().collect()
        };
        for id in free {
            if self.healthy(&id).await {
                continue;
            }
            let removed = self.table().remove_free(&id);
            if let Some(facts) = removed {
                self.changed();
                tracing::warn!(sandbox = %id, "free slot failed its health check; replacing it");
                self.destroy_slot(&facts).await;
                self.refill.notify_one();
            }
        }
    }

    /// Whether upstream still reports free slot `id` ready.
    async fn healthy(&self, id: &str) -> bool {
        let status = self
            .upstream
            .clone()
            .pod_sandbox_status(self.request(PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: false,
            }))
            .await;
        match &status {
            Ok(r) => r
                .get_ref()
                .status
                .as_ref()
                .is_some_and(|s| s.state == PodSandboxState::SandboxReady as i32),
            // Upstream unreachable: says nothing about the slot.
            Err(s) if s.code() == tonic::Code::Unavailable => true,
            Err(_) => false,
        }
    }
}
