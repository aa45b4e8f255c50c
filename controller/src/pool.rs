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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event};
use kube::{Api, ResourceExt};
use tracing::Instrument;

use crate::crd::{NodePoolStatus, SandboxPool, SandboxPoolStatus, SlotRange};
use crate::events::{self, Note};
use crate::nodes::{NodeError, PoolSize};
use crate::reconcile::{backoff_key, condition, write_status, Context, Error};
use crate::scoring::PoolState;

/// The finalizer that lets a deleted pool be drained from its nodes first.
pub const FINALIZER: &str = "fast-sandbox.io/pool";
/// The largest `slotsPerNode.max` accepted (the node plugin's own limit).
pub const MAX_SLOTS_PER_NODE: u32 = 256;
/// Re-check a pool this often even when nothing triggers it.
const RESYNC: Duration = Duration::from_secs(300);
/// Retry pushes to nodes that refused or did not answer this soon.
const PUSH_RETRY: Duration = Duration::from_secs(10);

/// The free slots to ask of one node: `min` when the pool is idle, plus
/// the slots pods hold (`total − free` as last reported: the agent reports
/// `total` as free + claimed), capped at `max`. A node whose pods use the
/// pool keeps that much more headroom, up to `max`; when they end it goes
/// back to `min`. Slots the node has not built yet count for nothing, so a
/// raised size is pushed once, not grown on its own shortfall.
pub fn desired_size(range: SlotRange, reported: Option<&PoolState>) -> u32 {
    let in_flight = reported.map_or(0, |p| p.total.saturating_sub(p.free));
    range
        .min
        .saturating_add(in_flight)
        .clamp(range.min, range.max)
}

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

async fn apply(pool: &SandboxPool, ctx: &Context, api: &Api<SandboxPool>) -> Result<Action, Error> {
    let name = pool.name_any();
    let old = pool.status.clone().unwrap_or_default();
    let generation = pool.metadata.generation;
    let now = ctx.now();
    let handler = match validate(pool, ctx) {
        Ok(handler) => handler,
        Err(message) => {
            tracing::warn!(%message, "invalid SandboxPool");
            let status = SandboxPoolStatus {
                observed_generation: generation,
                conditions: vec![condition(
                    &old.conditions,
                    "Ready",
                    false,
                    "InvalidSpec",
                    message,
                    generation,
                    &now,
                )],
                ..Default::default()
            };
            let notes = events::condition_changes(&old.conditions, &status.conditions);
            write_status(api, &name, &old, status).await?;
            ctx.emit(pool, notes);
            return Ok(Action::await_change());
        }
    };
    let size = zero_size(pool, ctx, handler);
    let matching = ctx.nodes_matching(&pool.spec.node_selector);
    let mut outcome = Outcome::default();
    let mut nodes = Vec::with_capacity(matching.len());
    for node in &matching {
        let before = old.nodes.iter().find(|n| &n.node == node);
        nodes.push(serve_node(pool, ctx, &size, node, before, &mut outcome).await);
    }
    // Nodes the pool pushed to before but no longer matches keep no slots
    // for it (unless another pool asks for the same slots there).
    let matching_set: BTreeSet<&String> = matching.iter().collect();
    let left = old
        .nodes
        .iter()
        .filter(|n| !matching_set.contains(&n.node) && n.pushed.is_some());
    for gone in left {
        if let Err(error) = drain(pool, ctx, &size, &gone.node).await {
            tracing::warn!(node = %gone.node, %error, "pool not drained from a node it left");
            outcome.push_failed = true;
        }
    }
    let ready_nodes = nodes.iter().filter(|n| n.ready).count();
    let (ok, reason, message) = ready_condition(&nodes, matching.is_empty(), &outcome);
    let status = SandboxPoolStatus {
        observed_generation: generation,
        ready_nodes: u32::try_from(ready_nodes).unwrap_or(u32::MAX),
        free: nodes.iter().map(|n| n.free).fold(0, u32::saturating_add),
        total: nodes.iter().map(|n| n.total).fold(0, u32::saturating_add),
        conditions: vec![condition(
            &old.conditions,
            "Ready",
            ok,
            reason,
            message,
            generation,
            &now,
        )],
        nodes,
    };
    let notes: Vec<Note> = events::scaled(&old.nodes, &status.nodes)
        .into_iter()
        .chain(events::condition_changes(
            &old.conditions,
            &status.conditions,
        ))
        .collect();
    write_status(api, &name, &old, status).await?;
    ctx.emit(pool, notes);
    Ok(Action::requeue(if outcome.push_failed {
        PUSH_RETRY
    } else {
        RESYNC
    }))
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

/// What went wrong across a pool's nodes, for its `Ready` condition.
#[derive(Debug, Default)]
struct Outcome {
    push_failed: bool,
    /// The most telling reason seen: a node-side problem or a missing pool.
    reason: Option<&'static str>,
}

impl Outcome {
    fn saw(&mut self, reason: &'static str) {
        // A rejected token explains every other symptom: it wins.
        if self.reason != Some("AgentTokenRejected") {
            self.reason = Some(reason);
        }
    }
}

/// Pushes the pool's desired size to one matching node and describes the
/// pool there.
async fn serve_node(
    pool: &SandboxPool,
    ctx: &Context,
    size: &PoolSize,
    node: &str,
    before: Option<&NodePoolStatus>,
    outcome: &mut Outcome,
) -> NodePoolStatus {
    let snapshot = ctx.nodes.snapshot();
    let state = snapshot.node(node).filter(|s| s.ready);
    let reported = state.and_then(|s| {
        s.pools
            .iter()
            .find(|p| p.handler == size.handler && p.shape == size.shape_key)
    });
    let desired = desired_size(pool.spec.slots_per_node, reported);
    let mut entry = NodePoolStatus {
        node: node.to_owned(),
        ready: false,
        free: reported.map_or(0, |p| p.free),
        total: reported.map_or(0, |p| p.total),
        desired,
        // Still ours until a push to the node changes it.
        pushed: before.and_then(|b| b.pushed),
        message: None,
    };
    if state.is_none() {
        entry.message = Some(match (snapshot.node(node), ctx.nodes.problem(node)) {
            (_, Some(problem)) => {
                outcome.saw(problem.reason());
                problem.to_string()
            }
            (Some(_), None) => "node plugin not ready".into(),
            (None, None) => "no report from a node plugin on this node".into(),
        });
        return entry;
    }
    let size = PoolSize {
        size: desired,
        ..size.clone()
    };
    match ctx.nodes.set_pool_size(node, &size).await {
        Ok(()) => {
            entry.pushed = Some(desired);
            ctx.warned_once(&pool.name_any(), node, None);
            if reported.is_some() {
                entry.ready = true;
            } else {
                entry.message = Some("waiting for the node to report the pool".into());
            }
        }
        Err(error) => {
            if ctx.warned_once(&pool.name_any(), node, Some(&error.to_string())) {
                tracing::warn!(node = %node, %error, "pool size not pushed");
                let message = format!("node {node}: {error}");
                ctx.emit(pool, [Note::warning("PushFailed", "Scale", message)]);
            } else {
                tracing::debug!(node = %node, %error, "pool size still not pushed");
            }
            match error {
                NodeError::NoSuchPool { .. } => outcome.saw("PoolMissingOnNode"),
                _ => outcome.push_failed = true,
            }
            entry.message = Some(error.to_string());
        }
    }
    entry
}

/// The pool's `Ready` condition: (status, reason, message).
fn ready_condition(
    nodes: &[NodePoolStatus],
    none_match: bool,
    outcome: &Outcome,
) -> (bool, &'static str, String) {
    let ready_nodes = nodes.iter().filter(|n| n.ready).count();
    if none_match {
        return (
            false,
            "NoMatchingNodes",
            "no node matches spec.nodeSelector".to_owned(),
        );
    }
    if ready_nodes == nodes.len() {
        return (
            true,
            "PoolServed",
            format!("{ready_nodes} nodes serve the pool"),
        );
    }
    let missing: Vec<String> = nodes
        .iter()
        .filter(|n| !n.ready)
        .take(5)
        .map(|n| {
            format!(
                "{} ({})",
                n.node,
                n.message.as_deref().unwrap_or("not ready")
            )
        })
        .collect();
    let reason = match outcome.reason {
        Some(reason) => reason,
        None if outcome.push_failed => "PushFailed",
        None => "NodesNotReady",
    };
    let more = nodes.len() - ready_nodes;
    (
        false,
        reason,
        format!(
            "{more} of {} nodes do not serve the pool: {}",
            nodes.len(),
            missing.join(", ")
        ),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reported(free: u32, total: u32) -> PoolState {
        PoolState {
            handler: "fast-runc".into(),
            upstream_handler: "runc".into(),
            shape: "seccomp=unconfined".into(),
            free,
            total,
        }
    }

    #[test]
    fn desired_size_follows_demand_within_bounds() {
        let range = SlotRange { min: 2, max: 6 };
        assert_eq!(desired_size(range, None), 2);
        assert_eq!(desired_size(range, Some(&reported(2, 2))), 2);
        assert_eq!(desired_size(range, Some(&reported(0, 2))), 4);
        assert_eq!(desired_size(range, Some(&reported(0, 9))), 6);
        assert_eq!(
            desired_size(SlotRange { min: 0, max: 0 }, Some(&reported(0, 3))),
            0
        );
    }
}
