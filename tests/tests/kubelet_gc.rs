//! Kubelet's own behaviour, emulated beside a warm pool that claims and
//! refills meanwhile: kubelet must never see an unclaimed slot in any list
//! or status, never stop or remove one, and the pool stays at size.
//!
//! Kubelet treats every sandbox its runtime lists as its own, and destroys
//! those that belong to no pod it knows. What is emulated, from the
//! Kubernetes source (`pkg/kubelet/pleg/generic.go`,
//! `pkg/kubelet/kuberuntime/kuberuntime_gc.go`, `kuberuntime_sandbox.go`,
//! `kuberuntime_manager.go`, `kubelet_pods.go`):
//!
//! - **PLEG relist** (`GenericPLEG.Relist`, every `relistPeriod` = 1 s):
//!   `GetPods(all=true)`, i.e. `ListPodSandbox` with no filter and
//!   `ListContainers` with no filter; then, for pods whose state changed,
//!   `GetPodStatus`: `ListPodSandbox` filtered by the pod's
//!   `io.kubernetes.pod.uid` label, `PodSandboxStatus` of each of its
//!   sandboxes and `ListContainers` filtered by the uid label. The
//!   emulation runs the status calls for every own pod each round (more
//!   than kubelet does, never less).
//! - **Unknown running pods** (`HandlePodCleanups`: runtime pods not among
//!   the desired pods are killed, `killPodWithSyncResult` →
//!   `StopPodSandbox`): a *ready* sandbox whose pod uid is not one of ours
//!   is stopped.
//! - **Sandbox GC** (`containerGC.evictSandboxes`: sandboxes that are not
//!   ready and have no containers, of pods that are deleted, are removed
//!   with `StopPodSandbox` + `RemovePodSandbox`): a not-ready sandbox of an
//!   unknown pod with no container is removed, and its pod cgroup with it
//!   (kubelet's cgroup manager does that for orphaned pods).
//!
//! Not emulated: container GC (`evictContainers`; the pods here have no
//! containers), image GC, log-directory GC, the minimum-age and
//! max-per-pod policies (they only delay removal), and the event cache.
//!
//! On the shared development node, the emulated kubelet acts only on this
//! test's pods (its case label) and on anything that looks like a slot
//! (placeholder namespace or slot labels, which would be the bug), so
//! pods of tests running beside it survive; every listed sandbox is still
//! checked for slot visibility. Its own test binary, as it relists the
//! whole node.

mod support;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use fast_sandbox_node::metrics::PoolOutcome;
use fast_sandbox_proto::cri::{
    ContainerFilter, ListContainersRequest, ListPodSandboxRequest, PodSandbox, PodSandboxState,
    PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StopPodSandboxRequest,
};
use fast_sandbox_shim::slots::{
    POOL_LABEL, RUNTIME_HANDLER_LABEL, SLOT_LABEL, SLOT_NAMESPACE, SLOT_TOKEN_LABEL,
};
use fast_sandbox_tests::{
    pod::{remove_cgroup_dirs, TestPod, TEST_LABEL},
    wait_for, CaseGuard, Cri, DevNode,
};
use support::WarmNode;

/// kubelet's `relistPeriod`.
const RELIST: Duration = Duration::from_secs(1);
/// Rounds while the workload runs, at most; then until all is collected.
const MAX_ROUNDS: usize = 40;
const POOL: usize = 3;
/// Pods the workload creates (each a warm claim), one every 600 ms, each
/// deleted (dropped from kubelet's desired set) three pods later.
const PODS: usize = 10;
const KEEP: usize = 3;
/// Sandboxes of pods kubelet does not know, made straight on containerd:
/// ready ones, and one already stopped.
const FOREIGN_READY: usize = 2;

/// What the emulated kubelet knows: the pods it wants, every pod uid it
/// ever asked a sandbox for, and the sandbox ids it was given.
#[derive(Default)]
struct Desired {
    own: HashSet<String>,
    requested: HashSet<String>,
    given: HashMap<String, String>,
}

/// What the emulated kubelet did.
#[derive(Default, Debug)]
struct Actions {
    rounds: usize,
    stopped: HashSet<String>,
    removed: HashSet<String>,
    status_calls: usize,
}

/// A sandbox that shows one of pool `pool`'s placeholders: their
/// namespace and name, or a slot label naming the pool. Slots of other
/// pools (other tests' in-process nodes, each with its own token) are
/// ordinary sandboxes to this node plugin, by design, and are left alone.
fn shows_a_slot(sb: &PodSandbox, pool: &str) -> bool {
    let placeholder = sb.metadata.as_ref().is_some_and(|m| {
        m.namespace == SLOT_NAMESPACE && m.name.starts_with(&format!("slot-{pool}-"))
    });
    placeholder || sb.labels.get(POOL_LABEL).is_some_and(|p| p == pool)
}

/// The shim's reserved labels, which no pod of this test may show.
const RESERVED: [&str; 4] = [
    POOL_LABEL,
    SLOT_LABEL,
    SLOT_TOKEN_LABEL,
    RUNTIME_HANDLER_LABEL,
];

/// One relist + GC round through the shim. `slots` is containerd's list of
/// this pool's sandboxes (claimed and free), taken after the shim's list.
async fn round(
    kubelet: &mut Cri,
    direct: &mut Cri,
    pool: &str,
    case: &str,
    desired: &Mutex<Desired>,
    actions: &mut Actions,
) -> anyhow::Result<()> {
    // PLEG relist: everything, unfiltered.
    let sandboxes = kubelet
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    let containers = kubelet
        .runtime
        .list_containers(ListContainersRequest { filter: None })
        .await?
        .into_inner()
        .containers;
    let slots: HashSet<String> = direct
        .list_by_label(POOL_LABEL, pool)
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    let (own, requested) = {
        let d = desired.lock().expect("lock");
        (d.own.clone(), d.requested.clone())
    };
    let with_containers: HashSet<&str> = containers
        .iter()
        .map(|c| c.pod_sandbox_id.as_str())
        .collect();

    for sb in &sandboxes {
        let md = sb.metadata.clone().unwrap_or_default();
        // Never an unclaimed slot: no placeholder identity, no slot label,
        // and a pool slot shows only as a pod kubelet itself asked for.
        anyhow::ensure!(
            !shows_a_slot(sb, pool),
            "relist shows a slot-looking sandbox {}: {md:?} {:?}",
            sb.id,
            sb.labels
        );
        anyhow::ensure!(
            !slots.contains(&sb.id) || requested.contains(&md.uid),
            "relist shows pool slot {} as pod {}/{} (uid {}) that kubelet never asked for",
            sb.id,
            md.namespace,
            md.name,
            md.uid
        );
        let ours = sb.labels.get(TEST_LABEL).is_some_and(|c| c == case);
        if !ours {
            continue;
        }
        anyhow::ensure!(
            !RESERVED.iter().any(|k| sb.labels.contains_key(*k)),
            "{}: a reserved label shows: {:?}",
            sb.id,
            sb.labels
        );
        if own.contains(&md.uid) {
            // GetPodStatus of an own pod.
            let status = kubelet
                .runtime
                .pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: sb.id.clone(),
                    verbose: false,
                })
                .await?
                .into_inner()
                .status
                .ok_or_else(|| anyhow::anyhow!("{}: status without a body", sb.id))?;
            anyhow::ensure!(
                status.metadata.as_ref() == Some(&md) && status.labels == sb.labels,
                "{}: status and list disagree on identity",
                sb.id
            );
            kubelet
                .runtime
                .list_containers(ListContainersRequest {
                    filter: Some(ContainerFilter {
                        label_selector: [("io.kubernetes.pod.uid".to_owned(), md.uid.clone())]
                            .into(),
                        ..Default::default()
                    }),
                })
                .await?;
            actions.status_calls += 1;
        } else if sb.state == PodSandboxState::SandboxReady as i32 {
            // HandlePodCleanups: an unwanted running pod is killed.
            kubelet
                .runtime
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: sb.id.clone(),
                })
                .await?;
            actions.stopped.insert(sb.id.clone());
        } else if !with_containers.contains(sb.id.as_str()) {
            // evictSandboxes: not ready, no containers, pod gone.
            kubelet
                .runtime
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: sb.id.clone(),
                })
                .await?;
            kubelet
                .runtime
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: sb.id.clone(),
                })
                .await?;
            remove_cgroup_dirs(&format!("/kubepods/besteffort/pod{}", md.uid));
            actions.removed.insert(sb.id.clone());
        }
    }
    actions.rounds += 1;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_relist_and_gc_never_touch_unclaimed_slots() {
    let test = "kubelet_gc_beside_warm_pools";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    support::remove_pool_leftovers(&node, "kubelet-gc")
        .await
        .expect("leftovers of an earlier run removed");
    let warm = Arc::new(
        WarmNode::start(&node, "kubelet-gc", "runc", POOL)
            .await
            .expect("pool"),
    );
    warm.wait_free(POOL).await.expect("pool filled");
    let created_before = warm
        .metrics
        .creations
        .get_or_create(&PoolOutcome {
            pool: warm.pool.clone(),
            outcome: "ok",
        })
        .get();
    let hits_before = warm.hits();

    // Pods kubelet does not know, straight on containerd.
    let mut direct = node.cri().expect("client");
    let mut foreign = HashSet::new();
    for i in 0..=FOREIGN_READY {
        let pod = TestPod::new(test, &format!("gc-foreign-{i}"), logs.path());
        let id = direct
            .runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod.sandbox_config()),
                runtime_handler: "runc".into(),
            })
            .await
            .expect("foreign pod")
            .into_inner()
            .pod_sandbox_id;
        if i == FOREIGN_READY {
            direct
                .runtime
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await
                .expect("stop foreign pod");
        }
        foreign.insert(id);
    }

    // The workload: pods created through the shim (each a warm claim) and
    // later deleted, while kubelet relists.
    let desired = Arc::new(Mutex::new(Desired::default()));
    let workload = {
        let (warm, desired) = (Arc::clone(&warm), Arc::clone(&desired));
        let logs = logs.path().to_owned();
        tokio::spawn(async move {
            let mut cri = warm.shim.cri()?;
            let mut uids = Vec::new();
            for k in 0..PODS {
                let pod = TestPod::new(test, &format!("gc-pod-{k}"), &logs);
                // Desired before the call, as a pod is before kubelet syncs it.
                {
                    let mut d = desired.lock().expect("lock");
                    d.own.insert(pod.uid.clone());
                    d.requested.insert(pod.uid.clone());
                }
                wait_for("a free slot", Duration::from_secs(30), || async {
                    (warm.free() > 0).then_some(())
                })
                .await?;
                let id = cri
                    .runtime
                    .run_pod_sandbox(RunPodSandboxRequest {
                        config: Some(pod.sandbox_config()),
                        runtime_handler: "fast-runc".into(),
                    })
                    .await?
                    .into_inner()
                    .pod_sandbox_id;
                desired
                    .lock()
                    .expect("lock")
                    .given
                    .insert(id, pod.uid.clone());
                uids.push(pod.uid);
                if k >= KEEP {
                    desired.lock().expect("lock").own.remove(&uids[k - KEEP]);
                }
                tokio::time::sleep(Duration::from_millis(600)).await;
            }
            // Every pod deleted at the end.
            desired.lock().expect("lock").own.clear();
            anyhow::Ok(())
        })
    };

    let mut kubelet = warm.shim.cri().expect("client");
    let mut actions = Actions::default();
    let mut tick = tokio::time::interval(RELIST);
    let mut workload = Some(workload);
    while actions.rounds < MAX_ROUNDS {
        tick.tick().await;
        round(
            &mut kubelet,
            &mut direct,
            &warm.pool,
            test,
            &desired,
            &mut actions,
        )
        .await
        .unwrap_or_else(|e| panic!("round {}: {e:#}", actions.rounds));
        if workload.as_ref().is_some_and(|w| w.is_finished()) {
            if let Some(w) = workload.take() {
                w.await.expect("workload task").expect("workload");
            }
        }
        let left = kubelet.list_by_label(TEST_LABEL, test).await.expect("list");
        if workload.is_none() && left.is_empty() {
            break;
        }
    }
    assert!(workload.is_none(), "the workload did not finish");

    let left = kubelet.list_by_label(TEST_LABEL, test).await.expect("list");
    {
        let d = desired.lock().expect("lock");
        assert!(
            left.is_empty(),
            "after {} rounds, kubelet left {} of this test's sandboxes",
            actions.rounds,
            left.len()
        );
        // Everything collected was a pod kubelet was given or a foreign one.
        for id in actions.stopped.iter().chain(&actions.removed) {
            assert!(
                d.given.contains_key(id) || foreign.contains(id),
                "kubelet stopped or removed {id}, which is neither its pod nor a foreign one"
            );
        }
        for id in d.given.keys().chain(&foreign) {
            assert!(actions.removed.contains(id), "{id} was never collected");
        }
        assert_eq!(d.given.len(), PODS, "sandboxes given to the workload");
        assert_eq!(warm.hits() - hits_before, PODS as u64, "every pod was warm");
        assert!(actions.status_calls > 0, "kubelet never polled an own pod");
    }

    // No slot was destroyed behind the pool's back: every slot created
    // since the start was claimed, and the pool is full again.
    warm.wait_free(POOL).await.expect("pool back at size");
    let created = warm
        .metrics
        .creations
        .get_or_create(&PoolOutcome {
            pool: warm.pool.clone(),
            outcome: "ok",
        })
        .get()
        - created_before;
    assert_eq!(
        created, PODS as u64,
        "slots created during the run (one per claim, none to replace a lost one)"
    );
    assert_eq!(
        warm.claimed(),
        0,
        "every claimed slot forgotten after removal"
    );
    eprintln!(
        "kubelet emulation: {} relist rounds, {} pods warm, {} stops and {} removals, \
         {} status polls; pool {} free",
        actions.rounds,
        PODS,
        actions.stopped.len(),
        actions.removed.len(),
        actions.status_calls,
        warm.free()
    );
    match Arc::try_unwrap(warm) {
        Ok(warm) => warm.stop().await.expect("pool stops"),
        Err(_) => panic!("the pool is still shared"),
    }
}
