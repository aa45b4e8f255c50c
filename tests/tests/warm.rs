//! Warm ≡ cold: the same pod spec, started once from a pre-created slot
//! (warm hit) and once with the pool empty (cold miss), through the same shim
//! with warm pools, gives the same transcript — every CRI answer kubelet
//! sees, and what the pod and the host observe (hostname, /etc/hostname,
//! /etc/resolv.conf, sysctl, container and pause cgroups, IP reachable from
//! the host, log file). Also: slots leak nothing over many claim/remove
//! cycles.

use std::{sync::Arc, time::Duration};

use fast_sandbox_node::{
    fixup::RealOps,
    metrics::Metrics,
    pool::{setns::SetnsFixup, ManagerConfig, PoolManager, PoolSpec},
};
use fast_sandbox_proto::cri::{
    ListPodSandboxRequest, PodSandboxFilter, RemovePodSandboxRequest, RunPodSandboxRequest,
    StopPodSandboxRequest,
};
use fast_sandbox_shim::{
    slots::{HandlerMap, PoolKey, Shape, SlotSource, POOL_LABEL, SLOT_NAMESPACE},
    Shim, Upstream, UpstreamConfig,
};
use fast_sandbox_tests::{
    kubelet::kubelet_sequence, pod::TestPod, wait_for, CaseGuard, Cri, DevNode, InProcessShim,
};

/// A shim with one warm pool, served in-process, like `fast-sandbox-node`.
struct WarmNode {
    manager: Arc<PoolManager>,
    shim: InProcessShim,
    pool: String,
    cgroup_root: String,
    endpoint: String,
    stop: tokio::sync::watch::Sender<bool>,
    _state: tempfile::TempDir,
}

impl WarmNode {
    /// Pool `pool` serving `fast-<handler>` from `handler` slots, `size` free.
    async fn start(node: &DevNode, pool: &str, handler: &str, size: usize) -> anyhow::Result<Self> {
        let state = tempfile::tempdir()?;
        let cgroup_root = format!("/fast-sandbox-test/{pool}");
        let spec = PoolSpec {
            name: pool.to_owned(),
            exposed_handler: format!("fast-{handler}"),
            key: PoolKey {
                upstream_handler: handler.to_owned(),
                shape: Shape::default(),
            },
            size,
        };
        let cfg = ManagerConfig {
            state_dir: state.path().join("state"),
            placeholder_cgroup_root: cgroup_root.clone(),
            placeholder_namespace: SLOT_NAMESPACE.to_owned(),
            upstream_timeout: Duration::from_secs(60),
            refill_interval: Duration::ZERO,
            refill_delay: Duration::from_millis(100),
            health_interval: Duration::from_secs(30),
        };
        let fixup = Arc::new(SetnsFixup::new(
            Arc::new(RealOps::new()),
            node.containerd_root.clone(),
            Duration::from_secs(5),
        ));
        let channel = fast_sandbox_shim::cri_channel(&node.containerd_endpoint)?;
        let manager = PoolManager::start(
            vec![spec.clone()],
            cfg,
            channel,
            fixup,
            Arc::new(Metrics::default()),
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
            shim,
            pool: pool.to_owned(),
            cgroup_root,
            endpoint: node.containerd_endpoint.clone(),
            stop,
            _state: state,
        })
    }

    fn free(&self) -> usize {
        self.manager
            .stats()
            .iter()
            .find(|p| p.name == self.pool)
            .map_or(0, |p| p.free)
    }

    fn claimed(&self) -> usize {
        self.manager
            .stats()
            .iter()
            .find(|p| p.name == self.pool)
            .map_or(0, |p| p.claimed)
    }

    /// Waits until the pool has exactly `n` free slots.
    async fn wait_free(&self, n: usize) -> anyhow::Result<()> {
        wait_for(
            &format!("{n} free slots in {}", self.pool),
            Duration::from_secs(60),
            || async { (self.free() == n).then_some(()) },
        )
        .await
    }

    /// Stops the pool and removes its slots and their cgroups.
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.shim.stop().await?;
        let mut cri = Cri::connect(&self.endpoint)?;
        let slots = cri
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: [(POOL_LABEL.to_owned(), self.pool.clone())].into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .items;
        for sb in slots {
            cri.runtime
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: sb.id.clone(),
                })
                .await?;
            cri.runtime
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: sb.id,
                })
                .await?;
            if let Some(uid) = sb.metadata.map(|m| m.uid) {
                fast_sandbox_tests::pod::remove_cgroup_dirs(&format!("{}/{uid}", self.cgroup_root));
            }
        }
        fast_sandbox_tests::pod::remove_cgroup_dirs(&self.cgroup_root);
        Ok(())
    }
}

/// Directories under `root` in every cgroup hierarchy (leak counting).
fn cgroup_dirs_under(root: &str) -> usize {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return 0;
    };
    hierarchies
        .flatten()
        .map(|h| {
            std::fs::read_dir(h.path().join(root.trim_start_matches('/')))
                .map(|d| d.flatten().filter(|e| e.path().is_dir()).count())
                .unwrap_or(0)
        })
        .sum()
}

async fn warm_equals_cold(handler: &str) {
    let test = format!("warm_equals_cold_{handler}");
    let Some(node) = DevNode::require(&test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, &test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(&test, &format!("warm-cold-{handler}"), logs.path());
    let exposed = format!("fast-{handler}");

    // Cold: the pool exists but is empty, so the claim misses.
    let warm = WarmNode::start(&node, &format!("wc-{handler}"), handler, 0)
        .await
        .expect("pool");
    let mut cri = warm.shim.cri().expect("client");
    let cold_t = kubelet_sequence(&mut cri, &node, &pod, &exposed).await;
    assert_eq!(
        warm.claimed(),
        0,
        "the cold run must not have claimed a slot"
    );

    // Warm: one free slot, claimed by the same pod spec.
    assert!(warm.manager.set_size(&warm.pool, 1));
    warm.wait_free(1).await.expect("slot created");
    std::fs::remove_dir_all(&pod.log_directory).expect("clean log dir");
    let warm_t = kubelet_sequence(&mut cri, &node, &pod, &exposed).await;
    warm.manager.set_size(&warm.pool, 0);
    warm.wait_free(0).await.expect("pool emptied");
    warm.stop().await.expect("pool stops");

    cold_t.assert_equivalent(&warm_t, "cold", "warm");
}

#[tokio::test]
async fn warm_equals_cold_runc() {
    warm_equals_cold("runc").await;
}

#[tokio::test]
async fn warm_equals_cold_crun() {
    warm_equals_cold("crun").await;
}

/// Many claim → stop → remove cycles leave no sandbox, cgroup or record
/// behind, and every claim got a distinct, never reused slot.
#[tokio::test]
async fn claim_cycles_leak_nothing() {
    let test = "claim_cycles_leak_nothing";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let cycles: usize = std::env::var("FAST_SANDBOX_CLAIM_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let logs = tempfile::tempdir().expect("tempdir");
    let warm = WarmNode::start(&node, "cycles", "runc", 2)
        .await
        .expect("pool");
    warm.wait_free(2).await.expect("pool filled");
    let mut direct = node.cri().expect("client");
    let count_sandboxes = |items: Vec<fast_sandbox_proto::cri::PodSandbox>| items.len();
    let before = count_sandboxes(
        direct
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .await
            .unwrap()
            .into_inner()
            .items,
    );
    let cgroups_before = cgroup_dirs_under(&warm.cgroup_root);

    let mut cri = warm.shim.cri().expect("client");
    let mut seen = std::collections::HashSet::new();
    for i in 0..cycles {
        // Wait for a free slot so every cycle is a warm claim.
        wait_for("a free slot", Duration::from_secs(30), || async {
            (warm.free() > 0).then_some(())
        })
        .await
        .expect("refill");
        let pod = TestPod::new(test, &format!("cycle-{i}"), logs.path());
        let id = cri
            .runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod.sandbox_config()),
                runtime_handler: "fast-runc".into(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        assert!(seen.insert(id.clone()), "slot {id} handed out twice");
        cri.runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .expect("stop");
        cri.runtime
            .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
            .await
            .expect("remove");
        pod.remove_pod_cgroups();
    }
    assert_eq!(
        warm.claimed(),
        0,
        "every claimed slot was forgotten after removal"
    );
    warm.wait_free(2).await.expect("pool refilled");
    let after = count_sandboxes(
        direct
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .await
            .unwrap()
            .into_inner()
            .items,
    );
    // Other tests may run pods beside this one; this test's own pods are
    // all gone, and the pool holds the same number of slots as before.
    let leftover = direct
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                label_selector: [(
                    fast_sandbox_tests::pod::TEST_LABEL.to_owned(),
                    test.to_owned(),
                )]
                .into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(leftover.is_empty(), "{} test pods left", leftover.len());
    assert_eq!(
        cgroup_dirs_under(&warm.cgroup_root),
        cgroups_before,
        "placeholder cgroups leaked"
    );
    let claimed_leaves: usize = (0..cycles)
        .map(|i| {
            let uid = TestPod::new(test, &format!("cycle-{i}"), logs.path()).uid;
            cgroup_dirs_under(&format!("/kubepods/besteffort/pod{uid}"))
        })
        .sum();
    assert_eq!(claimed_leaves, 0, "claimed slots' cgroup leaves leaked");
    assert_eq!(seen.len(), cycles);
    eprintln!("{cycles} claim cycles: sandboxes before {before}, after {after}");
    warm.stop().await.expect("pool stops");
}
