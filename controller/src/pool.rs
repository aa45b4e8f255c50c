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
use crate::nodes::PoolSize;
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
/// the slots taken and not yet refilled (`total − free` as last reported),
/// capped at `max`. A node whose pool drains faster than it refills is asked
/// for more, up to `max`; when demand stops, refills bring it back to `min`.
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
            write_status(api, &name, &old, status).await?;
            return Ok(Action::await_change());
        }
    };
    let shape_key = pool.spec.shape.key(&ctx.config.default_seccomp);
    let snapshot = ctx.nodes.snapshot();
    let matching = ctx.nodes_matching(&pool.spec.node_selector);
    let mut nodes = Vec::with_capacity(matching.len());
    let mut push_failed = false;
    for node in &matching {
        let state = snapshot.node(node).filter(|s| s.ready);
        let reported = state.and_then(|s| {
            s.pools
                .iter()
                .find(|p| p.handler == handler && p.shape == shape_key)
        });
        let desired = desired_size(pool.spec.slots_per_node, reported);
        let mut entry = NodePoolStatus {
            node: node.clone(),
            ready: false,
            free: reported.map_or(0, |p| p.free),
            total: reported.map_or(0, |p| p.total),
            desired,
            message: None,
        };
        if state.is_none() {
            entry.message = Some(match snapshot.node(node) {
                Some(_) => "node plugin not ready".into(),
                None => "no report from a node plugin on this node".into(),
            });
            nodes.push(entry);
            continue;
        }
        let size = PoolSize {
            pool: name.clone(),
            handler: handler.clone(),
            shape: pool.spec.shape.clone(),
            shape_key: shape_key.clone(),
            size: desired,
        };
        match ctx.nodes.set_pool_size(node, &size).await {
            Ok(()) if reported.is_some() => entry.ready = true,
            Ok(()) => entry.message = Some("waiting for the node to report the pool".into()),
            Err(error) => {
                tracing::warn!(node = %node, %error, "pool size not pushed");
                push_failed = true;
                entry.message = Some(error.to_string());
            }
        }
        nodes.push(entry);
    }
    // Nodes the pool served before but no longer matches keep no slots.
    let matching_set: BTreeSet<&String> = matching.iter().collect();
    for gone in old.nodes.iter().filter(|n| !matching_set.contains(&n.node)) {
        if snapshot.node(&gone.node).is_none_or(|s| !s.ready) {
            continue;
        }
        let size = PoolSize {
            pool: name.clone(),
            handler: handler.clone(),
            shape: pool.spec.shape.clone(),
            shape_key: shape_key.clone(),
            size: 0,
        };
        if let Err(error) = ctx.nodes.set_pool_size(&gone.node, &size).await {
            tracing::warn!(node = %gone.node, %error, "pool not drained from a node it left");
            push_failed = true;
        }
    }
    let ready_nodes = nodes.iter().filter(|n| n.ready).count();
    let (ok, reason, message) = if matching.is_empty() {
        (
            false,
            "NoMatchingNodes",
            "no node matches spec.nodeSelector".to_owned(),
        )
    } else if ready_nodes == nodes.len() {
        (
            true,
            "PoolServed",
            format!("{ready_nodes} nodes serve the pool"),
        )
    } else {
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
        let reason = if push_failed {
            "PushFailed"
        } else {
            "NodesNotReady"
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
    };
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
    write_status(api, &name, &old, status).await?;
    Ok(Action::requeue(if push_failed {
        PUSH_RETRY
    } else {
        RESYNC
    }))
}

/// A deleted pool: tell every node it served to keep no slots for it. A
/// node that does not answer does not hold the deletion up (it drops pools
/// no controller asks for when it restarts).
async fn cleanup(pool: &SandboxPool, ctx: &Context) -> Result<Action, Error> {
    let name = pool.name_any();
    let Some(handler) = ctx.config.fast_classes.get(&pool.spec.runtime_class_name) else {
        return Ok(Action::await_change());
    };
    let snapshot = ctx.nodes.snapshot();
    let mut served: BTreeSet<String> = ctx
        .nodes_matching(&pool.spec.node_selector)
        .into_iter()
        .collect();
    served.extend(
        pool.status
            .iter()
            .flat_map(|s| s.nodes.iter().map(|n| n.node.clone())),
    );
    let size = PoolSize {
        pool: name.clone(),
        handler: handler.clone(),
        shape: pool.spec.shape.clone(),
        shape_key: pool.spec.shape.key(&ctx.config.default_seccomp),
        size: 0,
    };
    for node in served.iter().filter(|n| snapshot.node(n).is_some()) {
        if let Err(error) = ctx.nodes.set_pool_size(node, &size).await {
            tracing::warn!(node = %node, %error, "deleted pool not drained from a node");
        }
    }
    tracing::info!(nodes = served.len(), "pool deleted; nodes told to drain it");
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
