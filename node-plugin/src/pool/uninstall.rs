//! `fast-sandbox-node uninstall`: removes every slot of the node (free or
//! claimed), with what the pool made for it outside containerd (placeholder
//! cgroups, the moved pause's leaf), the claim records, the token and the
//! instance's placeholder cgroup root. Run with the node plugin stopped.

use fast_sandbox_proto::cri::PodSandbox;

use super::{table::Status, PoolError, PoolManager};
use crate::{blocking::chain, fixup::SlotFacts};

impl PoolManager {
    /// Removes every slot carrying this node's token and every trace of
    /// the pool; returns how many sandboxes were removed.
    pub async fn remove_everything(&self) -> Result<usize, PoolError> {
        let listed = self.list_ours().await?;
        // Records whose sandbox is already gone: cleaned as at start-up.
        self.forget_vanished(&listed).await;
        for sb in &listed {
            self.remove_one(sb).await;
        }
        let root = self.cfg.placeholder_cgroup_root.clone();
        let cgroups = std::sync::Arc::clone(&self.cgroups);
        let dirs = crate::blocking::asyncify(self.cfg.upstream_timeout, {
            let root = root.clone();
            move || cgroups.placeholder_dirs(&root)
        })
        .await
        .unwrap_or_default();
        for parent in dirs
            .iter()
            .map(|uid| format!("{root}/{uid}"))
            .chain(std::iter::once(root.clone()))
        {
            self.fixup.discard(&placeholder_only(parent)).await;
        }
        let records = self.records.clone();
        crate::blocking::asyncify(self.cfg.upstream_timeout, move || records.remove_all())
            .await
            .map_err(PoolError::RecordsBlocked)??;
        Ok(listed.len())
    }

    /// Stops and removes one slot, then what the pool made for it.
    async fn remove_one(&self, sb: &PodSandbox) {
        let slot = self.table().slots.remove(&sb.id);
        let (facts, claimed) = match slot {
            Some(slot) => match slot.status {
                Status::Claimed(pod) => (slot.facts, Some(pod)),
                Status::Free | Status::Claiming => (slot.facts, None),
            },
            None => {
                let mut facts = self.orphan_facts(sb);
                // The cgroup parent it was really made under (an older
                // release used another root).
                if let Ok((_, info)) = self.sandbox_info(&sb.id).await {
                    if let Some(p) = info
                        .pointer("/config/linux/cgroup_parent")
                        .and_then(serde_json::Value::as_str)
                        .filter(|p| !p.is_empty())
                    {
                        p.clone_into(&mut facts.placeholder_cgroup_parent);
                    }
                }
                (facts, None)
            }
        };
        tracing::info!(sandbox = %sb.id, claimed = claimed.is_some(), "removing a slot");
        self.destroy(&sb.id).await;
        if let Some(pod) = claimed {
            self.fixup.after_remove(&facts, &pod.config).await;
        }
        self.fixup.discard(&facts).await;
        if let Err(e) = self.remove_record(&sb.id).await {
            tracing::warn!(sandbox = %sb.id, error = %chain(&e), "removing the claim record failed");
        }
    }
}

/// Facts naming only a placeholder cgroup parent, for `Fixup::discard`.
fn placeholder_only(parent: String) -> SlotFacts {
    SlotFacts {
        sandbox_id: String::new(),
        pause_pid: 0,
        placeholder_cgroup_parent: parent,
        upstream_handler: String::new(),
    }
}
