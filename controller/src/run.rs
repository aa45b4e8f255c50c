//! `fast-sandbox-controller run`: both reconcilers and the extender, in one
//! process, against one API server.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{stream, FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{predicates, watcher, Controller, WatchStreamExt};
use kube::{Api, Client, ResourceExt};

use crate::admit::NodeUsage;
use crate::crd::{Sandbox, SandboxPool, SANDBOX_LABEL};
use crate::events::EventSink;
use crate::extender::Extender;
use crate::metrics::Metrics;
use crate::nodes::NodeDirectory;
use crate::reconcile::{error_policy, Context, Error, ReconcileConfig};
use crate::{pool, sandbox};

/// Why the controller cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "no Kubernetes API server reachable at {url} ({source}); check --kubeconfig, \
         KUBECONFIG or the in-cluster service account"
    )]
    Unreachable { url: String, source: kube::Error },
    #[error("no answer from the Kubernetes API server at {url} within {seconds} s")]
    Timeout { url: String, seconds: u64 },
    #[error(
        "the {kind} CRD is not installed or not readable ({source}); \
         apply deploy/crds/ and the controller's RBAC first"
    )]
    Crd {
        kind: &'static str,
        source: kube::Error,
    },
}

/// Which of the project's CRDs the API server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub sandbox_pools: bool,
    pub sandboxes: bool,
}

/// Whether the CRD of `K` is served: a 404 (not installed, or being
/// deleted) is `false` with a WARN; any other error stops the start.
async fn crd_served<K>(client: &Client, kind: &'static str) -> Result<bool, StartError>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match Api::<K>::all(client.clone())
        .list(&ListParams::default().limit(1))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(response)) if response.code == 404 => {
            tracing::warn!(
                kind,
                "the {kind} CRD is not installed: running without its controller \
                 (apply deploy/crds/ and restart to enable it)"
            );
            Ok(false)
        }
        Err(source) => Err(StartError::Crd { kind, source }),
    }
}

/// Checks that the API server answers and which CRDs are served, so a
/// misconfigured controller fails at once with a message that says why. A
/// missing CRD is not fatal (the controller runs degraded, without that
/// controller): an uninstall or a partial install must never leave it
/// crash-looping.
pub async fn preflight(client: &Client, url: &str) -> Result<Served, StartError> {
    const SECONDS: u64 = 10;
    match tokio::time::timeout(Duration::from_secs(SECONDS), client.apiserver_version()).await {
        Err(_) => {
            return Err(StartError::Timeout {
                url: url.to_owned(),
                seconds: SECONDS,
            })
        }
        Ok(Err(source)) => {
            return Err(StartError::Unreachable {
                url: url.to_owned(),
                source,
            })
        }
        Ok(Ok(version)) => tracing::info!(version = %version.git_version, "API server reachable"),
    }
    Ok(Served {
        sandbox_pools: crd_served::<SandboxPool>(client, "SandboxPool").await?,
        sandboxes: crd_served::<Sandbox>(client, "Sandbox").await?,
    })
}

/// Removes the controller's finalizer from every `SandboxPool`, so pools
/// and their CRD can be deleted without a controller running (uninstall).
/// Nodes are not drained: uninstalling removes the node plugins too, and a
/// node plugin drops pools no controller asks for when it restarts.
/// Returns how many pools had the finalizer.
pub async fn remove_finalizers(client: &Client) -> Result<usize, kube::Error> {
    let api = Api::<SandboxPool>::all(client.clone());
    let mut removed = 0;
    for pool in api.list(&ListParams::default()).await? {
        let finalizers = pool.metadata.finalizers.clone().unwrap_or_default();
        if !finalizers.iter().any(|f| f == pool::FINALIZER) {
            continue;
        }
        let rest: Vec<&String> = finalizers
            .iter()
            .filter(|f| *f != pool::FINALIZER)
            .collect();
        // The resourceVersion makes it conditional: a pool changed meanwhile
        // answers 409 and is not patched blindly.
        let patch = serde_json::json!({
            "metadata": {
                "finalizers": rest,
                "resourceVersion": pool.metadata.resource_version,
            }
        });
        let name = pool.name_any();
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            // Gone meanwhile: nothing to remove.
            Err(kube::Error::Api(response)) if response.code == 404 => continue,
            Err(error) => return Err(error),
        }
        tracing::info!(pool = %name, "finalizer removed");
        removed += 1;
    }
    Ok(removed)
}

/// A store of the API server's Nodes (image lists and managed fields
/// dropped: a Node's status carries every image it holds) and a stream that
/// fires when a Node's labels change.
fn node_label_events(
    client: &Client,
) -> (
    reflector::Store<Node>,
    impl futures::Stream<Item = ()> + Send + 'static,
) {
    let (api_nodes, node_writer) = reflector::store();
    let nodes = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|node| {
            node.managed_fields_mut().clear();
            if let Some(status) = node.status.as_mut() {
                status.images = None;
            }
        });
    let events = reflector(node_writer, nodes)
        .touched_objects()
        .predicate_filter(predicates::labels, Default::default())
        .filter_map(|event| async move {
            match event {
                Ok(_) => Some(()),
                Err(error) => {
                    tracing::warn!(%error, "node watch");
                    None
                }
            }
        });
    (api_nodes, events)
}

/// Feeds `usage` from a watch of every bound, unfinished pod (the
/// `Sandbox` path's resource fit), until the stream ends.
async fn follow_pod_usage(client: Client, usage: Arc<NodeUsage>) {
    let bound = watcher::Config::default()
        .fields("spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed");
    watcher(Api::<Pod>::all(client), bound)
        .default_backoff()
        .for_each(|event| {
            match event {
                Ok(event) => usage.apply(&event),
                Err(error) => tracing::warn!(%error, "pod watch (node usage)"),
            }
            futures::future::ready(())
        })
        .await;
}

/// Keeps `extender`'s view of the pods waiting to be scheduled (no
/// `nodeName`, not finished) current, until the stream ends: the extender
/// assumes slots only for those ([`crate::extender::PendingPods`]).
pub async fn follow_pending_pods(client: Client, extender: Arc<Extender>) {
    let (store, writer) = reflector::store();
    extender.set_pending_pods(Arc::new(store));
    let pending = watcher::Config::default()
        .fields("spec.nodeName=,status.phase!=Succeeded,status.phase!=Failed");
    let pods = watcher(Api::<Pod>::all(client), pending)
        .default_backoff()
        .modify(|pod| {
            pod.managed_fields_mut().clear();
            pod.status = None;
        });
    reflector(writer, pods)
        .for_each(|event| {
            if let Err(error) = event {
                tracing::warn!(%error, "pod watch (pending pods)");
            }
            futures::future::ready(())
        })
        .await;
}

/// Fires on every change of the node directory (every pool re-runs on it).
fn directory_changes(
    nodes: Arc<dyn NodeDirectory>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    stream::unfold(nodes.subscribe(), |mut changes| async move {
        changes.changed().await.ok()?;
        Some(((), changes))
    })
}

/// Keeps `extender` fed with the node directory's snapshots until the
/// directory goes away. Every replica runs this, leader or not: each serves
/// the extender from its own node directory.
pub async fn feed_extender(nodes: Arc<dyn NodeDirectory>, extender: Arc<Extender>) {
    let mut changes = nodes.subscribe();
    extender.replace_snapshot((*nodes.snapshot()).clone());
    while changes.changed().await.is_ok() {
        extender.replace_snapshot((*nodes.snapshot()).clone());
    }
}

/// Where the reconcilers' Events and counts go.
#[derive(Debug, Clone)]
pub struct Instruments {
    pub events: Arc<dyn EventSink>,
    pub metrics: Arc<Metrics>,
}

/// `reconcile`, counted by outcome and timed as `controller` in the
/// context's metrics.
fn measured<K, Fut>(
    controller: &'static str,
    reconcile: fn(Arc<K>, Arc<Context>) -> Fut,
) -> impl FnMut(Arc<K>, Arc<Context>) -> futures::future::BoxFuture<'static, Result<Action, Error>>
where
    K: Send + Sync + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    move |object, ctx| {
        let metrics = ctx.metrics.clone();
        async move { metrics.reconcile(controller, reconcile(object, ctx)).await }.boxed()
    }
}

/// Runs the controllers of the `served` CRDs until `shutdown` resolves
/// (only the leader runs them: they write).
pub async fn controllers(
    client: Client,
    nodes: Arc<dyn NodeDirectory>,
    config: ReconcileConfig,
    instruments: Instruments,
    served: Served,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = shutdown.shared();
    let controller_config = ControllerConfig::default().debounce(Duration::from_millis(200));

    let (api_nodes, node_events) = node_label_events(&client);
    let directory_changes = directory_changes(nodes.clone());

    let pool_controller = Controller::new(
        Api::<SandboxPool>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(controller_config.clone());
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            nodes,
            api_nodes,
            pool_controller.store(),
            config,
        )
        .with_events(instruments.events)
        .with_metrics(instruments.metrics),
    );
    let pools = pool_controller
        .reconcile_all_on(stream::select(node_events, directory_changes))
        .graceful_shutdown_on(shutdown.clone())
        .run(
            measured("sandboxpool", pool::reconcile),
            error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "SandboxPool controller");
            }
        });
    let (ctx_client, ctx_usage) = (client.clone(), ctx.usage.clone());
    let sandbox_controller = Controller::new(
        Api::<Sandbox>::all(client.clone()),
        watcher::Config::default(),
    );
    let sandbox_store = sandbox_controller.store();
    let waiting = ctx.waiting_on_nodes(move |sandbox| sandbox_store.get(sandbox).is_some());
    let sandboxes = sandbox_controller
        .owns(
            Api::<Pod>::all(client),
            watcher::Config::default().labels(SANDBOX_LABEL),
        )
        // A Sandbox waiting for a slot is tried again on every node report.
        .reconcile_on(waiting)
        .with_config(controller_config)
        .graceful_shutdown_on(shutdown)
        .run(measured("sandbox", sandbox::reconcile), error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "Sandbox controller");
            }
        });
    let usage = follow_pod_usage(ctx_client, ctx_usage);
    let sandboxes = futures::future::select(Box::pin(sandboxes), Box::pin(usage)).map(|_| ());
    futures::join!(
        if_served(served.sandbox_pools, pools),
        if_served(served.sandboxes, sandboxes)
    );
}

/// Runs `controller` if its CRD is `served`: one that is not has no
/// controller (preflight warned).
async fn if_served(served: bool, controller: impl Future<Output = ()>) {
    if served {
        controller.await;
    }
}
