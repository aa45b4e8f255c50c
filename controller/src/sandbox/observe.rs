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

/// The writes one look at the `Sandbox`'s pod calls for: the plan of
/// [`observe`], apart from its calls.
#[derive(Debug, PartialEq)]
pub(super) struct PodWrites {
    /// The status to write (`None`: leave it as it is).
    pub status: Option<SandboxStatus>,
    /// Delete the pod (its image never came: its warm slot is released).
    pub delete_pod: bool,
    pub action: Action,
}

impl PodWrites {
    fn status(status: SandboxStatus, action: Action) -> Self {
        PodWrites {
            status: Some(status),
            delete_pod: false,
            action,
        }
    }
}

/// A pod that cannot get its image for longer than the grace: the
/// `Sandbox` fails and the pod is deleted, so its warm slot is released.
fn image_writes(
    scope: &Scope<'_>,
    status: SandboxStatus,
    (reason, detail): (String, String),
) -> PodWrites {
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
        let left = grace.saturating_sub(Duration::from_millis(waited));
        return PodWrites::status(status, Action::requeue(left.max(Duration::from_secs(1))));
    }
    let message = format!("{message} for {} s; pod deleted", waited / 1000);
    let mut status = scope.with_condition(status, "Ready", "ImagePullFailed", message);
    status.phase = Some(SandboxPhase::Failed);
    PodWrites {
        status: Some(status),
        delete_pod: true,
        action: Action::await_change(),
    }
}

/// Status from the existing pod: the plan, then its writes.
pub(super) async fn observe(scope: &Scope<'_>, pod: &Pod) -> Result<Action, Error> {
    let writes = plan(scope, pod);
    if let Some(status) = writes.status {
        scope.write(status).await?;
    }
    if writes.delete_pod {
        tracing::warn!(image = %scope.sandbox.spec.image, "sandbox failed: image cannot be pulled; deleting its pod");
        match scope.pods.delete(&scope.name, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(response)) if response.code == 404 => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(writes.action)
}

/// What the existing pod calls for: the `Sandbox`'s status from its phase,
/// failure when it is not the `Sandbox`'s or its image never comes.
pub(super) fn plan(scope: &Scope<'_>, pod: &Pod) -> PodWrites {
    let sandbox = scope.sandbox;
    let owned = sandbox.meta().uid.as_deref().is_some_and(|uid| {
        pod.owner_references()
            .iter()
            .any(|o| o.uid == uid && o.controller == Some(true))
    });
    if !owned {
        let message = format!(
            "a pod named {} exists and is not this Sandbox's",
            scope.name
        );
        let status = scope.failed("Scheduled", "PodNameTaken", message);
        return PodWrites::status(status, Action::await_change());
    }
    if finished(&scope.old) {
        // Failed by the controller (an image that never came): final.
        return PodWrites {
            status: None,
            delete_pod: false,
            action: Action::await_change(),
        };
    }
    let pod_status = pod.status.clone().unwrap_or_default();
    let phase = match pod_status.phase.as_deref() {
        Some("Running") => SandboxPhase::Running,
        Some("Succeeded") => SandboxPhase::Succeeded,
        Some("Failed") => SandboxPhase::Failed,
        Some("Unknown") => SandboxPhase::Unknown,
        _ => SandboxPhase::Pending,
    };
    let mut status = status_of_pod(scope, pod, phase);
    if phase == SandboxPhase::Pending {
        if let Some(failure) = image_pull_failure(pod) {
            return image_writes(scope, status, failure);
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
    PodWrites::status(
        status,
        match phase {
            SandboxPhase::Succeeded | SandboxPhase::Failed => Action::await_change(),
            _ => Action::requeue(RESYNC),
        },
    )
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kube::runtime::reflector;
    use kube::{Api, Client};
    use serde_json::json;

    use super::*;
    use crate::crd::{Sandbox, SandboxSpec};
    use crate::nodes::StaticNodes;
    use crate::reconcile::{Context, ReconcileConfig};
    use crate::scoring::Snapshot;

    /// The pod's creation, and the grace's default (120 s).
    const CREATED_MS: u64 = 1_700_000_000_000;

    /// A context at `now_ms` whose client nothing answers: the plan must
    /// make no call.
    fn context(now_ms: u64) -> Context {
        let (service, _) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = Client::new(service, "team");
        let (api_nodes, _) = reflector::store();
        let (pools, _) = reflector::store();
        let nodes = Arc::new(StaticNodes::new(Snapshot::default()));
        Context::new(client, nodes, api_nodes, pools, ReconcileConfig::default())
            .with_clock(move || now_ms)
    }

    fn sandbox() -> Sandbox {
        let mut sb = Sandbox::new(
            "sb1",
            SandboxSpec {
                image: "registry.example/agent:1".into(),
                command: vec![],
                args: vec![],
                env: vec![],
                tolerations: vec![],
                resources: None,
                runtime_class_name: Some("fast-runc".into()),
                pool: None,
            },
        );
        sb.metadata.namespace = Some("team".into());
        sb.metadata.uid = Some("uid-sb1".into());
        sb.status = Some(SandboxStatus {
            node_name: Some("a".into()),
            pod_created_unix_ms: Some(CREATED_MS),
            ..Default::default()
        });
        sb
    }

    fn scope<'a>(sandbox: &'a Sandbox, ctx: &'a Context) -> Scope<'a> {
        Scope {
            sandbox,
            ctx,
            name: "sb1".into(),
            sandboxes: Api::namespaced(ctx.client.clone(), "team"),
            pods: Api::namespaced(ctx.client.clone(), "team"),
            old: sandbox.status.clone().unwrap_or_default(),
        }
    }

    /// The Sandbox's pod, owned by `owner`, waiting on `waiting`.
    fn pod(owner: &str, waiting: Option<&str>) -> Pod {
        let statuses = waiting.map_or_else(Vec::new, |reason| {
            vec![
                json!({"name": "sandbox", "image": "x", "imageID": "", "ready": false,
                        "restartCount": 0,
                        "state": {"waiting": {"reason": reason, "message": "no such image"}}}),
            ]
        });
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "sb1", "namespace": "team",
                         "ownerReferences": [{"apiVersion": "fast-sandbox.io/v1alpha1",
                            "kind": "Sandbox", "name": "sb1", "uid": owner, "controller": true}]},
            "spec": {"nodeName": "a", "containers": [{"name": "sandbox", "image": "x"}]},
            "status": {"phase": "Pending", "containerStatuses": statuses}
        }))
        .expect("a pod")
    }

    fn ready_reason(writes: &PodWrites) -> Option<&str> {
        let status = writes.status.as_ref()?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
        Some(ready.reason.as_str())
    }

    #[tokio::test]
    async fn an_image_that_never_comes_fails_the_sandbox_after_the_grace_only() {
        let sb = sandbox();
        let early = context(CREATED_MS + 30_000);
        let writes = plan(&scope(&sb, &early), &pod("uid-sb1", Some("ErrImagePull")));
        assert_eq!(ready_reason(&writes), Some("ImagePullFailing"));
        assert!(!writes.delete_pod);
        // Looked at again when the grace (120 s) runs out.
        assert_eq!(writes.action, Action::requeue(Duration::from_secs(90)));
        let late = context(CREATED_MS + 121_000);
        let writes = plan(
            &scope(&sb, &late),
            &pod("uid-sb1", Some("ImagePullBackOff")),
        );
        assert_eq!(ready_reason(&writes), Some("ImagePullFailed"));
        let phase = writes.status.as_ref().and_then(|s| s.phase);
        assert_eq!(phase, Some(SandboxPhase::Failed));
        assert!(writes.delete_pod);
        assert_eq!(writes.action, Action::await_change());
    }

    #[tokio::test]
    async fn a_pending_pod_is_followed_and_a_strangers_pod_fails_the_sandbox() {
        let sb = sandbox();
        let ctx = context(CREATED_MS + 1_000);
        let writes = plan(&scope(&sb, &ctx), &pod("uid-sb1", None));
        assert_eq!(ready_reason(&writes), Some("PodPending"));
        assert!(!writes.delete_pod);
        assert_eq!(writes.action, Action::requeue(RESYNC));
        let writes = plan(&scope(&sb, &ctx), &pod("someone-else", None));
        let status = writes.status.as_ref().expect("a status");
        assert_eq!(status.phase, Some(SandboxPhase::Failed));
        let scheduled = status.conditions.iter().find(|c| c.type_ == "Scheduled");
        assert_eq!(scheduled.map(|c| c.reason.as_str()), Some("PodNameTaken"));
        assert!(!writes.delete_pod);
    }
}
