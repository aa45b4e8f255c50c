//! The fix-up of each slot, picked by the upstream handler it was created
//! with (`fixup = "setns" | "guest-exec"` in a `[[pool]]`).

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use fast_sandbox_proto::cri::PodSandboxConfig;

use super::{
    guest::{GuestExecFixup, GuestExecSettings},
    guest_ops::GuestOps,
    ops::NodeOps,
    setns::SetnsFixup,
    Fixup, FixupFailed, SlotFacts,
};

/// Which fix-up mechanism a pool's upstream runtime needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    /// runc, crun: `setns` into the pause's namespaces.
    Setns,
    /// gVisor, Kata: a command inside the sandbox.
    GuestExec(GuestExecSettings),
}

/// Dispatches each slot to the mechanism of its upstream handler; handlers
/// not listed use `setns`.
#[derive(Debug)]
pub struct ByRuntime {
    by_upstream: HashMap<String, Arc<dyn Fixup>>,
    default: Arc<dyn Fixup>,
}

impl ByRuntime {
    pub fn new(default: Arc<dyn Fixup>) -> Self {
        Self {
            by_upstream: HashMap::new(),
            default,
        }
    }

    /// Serves slots of `upstream` with `fixup`.
    #[must_use]
    pub fn with(mut self, upstream: &str, fixup: Arc<dyn Fixup>) -> Self {
        self.by_upstream.insert(upstream.to_owned(), fixup);
        self
    }

    /// The real mechanisms for `choices` (upstream handler → mechanism).
    pub fn real(
        node: Arc<dyn NodeOps>,
        guest: Arc<dyn GuestOps>,
        containerd_root: PathBuf,
        choices: &HashMap<String, Mechanism>,
        deadline: Duration,
    ) -> Self {
        let setns: Arc<dyn Fixup> = Arc::new(SetnsFixup::new(
            Arc::clone(&node),
            containerd_root.clone(),
            deadline,
        ));
        let mut out = Self::new(Arc::clone(&setns));
        for (upstream, mechanism) in choices {
            let fixup: Arc<dyn Fixup> = match mechanism {
                Mechanism::Setns => Arc::clone(&setns),
                Mechanism::GuestExec(settings) => Arc::new(GuestExecFixup::new(
                    Arc::clone(&node),
                    Arc::clone(&guest),
                    containerd_root.clone(),
                    settings.clone(),
                    deadline,
                )),
            };
            out = out.with(upstream, fixup);
        }
        out
    }

    pub(super) fn pick(&self, slot: &SlotFacts) -> &dyn Fixup {
        self.for_handler(&slot.upstream_handler)
    }

    fn for_handler(&self, upstream: &str) -> &dyn Fixup {
        self.by_upstream
            .get(upstream)
            .unwrap_or(&self.default)
            .as_ref()
    }
}

#[tonic::async_trait]
impl Fixup for ByRuntime {
    fn check(&self, upstream_handler: &str, real: &PodSandboxConfig) -> Result<(), FixupFailed> {
        self.for_handler(upstream_handler)
            .check(upstream_handler, real)
    }
    async fn apply(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<(), FixupFailed> {
        self.pick(slot).apply(slot, real).await
    }
    fn settles(&self, slot: &SlotFacts) -> bool {
        self.pick(slot).settles(slot)
    }
    async fn settle(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<(), FixupFailed> {
        self.pick(slot).settle(slot, real).await
    }
    async fn prepare(
        &self,
        slot: &SlotFacts,
        placeholder: &PodSandboxConfig,
    ) -> Result<(), FixupFailed> {
        self.pick(slot).prepare(slot, placeholder).await
    }
    async fn complete(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<(), FixupFailed> {
        self.pick(slot).complete(slot, real).await
    }
    async fn after_remove(&self, slot: &SlotFacts, real: &PodSandboxConfig) {
        self.pick(slot).after_remove(slot, real).await;
    }
    async fn discard(&self, slot: &SlotFacts) {
        self.pick(slot).discard(slot).await;
    }
}
