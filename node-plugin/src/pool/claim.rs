//! The claim path and what follows it: taking a free slot, recording the
//! claim, the fix-up and its deferred parts, the view the shim reports,
//! stats of claimed pods, and forgetting a removed slot.

use std::{collections::HashMap, sync::Arc, time::Instant};

use fast_sandbox_proto::cri::PodSandboxConfig;
use fast_sandbox_shim::slots::{
    Claim, ClaimFailed, ClaimedPod, ClaimedSlot, NoSlot, NotReady, PodIps, PodUsage, PoolKey,
    SlotView,
};
use tokio::sync::{watch, Notify};

use super::{
    now_ns,
    records::ClaimRecord,
    table::{Completion, Identity, Status},
    NetworkMode, PoolError, PoolManager,
};
use crate::{
    blocking::{asyncify, chain},
    fault,
    fixup::{CgroupLeaf, ContainerdCgroup, Fixup, FixupFailed, SlotFacts},
    metrics::{PoolLabel, PoolOutcome},
    network::{pod_ips, Attachment},
};

impl PoolManager {
    /// A claim, counted in the metrics. A miss is counted once, by the
    /// shim's `missed` (it knows the reason, eligibility misses included).
    pub(super) async fn claim_measured(
        &self,
        claim: &Claim,
    ) -> Result<Result<ClaimedSlot, NoSlot>, ClaimFailed> {
        let started = Instant::now();
        if let Err(no) = self.can_serve(claim) {
            return Ok(Err(no));
        }
        let (i, facts) = match self.take_free(&claim.key, &claim.exposed_handler) {
            Ok(found) => found,
            Err(no) => return Ok(Err(no)),
        };
        let result = self.claim_slot(claim, i, &facts).await;
        let pool = self.specs[i].name.clone();
        let outcome = if result.is_ok() { "hit" } else { "failed" };
        self.metrics
            .claims
            .get_or_create(&PoolOutcome {
                pool: pool.clone(),
                outcome,
            })
            .inc();
        if result.is_ok() {
            self.metrics
                .claim_duration
                .get_or_create(&PoolLabel { pool })
                .observe(started.elapsed().as_secs_f64());
        }
        result.map(Ok).map_err(|e| ClaimFailed {
            sandbox_id: facts.sandbox_id.clone(),
            reason: chain(&e),
        })
    }

    /// Whether a pool of the claim's key and handler exists and its fix-up
    /// can serve the pod, decided before any slot is touched: a pod no slot
    /// can serve starts cold at cold speed and the pool keeps its slots.
    fn can_serve(&self, claim: &Claim) -> Result<(), NoSlot> {
        let exists = self
            .specs
            .iter()
            .any(|s| s.key == claim.key && s.exposed_handler == claim.exposed_handler);
        if !exists {
            return Err(NoSlot::NoPool);
        }
        self.fixup
            .check(&claim.key.upstream_handler, &claim.config)
            .map_err(|refused| {
                tracing::info!(pool = %claim.key, cause = %chain(&refused),
                    "the pool cannot serve this pod; starting it cold");
                NoSlot::CannotServe(refused.miss_reason())
            })
    }

    /// Takes a free slot of `key`, marking it as being claimed.
    fn take_free(&self, key: &PoolKey, exposed: &str) -> Result<(usize, SlotFacts), NoSlot> {
        let mut t = self.table();
        let mut any_pool = false;
        for (i, spec) in self.specs.iter().enumerate() {
            if spec.key != *key || spec.exposed_handler != exposed {
                continue;
            }
            any_pool = true;
            // Adopted slots wait for the pool's network mode like new ones.
            if self.decided_mode(i).is_none() {
                continue;
            }
            while let Some(id) = t.free[i].pop_front() {
                if let Some(slot) = t.slots.get_mut(&id) {
                    slot.status = Status::Claiming;
                    let facts = slot.facts.clone();
                    t.hold_until[i] = Some(Instant::now() + self.cfg.refill_delay);
                    self.changed();
                    return Ok((i, facts));
                }
            }
        }
        Err(if any_pool {
            NoSlot::PoolEmpty
        } else {
            NoSlot::NoPool
        })
    }

    /// Writes `record` on a blocking thread, within the upstream deadline.
    pub(super) async fn put_record(&self, record: &ClaimRecord) -> Result<(), PoolError> {
        let records = self.records.clone();
        let record = record.clone();
        asyncify(self.cfg.upstream_timeout, move || records.put(&record))
            .await
            .map_err(PoolError::RecordsBlocked)?
            .map_err(PoolError::Records)
    }

    /// Removes the record of `sandbox_id` on a blocking thread, logging
    /// failures.
    pub(super) async fn remove_record(&self, sandbox_id: &str) -> Result<(), PoolError> {
        let records = self.records.clone();
        let id = sandbox_id.to_owned();
        asyncify(self.cfg.upstream_timeout, move || records.remove(&id))
            .await
            .map_err(PoolError::RecordsBlocked)?
            .map_err(PoolError::Records)
    }

    /// The claim proper, once a free slot was taken; on failure the slot
    /// is destroyed.
    async fn claim_slot(
        &self,
        claim: &Claim,
        i: usize,
        facts: &SlotFacts,
    ) -> Result<ClaimedSlot, PoolError> {
        self.refill.notify_one();
        let result = self.record_and_identify(claim, i, facts).await;
        let record = match result {
            Ok(record) => record,
            Err(e) => {
                self.abandon(facts).await;
                return Err(e);
            }
        };
        let pod = Arc::new(ClaimedPod {
            config: record.config,
            exposed_handler: record.exposed_handler,
            claimed_at_ns: record.claimed_at_ns,
            network: record.network,
        });
        // The barrier first: the slot is claimed (visible, and its id soon
        // kubelet's) only with its pending identity step registered.
        self.spawn_complete(facts.clone(), Arc::clone(&pod));
        if let Some(slot) = self.table().slots.get_mut(&facts.sandbox_id) {
            slot.status = Status::Claimed(pod);
        }
        self.changed();
        Ok(ClaimedSlot {
            sandbox_id: facts.sandbox_id.clone(),
        })
    }

    /// The durable steps of a claim: the record, the identity, the record
    /// marked applied.
    async fn record_and_identify(
        &self,
        claim: &Claim,
        i: usize,
        facts: &SlotFacts,
    ) -> Result<ClaimRecord, PoolError> {
        let mut record = ClaimRecord {
            sandbox_id: facts.sandbox_id.clone(),
            pool: self.specs[i].name.clone(),
            exposed_handler: claim.exposed_handler.clone(),
            claimed_at_ns: now_ns(),
            pause_pid: facts.pause_pid,
            placeholder_cgroup_parent: facts.placeholder_cgroup_parent.clone(),
            config: claim.config.clone(),
            identity_applied: false,
            network: None,
        };
        // Durable before anything else: after this, a crash leaves a pod
        // that owns this slot, never a slot handed out twice.
        self.put_record(&record).await?;
        fault::pass(fault::CLAIM_RECORDED).await?;
        record.network = self.identify(i, facts, &claim.config).await?;
        // A crash before this rewrite makes recovery apply the fix-up again
        // (it is idempotent); after it, recovery leaves the pod's files
        // alone.
        record.identity_applied = true;
        if let Err(e) = self.put_record(&record).await {
            tracing::warn!(sandbox = %facts.sandbox_id, error = %chain(&e),
                "marking the fix-up applied failed; a restart would apply it again");
        }
        fault::pass(fault::CLAIM_APPLIED).await?;
        Ok(record)
    }

    /// Gives a taken slot the pod's identity: the fix-up's synchronous part,
    /// then, for a `rebind` pool, the pod's own CNI attachment (the pod's
    /// IPs are returned). Idempotent, so recovery can run it again.
    pub(super) async fn identify(
        &self,
        i: usize,
        facts: &SlotFacts,
        real: &PodSandboxConfig,
    ) -> Result<Option<PodIps>, PoolError> {
        self.fixup.apply(facts, real).await?;
        let network = self.network().await?;
        if network.mode(i)? != NetworkMode::Rebind {
            return Ok(None);
        }
        let cni = network.cni().ok_or(PoolError::NoCni)?;
        // The placeholder's identity, as containerd attached it.
        let uid = facts
            .placeholder_cgroup_parent
            .rsplit('/')
            .next()
            .unwrap_or_default();
        let placeholder = self.placeholder(i, uid);
        let id = &facts.sandbox_id;
        cni.del(&Attachment::of(id, facts.pause_pid, &placeholder), None)
            .await
            .map_err(PoolError::CniRelease)?;
        let result = cni
            .add(&Attachment::of(id, facts.pause_pid, real))
            .await
            .map_err(PoolError::CniAttach)?;
        let ips = pod_ips(&result).map_err(PoolError::PodIps)?;
        tracing::debug!(sandbox = %id, ip = %ips.ip, "network rebound to the pod");
        Ok(Some(ips))
    }

    /// Undoes a claim that could not finish: the slot is destroyed.
    pub(super) async fn abandon(&self, facts: &SlotFacts) {
        self.table().slots.remove(&facts.sandbox_id);
        self.changed();
        if let Err(e) = self.remove_record(&facts.sandbox_id).await {
            tracing::error!(sandbox = %facts.sandbox_id, error = %chain(&e), "removing the claim record failed");
        }
        self.destroy_slot(facts).await;
        self.refill.notify_one();
    }

    /// Schedules the fix-up's deferred parts. First, at once, the
    /// identity step nothing in the pod can observe before its first
    /// container (`Fixup::settle`, retried once), which the pod's
    /// `CreateContainer` waits for (`SlotSource::ready_for_containers`).
    /// Then, `refill_delay` after the claim, `Fixup::complete`, so the
    /// pod's own `CreateContainer`/`StartContainer` have the node to
    /// themselves (the cgroup move stalls thread creation system-wide for
    /// an RCU grace period). Cancelled if the pod is removed first.
    pub(super) fn spawn_complete(&self, facts: SlotFacts, pod: Arc<ClaimedPod>) {
        let fixup = Arc::clone(&self.fixup);
        let cancel = Arc::new(Notify::new());
        let until = tokio::time::Instant::now() + self.cfg.refill_delay;
        let id = facts.sandbox_id.clone();
        let (settled, identity) = if self.fixup.settles(&facts) {
            let (tx, rx) = watch::channel(Identity::Pending);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let task = tokio::spawn(deferred_fixup(
            fixup,
            facts,
            pod,
            settled,
            until,
            Arc::clone(&cancel),
        ));
        if let Some(slot) = self.table().slots.get_mut(&id) {
            slot.completion = Some(Completion { cancel, task });
            slot.identity = identity;
        }
    }

    /// See [`SlotSource::ready_for_containers`](fast_sandbox_shim::slots::SlotSource::ready_for_containers).
    pub(super) async fn wait_settled(&self, sandbox_id: &str) -> Result<(), NotReady> {
        let identity = self
            .table()
            .slots
            .get(sandbox_id)
            .and_then(|slot| slot.identity.clone());
        let Some(mut identity) = identity else {
            return Ok(());
        };
        let bound = self.cfg.upstream_timeout;
        let waited = tokio::time::timeout(
            bound,
            identity.wait_for(|state| *state != Identity::Pending),
        )
        .await;
        let failed = |reason: String| NotReady::Failed {
            sandbox_id: sandbox_id.to_owned(),
            reason,
        };
        match waited {
            Ok(Ok(state)) => match &*state {
                Identity::Settled => Ok(()),
                Identity::Failed(reason) => Err(failed(reason.clone())),
                Identity::Pending => Err(failed("still pending".to_owned())),
            },
            Ok(Err(_)) => Err(failed("abandoned: the sandbox is being removed".to_owned())),
            Err(_) => Err(NotReady::Pending {
                sandbox_id: sandbox_id.to_owned(),
                waited: bound,
            }),
        }
    }

    /// The CPU and memory of a claimed pod's own cgroup. The read runs on a
    /// blocking thread with the upstream deadline; the async thread is
    /// handed to the runtime's other tasks meanwhile
    /// ([`crate::blocking::wait_in_place`]).
    pub(super) fn usage_of(&self, sandbox_id: &str, pod: &ClaimedPod) -> Option<PodUsage> {
        let parent = pod.config.linux.as_ref()?.cgroup_parent.as_str();
        let leaf = CgroupLeaf::for_pod(parent).ok()?;
        // What the slot used before its claim and the kernel did not move
        // with its processes stays charged under the slot's placeholder
        // parent: reported as the pod's (docs/runtimes.md, "Memory a warm
        // slot used before its claim").
        let placeholder = self.table().slots.get(sandbox_id).and_then(|slot| {
            let parent = &slot.facts.placeholder_cgroup_parent;
            CgroupLeaf::parse(parent, "placeholder cgroup parent").ok()
        });
        let cgroups = Arc::clone(&self.cgroups);
        let read = crate::blocking::wait_in_place(self.cfg.upstream_timeout, move || {
            let mut sample = cgroups.pod_sample(&leaf)?;
            if let Some(left) = placeholder.and_then(|p| cgroups.pod_sample(&p)) {
                sample.add_memory(&left);
            }
            Some(sample)
        });
        let sample = match read {
            Ok(sample) => sample?,
            Err(e) => {
                tracing::warn!(sandbox = %sandbox_id, error = %e, "reading the pod's cgroup");
                return None;
            }
        };
        let (cpu, memory) = self.usage.usage(sandbox_id, &sample, now_ns());
        Some(PodUsage { cpu, memory })
    }

    /// CNI DEL with the pod's identity, for a rebound pod being stopped.
    pub(super) async fn leave_network(&self, sandbox_id: &str) {
        let found = {
            let t = self.table();
            t.slots.get(sandbox_id).and_then(|slot| match &slot.status {
                Status::Claimed(pod) if pod.network.is_some() => {
                    Some((slot.facts.pause_pid, Arc::clone(pod)))
                }
                _ => None,
            })
        };
        let Some((pid, pod)) = found else {
            return;
        };
        // Rebound, so the decision was made (by this run, or it is made
        // now for a pod rebound by the previous one).
        let cni = match self.network().await {
            Ok(network) => network.cni(),
            Err(e) => {
                tracing::warn!(sandbox = %sandbox_id, error = %chain(&e), "CNI DEL with the pod's identity skipped");
                return;
            }
        };
        let Some(cni) = cni else {
            return;
        };
        if let Err(e) = cni
            .del(&Attachment::of(sandbox_id, pid, &pod.config), None)
            .await
        {
            // containerd's DEL at the stop releases the address anyway
            // (host-local keys it by container id); a policy CNI may keep
            // the pod's endpoint until its own garbage collection.
            tracing::warn!(sandbox = %sandbox_id, error = %chain(&e), "CNI DEL with the pod's identity failed");
        }
    }

    pub(super) fn view_of(
        &self,
        sandbox_id: &str,
        upstream_labels: &HashMap<String, String>,
    ) -> SlotView {
        if let Some(slot) = self.table().slots.get(sandbox_id) {
            return match &slot.status {
                Status::Claimed(pod) => SlotView::Claimed(Arc::clone(pod)),
                Status::Free | Status::Claiming => SlotView::Unclaimed,
            };
        }
        // Not in the table: a slot still being created, or one a previous
        // run left behind. Only the secret token makes it ours.
        super::token_only::by_token(upstream_labels, &self.token)
    }

    /// A sandbox was removed upstream: drops its slot, its record and what
    /// the fix-up made for it.
    pub(super) async fn forget(&self, sandbox_id: &str) {
        let slot = self.table().slots.remove(sandbox_id);
        let Some(mut slot) = slot else { return };
        self.changed();
        self.usage.forget(sandbox_id);
        if let Some(c) = slot.completion.take() {
            // Never clean up while a cgroup move may still create the leaf.
            c.cancel.notify_one();
            let _ = c.task.await;
        }
        if let Status::Claimed(pod) = &slot.status {
            if let Err(e) = self.remove_record(sandbox_id).await {
                tracing::error!(sandbox = %sandbox_id, error = %chain(&e), "removing the claim record failed");
            }
            self.fixup.after_remove(&slot.facts, &pod.config).await;
        }
        self.fixup.discard(&slot.facts).await;
    }
}

/// The deferred parts of a claim's fix-up (see
/// [`PoolManager::spawn_complete`]): the settle step if `settled` is set,
/// then, at `until`, `Fixup::complete`; each stops at `cancelled`.
async fn deferred_fixup(
    fixup: Arc<dyn Fixup>,
    facts: SlotFacts,
    pod: Arc<ClaimedPod>,
    settled: Option<watch::Sender<Identity>>,
    until: tokio::time::Instant,
    cancelled: Arc<Notify>,
) {
    if let Some(settled) = settled {
        let outcome = tokio::select! {
            outcome = settle_retrying(&*fixup, &facts, &pod.config) => outcome,
            // Dropping the step kills its command; waiters see the
            // sender gone.
            () = cancelled.notified() => return,
        };
        settled.send_replace(match outcome {
            Ok(()) => Identity::Settled,
            Err(e) => {
                let reason = chain(&e);
                tracing::error!(sandbox = %facts.sandbox_id, error = %reason,
                    "setting up the claimed sandbox's identity failed twice: CreateContainer in it will fail; remove the pod's sandbox to get a new one");
                Identity::Failed(reason)
            }
        });
    }
    tokio::select! {
        () = tokio::time::sleep_until(until) => {}
        () = cancelled.notified() => return,
    }
    match fixup.complete(&facts, &pod.config).await {
        Ok(()) => {}
        // The pod was stopped meanwhile: nothing left to move.
        Err(e) if e.process_gone() => {
            tracing::debug!(sandbox = %facts.sandbox_id, error = %chain(&e),
                "the pod's pause exited before the fix-up completed; nothing to move");
        }
        Err(e) => {
            tracing::error!(sandbox = %facts.sandbox_id, error = %chain(&e),
                "completing the fix-up failed; the pod runs, but its pause stays in the placeholder cgroup");
        }
    }
}

/// `Fixup::settle`, once more if it fails.
async fn settle_retrying(
    fixup: &dyn Fixup,
    facts: &SlotFacts,
    real: &PodSandboxConfig,
) -> Result<(), FixupFailed> {
    match fixup.settle(facts, real).await {
        Ok(()) => Ok(()),
        Err(first) => {
            tracing::warn!(sandbox = %facts.sandbox_id, error = %chain(&first),
                "setting up the claimed sandbox's identity failed; retrying once");
            fixup.settle(facts, real).await
        }
    }
}
