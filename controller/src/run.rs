//! `fast-sandbox-controller run`: both reconcilers and the extender, in one
//! process, against one API server.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{stream, FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{predicates, watcher, Controller, WatchStreamExt};
use kube::{Api, Client};

use crate::crd::{Sandbox, SandboxPool, SANDBOX_LABEL};
use crate::extender::Extender;
use crate::nodes::NodeDirectory;
use crate::reconcile::{error_policy, Context, ReconcileConfig};
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

/// Checks that the API server answers and both CRDs are served, so a
/// misconfigured controller fails at once with a message that says why.
pub async fn preflight(client: &Client, url: &str) -> Result<(), StartError> {
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
    let one = ListParams::default().limit(1);
    Api::<SandboxPool>::all(client.clone())
        .list(&one)
        .await
        .map_err(|source| StartError::Crd {
            kind: "SandboxPool",
            source,
        })?;
    Api::<Sandbox>::all(client.clone())
        .list(&one)
        .await
        .map_err(|source| StartError::Crd {
            kind: "Sandbox",
            source,
        })?;
    Ok(())
}

/// Runs both controllers until `shutdown` resolves, and keeps `extender`
/// (if any) fed with the node directory's snapshots.
pub async fn controllers(
    client: Client,
    nodes: Arc<dyn NodeDirectory>,
    config: ReconcileConfig,
    extender: Option<Arc<Extender>>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = shutdown.shared();
    let controller_config = ControllerConfig::default().debounce(Duration::from_millis(200));

    // Node labels, metadata only (a Node's status carries its image list).
    let (node_labels, node_writer) = reflector::store();
    let node_events = reflector(
        node_writer,
        watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
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

    // Every change of the node directory re-runs every pool (and refreshes
    // the extender's snapshot).
    let directory_changes = {
        let nodes = nodes.clone();
        stream::unfold(nodes.subscribe(), move |mut changes| {
            let nodes = nodes.clone();
            let extender = extender.clone();
            async move {
                changes.changed().await.ok()?;
                if let Some(extender) = &extender {
                    extender.replace_snapshot((*nodes.snapshot()).clone());
                }
                Some(((), changes))
            }
        })
    };

    let pool_controller = Controller::new(
        Api::<SandboxPool>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(controller_config.clone());
    let ctx = Arc::new(Context::new(
        client.clone(),
        nodes,
        node_labels,
        pool_controller.store(),
        config,
    ));
    let pools = pool_controller
        .reconcile_all_on(stream::select(node_events, directory_changes))
        .graceful_shutdown_on(shutdown.clone())
        .run(pool::reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "SandboxPool controller");
            }
        });
    let sandboxes = Controller::new(
        Api::<Sandbox>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<Pod>::all(client),
        watcher::Config::default().labels(SANDBOX_LABEL),
    )
    .with_config(controller_config)
    .graceful_shutdown_on(shutdown)
    .run(sandbox::reconcile, error_policy, ctx)
    .for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "Sandbox controller");
        }
    });
    futures::join!(pools, sandboxes);
}
