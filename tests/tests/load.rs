//! Load: 100 concurrent `RunPodSandbox` calls through the shim with a warm
//! pool of 20 free slots. Exactly 20 are served warm (the hit metric, the
//! slots' upstream labels and the pool's claimed count agree) and 80 start
//! cold (the `pool_empty` miss metric), nothing fails, no sandbox id is
//! returned twice, every pod is listed and reported with its own identity,
//! and after all 100 are removed the node's census equals the one before.
//! Its own test binary, so no other test's pods disturb the counts.
//!
//! The pool's refill is held for a few seconds after a claim
//! ([`WarmNode::start_tuned`]), so every one of the 100 claim decisions sees
//! only the 20 slots that were free when the burst began: a slot refilled
//! mid-burst would make the split depend on timing.

mod support;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use fast_sandbox_node::{config::NetworkMode, metrics::Miss};
use fast_sandbox_proto::cri::{PodSandboxState, PodSandboxStatusRequest, RunPodSandboxRequest};
use fast_sandbox_shim::slots::POOL_LABEL;
use fast_sandbox_tests::{
    pod::{TestPod, TEST_LABEL},
    CaseGuard, DevNode,
};
use support::WarmNode;

const PODS: usize = 100;
const POOL: usize = 20;
/// Removals in flight at once (teardown only; not what is measured).
const REMOVE_CONCURRENCY: usize = 8;

/// One `RunPodSandbox` as the client saw it.
struct Call {
    pod: TestPod,
    sent: Instant,
    answered: Instant,
    result: Result<String, tonic::Status>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_runs_twenty_warm_eighty_cold() {
    let test = "load_hundred_concurrent_runs";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let warm = WarmNode::start_tuned(
        &node,
        "load",
        "runc",
        POOL,
        NetworkMode::Keep,
        Duration::from_secs(5),
    )
    .await
    .expect("pool");
    warm.wait_free(POOL).await.expect("pool filled");
    let roots = [warm.cgroup_root.as_str(), "/kubepods/besteffort"];
    let before = node.census(&roots).await.expect("census");
    let hits_before = warm.hits();
    let pool_empty = Miss {
        handler: "fast-runc".into(),
        reason: "pool_empty",
    };
    let misses_before = warm.metrics.misses.get_or_create(&pool_empty).get();

    // One connection, as kubelet has; every call is released at once.
    let mut cri = warm.shim.cri().expect("client");
    cri.runtime
        .version(fast_sandbox_proto::cri::VersionRequest::default())
        .await
        .expect("the shim answers");
    let barrier = Arc::new(tokio::sync::Barrier::new(PODS));
    let started = Instant::now();
    let tasks: Vec<_> = (0..PODS)
        .map(|i| {
            let pod = TestPod::new(test, &format!("load-{i}"), logs.path());
            let mut rt = cri.runtime.clone();
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                let sent = Instant::now();
                let result = rt
                    .run_pod_sandbox(RunPodSandboxRequest {
                        config: Some(pod.sandbox_config()),
                        runtime_handler: "fast-runc".into(),
                    })
                    .await
                    .map(|r| r.into_inner().pod_sandbox_id);
                Call {
                    pod,
                    sent,
                    answered: Instant::now(),
                    result,
                }
            })
        })
        .collect();
    let mut calls = Vec::with_capacity(PODS);
    for t in tasks {
        calls.push(t.await.expect("call task"));
    }
    let burst = started.elapsed();

    let failed: Vec<String> = calls
        .iter()
        .filter_map(|c| {
            c.result
                .as_ref()
                .err()
                .map(|e| format!("{}: {e}", c.pod.name))
        })
        .collect();
    let pods: Vec<(TestPod, String)> = calls
        .iter()
        .filter_map(|c| c.result.as_ref().ok().map(|id| (c.pod.clone(), id.clone())))
        .collect();
    // On a failed assertion the case guard removes the pods straight on
    // containerd, with their cgroups.
    assert!(failed.is_empty(), "RunPodSandbox failed: {failed:#?}");
    check_burst(&node, &warm, &calls, &pods, test).await;
    remove_all(&warm, &pods).await;

    let hits = warm.hits() - hits_before;
    let misses = warm.metrics.misses.get_or_create(&pool_empty).get() - misses_before;
    assert_eq!(hits, POOL as u64, "warm claims (hit metric)");
    // Cold starts are also counted in `check_burst`, from containerd's view
    // (answers that are not pool slots); each is one miss, counted once.
    assert_eq!(
        misses,
        (PODS - POOL) as u64,
        "cold starts (pool_empty misses)"
    );

    assert_eq!(
        warm.claimed(),
        0,
        "every claimed slot forgotten after removal"
    );
    warm.wait_free(POOL).await.expect("pool refilled");
    let after = node
        .settled_census(&before, &roots, Duration::from_secs(30))
        .await
        .expect("census");
    eprintln!(
        "{PODS} concurrent RunPodSandbox ({POOL} warm, {} cold) in {burst:?}; \
         census before {before:?}, after {after:?}",
        PODS - POOL
    );
    assert_eq!(before, after, "resources leaked by the load burst");
    warm.stop().await.expect("pool stops");
}

/// What the burst must have produced, checked before teardown.
async fn check_burst(
    node: &DevNode,
    warm: &WarmNode,
    calls: &[Call],
    pods: &[(TestPod, String)],
    case: &str,
) {
    let ids: HashSet<&str> = pods.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids.len(), pods.len(), "a sandbox id was returned twice");

    // Which answers were slots, by their upstream labels (containerd's view).
    let mut direct = node.cri().expect("client");
    let slots: HashSet<String> = direct
        .list_by_label(POOL_LABEL, &warm.pool)
        .await
        .expect("list slots")
        .into_iter()
        .map(|s| s.id)
        .collect();
    let served_warm = ids.iter().filter(|id| slots.contains(**id)).count();
    assert_eq!(served_warm, POOL, "answers that are pool slots upstream");
    assert_eq!(warm.claimed(), POOL, "claimed slots in the pool");

    // Concurrency the shim saw. A warm claim answers in about a millisecond,
    // so a few warm answers may come back while the last requests are still
    // being written; every request was sent before the first cold answer,
    // and the peak number in flight is measured, not assumed.
    let last_sent = calls.iter().map(|c| c.sent).max().expect("calls");
    let first_cold_answer = calls
        .iter()
        .filter(|c| c.result.as_ref().is_ok_and(|id| !slots.contains(id)))
        .map(|c| c.answered)
        .min()
        .expect("cold calls");
    assert!(
        last_sent < first_cold_answer,
        "a call was sent {:?} after the first cold answer",
        last_sent - first_cold_answer
    );
    let peak = peak_in_flight(calls);
    eprintln!("peak calls in flight at once: {peak} of {PODS}");
    assert!(
        peak >= PODS * 9 / 10,
        "only {peak} of {PODS} calls were in flight at once"
    );

    // Listed through the shim with each pod's own identity.
    let mut cri = warm.shim.cri().expect("client");
    let listed: HashMap<String, _> = cri
        .list_by_label(TEST_LABEL, case)
        .await
        .expect("list")
        .into_iter()
        .map(|s| (s.id.clone(), s))
        .collect();
    assert_eq!(listed.len(), PODS, "pods listed through the shim");
    for (pod, id) in pods {
        let sb = listed
            .get(id)
            .unwrap_or_else(|| panic!("{} not listed", pod.name));
        let md = sb.metadata.as_ref().expect("metadata");
        assert_eq!(
            (md.name.as_str(), md.uid.as_str(), md.namespace.as_str()),
            (pod.name.as_str(), pod.uid.as_str(), pod.namespace.as_str()),
            "{id} listed under another identity"
        );
        assert_eq!(sb.labels, pod.labels(), "{id}: labels");
        assert_eq!(
            sb.state,
            PodSandboxState::SandboxReady as i32,
            "{id}: state"
        );
        assert_eq!(sb.runtime_handler, "fast-runc", "{id}: handler");
        let status = cri
            .runtime
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            })
            .await
            .expect("status")
            .into_inner()
            .status
            .expect("status body");
        assert_eq!(status.metadata.as_ref(), Some(md), "{id}: status metadata");
        assert_eq!(status.labels, pod.labels(), "{id}: status labels");
    }
}

/// Stops and removes every pod through the shim, a few at a time, and the
/// pod cgroups kubelet would remove.
async fn remove_all(warm: &WarmNode, pods: &[(TestPod, String)]) {
    let cri = warm.shim.cri().expect("client");
    let limit = Arc::new(tokio::sync::Semaphore::new(REMOVE_CONCURRENCY));
    let mut set = tokio::task::JoinSet::new();
    for (pod, id) in pods.iter().cloned() {
        let mut cri = cri.clone();
        let limit = Arc::clone(&limit);
        set.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("semaphore");
            let removed = cri.remove_sandbox(&id).await;
            pod.remove_pod_cgroups();
            removed.map_err(|e| format!("{}: {e}", pod.name))
        });
    }
    let mut errors = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Err(e) = r.expect("remove task") {
            errors.push(e);
        }
    }
    assert!(errors.is_empty(), "removal failed: {errors:#?}");
}

/// The largest number of calls in flight at one instant (sweep over the
/// send and answer instants; an answer at the same instant as a send ends
/// first).
fn peak_in_flight(calls: &[Call]) -> usize {
    let mut events: Vec<(Instant, i32)> = calls
        .iter()
        .flat_map(|c| [(c.sent, 1), (c.answered, -1)])
        .collect();
    events.sort();
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, delta) in events {
        now += delta;
        peak = peak.max(now);
    }
    usize::try_from(peak).unwrap_or(0)
}
