//! A placed `Sandbox` followed through its pod: status from the pod's
//! phase, failure when the pod is lost or its image never comes.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use crate::crd::{SandboxPhase, SandboxStatus, POOL_LABEL};
use crate::reconcile::{condition, Error};

use super::scope::{set_condition, Scope, RESYNC};

/// A placed `Sandbox` whose pool went away: follow its pod all the same.
pub(super) async fn observe_existing(scope: &Scope<'_>) -> Result<Action, Error> {
    match scope.pods.get_opt(&scope.name).await? {
        Some(pod) => observe(scope, &pod).await,
        None => lost(scope).await,
    }
}

/// A finished `Sandbox` stays as it ended.
pub(super) fn finished(status: &SandboxStatus) -> bool {
    matches!(
        status.phase,
        Some(SandboxPhase::Succeeded | SandboxPhase::Failed)
    )
}

/// The pod is gone after it was created: the `Sandbox` has failed.
pub(super) async fn lost(scope: &Scope<'_>) -> Result<Action, Error> {
    if finished(&scope.old) {
        return Ok(Action::await_change());
    }
    let message = format!(
        "pod {} is gone; a Sandbox runs once and is not re-placed",
        scope.name
    );
    scope.fail("Ready", "PodLost", message).await
}

/// Container waiting reasons that mean the image cannot be had.
pub(super) const IMAGE_PULL_FAILURES: [&str; 4] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
];

/// The image-pull failure the pod's container waits on, as (reason,
/// message).
pub(super) fn image_pull_failure(pod: &Pod) -> Option<(String, String)> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref()?;
        IMAGE_PULL_FAILURES.contains(&reason).then(|| {
            (
                reason.to_owned(),
                waiting.message.clone().unwrap_or_default(),
            )
        })
    })
}

/// Milliseconds since the `Sandbox` was created (its `creationTimestamp`,
/// whole seconds as the API server records it), else since its pod was.
pub(super) fn since_created_ms(scope: &Scope<'_>, pod_created_ms: Option<u64>) -> Option<u64> {
    let created = scope
        .sandbox
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| u64::try_from(t.0.as_millisecond()).ok())
        .or(pod_created_ms)?;
    Some(scope.ctx.now_ms().saturating_sub(created))
}

/// A pod that cannot get its image for longer than the grace: the
/// `Sandbox` fails and the pod is deleted, so its warm slot is released.
pub(super) async fn fail_on_image(
    scope: &Scope<'_>,
    status: SandboxStatus,
    (reason, detail): (String, String),
) -> Result<Action, Error> {
    let grace = scope.ctx.config.image_pull_grace;
    let waited = status
        .pod_created_unix_ms
        .map(|c| scope.ctx.now_ms().saturating_sub(c))
        .unwrap_or(0);
    let message = format!(
        "image {:?} cannot be pulled ({reason}: {detail})",
        scope.sandbox.spec.image
    );
    if u128::from(waited) < grace.as_millis() {
        let message = format!("{message}; the Sandbox fails after {} s", grace.as_secs());
        let status = scope.with_condition(status, "Ready", "ImagePullFailing", message);
        scope.write(status).await?;
        let left = grace.saturating_sub(Duration::from_millis(waited));
        return Ok(Action::requeue(left.max(Duration::from_secs(1))));
    }
    let message = format!("{message} for {} s; pod deleted", waited / 1000);
    let mut status = scope.with_condition(status, "Ready", "ImagePullFailed", message);
    status.phase = Some(SandboxPhase::Failed);
    scope.write(status).await?;
    tracing::warn!(image = %scope.sandbox.spec.image, %reason, "sandbox failed: image cannot be pulled; deleting its pod");
    match scope.pods.delete(&scope.name, &Default::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(response)) if response.code == 404 => {}
        Err(error) => return Err(error.into()),
    }
    Ok(Action::await_change())
}

/// The pod exists but is not the `Sandbox`'s: it fails.
pub(super) async fn name_taken(scope: &Scope<'_>) -> Result<Action, Error> {
    let message = format!(
        "a pod named {} exists and is not this Sandbox's",
        scope.name
    );
    scope.fail("Scheduled", "PodNameTaken", message).await
}

/// Status from the existing pod.
pub(super) async fn observe(scope: &Scope<'_>, pod: &Pod) -> Result<Action, Error> {
    let sandbox = scope.sandbox;
    let owned = sandbox.meta().uid.as_deref().is_some_and(|uid| {
        pod.owner_references()
            .iter()
            .any(|o| o.uid == uid && o.controller == Some(true))
    });
    if !owned {
        return name_taken(scope).await;
    }
    if finished(&scope.old) {
        // Failed by the controller (an image that never came): final.
        return Ok(Action::await_change());
    }
    let pod_status = pod.status.clone().unwrap_or_default();
    let phase = match pod_status.phase.as_deref() {
        Some("Running") => SandboxPhase::Running,
        Some("Succeeded") => SandboxPhase::Succeeded,
        Some("Failed") => SandboxPhase::Failed,
        Some("Unknown") => SandboxPhase::Unknown,
        _ => SandboxPhase::Pending,
    };
    let status = status_of_pod(scope, pod, phase);
    if phase == SandboxPhase::Pending {
        if let Some(failure) = image_pull_failure(pod) {
            return fail_on_image(scope, status, failure).await;
        }
    }
    let (ready, reason) = match phase {
        SandboxPhase::Running => (true, "PodRunning"),
        SandboxPhase::Pending => (false, "PodPending"),
        SandboxPhase::Succeeded => (false, "PodSucceeded"),
        SandboxPhase::Failed => (false, "PodFailed"),
        SandboxPhase::Unknown => (false, "PodUnknown"),
    };
    let message = pod_status
        .message
        .clone()
        .unwrap_or_else(|| format!("pod {} is {phase:?}", scope.name));
    let generation = sandbox.metadata.generation;
    let mut status = status;
    let now = scope.ctx.now();
    let ready = condition(
        &scope.old.conditions,
        "Ready",
        ready,
        reason,
        message,
        generation,
        &now,
    );
    set_condition(&mut status, ready);
    scope.write(status).await?;
    Ok(match phase {
        SandboxPhase::Succeeded | SandboxPhase::Failed => Action::await_change(),
        _ => Action::requeue(RESYNC),
    })
}

/// The status an existing pod of `phase` shows: node, IP, times, and
/// `Scheduled=True`.
pub(super) fn status_of_pod(scope: &Scope<'_>, pod: &Pod, phase: SandboxPhase) -> SandboxStatus {
    let old = &scope.old;
    let generation = scope.sandbox.metadata.generation;
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let created_ms = old.pod_created_unix_ms.or_else(|| {
        pod.metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| u64::try_from(t.0.as_millisecond()).ok())
    });
    let time_to_running_ms = old.time_to_running_ms.or_else(|| {
        (phase != SandboxPhase::Pending)
            .then(|| since_created_ms(scope, created_ms))
            .flatten()
    });
    let mut status = SandboxStatus {
        observed_generation: generation,
        phase: Some(phase),
        node_name: node.clone(),
        pool: old
            .pool
            .clone()
            .or_else(|| pod.labels().get(POOL_LABEL).cloned()),
        pod_ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        pod_created_unix_ms: created_ms,
        time_to_running_ms,
        conditions: old.conditions.clone(),
    };
    let bound = condition(
        &old.conditions,
        "Scheduled",
        true,
        "Bound",
        format!("bound to node {}", node.as_deref().unwrap_or("?")),
        generation,
        &scope.ctx.now(),
    );
    set_condition(&mut status, bound);
    status
}
