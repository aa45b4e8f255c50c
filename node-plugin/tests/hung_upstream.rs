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
    collections::HashMap,
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use fast_sandbox_node::{
    fixup::{Fixup, FixupFailed, SlotFacts},
    metrics::Metrics,
    pool::{ManagerConfig, PoolManager, PoolSpec},
};
use fast_sandbox_proto::cri;
use fast_sandbox_shim::slots::{HandlerMap, PoolKey, SeccompShape, Shape, SlotSource};
use fast_sandbox_tests::{pod::TestPod, wait_for, InProcessShim};
use tonic::{
    codegen::{http, BoxFuture, Service},
    server::{Grpc, NamedService, UnaryService},
    transport::Server,
    Code, Request, Response, Status,
};

const POOL_SIZE: usize = 2;

/// The fake containerd: sandboxes in memory; `RunPodSandbox` and
/// `PodSandboxStatus` never answer while their switch is on.
#[derive(Debug, Default)]
struct Fake {
    next: Mutex<u32>,
    sandboxes: Mutex<Vec<cri::PodSandbox>>,
    hang_run: AtomicBool,
    hang_status: AtomicBool,
    /// Calls that reached a hang (and never got an answer).
    hung_runs: AtomicUsize,
    hung_statuses: AtomicUsize,
}

impl Fake {
    fn sandboxes(&self) -> std::sync::MutexGuard<'_, Vec<cri::PodSandbox>> {
        self.sandboxes.lock().expect("fake state")
    }

    fn run(&self, req: cri::RunPodSandboxRequest) -> cri::RunPodSandboxResponse {
        let config = req.config.unwrap_or_default();
        let mut next = self.next.lock().expect("fake state");
        *next += 1;
        let id = format!("{:064x}", *next);
        self.sandboxes().push(cri::PodSandbox {
            id: id.clone(),
            metadata: config.metadata,
            state: cri::PodSandboxState::SandboxReady as i32,
            labels: config.labels,
            annotations: config.annotations,
            runtime_handler: req.runtime_handler,
            ..Default::default()
        });
        cri::RunPodSandboxResponse { pod_sandbox_id: id }
    }

    fn list(&self, req: cri::ListPodSandboxRequest) -> cri::ListPodSandboxResponse {
        let selector = req.filter.map(|f| f.label_selector).unwrap_or_default();
        let items = self
            .sandboxes()
            .iter()
            .filter(|s| selector.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .cloned()
            .collect();
        cri::ListPodSandboxResponse { items }
    }

    fn status(
        &self,
        req: &cri::PodSandboxStatusRequest,
    ) -> Result<cri::PodSandboxStatusResponse, Status> {
        let sandboxes = self.sandboxes();
        let sb = sandboxes
            .iter()
            .find(|s| s.id == req.pod_sandbox_id)
            .ok_or_else(|| Status::not_found("no such sandbox"))?;
        Ok(cri::PodSandboxStatusResponse {
            status: Some(cri::PodSandboxStatus {
                id: sb.id.clone(),
                metadata: sb.metadata.clone(),
                state: sb.state,
                labels: sb.labels.clone(),
                ..Default::default()
            }),
            info: HashMap::from([("info".to_owned(), r#"{"pid": 4242}"#.to_owned())]),
            ..Default::default()
        })
    }
}

/// One unary handler as a tonic `UnaryService`.
struct Unary<F>(Option<F>);

impl<Req, Resp, F, Fut> UnaryService<Req> for Unary<F>
where
    F: FnOnce(Req) -> Fut,
    Fut: std::future::Future<Output = Result<Resp, Status>> + Send + 'static,
    Resp: Send + 'static,
{
    type Response = Resp;
    type Future = BoxFuture<Response<Resp>, Status>;

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        let f = self.0.take().expect("a unary service is called once");
        let fut = f(request.into_inner());
        Box::pin(async move { fut.await.map(Response::new) })
    }
}

async fn unary<Req, Resp, F, Fut>(
    req: http::Request<tonic::body::Body>,
    f: F,
) -> http::Response<tonic::body::Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnOnce(Req) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Resp, Status>> + Send + 'static,
{
    let mut grpc = Grpc::new(tonic_prost::ProstCodec::<Resp, Req>::default());
    grpc.unary(Unary(Some(f)), req).await
}

/// Never answers; counts the call.
async fn hang<T>(counter: &AtomicUsize) -> T {
    counter.fetch_add(1, Ordering::SeqCst);
    std::future::pending().await
}

#[derive(Debug, Clone)]
struct Runtime(Arc<Fake>);

impl NamedService for Runtime {
    const NAME: &'static str = "runtime.v1.RuntimeService";
}

impl Service<http::Request<tonic::body::Body>> for Runtime {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let fake = Arc::clone(&self.0);
        Box::pin(async move {
            let method = req.uri().path().rsplit('/').next().unwrap_or_default();
            Ok(match method {
                "Version" => {
                    unary(req, |_: cri::VersionRequest| async {
                        Ok(cri::VersionResponse {
                            version: "0.1.0".into(),
                            runtime_name: "fake".into(),
                            runtime_version: "1".into(),
                            runtime_api_version: "v1".into(),
                        })
                    })
                    .await
                }
                "ListPodSandbox" => unary(req, move |r| async move { Ok(fake.list(r)) }).await,
                "RunPodSandbox" => {
                    unary(req, move |r| async move {
                        if fake.hang_run.load(Ordering::SeqCst) {
                            hang(&fake.hung_runs).await
                        } else {
                            Ok(fake.run(r))
                        }
                    })
                    .await
                }
                "PodSandboxStatus" => {
                    unary(req, move |r| async move {
                        if fake.hang_status.load(Ordering::SeqCst) {
                            hang(&fake.hung_statuses).await
                        } else {
                            fake.status(&r)
                        }
                    })
                    .await
                }
                "StopPodSandbox" => {
                    unary(req, |_: cri::StopPodSandboxRequest| async {
                        Ok(cri::StopPodSandboxResponse {})
                    })
                    .await
                }
                "RemovePodSandbox" => {
                    unary(req, move |r: cri::RemovePodSandboxRequest| async move {
                        fake.sandboxes().retain(|s| s.id != r.pod_sandbox_id);
                        Ok(cri::RemovePodSandboxResponse {})
                    })
                    .await
                }
                other => Status::unimplemented(format!("fake CRI: {other}")).into_http(),
            })
        })
    }
}

/// A fix-up that changes nothing (the fix-ups have their own tests).
#[derive(Debug)]
struct NoFixup;

#[tonic::async_trait]
impl Fixup for NoFixup {
    async fn apply(&self, _: &SlotFacts, _: &cri::PodSandboxConfig) -> Result<(), FixupFailed> {
        Ok(())
    }
    async fn complete(&self, _: &SlotFacts, _: &cri::PodSandboxConfig) -> Result<(), FixupFailed> {
        Ok(())
    }
    async fn after_remove(&self, _: &SlotFacts, _: &cri::PodSandboxConfig) {}
    async fn discard(&self, _: &SlotFacts) {}
}

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
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let upstream_sock = dir.path().join("upstream.sock");
    let listener = tokio::net::UnixListener::bind(&upstream_sock).expect("bind fake upstream");
    tokio::spawn(
        Server::builder()
            .add_service(Runtime(Arc::clone(&fake)))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let endpoint = format!("unix://{}", upstream_sock.display());

    // The pool's own upstream deadline is long: a hung refill or health
    // check holds the refill task for that long, never a claim.
    let cfg = ManagerConfig {
        state_dir: dir.path().join("state"),
        placeholder_cgroup_root: "/fast-sandbox-test/hung".into(),
        placeholder_namespace: "fast-sandbox-slots".into(),
        upstream_timeout: Duration::from_secs(30),
        refill_interval: Duration::from_millis(1),
        refill_delay: Duration::ZERO,
        health_interval: Duration::from_millis(50),
        cni: fast_sandbox_node::network::CniSettings {
            conf_dir: dir.path().join("cni"),
            bin_dirs: Vec::new(),
            timeout: Duration::from_secs(1),
        },
    };
    let key = PoolKey {
        upstream_handler: "runc".into(),
        // The shape of a kubelet pod (`TestPod`): runtime-default seccomp.
        shape: Shape {
            seccomp: SeccompShape::RuntimeDefault,
            ..Shape::default()
        },
    };
    let specs = vec![PoolSpec {
        name: "hung".into(),
        exposed_handler: "fast-runc".into(),
        key: key.clone(),
        size: POOL_SIZE,
        network: Default::default(),
    }];
    let manager = PoolManager::start(
        specs,
        cfg,
        fast_sandbox_shim::cri_channel(&endpoint).expect("channel"),
        Arc::new(NoFixup),
        Arc::new(Metrics::default()),
    )
    .await
    .expect("pool manager starts");
    tokio::spawn(Arc::clone(&manager).run(std::future::pending()));
    let upstream = fast_sandbox_shim::Upstream::connect_lazy(&fast_sandbox_shim::UpstreamConfig {
        call_timeout: Duration::from_secs(30),
        ..fast_sandbox_shim::UpstreamConfig::new(endpoint.clone())
    })
    .expect("upstream");
    let shim = InProcessShim::serve(fast_sandbox_shim::Shim::with_slots(
        upstream,
        HandlerMap::new([("fast-runc", "runc")]),
        Arc::clone(&manager) as Arc<dyn SlotSource>,
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
    fake.hang_status.store(true, Ordering::SeqCst);
    fake.hang_run.store(true, Ordering::SeqCst);
    wait_for("a hung health check", Duration::from_secs(10), || async {
        (fake.hung_statuses.load(Ordering::SeqCst) > 0).then_some(())
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
    let hung_before = fake.hung_runs.load(Ordering::SeqCst);
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
        fake.hung_runs.load(Ordering::SeqCst) > hung_before,
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
