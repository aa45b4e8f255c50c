//! Upstream hung under a node plugin with warm pools (issue 6, item 1):
//! the shim with a real `PoolManager`, in process, in front of a fake CRI
//! upstream on a unix socket that stops answering `RunPodSandbox` and
//! `PodSandboxStatus` on demand. The refill and the health check then hang
//! upstream; claims must not wait for them, a cold start that hangs ends in
//! `DeadlineExceeded` within the caller's `grpc-timeout`, and other calls are
//! served meanwhile. (A plain forwarded call that hangs is covered by
//! `shim/tests/forwarding.rs::hung_upstream_hits_the_shim_default` and
//! `::callers_shorter_deadline_wins`.) No root, no containerd.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use fast_sandbox_proto::cri;
use fast_sandbox_shim::slots::{HandlerMap, PoolKey, SeccompShape, Shape, SlotSource};
use fast_sandbox_tests::{fake_cri::PoolRig, pod::TestPod, wait_for, InProcessShim};
use tonic::{Code, Request, Status};

const POOL_SIZE: usize = 2;

/// `RunPodSandbox` on `fast-runc` with the caller's deadline `timeout`;
/// returns the answer and how long it took.
async fn run(
    cri: &mut fast_sandbox_tests::Cri,
    pod: &TestPod,
    timeout: Duration,
) -> (Result<String, Status>, Duration) {
    let mut req = Request::new(cri::RunPodSandboxRequest {
        config: Some(pod.sandbox_config()),
        runtime_handler: "fast-runc".into(),
    });
    req.set_timeout(timeout);
    let started = Instant::now();
    let r = cri
        .runtime
        .run_pod_sandbox(req)
        .await
        .map(|r| r.into_inner().pod_sandbox_id);
    (r, started.elapsed())
}

#[tokio::test]
async fn hung_refills_and_health_checks_never_block_claims() {
    let key = PoolKey {
        upstream_handler: "runc".into(),
        // The shape of a kubelet pod (`TestPod`): runtime-default seccomp.
        shape: Shape {
            seccomp: SeccompShape::RuntimeDefault,
            ..Shape::default()
        },
    };
    let rig = PoolRig::builder()
        .pool("hung", "fast-runc", key, POOL_SIZE)
        .unix_socket()
        // The pool's own upstream deadline is long: a hung refill or health
        // check holds the refill task for that long, never a claim.
        .tune(|cfg| {
            cfg.placeholder_cgroup_root = "/fast-sandbox-test/hung".into();
            cfg.upstream_timeout = Duration::from_secs(30);
            cfg.refill_delay = Duration::ZERO;
            cfg.health_interval = Duration::from_millis(50);
        })
        .start()
        .await;
    let (fake, manager) = (&rig.cri, &rig.manager);
    let endpoint = rig.endpoint.clone().expect("a unix socket");
    let upstream = fast_sandbox_shim::Upstream::connect_lazy(&fast_sandbox_shim::UpstreamConfig {
        call_timeout: Duration::from_secs(30),
        ..fast_sandbox_shim::UpstreamConfig::new(endpoint.clone())
    })
    .expect("upstream");
    let shim = InProcessShim::serve(fast_sandbox_shim::Shim::with_slots(
        upstream,
        HandlerMap::new([("fast-runc", "runc")]),
        Arc::clone(manager) as Arc<dyn SlotSource>,
    ))
    .await
    .expect("shim");
    let mut cri = shim.cri().expect("client");

    wait_for("the pool to fill", Duration::from_secs(10), || async {
        (manager.stats()[0].free == POOL_SIZE).then_some(())
    })
    .await
    .expect("pool full");

    // From now on upstream never answers a creation or a status: the next
    // health check hangs in the refill task.
    fake.hang("PodSandboxStatus");
    fake.hang("RunPodSandbox");
    wait_for("a hung health check", Duration::from_secs(10), || async {
        (fake.hung_calls("PodSandboxStatus") > 0).then_some(())
    })
    .await
    .expect("the health check is waiting on upstream");

    let logs = tempfile::tempdir().expect("tempdir");
    let pods: Vec<TestPod> = (0..3)
        .map(|i| TestPod::new("hung", &format!("hung-{i}"), logs.path()))
        .collect();
    let caller = Duration::from_millis(400);
    let mut warm = Vec::new();
    for pod in &pods[..POOL_SIZE] {
        let (r, took) = run(&mut cri, pod, caller).await;
        let id = r.unwrap_or_else(|e| panic!("claim of {} while upstream hangs: {e:?}", pod.name));
        assert!(
            took < Duration::from_millis(200),
            "a claim waited for the hung upstream: {took:?}"
        );
        warm.push(id);
    }
    assert_ne!(warm[0], warm[1], "two pods, two slots");
    assert_eq!(manager.stats()[0].claimed, POOL_SIZE);

    // The pool is empty: the pod starts cold, upstream never answers, and
    // the caller's deadline ends it.
    // (A plain client: tonic's own would give up locally at the deadline
    // and hide the shim's answer.)
    let hung_before = fake.hung_calls("RunPodSandbox");
    let mut plain = fast_sandbox_tests::plain_runtime_client(shim.socket());
    let mut req = Request::new(cri::RunPodSandboxRequest {
        config: Some(pods[POOL_SIZE].sandbox_config()),
        runtime_handler: "fast-runc".into(),
    });
    req.set_timeout(caller);
    let started = Instant::now();
    let r = plain.run_pod_sandbox(req).await;
    let took = started.elapsed();
    let err = r.expect_err("upstream never answers");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        took >= caller - Duration::from_millis(10) && took < caller + Duration::from_millis(300),
        "answered after {took:?}, the caller gave {caller:?}"
    );
    assert!(
        fake.hung_calls("RunPodSandbox") > hung_before,
        "the cold start reached upstream"
    );

    // Meanwhile (a refill creation and a health check still hang
    // upstream), other calls are served at once.
    let started = Instant::now();
    cri.runtime
        .version(cri::VersionRequest::default())
        .await
        .expect("version");
    let listed = cri
        .runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items;
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    let shown: Vec<&str> = listed.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        shown.len(),
        POOL_SIZE,
        "the two claimed pods, no slot: {shown:?}"
    );
    assert!(warm.iter().all(|id| shown.contains(&id.as_str())));
    shim.stop().await.expect("clean stop");
}
