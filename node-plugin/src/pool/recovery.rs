//! Start-up, in two steps, so CRI is served before any slot is touched:
//!
//! 1. [`PoolManager::load_claims`] (before serving, no upstream call): the
//!    claim records put every claimed slot in the table, so the shim
//!    reports recovered pods with their own identity from the first call,
//!    and hides every other sandbox carrying this node's token.
//! 2. [`PoolManager::recover`] (in the background, before the refill):
//!    upstream's list of this node's slots against the table. Claimed
//!    slots keep their pod; claims cut short are finished or rolled back;
//!    a slot without a record whose copy survives in its sandbox directory
//!    gets its record back; free slots of the previous run are adopted
//!    when healthy and of a configured pool (`adopt.rs`); only the rest,
//!    records without a sandbox and cgroups of unfinished creations are
//!    removed. A slot with containers but no record anywhere is never
//!    removed: it is handed to kubelet, as for an unreadable record.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
};

use fast_sandbox_proto::cri::{
    ListContainersRequest, PodSandbox, PodSandboxConfig, PodSandboxState,
};
use fast_sandbox_shim::slots::{ClaimedPod, POOL_LABEL};

use super::{
    records::{self, BadRecord, ClaimRecord},
    table::{Slot, Status},
    PoolError, PoolManager,
};
use crate::{blocking::chain, fixup::SlotFacts};

/// What the listing of upstream against the table found.
#[derive(Default)]
struct Found {
    /// Placeholders without a record: adopted if healthy and matching.
    candidates: Vec<PodSandbox>,
    /// Claimed slots whose deferred fix-up may not have run.
    completions: Vec<(SlotFacts, Arc<ClaimedPod>)>,
    /// Claims cut short before their identity was applied.
    unapplied: Vec<ClaimRecord>,
}

impl PoolManager {
    /// Puts every readable claim record in the table as claimed and keeps
    /// the unreadable ones for [`PoolManager::recover`]. No upstream call.
    pub(super) fn load_claims(&self, good: Vec<ClaimRecord>, bad: &[BadRecord]) {
        let mut pending = Pending {
            unreadable: unreadable_records(bad),
            unapplied: HashMap::new(),
        };
        let mut t = self.table();
        for rec in good {
            let pool = self.pool_index(&rec.pool);
            let facts = self.record_facts(&rec);
            let id = rec.sandbox_id.clone();
            if !rec.identity_applied {
                pending.unapplied.insert(id.clone(), rec.clone());
            }
            t.slots
                .insert(id, Slot::new(pool, facts, Status::Claimed(pod_of(rec))));
        }
        drop(t);
        *self.pending() = pending;
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reconciles the table with upstream. Fails only before it changed
    /// anything (listing upstream), so it can be retried.
    pub(super) async fn recover(&self) -> Result<(), PoolError> {
        let listed = self.list_ours().await?;
        let with_containers = self.sandboxes_with_containers().await?;
        let found = self.sort_listed(&listed, &with_containers).await;
        self.forget_vanished(&listed).await;
        let rolled_back = self.finish_claims(found.unapplied).await;
        for (facts, pod) in found.completions {
            if !rolled_back.contains(&facts.sandbox_id) {
                self.spawn_complete(facts, pod);
            }
        }
        let adopted = self.adopt_all(found.candidates).await;
        self.sweep_placeholder_cgroups(&listed).await;
        tracing::info!(adopted, "recovered the pools from the previous run");
        self.changed();
        Ok(())
    }

    /// Sorts each listed slot: claimed (from a record, a record's copy, or
    /// an unreadable record), unknown with containers, or free.
    async fn sort_listed(&self, listed: &[PodSandbox], with_containers: &HashSet<String>) -> Found {
        let mut found = Found::default();
        for sb in listed {
            let ready = sb.state == PodSandboxState::SandboxReady as i32;
            // An unreadable record is replaced if its copy is readable.
            let unreadable = self.pending().unreadable.remove(&sb.id);
            let claimed = match self.table().slots.get(&sb.id).map(|s| &s.status) {
                Some(Status::Claimed(pod)) => Some(Arc::clone(pod)),
                Some(Status::Free | Status::Claiming) => continue,
                None => None,
            };
            let claimed = match claimed {
                Some(pod) => Some(pod),
                None => self.rebuild_record(sb).await,
            };
            if let Some(pod) = claimed {
                let facts = self.table().slots.get(&sb.id).map(|s| s.facts.clone());
                let unapplied = self.pending().unapplied.remove(&sb.id);
                // The deferred part may not have run before the restart.
                if let (true, Some(facts)) = (ready, facts) {
                    found.unapplied.extend(unapplied);
                    found.completions.push((facts, pod));
                }
                continue;
            }
            if let Some(path) = unreadable {
                tracing::error!(sandbox = %sb.id, path = %path.display(),
                    "claimed sandbox without a readable record: reported under its placeholder identity, as a pod kubelet does not know, so kubelet stops and removes it and recreates its pod's sandbox; never served again");
                self.hand_to_kubelet(sb);
            } else if with_containers.contains(&sb.id) {
                tracing::error!(sandbox = %sb.id,
                    "slot with containers but no claim record or copy (the records were lost): reported under its placeholder identity, as a pod kubelet does not know, so kubelet stops and removes it and recreates its pod's sandbox; never served again");
                self.hand_to_kubelet(sb);
            } else {
                found.candidates.push(sb.clone());
            }
        }
        found
    }

    /// A listed slot without a record in `claims/`: its record is rebuilt
    /// from the copy in its sandbox directory, if there is one.
    async fn rebuild_record(&self, sb: &PodSandbox) -> Option<Arc<ClaimedPod>> {
        let records = self.records.clone();
        let id = sb.id.clone();
        let copy =
            crate::blocking::asyncify(self.cfg.upstream_timeout, move || records.read_copy(&id))
                .await;
        let rec = match copy {
            Ok(Ok(Some(rec))) => rec,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                tracing::warn!(sandbox = %sb.id, error = %chain(&e), "reading the copy of a claim record");
                return None;
            }
            Err(e) => {
                tracing::warn!(sandbox = %sb.id, error = %chain(&e), "reading the copy of a claim record");
                return None;
            }
        };
        tracing::warn!(sandbox = %sb.id, "claim record missing; rebuilt from its copy in the sandbox's directory");
        if let Err(e) = self.put_record(&rec).await {
            tracing::error!(sandbox = %sb.id, error = %chain(&e), "restoring a claim record failed; the pod keeps its sandbox");
        }
        let pool = self.pool_index(&rec.pool);
        let facts = self.record_facts(&rec);
        if !rec.identity_applied {
            self.pending()
                .unapplied
                .insert(rec.sandbox_id.clone(), rec.clone());
        }
        let pod = pod_of(rec);
        let slot = Slot::new(pool, facts, Status::Claimed(Arc::clone(&pod)));
        self.table().slots.insert(sb.id.clone(), slot);
        Some(pod)
    }

    /// Shows a claimed slot whose pod cannot be known to kubelet under its
    /// placeholder's metadata (no labels: the placeholder's would show the
    /// token), so kubelet removes it. Never stopped here.
    fn hand_to_kubelet(&self, sb: &PodSandbox) {
        let pool = sb.labels.get(POOL_LABEL).map_or(0, |p| self.pool_index(p));
        let pod = Arc::new(ClaimedPod {
            config: PodSandboxConfig {
                metadata: sb.metadata.clone(),
                ..Default::default()
            },
            exposed_handler: self.specs[pool].exposed_handler.clone(),
            claimed_at_ns: sb.created_at,
            network: None,
        });
        let slot = Slot::new(pool, self.orphan_facts(sb), Status::Claimed(pod));
        self.table().slots.insert(sb.id.clone(), slot);
    }

    /// Claimed slots of the table (from records) whose sandbox is gone
    /// upstream: the pod was removed while we were down. And unreadable
    /// records whose sandbox is gone: nothing left to keep.
    pub(super) async fn forget_vanished(&self, listed: &[PodSandbox]) {
        let present: HashSet<&str> = listed.iter().map(|sb| sb.id.as_str()).collect();
        let gone: Vec<(String, Slot)> = {
            let mut t = self.table();
            let ids: Vec<String> = t
                .slots
                .iter()
                .filter(|(id, s)| {
                    matches!(s.status, Status::Claimed(_)) && !present.contains(id.as_str())
                })
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| t.slots.remove(&id).map(|s| (id, s)))
                .collect()
        };
        for (id, slot) in gone {
            tracing::info!(sandbox = %id, "claimed sandbox no longer exists upstream; forgetting its record");
            if let Status::Claimed(pod) = &slot.status {
                self.fixup.after_remove(&slot.facts, &pod.config).await;
            }
            self.fixup.discard(&slot.facts).await;
            if let Err(e) = self.remove_record(&id).await {
                tracing::error!(sandbox = %id, error = %chain(&e), "removing the claim record failed");
            }
        }
        let unreadable: Vec<(String, PathBuf)> = self.pending().unreadable.drain().collect();
        for (id, path) in unreadable {
            tracing::error!(sandbox = %id, path = %path.display(),
                "removing an unreadable claim record: its sandbox no longer exists upstream");
            if let Err(e) = self.remove_record(&id).await {
                tracing::error!(sandbox = %id, error = %chain(&e), "removing the claim record failed");
            }
        }
    }

    /// The ids of sandboxes that have containers (any state): a slot with
    /// containers was claimed, whatever the records say.
    async fn sandboxes_with_containers(&self) -> Result<HashSet<String>, PoolError> {
        let listed = self
            .upstream
            .clone()
            .list_containers(self.request(ListContainersRequest::default()))
            .await
            .map_err(PoolError::ListContainers)?;
        Ok(listed
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.pod_sandbox_id)
            .collect())
    }

    /// What a claim record says about its slot.
    pub(super) fn record_facts(&self, rec: &ClaimRecord) -> SlotFacts {
        SlotFacts {
            sandbox_id: rec.sandbox_id.clone(),
            pause_pid: rec.pause_pid,
            placeholder_cgroup_parent: rec.placeholder_cgroup_parent.clone(),
            upstream_handler: self.upstream_of(&rec.pool),
        }
    }

    /// A slot creation killed mid-way leaves the cgroup parent runc made
    /// for it (containerd cleans up the sandbox, not that directory). Only
    /// this instance's root is swept.
    async fn sweep_placeholder_cgroups(&self, listed: &[PodSandbox]) {
        let known: HashSet<String> = listed
            .iter()
            .filter_map(|sb| sb.metadata.as_ref().map(|m| m.uid.clone()))
            .collect();
        let root = self.cfg.placeholder_cgroup_root.clone();
        let cgroups = Arc::clone(&self.cgroups);
        let dirs = crate::blocking::asyncify(self.cfg.upstream_timeout, move || {
            cgroups.placeholder_dirs(&root)
        })
        .await;
        let dirs = match dirs {
            Ok(dirs) => dirs,
            Err(e) => {
                tracing::warn!(error = %e, "listing placeholder cgroups; leaving them");
                return;
            }
        };
        for uid in dirs.into_iter().filter(|uid| !known.contains(uid)) {
            tracing::info!(uid = %uid, "removing a placeholder cgroup left by an unfinished slot creation");
            self.fixup
                .discard(&SlotFacts {
                    sandbox_id: String::new(),
                    pause_pid: 0,
                    placeholder_cgroup_parent: format!(
                        "{}/{uid}",
                        self.cfg.placeholder_cgroup_root
                    ),
                    upstream_handler: String::new(),
                })
                .await;
        }
    }

    /// Claims the previous run died in the middle of: kubelet was never
    /// answered, but its next sync finds the sandbox by the pod's uid and
    /// uses it, so the claim is finished here, or rolled back. Returns the
    /// rolled-back sandboxes.
    async fn finish_claims(&self, unapplied: Vec<ClaimRecord>) -> HashSet<String> {
        let mut rolled_back = HashSet::new();
        for mut rec in unapplied {
            let facts = self.record_facts(&rec);
            let pool = self.pool_index(&rec.pool);
            match self.identify(pool, &facts, &rec.config).await {
                Ok(network) => {
                    tracing::info!(sandbox = %rec.sandbox_id, "finished a claim interrupted by a restart");
                    rec.identity_applied = true;
                    rec.network.clone_from(&network);
                    if let Err(e) = self.put_record(&rec).await {
                        tracing::error!(sandbox = %rec.sandbox_id, error = %chain(&e), "updating the claim record failed");
                    }
                    if let Some(slot) = self.table().slots.get_mut(&rec.sandbox_id) {
                        if let Status::Claimed(pod) = &slot.status {
                            let mut pod = ClaimedPod::clone(pod);
                            pod.network = network;
                            slot.status = Status::Claimed(Arc::new(pod));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(sandbox = %rec.sandbox_id, error = %chain(&e),
                        "rolling back a claim interrupted by a restart: its fix-up failed");
                    self.abandon(&facts).await;
                    rolled_back.insert(rec.sandbox_id);
                }
            }
        }
        rolled_back
    }
}

/// What [`PoolManager::load_claims`] leaves for [`PoolManager::recover`].
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Unreadable records by sandbox id.
    unreadable: HashMap<String, PathBuf>,
    /// Records of claims whose identity was never applied.
    unapplied: HashMap<String, ClaimRecord>,
}

/// The pod a claim record names.
fn pod_of(rec: ClaimRecord) -> Arc<ClaimedPod> {
    Arc::new(ClaimedPod {
        config: rec.config,
        exposed_handler: rec.exposed_handler,
        claimed_at_ns: rec.claimed_at_ns,
        network: rec.network,
    })
}

/// Claim records that could not be read, by sandbox id. A record file
/// names its sandbox even when its content is lost: a pod claimed that
/// sandbox, so it is never taken for a free slot or an orphan (which would
/// destroy it, and the pod's containers, with no word to kubelet).
fn unreadable_records(bad: &[records::BadRecord]) -> HashMap<String, PathBuf> {
    let mut unreadable = HashMap::new();
    for b in bad {
        tracing::error!(path = %b.path.display(), error = %b.error,
            "claim record unreadable; the pod that claimed its sandbox cannot be known");
        if let Some(id) = b.path.file_stem().and_then(|s| s.to_str()) {
            if records::is_sandbox_id(id) {
                unreadable.insert(id.to_owned(), b.path.clone());
            }
        }
    }
    unreadable
}
