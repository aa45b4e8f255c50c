//! What one reconcile of a `Sandbox` works with: its [`Scope`] (the APIs,
//! the old status, the status writes), and the reconciler's timings and
//! limits.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Action;
use kube::Api;

use crate::crd::{Sandbox, SandboxPhase, SandboxStatus};
use crate::events;
use crate::reconcile::{condition, write_status, Context, Error};

/// The container's name in a `Sandbox`'s pod.
pub const CONTAINER: &str = "sandbox";
/// Retry placing a `Sandbox` no node can take this soon.
pub(super) const UNSCHEDULABLE_RETRY: Duration = Duration::from_secs(5);
/// Re-check a placed `Sandbox` this often even without pod events.
pub(super) const RESYNC: Duration = Duration::from_secs(300);
/// Label values are at most this long.
pub(super) const MAX_LABEL_VALUE: usize = 63;

/// The APIs and the old status one reconcile of a `Sandbox` works with.
pub(super) struct Scope<'a> {
    pub(super) sandbox: &'a Sandbox,
    pub(super) ctx: &'a Context,
    pub(super) name: String,
    pub(super) sandboxes: Api<Sandbox>,
    pub(super) pods: Api<Pod>,
    pub(super) old: SandboxStatus,
}

impl Scope<'_> {
    /// A status that says the `Sandbox` is not (or no longer) placed.
    pub(super) fn not_scheduled(
        &self,
        phase: SandboxPhase,
        reason: &str,
        message: String,
    ) -> SandboxStatus {
        let generation = self.sandbox.metadata.generation;
        SandboxStatus {
            observed_generation: generation,
            phase: Some(phase),
            conditions: vec![condition(
                &self.old.conditions,
                "Scheduled",
                false,
                reason,
                message,
                generation,
                &self.ctx.now(),
            )],
            ..Default::default()
        }
    }

    /// Writes `status`, then emits an Event per condition it changes.
    pub(super) async fn write(&self, status: SandboxStatus) -> Result<(), Error> {
        let notes = events::condition_changes(&self.old.conditions, &status.conditions);
        write_status(&self.sandboxes, &self.name, &self.old, status).await?;
        self.ctx.emit(self.sandbox, notes);
        Ok(())
    }

    /// The old status with condition `type_` set false for `reason`.
    pub(super) fn with_condition(
        &self,
        mut status: SandboxStatus,
        type_: &str,
        reason: &str,
        message: String,
    ) -> SandboxStatus {
        let generation = self.sandbox.metadata.generation;
        status.observed_generation = generation;
        let now = self.ctx.now();
        let new = condition(
            &self.old.conditions,
            type_,
            false,
            reason,
            message,
            generation,
            &now,
        );
        set_condition(&mut status, new);
        status
    }

    /// Fails the `Sandbox` for good: phase `Failed`, condition `type_`
    /// false for `reason`.
    pub(super) async fn fail(
        &self,
        type_: &str,
        reason: &str,
        message: String,
    ) -> Result<Action, Error> {
        self.write(self.failed(type_, reason, message)).await?;
        Ok(Action::await_change())
    }

    /// The status of a `Sandbox` failed for good: phase `Failed`,
    /// condition `type_` false for `reason`.
    pub(super) fn failed(&self, type_: &str, reason: &str, message: String) -> SandboxStatus {
        let mut status = self.with_condition(self.old.clone(), type_, reason, message);
        status.phase = Some(SandboxPhase::Failed);
        status
    }
}

/// Replaces the condition of the same type, or adds it.
pub(super) fn set_condition(
    status: &mut SandboxStatus,
    new: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
) {
    match status.conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => *existing = new,
        None => status.conditions.push(new),
    }
}
