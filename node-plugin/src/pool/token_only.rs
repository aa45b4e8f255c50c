//! The slot source of a node plugin configured without pools: it makes no
//! slot and claims none, but still keeps this node's slots out of sight
//! (a graceful stop leaves free slots for the next run to adopt, and a
//! run without pools must not list them to kubelet, which would destroy
//! them), and reports the pods of the claim records it finds with their
//! own identity; when kubelet removes one of those, it cleans up after it
//! as the pools would (the moved pause's leaf, the placeholder cgroup, the
//! record).

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
};

use fast_sandbox_shim::slots::{
    Claim, ClaimFailed, ClaimedPod, ClaimedSlot, NoSlot, SlotSource, SlotView, SLOT_TOKEN_LABEL,
};

use super::records::{ClaimRecord, RecordError, RecordStore};
use crate::fixup::{Fixup, SlotFacts};

/// Hides the sandboxes carrying the node's token; serves no claim.
#[derive(Debug)]
pub struct TokenOnly {
    token: String,
    records: RecordStore,
    fixup: Arc<dyn Fixup>,
    claimed: Mutex<HashMap<String, (SlotFacts, Arc<ClaimedPod>)>>,
}

impl TokenOnly {
    /// Reads the token and the claim records of the state in `state_dir`;
    /// `fixup` cleans up after a claimed slot once it is removed.
    pub fn open(state_dir: &Path, fixup: Arc<dyn Fixup>) -> Result<Self, RecordError> {
        let records = RecordStore::open(state_dir)?;
        let token = records.token()?;
        let (good, bad) = records.load()?;
        for b in bad {
            tracing::error!(path = %b.path.display(), error = %b.error, "claim record unreadable");
        }
        let claimed = good.into_iter().map(claimed_slot).collect();
        Ok(Self {
            token,
            records,
            fixup,
            claimed: Mutex::new(claimed),
        })
    }

    fn claimed(&self) -> std::sync::MutexGuard<'_, HashMap<String, (SlotFacts, Arc<ClaimedPod>)>> {
        self.claimed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a claim record says of its slot and pod. The upstream handler is
/// not recorded: the default (setns) mechanism cleans up after it.
fn claimed_slot(r: ClaimRecord) -> (String, (SlotFacts, Arc<ClaimedPod>)) {
    let facts = SlotFacts {
        sandbox_id: r.sandbox_id.clone(),
        pause_pid: r.pause_pid,
        placeholder_cgroup_parent: r.placeholder_cgroup_parent,
        upstream_handler: String::new(),
    };
    let pod = Arc::new(ClaimedPod {
        config: r.config,
        exposed_handler: r.exposed_handler,
        claimed_at_ns: r.claimed_at_ns,
        network: r.network,
    });
    (r.sandbox_id, (facts, pod))
}

/// The view of a sandbox the pool holds no entry for: only the secret
/// token makes it one of this node's slots (then hidden).
pub(super) fn by_token(upstream_labels: &HashMap<String, String>, token: &str) -> SlotView {
    if upstream_labels
        .get(SLOT_TOKEN_LABEL)
        .is_some_and(|t| t == token)
    {
        SlotView::Unclaimed
    } else {
        SlotView::NotASlot
    }
}

#[tonic::async_trait]
impl SlotSource for TokenOnly {
    async fn claim(&self, _claim: &Claim) -> Result<Result<ClaimedSlot, NoSlot>, ClaimFailed> {
        Ok(Err(NoSlot::NoPool))
    }

    fn view(&self, sandbox_id: &str, upstream_labels: &HashMap<String, String>) -> SlotView {
        if let Some((_, pod)) = self.claimed().get(sandbox_id) {
            return SlotView::Claimed(Arc::clone(pod));
        }
        by_token(upstream_labels, &self.token)
    }

    async fn removed(&self, sandbox_id: &str) {
        let removed = self.claimed().remove(sandbox_id);
        if let Some((facts, pod)) = removed {
            self.fixup.after_remove(&facts, &pod.config).await;
            self.fixup.discard(&facts).await;
            let records = self.records.clone();
            let id = sandbox_id.to_owned();
            let removed = tokio::task::spawn_blocking(move || records.remove(&id)).await;
            if let Ok(Err(e)) = removed {
                tracing::error!(sandbox = %sandbox_id, error = %crate::blocking::chain(&e), "removing the claim record failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::records::ClaimRecord;

    #[tokio::test]
    async fn hides_the_token_and_shows_recorded_claims() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        let token = store.token().unwrap();
        let id: String = std::iter::repeat_n('a', 64).collect();
        store
            .put(&ClaimRecord {
                sandbox_id: id.clone(),
                pool: "p".into(),
                exposed_handler: "fast-runc".into(),
                claimed_at_ns: 1,
                pause_pid: 7,
                placeholder_cgroup_parent: "/x/y".into(),
                config: Default::default(),
                identity_applied: true,
                network: None,
            })
            .unwrap();
        let ops = Arc::new(crate::fixup::RecordingOps::new());
        let fixup = Arc::new(crate::fixup::SetnsFixup::new(
            Arc::clone(&ops) as Arc<dyn crate::fixup::NodeOps>,
            "/var/lib/containerd".into(),
            std::time::Duration::from_secs(1),
        ));
        let source = TokenOnly::open(dir.path(), fixup).unwrap();
        let ours = HashMap::from([(SLOT_TOKEN_LABEL.to_owned(), token)]);
        let theirs = HashMap::from([(SLOT_TOKEN_LABEL.to_owned(), "other".to_owned())]);
        assert!(matches!(source.view("b", &ours), SlotView::Unclaimed));
        assert!(matches!(source.view("b", &theirs), SlotView::NotASlot));
        assert!(matches!(source.view(&id, &ours), SlotView::Claimed(_)));
        source.removed(&id).await;
        assert!(store.load().unwrap().0.is_empty());
        // The placeholder cgroup is removed as the pools would.
        assert!(
            ops.calls()
                .iter()
                .any(|c| matches!(c, crate::fixup::Call::RemoveCgroup { leaf } if leaf == "/x/y")),
            "{:?}",
            ops.calls()
        );
        assert!(matches!(source.view(&id, &ours), SlotView::Unclaimed));
    }
}
