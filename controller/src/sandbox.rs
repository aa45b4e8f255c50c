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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, Pod, PodSecurityContext, PodSpec, SeccompProfile,
};
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use tracing::Instrument;

use crate::admit::{self, Requests};
use crate::crd::{Sandbox, SandboxPhase, SandboxPool, SandboxStatus, POOL_LABEL, SANDBOX_LABEL};
use crate::events;
use crate::nodes::SandboxShape;
use crate::reconcile::{backoff_key, condition, selector_matches, write_status, Context, Error};
use crate::scoring::{Rejection, Request, RequestedImage, Scorer};

/// The container's name in a `Sandbox`'s pod.
pub const CONTAINER: &str = "sandbox";
/// Retry placing a `Sandbox` no node can take this soon.
const UNSCHEDULABLE_RETRY: Duration = Duration::from_secs(5);
/// Re-check a placed `Sandbox` this often even without pod events.
const RESYNC: Duration = Duration::from_secs(300);
/// Label values are at most this long.
const MAX_LABEL_VALUE: usize = 63;

/// A `Sandbox` resolved against the pools and the fast classes.
#[derive(Debug)]
struct Target {
    runtime_class: String,
    handler: String,
    shape: SandboxShape,
    shape_key: String,
    pool: Option<Arc<SandboxPool>>,
}

/// Why a `Sandbox` cannot be placed as written.
#[derive(Debug)]
enum SpecProblem {
    /// A field is wrong: the message names it. Retried when the spec changes.
    Invalid(String),
    /// `spec.pool` names no pool (yet). Retried after a while.
    NoSuchPool(String),
    /// The spec asks for something its creator might not be allowed (a
    /// Secret's key in `env`): (reason, message naming the field). Retried
    /// when the spec changes.
    Refused(&'static str, String),
}

/// The `valueFrom` source named in `var`, for the refusal's message.
fn value_from_source(var: &EnvVar) -> Option<&'static str> {
    let from = var.value_from.as_ref()?;
    Some(if from.secret_key_ref.is_some() {
        "secretKeyRef"
    } else if from.config_map_key_ref.is_some() {
        "configMapKeyRef"
    } else if from.field_ref.is_some() {
        "fieldRef"
    } else if from.resource_field_ref.is_some() {
        "resourceFieldRef"
    } else {
        "valueFrom"
    })
}

/// The first `env` entry that is not a literal value, as a refusal. The
/// pod is created with the controller's rights, so a `secretKeyRef` would
/// hand the `Sandbox`'s creator a Secret they may not read; the creator is
/// not recorded on the object, so a SubjectAccessReview for them cannot be
/// made, and only literal values are allowed.
fn non_literal_env(spec: &crate::crd::SandboxSpec) -> Option<SpecProblem> {
    let (i, source) = spec
        .env
        .iter()
        .enumerate()
        .find_map(|(i, var)| value_from_source(var).map(|source| (i, source)))?;
    let field = match source {
        "valueFrom" => format!("spec.env[{i}].valueFrom"),
        source => format!("spec.env[{i}].valueFrom.{source}"),
    };
    Some(SpecProblem::Refused(
        "EnvValueFromRefused",
        format!(
            "{field}: refused: a Sandbox's environment takes literal values only (the \
             controller creates the pod, so a reference would read with its rights, not \
             its creator's)"
        ),
    ))
}

fn resolve(sandbox: &Sandbox, ctx: &Context) -> Result<Target, SpecProblem> {
    let spec = &sandbox.spec;
    let invalid = |m: String| Err(SpecProblem::Invalid(m));
    let name = sandbox.name_any();
    if name.len() > MAX_LABEL_VALUE {
        return invalid(format!(
            "metadata.name: {} characters, more than the {MAX_LABEL_VALUE} a pod label value allows",
            name.len()
        ));
    }
    if spec.image.trim().is_empty() {
        return invalid("spec.image: must not be empty".into());
    }
    if let Some(i) = spec.env.iter().position(|e| e.name.is_empty()) {
        return invalid(format!("spec.env[{i}].name: must not be empty"));
    }
    if let Some(refused) = non_literal_env(spec) {
        return Err(refused);
    }
    let pool = match &spec.pool {
        Some(pool) if pool.len() > MAX_LABEL_VALUE => {
            return invalid(format!(
                "spec.pool: {} characters, more than the {MAX_LABEL_VALUE} a label value allows",
                pool.len()
            ))
        }
        Some(pool) => Some(
            ctx.pools
                .get(&kube::runtime::reflector::ObjectRef::new(pool))
                .ok_or_else(|| SpecProblem::NoSuchPool(pool.clone()))?,
        ),
        None => None,
    };
    let runtime_class = match (&spec.runtime_class_name, &pool) {
        (Some(class), Some(pool)) if *class != pool.spec.runtime_class_name => {
            return invalid(format!(
                "spec.runtimeClassName: {class:?} differs from pool {:?}'s {:?}",
                pool.name_any(),
                pool.spec.runtime_class_name
            ))
        }
        (Some(class), _) => class.clone(),
        (None, Some(pool)) => pool.spec.runtime_class_name.clone(),
        (None, None) => {
            return invalid("spec.runtimeClassName: required when spec.pool is not set".into())
        }
    };
    let Some(handler) = ctx.config.fast_classes.get(&runtime_class) else {
        return invalid(format!(
            "spec.runtimeClassName: {runtime_class:?} is not a fast RuntimeClass ({})",
            ctx.config.class_list()
        ));
    };
    let shape = pool
        .as_ref()
        .map(|p| p.spec.shape.clone())
        .unwrap_or_default();
    Ok(Target {
        shape_key: shape.key(&ctx.config.default_seccomp),
        runtime_class,
        handler: handler.clone(),
        shape,
        pool,
    })
}

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

/// The APIs and the old status one reconcile of a `Sandbox` works with.
struct Scope<'a> {
    sandbox: &'a Sandbox,
    ctx: &'a Context,
    name: String,
    sandboxes: Api<Sandbox>,
    pods: Api<Pod>,
    old: SandboxStatus,
}

impl Scope<'_> {
    /// A status that says the `Sandbox` is not (or no longer) placed.
    fn not_scheduled(&self, phase: SandboxPhase, reason: &str, message: String) -> SandboxStatus {
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
    async fn write(&self, status: SandboxStatus) -> Result<(), Error> {
        let notes = events::condition_changes(&self.old.conditions, &status.conditions);
        write_status(&self.sandboxes, &self.name, &self.old, status).await?;
        self.ctx.emit(self.sandbox, notes);
        Ok(())
    }

    /// The old status with condition `type_` set false for `reason`.
    fn with_condition(
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
    async fn fail(&self, type_: &str, reason: &str, message: String) -> Result<Action, Error> {
        let mut status = self.with_condition(self.old.clone(), type_, reason, message);
        status.phase = Some(SandboxPhase::Failed);
        self.write(status).await?;
        Ok(Action::await_change())
    }
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

/// What the `Sandbox`'s pod requests of its node (the RuntimeClass's
/// overhead, added by the API server, is not known here).
fn sandbox_requests(sandbox: &Sandbox) -> Requests {
    admit::pod_requests(&PodSpec {
        containers: vec![Container {
            resources: sandbox.spec.resources.clone(),
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// Whether `node` admits the `Sandbox`'s pod (taints, cordon, resource
/// fit), from the API server's Node and the pods bound to it.
fn admitted(
    ctx: &Context,
    sandbox: &Sandbox,
    want: &Requests,
    totals: &HashMap<String, Requests>,
    node: &str,
) -> Result<(), String> {
    let api_node = ctx
        .api_node(node)
        .ok_or_else(|| "no Node object".to_owned())?;
    admit::admits(&api_node, &sandbox.spec.tolerations, want, totals.get(node))
}

/// The best node for `target`, counted as taken at once (its slot and the
/// pod's requests); or why there is none.
fn choose(scope: &Scope<'_>, target: &Target) -> Result<(String, u8), String> {
    let ctx = scope.ctx;
    let _guard = ctx.placement.lock().unwrap_or_else(PoisonError::into_inner);
    let snapshot = ctx.nodes.snapshot();
    let request = Request {
        handler: target.handler.clone(),
        shape: target.shape_key.clone(),
        images: vec![RequestedImage {
            reference: scope.sandbox.spec.image.clone(),
            size_bytes: None,
        }],
    };
    let scorer = Scorer::new(&snapshot, &request, ctx.config.sandbox_policy, ctx.now_ms());
    let in_pool = |node: &str| match &target.pool {
        Some(pool) => ctx
            .labels_of(node)
            .is_some_and(|labels| selector_matches(&pool.spec.node_selector, &labels)),
        None => true,
    };
    let want = sandbox_requests(scope.sandbox);
    let best = ctx.usage.with_totals(|totals| {
        let admits = |node: &str| admitted(ctx, scope.sandbox, &want, totals, node);
        match scorer.best_where(|node| in_pool(node) && admits(node).is_ok()) {
            Some(best) => Ok((best.node.to_owned(), best.score)),
            None => Err(why_unschedulable(ctx, &scorer, in_pool, admits, target)),
        }
    })?;
    ctx.nodes
        .assume(&best.0, &target.handler, &target.shape_key);
    let namespace = scope.sandbox.namespace().unwrap_or_default();
    ctx.usage.assume(&namespace, &scope.name, &best.0, want);
    Ok(best)
}

/// Chooses a node and creates the pod bound to it.
async fn place(scope: &Scope<'_>, target: &Target) -> Result<Action, Error> {
    let (ctx, sandbox, name) = (scope.ctx, scope.sandbox, &scope.name);
    let this = ObjectRef::from_obj(sandbox);
    let (node, score) = match choose(scope, target) {
        Ok(chosen) => chosen,
        Err(message) => {
            tracing::info!(%message, "no node for the sandbox");
            // Placed again as soon as a node's report changes (a slot
            // freed), not only on the timer.
            ctx.wait_for_slot(this);
            ctx.metrics.placed("no_eligible_node");
            let status = scope.not_scheduled(SandboxPhase::Pending, "NoEligibleNode", message);
            scope.write(status).await?;
            return Ok(Action::requeue(UNSCHEDULABLE_RETRY));
        }
    };
    ctx.stop_waiting(&this);
    let pool_name = target
        .pool
        .as_ref()
        .map(|p| p.name_any())
        .or_else(|| serving_pool(ctx, target, &node));
    let pod_namespace = sandbox.namespace().unwrap_or_default();
    let pod = build_pod(sandbox, target, &node, pool_name.as_deref()).inspect_err(|_| {
        ctx.usage.forget(&pod_namespace, name);
    })?;
    let created_ms = ctx.now_ms();
    let pod = match scope.pods.create(&PostParams::default(), &pod).await {
        Ok(pod) => pod,
        Err(kube::Error::Api(response)) if response.code == 409 => {
            // Created by an earlier attempt whose answer was lost.
            match scope.pods.get_opt(name).await? {
                Some(pod) => return observe(scope, &pod).await,
                None => return Ok(Action::requeue(Duration::from_secs(1))),
            }
        }
        Err(kube::Error::Api(response)) if matches!(response.code, 400 | 422) => {
            ctx.usage.forget(&pod_namespace, name);
            // The spec makes a pod the API server refuses (a bad env name,
            // requests above limits): only a spec change can help.
            let message = format!("the API server rejected the pod: {}", response.message);
            tracing::warn!(%message, "sandbox pod rejected");
            ctx.metrics.placed("pod_rejected");
            let status = scope.not_scheduled(SandboxPhase::Failed, "PodRejected", message);
            scope.write(status).await?;
            return Ok(Action::await_change());
        }
        Err(error) => {
            ctx.usage.forget(&pod_namespace, name);
            // Retried with backoff (the error policy); the status says why.
            let message = format!("creating the pod failed: {error}");
            ctx.metrics.placed("pod_create_failed");
            let status = scope.not_scheduled(SandboxPhase::Pending, "PodCreateFailed", message);
            scope.write(status).await?;
            return Err(error.into());
        }
    };
    tracing::info!(node = %node, score, pool = pool_name.as_deref().unwrap_or(""), "sandbox bound");
    ctx.metrics.placed("bound");
    let status = bound_status(scope, &pod, node, score, pool_name, created_ms);
    scope.write(status).await?;
    Ok(Action::requeue(RESYNC))
}

/// The status of a `Sandbox` whose pod was just created on `node`.
fn bound_status(
    scope: &Scope<'_>,
    pod: &Pod,
    node: String,
    score: u8,
    pool: Option<String>,
    created_ms: u64,
) -> SandboxStatus {
    let generation = scope.sandbox.metadata.generation;
    let now = scope.ctx.now();
    let old = &scope.old.conditions;
    SandboxStatus {
        observed_generation: generation,
        phase: Some(SandboxPhase::Pending),
        conditions: vec![
            condition(
                old,
                "Scheduled",
                true,
                "Bound",
                format!("bound to node {node} (score {score})"),
                generation,
                &now,
            ),
            condition(
                old,
                "Ready",
                false,
                "PodPending",
                format!("pod {} created", pod.name_any()),
                generation,
                &now,
            ),
        ],
        node_name: Some(node),
        pool,
        pod_ip: None,
        pod_created_unix_ms: Some(created_ms),
        time_to_running_ms: None,
    }
}

/// A placed `Sandbox` whose pool went away: follow its pod all the same.
async fn observe_existing(scope: &Scope<'_>) -> Result<Action, Error> {
    match scope.pods.get_opt(&scope.name).await? {
        Some(pod) => observe(scope, &pod).await,
        None => lost(scope).await,
    }
}

/// A finished `Sandbox` stays as it ended.
fn finished(status: &SandboxStatus) -> bool {
    matches!(
        status.phase,
        Some(SandboxPhase::Succeeded | SandboxPhase::Failed)
    )
}

/// The pod is gone after it was created: the `Sandbox` has failed.
async fn lost(scope: &Scope<'_>) -> Result<Action, Error> {
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
const IMAGE_PULL_FAILURES: [&str; 4] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
];

/// The image-pull failure the pod's container waits on, as (reason,
/// message).
fn image_pull_failure(pod: &Pod) -> Option<(String, String)> {
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
fn since_created_ms(scope: &Scope<'_>, pod_created_ms: Option<u64>) -> Option<u64> {
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
async fn fail_on_image(
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
async fn name_taken(scope: &Scope<'_>) -> Result<Action, Error> {
    let message = format!(
        "a pod named {} exists and is not this Sandbox's",
        scope.name
    );
    scope.fail("Scheduled", "PodNameTaken", message).await
}

/// Status from the existing pod.
async fn observe(scope: &Scope<'_>, pod: &Pod) -> Result<Action, Error> {
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
fn status_of_pod(scope: &Scope<'_>, pod: &Pod, phase: SandboxPhase) -> SandboxStatus {
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

/// Replaces the condition of the same type, or adds it.
fn set_condition(
    status: &mut SandboxStatus,
    new: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
) {
    match status.conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => *existing = new,
        None => status.conditions.push(new),
    }
}

/// Rejections of the candidate nodes, counted by reason.
fn why_unschedulable(
    ctx: &Context,
    scorer: &Scorer<'_>,
    in_pool: impl Fn(&str) -> bool,
    admits: impl Fn(&str) -> Result<(), String>,
    target: &Target,
) -> String {
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut candidates = 0;
    for (node, verdict) in scorer.verdicts() {
        if !in_pool(node) {
            continue;
        }
        candidates += 1;
        let reason = match verdict {
            Err(rejection) => match (rejection, ctx.nodes.problem(node)) {
                (Rejection::Stale { .. }, _) => "status too old".to_owned(),
                // Say why the node plugin is not ready, when it is known.
                (Rejection::NotReady, Some(problem)) => format!("{}: {problem}", problem.reason()),
                (other, _) => other.to_string(),
            },
            // Taints, cordon, resource fit: what kube-scheduler would check.
            Ok(_) => match admits(node) {
                Err(reason) => reason,
                Ok(()) => continue,
            },
        };
        *reasons.entry(reason).or_default() += 1;
    }
    let scope = match &target.pool {
        Some(pool) => format!("of pool {:?}", pool.name_any()),
        None => "reporting".to_owned(),
    };
    if candidates == 0 {
        return format!("no node {scope}");
    }
    let counts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n}: {r}")).collect();
    format!(
        "no eligible node among {candidates} {scope} for handler {} and shape {} ({})",
        target.handler,
        target.shape_key,
        counts.join("; ")
    )
}

/// Without `spec.pool`: the pool serving the class and shape on `node`
/// (smallest name), for the pod's label.
fn serving_pool(ctx: &Context, target: &Target, node: &str) -> Option<String> {
    let labels = ctx.labels_of(node).unwrap_or_default();
    let mut names: Vec<String> = ctx
        .pools
        .state()
        .iter()
        .filter(|p| {
            p.spec.runtime_class_name == target.runtime_class
                && p.spec.shape.key(&ctx.config.default_seccomp) == target.shape_key
                && selector_matches(&p.spec.node_selector, &labels)
        })
        .map(|p| p.name_any())
        .filter(|n| n.len() <= MAX_LABEL_VALUE)
        .collect();
    names.sort_unstable();
    names.into_iter().next()
}

/// The pod of a `Sandbox`, bound to `node`.
fn build_pod(
    sandbox: &Sandbox,
    target: &Target,
    node: &str,
    pool: Option<&str>,
) -> Result<Pod, Error> {
    let spec = &sandbox.spec;
    let owner = sandbox
        .controller_owner_ref(&())
        .ok_or(Error::MissingMetadata("uid"))?;
    let mut labels = BTreeMap::from([(SANDBOX_LABEL.to_owned(), sandbox.name_any())]);
    if let Some(pool) = pool {
        labels.insert(POOL_LABEL.to_owned(), pool.to_owned());
    }
    let shape = &target.shape;
    let seccomp = shape.seccomp.clone();
    let security_context = PodSecurityContext {
        seccomp_profile: seccomp.map(|s| match s.strip_prefix("localhost/") {
            Some(profile) => SeccompProfile {
                type_: "Localhost".into(),
                localhost_profile: Some(profile.to_owned()),
            },
            None if s == "runtime-default" => SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            },
            None => SeccompProfile {
                type_: "Unconfined".into(),
                localhost_profile: None,
            },
        }),
        run_as_user: shape.run_as_user,
        run_as_group: shape.run_as_group,
        supplemental_groups: (!shape.supplemental_groups.is_empty())
            .then(|| shape.supplemental_groups.clone()),
        ..Default::default()
    };
    let nonempty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    Ok(Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(sandbox.name_any()),
            namespace: sandbox.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            runtime_class_name: Some(target.runtime_class.clone()),
            restart_policy: Some("Never".into()),
            // A sandbox runs someone's code: no API credentials by default.
            automount_service_account_token: Some(false),
            security_context: Some(security_context),
            containers: vec![Container {
                name: CONTAINER.into(),
                image: Some(spec.image.clone()),
                command: nonempty(&spec.command),
                args: nonempty(&spec.args),
                env: (!spec.env.is_empty()).then(|| spec.env.clone()),
                resources: spec.resources.clone(),
                ..Default::default()
            }],
            tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
            ..Default::default()
        }),
        status: None,
    })
}
