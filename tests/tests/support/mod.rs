//! A shim with warm pools served in-process, shared by the warm tests.

// Each test binary uses a different part of the harness.
#![allow(dead_code)]

use std::{collections::HashMap, sync::Arc, time::Duration};

use fast_sandbox_node::{
    config::NetworkMode,
    fixup::{
        ByRuntime, ChannelTemplate, ExecTemplate, GuestExecSettings, Mechanism, RealGuestOps,
        RealOps, SysctlPolicy,
    },
    metrics::Metrics,
    network::CniSettings,
    pool::{ManagerConfig, PoolManager, PoolSpec},
};
use fast_sandbox_shim::{
    slots::{HandlerMap, PoolKey, SeccompShape, Shape, SlotSource, POOL_LABEL, SLOT_NAMESPACE},
    Shim, Upstream, UpstreamConfig,
};
use fast_sandbox_tests::{wait_for, Cri, DevNode, InProcessShim};

/// Where the dev node's runsc handler keeps runsc's state: the runc shim's
/// `--root`, i.e. the handler's `Root` option (`<instance>/runtime/runsc`,
/// written by `hack/containerd-instance.sh`) plus containerd's namespace.
pub fn runsc_root(node: &DevNode) -> String {
    node.containerd_root
        .parent()
        .unwrap_or(&node.containerd_root)
        .join("runtime/runsc/k8s.io")
        .display()
        .to_string()
}

/// A shim with one warm pool, served in-process, like `fast-sandbox-node`.
pub struct WarmNode {
    pub manager: Arc<PoolManager>,
    pub metrics: Arc<Metrics>,
    pub shim: InProcessShim,
    pub pool: String,
    pub cgroup_root: String,
    endpoint: String,
    stop: tokio::sync::watch::Sender<bool>,
    _state: tempfile::TempDir,
}

impl WarmNode {
    /// Pool `pool` serving `fast-<handler>` from `handler` slots, `size` free.
    pub async fn start(
        node: &DevNode,
        pool: &str,
        handler: &str,
        size: usize,
    ) -> anyhow::Result<Self> {
        Self::start_with(node, pool, handler, size, NetworkMode::Keep).await
    }

    /// As [`WarmNode::start`], with the pool's network mode.
    pub async fn start_with(
        node: &DevNode,
        pool: &str,
        handler: &str,
        size: usize,
        network: NetworkMode,
    ) -> anyhow::Result<Self> {
        Self::start_tuned(
            node,
            pool,
            handler,
            size,
            network,
            Duration::from_millis(100),
        )
        .await
    }

    /// As [`WarmNode::start_with`], with the pause between a claim and the
    /// next refill (and the deferred cgroup move): a load test holds the
    /// refill back so a burst sees exactly the slots that were free.
    pub async fn start_tuned(
        node: &DevNode,
        pool: &str,
        handler: &str,
        size: usize,
        network: NetworkMode,
        refill_delay: Duration,
    ) -> anyhow::Result<Self> {
        let state = tempfile::tempdir()?;
        let cgroup_root = format!("/fast-sandbox-test/{pool}");
        let spec = PoolSpec {
            name: pool.to_owned(),
            exposed_handler: format!("fast-{handler}"),
            key: PoolKey {
                upstream_handler: handler.to_owned(),
                // What `TestPod` asks for (kubelet's `RuntimeDefault`).
                shape: Shape {
                    seccomp: SeccompShape::RuntimeDefault,
                    ..Shape::default()
                },
            },
            size,
            network,
        };
        let cfg = ManagerConfig {
            state_dir: state.path().join("state"),
            record_copies: Some(fast_sandbox_node::pool::records::sandboxes_dir(
                &node.containerd_root,
            )),
            placeholder_cgroup_root: cgroup_root.clone(),
            placeholder_namespace: SLOT_NAMESPACE.to_owned(),
            upstream_timeout: Duration::from_secs(60),
            refill_interval: Duration::ZERO,
            refill_delay,
            health_interval: Duration::from_secs(30),
            cni: CniSettings {
                conf_dir: node.cni_conf_dir(),
                bin_dirs: vec!["/usr/lib/cni".into()],
                timeout: Duration::from_secs(10),
                recheck: Duration::from_secs(1),
            },
        };
        // As `fast-sandbox-node` chooses: setns for runc/crun, a command
        // inside the sandbox for runsc (its state under the dev node's
        // `Root`, see `runsc_root`).
        let mechanisms = HashMap::from([(
            "runsc".to_owned(),
            Mechanism::GuestExec(GuestExecSettings {
                command: ExecTemplate::runsc(
                    &DevNode::runsc().display().to_string(),
                    &runsc_root(node),
                ),
                sysctls: SysctlPolicy::Ignore,
                // The dev node's runsc adapter keeps it beside that root.
                channel: Some(ChannelTemplate::runsc_adapter(&runsc_root(node))),
            }),
        )]);
        let fixup = Arc::new(ByRuntime::real(
            Arc::new(RealOps::new()),
            Arc::new(RealGuestOps),
            node.containerd_root.clone(),
            &mechanisms,
            Duration::from_secs(5),
        ));
        let channel = fast_sandbox_shim::cri_channel(&node.containerd_endpoint)?;
        let metrics = Arc::new(Metrics::default());
        let manager = PoolManager::start(
            vec![spec.clone()],
            cfg,
            channel,
            fixup,
            Arc::clone(&metrics),
        )
        .await?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(Arc::clone(&manager).run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        let upstream =
            Upstream::connect_lazy(&UpstreamConfig::new(node.containerd_endpoint.clone()))?;
        let handlers = HandlerMap::new([(spec.exposed_handler.clone(), handler.to_owned())]);
        let shim = InProcessShim::serve(Shim::with_slots(
            upstream,
            handlers,
            Arc::clone(&manager) as Arc<dyn SlotSource>,
        ))
        .await?;
        Ok(Self {
            manager,
            metrics,
            shim,
            pool: pool.to_owned(),
            cgroup_root,
            endpoint: node.containerd_endpoint.clone(),
            stop,
            _state: state,
        })
    }

    pub fn free(&self) -> usize {
        self.manager
            .stats()
            .iter()
            .find(|p| p.name == self.pool)
            .map_or(0, |p| p.free)
    }

    /// Claims served from the pool so far.
    pub fn hits(&self) -> u64 {
        self.metrics
            .claims
            .get_or_create(&fast_sandbox_node::metrics::PoolOutcome {
                pool: self.pool.clone(),
                outcome: "hit",
            })
            .get()
    }

    pub fn claimed(&self) -> usize {
        self.manager
            .stats()
            .iter()
            .find(|p| p.name == self.pool)
            .map_or(0, |p| p.claimed)
    }

    /// Waits until the pool has exactly `n` free slots.
    pub async fn wait_free(&self, n: usize) -> anyhow::Result<()> {
        wait_for(
            &format!("{n} free slots in {}", self.pool),
            Duration::from_secs(60),
            || async { (self.free() == n).then_some(()) },
        )
        .await
    }

    /// Empties the pool (the pool destroys its free slots itself), then
    /// stops it: what a test does once it is done with the pool.
    pub async fn empty_and_stop(self) {
        self.manager.set_size(&self.pool, 0);
        self.wait_free(0).await.expect("pool emptied");
        self.stop().await.expect("pool stops");
    }

    /// Stops the pool and removes its slots and their cgroups.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.shim.stop().await?;
        let mut cri = Cri::connect(&self.endpoint)?;
        for sb in cri.list_by_label(POOL_LABEL, &self.pool).await? {
            remove_slot(&cri, &sb.id).await?;
            if let Some(uid) = sb.metadata.map(|m| m.uid) {
                fast_sandbox_tests::pod::remove_cgroup_dirs(&format!("{}/{uid}", self.cgroup_root));
            }
        }
        fast_sandbox_tests::pod::remove_cgroup_dirs(&self.cgroup_root);
        Ok(())
    }
}

/// Removes slot `id`, which the pool may still be destroying itself (after
/// `set_size(0)` a slot leaves the free count before its removal ends).
/// Two StopPodSandbox calls at once make containerd run two CNI teardowns
/// that race (`failed to delete "eth0": no such device`), or the slot is
/// gone by the time ours runs: retried until removed or not found.
async fn remove_slot(cri: &Cri, id: &str) -> anyhow::Result<()> {
    let last = std::sync::Mutex::new(String::new());
    let removed = wait_for(
        &format!("slot {id} removed"),
        Duration::from_secs(20),
        || {
            let (mut cri, last) = (cri.clone(), &last);
            async move {
                match cri.remove_sandbox(id).await {
                    Ok(()) => Some(()),
                    Err(s) if s.code() == tonic::Code::NotFound => Some(()),
                    Err(s) => {
                        *last
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = s.to_string();
                        None
                    }
                }
            }
        },
    )
    .await;
    let last = last
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    anyhow::Context::with_context(removed, || format!("last error: {last}"))
}

/// Removes, straight on containerd, every sandbox labelled as a slot of
/// pool `pool` and the pool's placeholder cgroups: what an earlier run of
/// the same test left behind when it failed before [`WarmNode::stop`].
/// Such slots carry that run's token, so a new pool does not know them
/// and its shim would list them as ordinary sandboxes.
pub async fn remove_pool_leftovers(node: &DevNode, pool: &str) -> anyhow::Result<usize> {
    let mut cri = node.cri()?;
    let cgroup_root = format!("/fast-sandbox-test/{pool}");
    let leftovers = cri.list_by_label(POOL_LABEL, pool).await?;
    for sb in &leftovers {
        cri.remove_sandbox(&sb.id).await?;
        if let Some(uid) = sb.metadata.as_ref().map(|m| m.uid.clone()) {
            fast_sandbox_tests::pod::remove_cgroup_dirs(&format!("{cgroup_root}/{uid}"));
        }
    }
    fast_sandbox_tests::pod::remove_cgroup_dirs(&cgroup_root);
    Ok(leftovers.len())
}
