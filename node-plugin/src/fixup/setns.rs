//! The fix-up mechanism for runtimes whose pause is an ordinary host process
//! (runc, crun): rewrite containerd's per-sandbox files in place, `setns`
//! into the pause's namespaces for the hostname and sysctls, and move the
//! pause into the pod's cgroup (the steps are in `steps.rs`).

use std::{path::PathBuf, sync::Arc, time::Duration};

use fast_sandbox_proto::cri::PodSandboxConfig;

use super::{
    ops::NodeOps,
    plan::{CgroupLeaf, CgroupMove, FixupPlan, SandboxId},
    steps::{apply_phase, cleanup_after_remove, Phase},
    Fixup, FixupFailed, SlotFacts,
};
use crate::blocking::asyncify;

/// [`Fixup`] through host namespaces and cgroupfs.
#[derive(Debug)]
pub struct SetnsFixup {
    ops: Arc<dyn NodeOps>,
    containerd_root: PathBuf,
    deadline: Duration,
}

impl SetnsFixup {
    /// `containerd_root` is containerd's `root` (its per-sandbox files live
    /// under `<root>/io.containerd.grpc.v1.cri/sandboxes/<id>`); `deadline`
    /// bounds one claim's fix-up.
    pub fn new(ops: Arc<dyn NodeOps>, containerd_root: PathBuf, deadline: Duration) -> Self {
        Self {
            ops,
            containerd_root,
            deadline,
        }
    }
}

impl SetnsFixup {
    fn plan(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<FixupPlan, FixupFailed> {
        super::plan(slot, &self.containerd_root, real)
    }
}

#[tonic::async_trait]
impl Fixup for SetnsFixup {
    async fn apply(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<(), FixupFailed> {
        let plan = self.plan(slot, real)?;
        let report =
            apply_phase(Arc::clone(&self.ops), plan, Phase::Identity, self.deadline).await?;
        tracing::debug!(sandbox = %slot.sandbox_id, total = ?report.total, "identity fixed up");
        Ok(())
    }

    async fn complete(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<(), FixupFailed> {
        let plan = self.plan(slot, real)?;
        let report = apply_phase(Arc::clone(&self.ops), plan, Phase::Cgroup, self.deadline).await?;
        tracing::debug!(sandbox = %slot.sandbox_id, total = ?report.total, "cgroup moved");
        Ok(())
    }

    async fn after_remove(&self, slot: &SlotFacts, real: &PodSandboxConfig) {
        cleanup_claimed_cgroup(&self.ops, self.deadline, slot, real).await;
    }

    async fn discard(&self, slot: &SlotFacts) {
        remove_placeholder_parent(&self.ops, self.deadline, slot).await;
    }
}

/// Removes what a claim left in the pod's cgroup once the sandbox is gone
/// (the moved pause's leaf; the placeholder leaf if a claim failed between
/// the move and its removal), logging failures. Shared by every mechanism
/// that moves a slot's processes into the pod's cgroup.
pub(super) async fn cleanup_claimed_cgroup(
    ops: &Arc<dyn NodeOps>,
    deadline: Duration,
    slot: &SlotFacts,
    real: &PodSandboxConfig,
) {
    let real_parent = real
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.as_str())
        .unwrap_or_default();
    let cgroup = SandboxId::parse(&slot.sandbox_id)
        .and_then(|id| CgroupMove::new(&id, &slot.placeholder_cgroup_parent, real_parent));
    let result = match cgroup {
        Ok(cgroup) => cleanup_after_remove(Arc::clone(ops), cgroup, deadline).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::warn!(sandbox = %slot.sandbox_id, error = %crate::blocking::chain(&e), "cleaning up the claimed slot's cgroup failed");
    }
}

/// Removes the slot's own placeholder cgroup parent (`<root>/<slot uid>`),
/// logging failures.
pub(super) async fn remove_placeholder_parent(
    ops: &Arc<dyn NodeOps>,
    deadline: Duration,
    slot: &SlotFacts,
) {
    let ops = Arc::clone(ops);
    let parent = slot.placeholder_cgroup_parent.clone();
    let removed = asyncify(deadline, move || {
        let dir = CgroupLeaf::parse(&parent, "placeholder cgroup parent")?;
        ops.remove_cgroup(&dir)
    })
    .await;
    let failed: Option<&(dyn std::error::Error + 'static)> = match &removed {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(e) => Some(e),
    };
    if let Some(e) = failed {
        tracing::warn!(sandbox = %slot.sandbox_id, error = %crate::blocking::chain(e),
            "removing the slot's placeholder cgroup parent failed");
    }
}
