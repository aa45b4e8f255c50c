//! Start-up: the in-memory table rebuilt from the claim records and
//! upstream's list of this node's slots, after a restart or a crash at any
//! point. Claimed slots keep their pod; claims cut short are finished or
//! rolled back; orphans (placeholders without a record, records without a
//! sandbox, cgroups of unfinished creations) are removed.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
};

use fast_sandbox_proto::cri::{PodSandbox, PodSandboxConfig, PodSandboxState};
use fast_sandbox_shim::slots::{ClaimedPod, POOL_LABEL};

use super::{
    records::{self, ClaimRecord},
    table::{Slot, Status},
    PoolError, PoolManager,
};
use crate::{blocking::chain, fixup::SlotFacts};

/// What the listing of upstream against the records found.
#[derive(Default)]
struct Found {
    /// Placeholders without a record: removed.
    orphans: Vec<SlotFacts>,
    /// Claimed slots whose deferred fix-up may not have run.
    completions: Vec<(SlotFacts, Arc<ClaimedPod>)>,
    /// Claims cut short before their identity was applied.
    unapplied: Vec<ClaimRecord>,
}

impl PoolManager {
    /// Reconciles the in-memory table with the records and upstream.
    pub(super) async fn recover(&self) -> Result<(), PoolError> {
        let records = self.records.clone();
        let (records, bad) =
            crate::blocking::asyncify(self.cfg.upstream_timeout, move || records.load())
                .await
                .map_err(PoolError::RecordsBlocked)??;
        let mut unreadable = unreadable_records(&bad);
        let listed = self.list_ours().await?;
        let mut by_id: HashMap<String, ClaimRecord> = records
            .into_iter()
            .map(|r| (r.sandbox_id.clone(), r))
            .collect();
        let found = self.adopt(&listed, &mut by_id, &mut unreadable);
        // Unreadable records whose sandbox is gone: nothing left to keep.
        for (id, path) in unreadable {
            tracing::error!(sandbox = %id, path = %path.display(),
                "removing an unreadable claim record: its sandbox no longer exists upstream");
            self.remove_record(&id).await?;
        }
        // Records whose sandbox is gone upstream: the pod was removed while
        // we were down.
        for (id, rec) in by_id {
            tracing::info!(sandbox = %id, "claimed sandbox no longer exists upstream; forgetting its record");
            let facts = self.record_facts(&rec);
            self.fixup.after_remove(&facts, &rec.config).await;
            self.fixup.discard(&facts).await;
            self.remove_record(&id).await?;
        }
        for facts in found.orphans {
            tracing::info!(sandbox = %facts.sandbox_id, "removing unclaimed slot left by a previous run");
            self.destroy_slot(&facts).await;
        }
        self.sweep_placeholder_cgroups(&listed).await;
        let rolled_back = self.finish_claims(found.unapplied).await?;
        for (facts, pod) in found.completions {
            if !rolled_back.contains(&facts.sandbox_id) {
                self.spawn_complete(facts, pod);
            }
        }
        Ok(())
    }

    /// Puts every listed slot that has a record (or an unreadable one) in
    /// the table as claimed; returns the rest as orphans, with the claims
    /// to finish.
    fn adopt(
        &self,
        listed: &[PodSandbox],
        by_id: &mut HashMap<String, ClaimRecord>,
        unreadable: &mut HashMap<String, PathBuf>,
    ) -> Found {
        let mut found = Found::default();
        let mut t = self.table();
        for sb in listed {
            if let Some(rec) = by_id.remove(&sb.id) {
                let ready = sb.state == PodSandboxState::SandboxReady as i32;
                if ready && !rec.identity_applied {
                    found.unapplied.push(rec.clone());
                }
                let pool = self.pool_index(&rec.pool);
                let facts = self.record_facts(&rec);
                let pod = Arc::new(ClaimedPod {
                    config: rec.config,
                    exposed_handler: rec.exposed_handler,
                    claimed_at_ns: rec.claimed_at_ns,
                    network: rec.network,
                });
                let slot = Slot::new(pool, facts.clone(), Status::Claimed(Arc::clone(&pod)));
                t.slots.insert(sb.id.clone(), slot);
                // The deferred part may not have run before the crash.
                if ready {
                    found.completions.push((facts, pod));
                }
            } else if let Some(path) = unreadable.remove(&sb.id) {
                tracing::error!(sandbox = %sb.id, path = %path.display(),
                    "claimed sandbox without a readable record: reported under its placeholder identity, as a pod kubelet does not know, so kubelet stops and removes it and recreates its pod's sandbox; never served again");
                let (pool, pod) = self.unknown_pod(sb);
                let slot = Slot::new(pool, self.orphan_facts(sb), Status::Claimed(pod));
                t.slots.insert(sb.id.clone(), slot);
            } else {
                found.orphans.push(self.orphan_facts(sb));
            }
        }
        found
    }

    /// The pod shown for a claimed slot whose record is unreadable: the
    /// placeholder's metadata, no labels (the placeholder's would show the
    /// token).
    fn unknown_pod(&self, sb: &PodSandbox) -> (usize, Arc<ClaimedPod>) {
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
        (pool, pod)
    }

    /// What a claim record says about its slot.
    fn record_facts(&self, rec: &ClaimRecord) -> SlotFacts {
        SlotFacts {
            sandbox_id: rec.sandbox_id.clone(),
            pause_pid: rec.pause_pid,
            placeholder_cgroup_parent: rec.placeholder_cgroup_parent.clone(),
            upstream_handler: self.upstream_of(&rec.pool),
        }
    }

    /// A slot creation killed mid-way leaves the cgroup parent runc made
    /// for it (containerd cleans up the sandbox, not that directory).
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
    async fn finish_claims(
        &self,
        unapplied: Vec<ClaimRecord>,
    ) -> Result<HashSet<String>, PoolError> {
        let mut rolled_back = HashSet::new();
        for mut rec in unapplied {
            let facts = self.record_facts(&rec);
            let pool = self.pool_index(&rec.pool);
            match self.identify(pool, &facts, &rec.config).await {
                Ok(network) => {
                    tracing::info!(sandbox = %rec.sandbox_id, "finished a claim interrupted by a restart");
                    rec.identity_applied = true;
                    rec.network.clone_from(&network);
                    self.put_record(&rec).await?;
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
        Ok(rolled_back)
    }
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
