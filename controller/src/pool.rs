//! The `SandboxPool` reconciler: sizes a warm pool on every matching node and
//! reports what the nodes serve.
//!
//! Each reconcile reads the node directory's snapshot and the node labels,
//! pushes each matching, ready node its desired free-slot count
//! ([`desired_size`]), pushes 0 to nodes the pool served before but no longer
//! matches, and writes the status (free/total per node, `Ready`). It re-runs
//! whenever the snapshot changes or a node's labels change.
//!
//! A finalizer (`fast-sandbox.io/pool`) is needed here: the warm slots live on
//! the nodes, outside Kubernetes, and only the controller can tell the nodes
//! to stop keeping them when the pool is deleted.

mod plan;

use std::collections::BTreeSet;
use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event};
use kube::{Api, ResourceExt};
use tracing::Instrument;

use crate::crd::{SandboxPool, SandboxPoolStatus, SlotRange};
use crate::events::Note;
use crate::nodes::{NodeError, PoolSize};
use crate::reconcile::{backoff_key, write_status, Context, Error};
use plan::{Observed, Plan, Seen};

pub use plan::desired_size;

/// The finalizer that lets a deleted pool be drained from its nodes first.
pub const FINALIZER: &str = "fast-sandbox.io/pool";
/// The largest `slotsPerNode.max` accepted (the node plugin's own limit).
pub const MAX_SLOTS_PER_NODE: u32 = 256;

/// A spec error, naming the field.
fn validate(pool: &SandboxPool, ctx: &Context) -> Result<String, String> {
    let spec = &pool.spec;
    let handler = ctx
        .config
        .fast_classes
        .get(&spec.runtime_class_name)
        .ok_or_else(|| {
            format!(
                "spec.runtimeClassName: {:?} is not a fast RuntimeClass ({})",
                spec.runtime_class_name,
                ctx.config.class_list()
            )
        })?;
    let SlotRange { min, max } = spec.slots_per_node;
    if min > max {
        return Err(format!("spec.slotsPerNode: min {min} is above max {max}"));
    }
    if max > MAX_SLOTS_PER_NODE {
        return Err(format!(
            "spec.slotsPerNode.max: {max} is above the limit of {MAX_SLOTS_PER_NODE}"
        ));
    }
    spec.shape
        .validate()
        .map_err(|e| format!("spec.shape.{}: {e}", e.field()))?;
    Ok(handler.clone())
}

/// Reconciles one `SandboxPool` (the `Controller`'s reconcile function).
pub async fn reconcile(pool: Arc<SandboxPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = backoff_key(pool.as_ref());
    let span = tracing::info_span!("sandboxpool", pool = %pool.name_any());
    let api: Api<SandboxPool> = Api::all(ctx.client.clone());
    let action = finalizer(&api, FINALIZER, pool, |event| async {
        match event {
            Event::Apply(pool) => apply(&pool, &ctx, &api).await,
            Event::Cleanup(pool) => cleanup(&pool, &ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.reset_backoff(&key);
    Ok(action)
}

/// One reconcile of a live pool: observe, [`plan`](plan::plan), push the
/// sizes to the nodes, drain the nodes it left, write the status.
async fn apply(pool: &SandboxPool, ctx: &Context, api: &Api<SandboxPool>) -> Result<Action, Error> {
    let name = pool.name_any();
    let old = pool.status.clone().unwrap_or_default();
    let generation = pool.metadata.generation;
    let handler = match validate(pool, ctx) {
        Ok(handler) => handler,
        Err(message) => {
            tracing::warn!(%message, "invalid SandboxPool");
            let (status, notes) = plan::invalid(&old, generation, &ctx.now(), message);
            write_status(api, &name, &old, status).await?;
            ctx.emit(pool, notes);
            return Ok(Action::await_change());
        }
    };
    let size = zero_size(pool, ctx, handler);
    let observed = observe(pool, ctx, &size, old.clone());
    let mut plan = plan::plan(&observed);
    push(pool, ctx, &size, &mut plan).await;
    // Nodes the pool pushed to before but no longer matches keep no slots
    // for it (unless another pool asks for the same slots there).
    let matching: BTreeSet<&String> = observed.matching.iter().map(|(n, _)| n).collect();
    let left = old
        .nodes
        .iter()
        .filter(|n| !matching.contains(&n.node) && n.pushed.is_some());
    for gone in left {
        if let Err(error) = drain(pool, ctx, &size, &gone.node).await {
            tracing::warn!(node = %gone.node, %error, "pool not drained from a node it left");
            plan.drain_failed();
        }
    }
    let (status, notes, retry) = plan.status(&observed);
    write_status(api, &name, &old, status).await?;
    ctx.emit(pool, notes);
    Ok(Action::requeue(retry))
}

/// The pool's matching nodes as the node directory sees them now.
fn observe(pool: &SandboxPool, ctx: &Context, size: &PoolSize, old: SandboxPoolStatus) -> Observed {
    let snapshot = ctx.nodes.snapshot();
    let matching = ctx
        .nodes_matching(&pool.spec.node_selector)
        .into_iter()
        .map(|node| {
            let seen = match (snapshot.node(&node), ctx.nodes.problem(&node)) {
                (Some(state), _) if state.ready => Seen::Ready(
                    state
                        .pools
                        .iter()
                        .find(|p| p.handler == size.handler && p.shape == size.shape_key)
                        .cloned(),
                ),
                (_, Some(problem)) => Seen::Problem(problem.reason(), problem.to_string()),
                (Some(_), None) => Seen::NotReady,
                (None, None) => Seen::Unknown,
            };
            (node, seen)
        })
        .collect();
    Observed {
        range: pool.spec.slots_per_node,
        old,
        generation: pool.metadata.generation,
        now: ctx.now(),
        matching,
    }
}

/// Pushes each planned size to its node and records the answers in `plan`;
/// a failure is logged and published once per problem.
async fn push(pool: &SandboxPool, ctx: &Context, size: &PoolSize, plan: &mut Plan) {
    for index in 0..plan.nodes.len() {
        let step = &plan.nodes[index];
        let Some(desired) = step.push else {
            continue;
        };
        let node = step.entry.node.clone();
        let size = PoolSize {
            size: desired,
            ..size.clone()
        };
        let answer = ctx.nodes.set_pool_size(&node, &size).await;
        match &answer {
            Ok(()) => {
                ctx.warned_once(&pool.name_any(), &node, None);
            }
            Err(error) if ctx.warned_once(&pool.name_any(), &node, Some(&error.to_string())) => {
                tracing::warn!(node = %node, %error, "pool size not pushed");
                let message = format!("node {node}: {error}");
                ctx.emit(pool, [Note::warning("PushFailed", "Scale", message)]);
            }
            Err(error) => tracing::debug!(node = %node, %error, "pool size still not pushed"),
        }
        plan.pushed(index, answer.as_ref().map(|_| ()));
    }
}

/// The pool's size message for its `handler` (validated), at size 0.
fn zero_size(pool: &SandboxPool, ctx: &Context, handler: String) -> PoolSize {
    PoolSize {
        pool: pool.name_any(),
        handler,
        shape: pool.spec.shape.clone(),
        shape_key: pool.spec.shape.key(&ctx.config.default_seccomp),
        size: 0,
    }
}

/// Another live, valid pool asks `node` for the same slots (handler and
/// shape) as `pool`: draining them would take that pool's slots.
fn shared_with_another_pool(
    pool: &SandboxPool,
    ctx: &Context,
    size: &PoolSize,
    node: &str,
) -> bool {
    ctx.pools.state().iter().any(|other| {
        other.name_any() != pool.name_any()
            && other.metadata.deletion_timestamp.is_none()
            && validate(other, ctx).is_ok_and(|h| h == size.handler)
            && other.spec.shape.key(&ctx.config.default_seccomp) == size.shape_key
            && ctx
                .nodes_matching(&other.spec.node_selector)
                .iter()
                .any(|n| n == node)
    })
}

/// Tells `node` to keep no slots for `pool`, unless another pool shares
/// them there (that pool's own reconcile keeps its size).
async fn drain(
    pool: &SandboxPool,
    ctx: &Context,
    size: &PoolSize,
    node: &str,
) -> Result<(), NodeError> {
    if ctx.nodes.snapshot().node(node).is_none_or(|s| !s.ready) {
        return Ok(());
    }
    if shared_with_another_pool(pool, ctx, size, node) {
        tracing::info!(
            node,
            "not drained: another SandboxPool asks for the same slots there"
        );
        return Ok(());
    }
    let zero = PoolSize {
        size: 0,
        ..size.clone()
    };
    ctx.nodes.set_pool_size(node, &zero).await
}

/// A deleted pool: tell every node it pushed a size to (and that accepted
/// it) to keep no slots for it. An invalid pool never pushed, so it drains
/// nothing; a node another pool shares the slots with is left alone. A node
/// that does not answer does not hold the deletion up (it drops pools no
/// controller asks for when it restarts).
async fn cleanup(pool: &SandboxPool, ctx: &Context) -> Result<Action, Error> {
    let Ok(handler) = validate(pool, ctx) else {
        tracing::info!("invalid pool deleted; it never pushed a size, nothing to drain");
        return Ok(Action::await_change());
    };
    let size = zero_size(pool, ctx, handler);
    let pushed: Vec<&str> = pool
        .status
        .iter()
        .flat_map(|s| &s.nodes)
        .filter(|n| n.pushed.is_some())
        .map(|n| n.node.as_str())
        .collect();
    for node in &pushed {
        if let Err(error) = drain(pool, ctx, &size, node).await {
            tracing::warn!(node = %node, %error, "deleted pool not drained from a node");
        }
    }
    tracing::info!(
        nodes = pushed.len(),
        "pool deleted; nodes it sized told to drain it"
    );
    let message = format!("pool deleted; {} nodes told to drain it", pushed.len());
    ctx.emit(pool, [Note::normal("Drained", "Delete", message)]);
    Ok(Action::await_change())
}
