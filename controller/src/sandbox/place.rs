//! Placing a `Sandbox`: the node chosen (pool, health, free slot, taints,
//! resource fit, image affinity), counted at once, and the pod created
//! bound to it.

use std::collections::{BTreeMap, HashMap};
use std::sync::PoisonError;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, PodSecurityContext, PodSpec, SeccompProfile};
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use crate::admit::{self, Requests};
use crate::crd::{Sandbox, SandboxPhase, SandboxStatus, POOL_LABEL, SANDBOX_LABEL};
use crate::reconcile::{condition, selector_matches, Context, Error};
use crate::scoring::{Rejection, Request, RequestedImage, Scorer};

use super::observe::observe;
use super::scope::{Scope, CONTAINER, MAX_LABEL_VALUE, RESYNC, UNSCHEDULABLE_RETRY};
use super::spec::Target;

/// What the `Sandbox`'s pod requests of its node (the RuntimeClass's
/// overhead, added by the API server, is not known here).
pub(super) fn sandbox_requests(sandbox: &Sandbox) -> Requests {
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
pub(super) fn admitted(
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
pub(super) fn choose(scope: &Scope<'_>, target: &Target) -> Result<(String, u8), String> {
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
pub(super) async fn place(scope: &Scope<'_>, target: &Target) -> Result<Action, Error> {
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
pub(super) fn bound_status(
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

/// Rejections of the candidate nodes, counted by reason.
pub(super) fn why_unschedulable(
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
pub(super) fn serving_pool(ctx: &Context, target: &Target, node: &str) -> Option<String> {
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
pub(super) fn build_pod(
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
