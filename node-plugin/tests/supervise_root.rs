//! Issue 11's acceptance for the supervisor: `fast-sandbox-node supervise
//! -- serve` on the development node, its serving process killed -9 twenty
//! times, each time during a burst of warm claims. Nothing but the
//! supervisor restarts it (no kubelet here). Checked: CRI answers again
//! within 200 ms p99 of each kill; no pod told it has a sandbox loses it or
//! its identity, no slot is given to two pods (a pod whose claim got no
//! answer retries as kubelet's next sync would, and finds its finished
//! claim or gets a new sandbox); at the end the slots in containerd equal
//! the pool's accounting, and once everything is removed nothing is left
//! that was not there before.
//!
//! Before start-up served first (issue 11, item 2) the new process tidied
//! free slots and finished cut-short claims before serving, and the tail
//! passed 200 ms (p99 169 ms, then 253 ms); serving first, one run gave
//! p50 30 ms, p99 154 ms (debug build, while claims and the previous
//! process's clean-up load containerd).
//!
//! Needs root and the development node (`hack/dev-node.sh up`); skips
//! locally without them, fails under `CI=true`.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use fast_sandbox_proto::cri::{
    runtime_service_client::RuntimeServiceClient, PodSandboxStatusRequest, RunPodSandboxRequest,
    VersionRequest,
};
use fast_sandbox_tests::{pod::TestPod, wait_for, Cri, DevNode};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

mod support;
use support::{clean_slate, pool_ids, remove_pool_slots, Node, Setup};

const POOL: &str = "supervise";
const SIZE: usize = 4;
const KILLS: usize = 20;
/// `supervise --min-uptime`'s default: a kill of a server that ran this
/// long is restarted at once (a sooner one is a crash loop and backs off).
const MIN_UPTIME: Duration = Duration::from_secs(1);

/// The serving process: the supervisor's one child that is not `not`.
async fn serving(supervisor: Pid, not: Option<Pid>) -> Pid {
    wait_for("the serving process", Duration::from_secs(10), || async {
        std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .map(Pid::from_raw)
            .find(|p| Some(*p) != not)
    })
    .await
    .expect("a serving process")
}

/// Time from `since` until `Version` through the shim answers, on a new
/// connection each try (as kubelet redials), polling every millisecond.
async fn until_answering(endpoint: &str, since: Instant, limit: Duration) -> Duration {
    loop {
        let channel = fast_sandbox_shim::cri_channel(endpoint).expect("endpoint");
        let mut request = tonic::Request::new(VersionRequest::default());
        request.set_timeout(Duration::from_millis(500));
        if RuntimeServiceClient::new(channel)
            .version(request)
            .await
            .is_ok()
        {
            return since.elapsed();
        }
        assert!(since.elapsed() < limit, "no CRI answer within {limit:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A burst of warm claims, one connection each; the node plugin's serving
/// process is killed once the first is answered. Returns the pods and
/// what each was told.
async fn burst_and_kill(
    endpoint: &str,
    case: &str,
    round: usize,
    logs: &std::path::Path,
    victim: Pid,
) -> (Vec<TestPod>, Vec<Option<String>>, Instant) {
    let pods: Vec<TestPod> = (0..SIZE)
        .map(|i| TestPod::new(case, &format!("sv-{round}-{i}"), logs))
        .collect();
    let answered = Arc::new(AtomicUsize::new(0));
    let calls: Vec<_> = pods
        .iter()
        .map(|pod| {
            let (endpoint, config) = (endpoint.to_owned(), pod.sandbox_config());
            let answered = Arc::clone(&answered);
            tokio::spawn(async move {
                let mut cri = Cri::connect(&endpoint).expect("client");
                let r = cri
                    .runtime
                    .run_pod_sandbox(RunPodSandboxRequest {
                        config: Some(config),
                        runtime_handler: "fast-runc".into(),
                    })
                    .await
                    .map(|r| r.into_inner().pod_sandbox_id);
                answered.fetch_add(1, Ordering::SeqCst);
                r.ok()
            })
        })
        .collect();
    wait_for("a claim answered", Duration::from_secs(30), || async {
        (answered.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await
    .expect("the burst is under way");
    kill(victim, Signal::SIGKILL).expect("kill -9 the serving process");
    let killed = Instant::now();
    let mut told = Vec::new();
    for call in calls {
        told.push(call.await.expect("task"));
    }
    (pods, told, killed)
}

/// Kubelet's next sync for each pod of a burst: a told pod must find its
/// sandbox; an untold one finds its finished claim or asks again. Returns
/// each pod's one sandbox.
async fn settle_burst(cri: &mut Cri, pods: &[TestPod], told: &[Option<String>]) -> Vec<String> {
    let mut ids = Vec::new();
    for (pod, told) in pods.iter().zip(told) {
        let listed = cri
            .list_by_label("io.kubernetes.pod.uid", &pod.uid)
            .await
            .expect("list");
        assert!(
            listed.len() <= 1,
            "pod {} has {} sandboxes",
            pod.name,
            listed.len()
        );
        let id = match (told, listed.first()) {
            (Some(told), Some(sb)) => {
                assert_eq!(
                    &sb.id, told,
                    "pod {} keeps the sandbox it was told",
                    pod.name
                );
                sb.id.clone()
            }
            (Some(told), None) => panic!("pod {} lost its sandbox {told}", pod.name),
            (None, Some(sb)) => sb.id.clone(),
            (None, None) => {
                cri.runtime
                    .run_pod_sandbox(RunPodSandboxRequest {
                        config: Some(pod.sandbox_config()),
                        runtime_handler: "fast-runc".into(),
                    })
                    .await
                    .expect("kubelet's retry")
                    .into_inner()
                    .pod_sandbox_id
            }
        };
        let status = cri
            .runtime
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            })
            .await
            .expect("status")
            .into_inner();
        let meta = status.status.and_then(|s| s.metadata).expect("metadata");
        assert_eq!(
            (meta.name.as_str(), meta.uid.as_str()),
            (pod.name.as_str(), pod.uid.as_str()),
            "sandbox {id} shows its own pod"
        );
        ids.push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_twenty_times_during_claims_is_served_again_within_200ms() {
    let test = "kill_9_twenty_times_during_claims_is_served_again_within_200ms";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guards = clean_slate(&node, test, POOL).await;
    let cg_root = format!("/fast-sandbox-test/{POOL}");
    let before = node.census(&[&cg_root]).await.expect("census");

    let dir = tempfile::tempdir().expect("tempdir");
    let logs = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        pool: POOL,
        size: SIZE,
        node: &node,
    };
    let plugin = Node::supervised(&setup, dir.path(), "supervisor.log");
    let supervisor = Pid::from_raw(i32::try_from(plugin.child.id()).expect("pid"));
    let endpoint = plugin.endpoint();
    let mut cri = plugin.cri().await;

    let mut gaps = Vec::new();
    let mut held = HashSet::new();
    let mut victim = serving(supervisor, None).await;
    let mut seen_at = Instant::now();
    for round in 0..KILLS {
        plugin.wait_full().await;
        // Each kill lands on a server that has run as long as an OOM kill
        // or a panic in service would find it, not on a crash loop.
        tokio::time::sleep_until((seen_at + MIN_UPTIME).into()).await;
        let (pods, told, killed) =
            burst_and_kill(&endpoint, test, round, logs.path(), victim).await;
        gaps.push(until_answering(&endpoint, killed, Duration::from_secs(30)).await);
        let next = serving(supervisor, Some(victim)).await;
        (victim, seen_at) = (next, Instant::now());

        let ids = settle_burst(&mut cri, &pods, &told).await;
        for id in &ids {
            assert!(held.insert(id.clone()), "slot {id} given twice");
        }
        // Kubelet deletes the pods.
        for (pod, id) in pods.iter().zip(&ids) {
            cri.remove_sandbox(id).await.expect("remove");
            pod.remove_pod_cgroups();
        }
    }
    gaps.sort();
    let p99 = gaps[(gaps.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "kill -9 → CRI answers again, {KILLS} kills: p50 {:?}, p99 {p99:?}, max {:?}; all {gaps:?}",
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1]
    );
    assert!(p99 <= Duration::from_millis(200), "p99 {p99:?}: {gaps:?}");

    plugin.wait_full().await;
    let pools: serde_json::Value = serde_json::from_str(
        &fast_sandbox_node::admin::get(plugin.admin, "/pools")
            .await
            .expect("/pools"),
    )
    .expect("JSON");
    let accounted =
        pools[0]["free"].as_u64().expect("free") + pools[0]["claimed"].as_u64().expect("claimed");
    assert_eq!(
        pool_ids(&node.containerd_endpoint, POOL).await.len() as u64,
        accounted,
        "census: the pool's slots in containerd are the pool's free and claimed ones: {pools}"
    );
    assert_eq!(accounted, SIZE as u64, "{pools}");
    let log = plugin.log();
    assert_eq!(
        log.matches("the serving process ended; restarting it")
            .count(),
        KILLS,
        "{log}"
    );
    drop(cri);
    plugin.stop().await;
    let removed = remove_pool_slots(&node.containerd_endpoint, POOL)
        .await
        .expect("remove slots");
    assert_eq!(removed, SIZE, "a graceful stop keeps the free slots");
    let after = node
        .settled_census(&before, &[&cg_root], Duration::from_secs(15))
        .await
        .expect("census");
    assert_eq!(before, after, "resources leaked across the kills");
}
