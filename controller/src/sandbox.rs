//! The `Sandbox` reconciler: the direct path. It chooses a node itself and
//! binds the pod there with `spec.nodeName`, skipping kube-scheduler.
//!
//! Per reconcile:
//! 1. A `Sandbox` being deleted: nothing (its pod goes with it, below).
//! 2. The spec is checked; a bad field becomes a `Scheduled=False,
//!    reason=InvalidSpec` condition naming it, and no retry until it changes.
//! 3. `GET` the pod, named after the `Sandbox`. If it exists, the status is
//!    read from it (phase, node, IP, time to Running). If it existed and is
//!    gone, the `Sandbox` has failed: it runs once and is never re-placed.
//! 4. Otherwise: pool filter (the nodes of `spec.pool`) → health and
//!    free-slot filter → image-affinity score, all by [`Scorer`]; the
//!    placement is counted in the node directory at once
//!    ([`NodeDirectory::assume`](crate::nodes::NodeDirectory::assume)) under
//!    a lock, so two `Sandbox`es never race for the last slot; then the pod
//!    is created with `nodeName`, `runtimeClassName`, the pool's shape as
//!    its security context, label `fast-sandbox.io/pool-name`, and an owner
//!    reference to the `Sandbox`.
//!
//! **No finalizer**: the pod carries a controller owner reference, so
//! deleting the `Sandbox` makes the garbage collector delete the pod, and
//! the slot accounting needs no cleanup (an assumed placement is settled by
//! the node's next report). Nothing outside the API server would be left
//! behind, so a finalizer would only make deletion depend on the controller
//! running.
//!
//! Idempotent: the pod name is the `Sandbox`'s, so a re-reconcile (or a
//! second controller replica) finds the pod instead of creating another; a
//! create that races with one answers 409 and the existing pod is read.

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use tracing::Instrument;

mod observe;
mod place;
mod scope;
mod spec;

pub use scope::CONTAINER;

use observe::{lost, observe, observe_existing};
use place::place;
use scope::{Scope, UNSCHEDULABLE_RETRY};
use spec::{resolve, SpecProblem};

use crate::crd::{Sandbox, SandboxPhase};
use crate::reconcile::{backoff_key, Context, Error};

/// Reconciles one `Sandbox` (the `Controller`'s reconcile function).
pub async fn reconcile(sandbox: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = backoff_key(sandbox.as_ref());
    let span = tracing::info_span!(
        "sandbox",
        namespace = sandbox.namespace().unwrap_or_default(),
        name = %sandbox.name_any()
    );
    let action = reconcile_inner(&sandbox, &ctx).instrument(span).await?;
    ctx.reset_backoff(&key);
    Ok(action)
}

async fn reconcile_inner(sandbox: &Sandbox, ctx: &Context) -> Result<Action, Error> {
    if sandbox.meta().deletion_timestamp.is_some() {
        ctx.stop_waiting(&ObjectRef::from_obj(sandbox));
        return Ok(Action::await_change());
    }
    let namespace = sandbox
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let scope = Scope {
        sandbox,
        ctx,
        name: sandbox.name_any(),
        sandboxes: Api::namespaced(ctx.client.clone(), &namespace),
        pods: Api::namespaced(ctx.client.clone(), &namespace),
        old: sandbox.status.clone().unwrap_or_default(),
    };
    let target = match resolve(sandbox, ctx) {
        Ok(target) => target,
        Err(SpecProblem::Invalid(message)) => {
            tracing::warn!(%message, "invalid Sandbox");
            ctx.stop_waiting(&ObjectRef::from_obj(sandbox));
            let status = scope.not_scheduled(SandboxPhase::Failed, "InvalidSpec", message);
            scope.write(status).await?;
            return Ok(Action::await_change());
        }
        Err(SpecProblem::Refused(reason, message)) => {
            tracing::warn!(%message, "Sandbox refused");
            ctx.stop_waiting(&ObjectRef::from_obj(sandbox));
            let status = scope.not_scheduled(SandboxPhase::Failed, reason, message);
            scope.write(status).await?;
            return Ok(Action::await_change());
        }
        Err(SpecProblem::NoSuchPool(pool)) if scope.old.node_name.is_none() => {
            let message = format!("spec.pool: no SandboxPool {pool:?}");
            let status = scope.not_scheduled(SandboxPhase::Pending, "PoolNotFound", message);
            scope.write(status).await?;
            return Ok(Action::requeue(UNSCHEDULABLE_RETRY));
        }
        // Placed already: the pool only mattered for placing it.
        Err(SpecProblem::NoSuchPool(_)) => return observe_existing(&scope).await,
    };
    if let Some(pod) = scope.pods.get_opt(&scope.name).await? {
        return observe(&scope, &pod).await;
    }
    if scope.old.node_name.is_some() {
        return lost(&scope).await;
    }
    place(&scope, &target).await
}
