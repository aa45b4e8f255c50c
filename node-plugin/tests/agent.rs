//! The node agent in process, over real gRPC on 127.0.0.1: a `PoolManager`
//! against a small fake CRI upstream (sandboxes and images in memory), the
//! agent in front of it, and a client. A claim reaches a watcher within
//! 100 ms; every call without the right bearer token is refused with no
//! data; pool sizes are set by handler and shape. No root, no containerd.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use fast_sandbox_node::{
    agent::{self, AgentParts, Token},
    metrics::Metrics,
    pool::{Fixup, FixupFailed, ManagerConfig, PoolManager, PoolSpec, SlotFacts},
};
use fast_sandbox_proto::{
    cri,
    nodeagent::{
        node_agent_client::NodeAgentClient, GetNodeStatusRequest, NodeStatus, SetPoolSizeRequest,
        WatchNodeStatusRequest,
    },
};
use fast_sandbox_shim::slots::{Claim, PoolKey, Shape, SlotSource};
use tonic::{
    codegen::{http, BoxFuture, Service},
    server::{Grpc, NamedService, UnaryService},
    transport::{Channel, Server},
    Code, Request, Response, Status,
};

const TOKEN: &str = "test-token-0123456789";
const POOL_SIZE: usize = 2;

/// The in-memory state of the fake containerd.
#[derive(Debug, Default)]
struct CriState {
    next: u32,
    sandboxes: Vec<cri::PodSandbox>,
    images: Vec<cri::Image>,
}

#[derive(Debug, Clone, Default)]
struct FakeCri(Arc<Mutex<CriState>>);

impl FakeCri {
    fn state(&self) -> std::sync::MutexGuard<'_, CriState> {
        self.0.lock().expect("fake CRI state")
    }

    fn list(&self, req: cri::ListPodSandboxRequest) -> cri::ListPodSandboxResponse {
        let selector = req.filter.map(|f| f.label_selector).unwrap_or_default();
        let items = self
            .state()
            .sandboxes
            .iter()
            .filter(|s| selector.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .cloned()
            .collect();
        cri::ListPodSandboxResponse { items }
    }

    fn run(&self, req: cri::RunPodSandboxRequest) -> cri::RunPodSandboxResponse {
        let config = req.config.unwrap_or_default();
        let mut state = self.state();
        state.next += 1;
        // containerd ids: 64 lowercase hex digits (the claim records check).
        let id = format!("{:064x}", state.next);
        state.sandboxes.push(cri::PodSandbox {
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

    fn status(
        &self,
        req: cri::PodSandboxStatusRequest,
    ) -> Result<cri::PodSandboxStatusResponse, Status> {
        let state = self.state();
        let sb = state
            .sandboxes
            .iter()
            .find(|s| s.id == req.pod_sandbox_id)
            .ok_or_else(|| Status::not_found("no such sandbox"))?;
        Ok(cri::PodSandboxStatusResponse {
            status: Some(cri::PodSandboxStatus {
                id: sb.id.clone(),
                metadata: sb.metadata.clone(),
                state: sb.state,
                ..Default::default()
            }),
            info: HashMap::from([("info".to_owned(), r#"{"pid": 4242}"#.to_owned())]),
            ..Default::default()
        })
    }

    fn remove(&self, id: &str) {
        self.state().sandboxes.retain(|s| s.id != id);
    }
}

/// One unary handler as a tonic `UnaryService`.
struct Unary<F>(Option<F>);

impl<Req, Resp, F> UnaryService<Req> for Unary<F>
where
    F: FnOnce(Req) -> Result<Resp, Status>,
{
    type Response = Resp;
    type Future = std::future::Ready<Result<Response<Resp>, Status>>;

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        let f = self.0.take().expect("a unary service is called once");
        std::future::ready(f(request.into_inner()).map(Response::new))
    }
}

async fn unary<Req, Resp, F>(
    req: http::Request<tonic::body::Body>,
    f: F,
) -> http::Response<tonic::body::Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnOnce(Req) -> Result<Resp, Status> + Send + 'static,
{
    let mut grpc = Grpc::new(tonic_prost::ProstCodec::<Resp, Req>::default());
    grpc.unary(Unary(Some(f)), req).await
}

/// `runtime.v1.RuntimeService`: the calls the pool manager makes.
#[derive(Debug, Clone)]
struct Runtime(FakeCri);

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
        let cri = self.0.clone();
        Box::pin(async move {
            let path = req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            Ok(match path.as_str() {
                "ListPodSandbox" => unary(req, move |r| Ok(cri.list(r))).await,
                "RunPodSandbox" => unary(req, move |r| Ok(cri.run(r))).await,
                "PodSandboxStatus" => unary(req, move |r| cri.status(r)).await,
                "StopPodSandbox" => {
                    unary(req, |_: cri::StopPodSandboxRequest| {
                        Ok(cri::StopPodSandboxResponse {})
                    })
                    .await
                }
                "RemovePodSandbox" => {
                    unary(req, move |r: cri::RemovePodSandboxRequest| {
                        cri.remove(&r.pod_sandbox_id);
                        Ok(cri::RemovePodSandboxResponse {})
                    })
                    .await
                }
                other => Status::unimplemented(format!("fake CRI: {other}")).into_http(),
            })
        })
    }
}

/// `runtime.v1.ImageService`: `ListImages` only.
#[derive(Debug, Clone)]
struct Images(FakeCri);

impl NamedService for Images {
    const NAME: &'static str = "runtime.v1.ImageService";
}

impl Service<http::Request<tonic::body::Body>> for Images {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let cri = self.0.clone();
        Box::pin(async move {
            Ok(if req.uri().path().ends_with("/ListImages") {
                unary(req, move |_: cri::ListImagesRequest| {
                    Ok(cri::ListImagesResponse {
                        images: cri.state().images.clone(),
                    })
                })
                .await
            } else {
                Status::unimplemented("fake CRI image service").into_http()
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

fn key() -> PoolKey {
    PoolKey {
        upstream_handler: "runc".into(),
        shape: Shape::default(),
    }
}

/// The fake upstream, a pool manager keeping `POOL_SIZE` slots, and the
/// agent; everything stops when the test's runtime ends.
struct Rig {
    _dir: tempfile::TempDir,
    cri: FakeCri,
    manager: Arc<PoolManager>,
    agent: SocketAddr,
}

async fn rig() -> Rig {
    let cri = FakeCri::default();
    cri.state().images.push(cri::Image {
        id: "sha256:1".into(),
        repo_tags: vec!["127.0.0.1:5000/busybox:v1".into()],
        repo_digests: vec!["127.0.0.1:5000/busybox@sha256:1".into()],
        size: 1_234_567,
        ..Default::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake CRI");
    let upstream_addr = listener.local_addr().expect("fake CRI address");
    tokio::spawn(
        Server::builder()
            .add_service(Runtime(cri.clone()))
            .add_service(Images(cri.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{upstream_addr}"))
        .expect("fake CRI URI")
        .connect_lazy();

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = ManagerConfig {
        state_dir: dir.path().join("state"),
        placeholder_cgroup_root: "/fast-sandbox-test".into(),
        placeholder_namespace: "fast-sandbox-slots".into(),
        upstream_timeout: Duration::from_secs(5),
        refill_interval: Duration::from_millis(1),
        // No refill during the test: a claim's change is the only one.
        refill_delay: Duration::from_secs(600),
        health_interval: Duration::from_secs(600),
        cni: fast_sandbox_node::network::CniSettings {
            conf_dir: dir.path().join("cni"),
            bin_dirs: Vec::new(),
            timeout: Duration::from_secs(1),
        },
    };
    let specs = vec![PoolSpec {
        name: "fast-runc".into(),
        exposed_handler: "fast-runc".into(),
        key: key(),
        size: POOL_SIZE,
        network: Default::default(),
    }];
    let manager = PoolManager::start(
        specs,
        cfg,
        channel.clone(),
        Arc::new(NoFixup),
        Arc::new(Metrics::default()),
    )
    .await
    .expect("pool manager starts");
    tokio::spawn(Arc::clone(&manager).run(std::future::pending()));

    let (agent, server) = agent::bind(
        "127.0.0.1:0".parse().expect("address"),
        AgentParts {
            pools: Some(Arc::clone(&manager)),
            upstream: channel,
            upstream_timeout: Duration::from_secs(5),
            token: Token::new(TOKEN),
            node_name: "node-a".into(),
            image_interval: Duration::from_secs(600),
        },
        std::future::pending(),
    )
    .await
    .expect("agent binds");
    tokio::spawn(server);
    Rig {
        _dir: dir,
        cri,
        manager,
        agent,
    }
}

type AddAuth = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;
type Client = NodeAgentClient<tonic::service::interceptor::InterceptedService<Channel, AddAuth>>;

/// A client sending `authorization` (or nothing).
async fn client(addr: SocketAddr, authorization: Option<&str>) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("agent URI")
        .connect()
        .await
        .expect("connect to the agent");
    let value: Option<tonic::metadata::MetadataValue<_>> =
        authorization.map(|a| a.parse().expect("header value"));
    let add: AddAuth = Box::new(move |mut r: Request<()>| {
        if let Some(v) = &value {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    });
    NodeAgentClient::with_interceptor(channel, add)
}

/// Reads statuses until one satisfies `pred`, or fails after `limit`.
async fn next_matching(
    stream: &mut tonic::Streaming<NodeStatus>,
    limit: Duration,
    what: &str,
    pred: impl Fn(&NodeStatus) -> bool,
) -> NodeStatus {
    let wait = async {
        loop {
            let status = stream
                .message()
                .await
                .expect("the watch stream")
                .expect("the watch stream ended");
            if pred(&status) {
                return status;
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .unwrap_or_else(|_| panic!("no status with {what} within {limit:?}"))
}

fn free(status: &NodeStatus) -> Option<u32> {
    status.pools.first().map(|p| p.free)
}

#[tokio::test]
async fn a_claim_reaches_a_watcher_within_100ms() {
    let rig = rig().await;
    let mut client = client(rig.agent, Some(&format!("Bearer {TOKEN}"))).await;
    let mut stream = client
        .watch_node_status(WatchNodeStatusRequest {})
        .await
        .expect("watch")
        .into_inner();
    let full = next_matching(&mut stream, Duration::from_secs(10), "a full pool", |s| {
        free(s) == Some(2)
    })
    .await;
    assert_eq!(full.node_name, "node-a");
    let pool = &full.pools[0];
    assert_eq!(
        (
            pool.name.as_str(),
            pool.handler.as_str(),
            pool.upstream_handler.as_str()
        ),
        ("fast-runc", "fast-runc", "runc")
    );
    assert_eq!(pool.shape, "seccomp=unconfined");
    assert_eq!((pool.desired, pool.claimed), (2, 0));

    let mut latencies = Vec::new();
    let mut last = full;
    for round in 0..POOL_SIZE {
        let before = last.generation;
        let claimed_at = Instant::now();
        let slot = rig
            .manager
            .claim(&Claim {
                exposed_handler: "fast-runc".into(),
                key: key(),
                config: cri::PodSandboxConfig::default(),
            })
            .await
            .expect("claim")
            .expect("a free slot");
        assert_eq!(slot.sandbox_id.len(), 64);
        let want = u32::try_from(POOL_SIZE - round - 1).expect("small");
        last = next_matching(&mut stream, Duration::from_millis(100), "the claim", |s| {
            free(s) == Some(want)
        })
        .await;
        latencies.push(claimed_at.elapsed());
        assert!(last.generation > before, "generation moves forward");
    }
    eprintln!("claim → watcher latency: {latencies:?}");
    // The claims themselves are reported once the pods hold them (maybe in
    // the status already seen: updates are coalesced).
    if last.pools[0].claimed != 2 {
        last = next_matching(&mut stream, Duration::from_millis(100), "2 claimed", |s| {
            s.pools[0].claimed == 2
        })
        .await;
    }
    assert_eq!(free(&last), Some(0));
}

#[tokio::test]
async fn status_reports_images_and_health() {
    let rig = rig().await;
    let mut client = client(rig.agent, Some(&format!("Bearer {TOKEN}"))).await;
    let mut stream = client
        .watch_node_status(WatchNodeStatusRequest {})
        .await
        .expect("watch")
        .into_inner();
    let status = next_matching(&mut stream, Duration::from_secs(10), "images", |s| {
        !s.images.is_empty()
    })
    .await;
    assert_eq!(
        status.images[0].repo_tags,
        vec!["127.0.0.1:5000/busybox:v1"]
    );
    assert_eq!(
        status.images[0].repo_digests,
        vec!["127.0.0.1:5000/busybox@sha256:1"]
    );
    assert_eq!(status.images[0].size_bytes, 1_234_567);
    let health = status.health.expect("health");
    assert!(health.ready && health.upstream_reachable, "{health:?}");
    assert!(!status.boot_id.is_empty());

    let pulled = client
        .get_node_status(GetNodeStatusRequest {})
        .await
        .expect("get")
        .into_inner();
    assert_eq!(pulled.node_name, "node-a");
    assert!(pulled.generation >= status.generation);
    drop(rig.cri);
}

#[tokio::test]
async fn every_call_needs_the_token_and_gets_no_data_without_it() {
    let rig = rig().await;
    for auth in [
        None,
        Some("Bearer wrong-token".to_owned()),
        Some(format!("Bearer {TOKEN}x")),
        Some(TOKEN.to_owned()),
        Some(format!("Basic {TOKEN}")),
    ] {
        let mut client = client(rig.agent, auth.as_deref()).await;
        let get = client
            .get_node_status(GetNodeStatusRequest {})
            .await
            .expect_err("status without the token");
        assert_eq!(get.code(), Code::Unauthenticated, "{auth:?}");
        assert!(!get.message().contains("node-a"), "{}", get.message());
        let watch = client
            .watch_node_status(WatchNodeStatusRequest {})
            .await
            .expect_err("watch without the token");
        assert_eq!(watch.code(), Code::Unauthenticated, "{auth:?}");
        let set = client
            .set_pool_size(SetPoolSizeRequest {
                handler: "fast-runc".into(),
                shape: "seccomp=unconfined".into(),
                size: 7,
            })
            .await
            .expect_err("set without the token");
        assert_eq!(set.code(), Code::Unauthenticated, "{auth:?}");
    }
    assert_eq!(rig.manager.stats()[0].desired, POOL_SIZE, "no size changed");
}

#[tokio::test]
async fn set_pool_size_by_handler_and_shape() {
    let rig = rig().await;
    let mut client = client(rig.agent, Some(&format!("Bearer {TOKEN}"))).await;
    let mut stream = client
        .watch_node_status(WatchNodeStatusRequest {})
        .await
        .expect("watch")
        .into_inner();
    let answer = client
        .set_pool_size(SetPoolSizeRequest {
            handler: "fast-runc".into(),
            shape: "seccomp=unconfined".into(),
            size: 3,
        })
        .await
        .expect("set")
        .into_inner();
    assert_eq!(answer.pool, "fast-runc");
    next_matching(&mut stream, Duration::from_secs(10), "3 free of 3", |s| {
        s.pools[0].desired == 3 && s.pools[0].free == 3
    })
    .await;

    let unknown = client
        .set_pool_size(SetPoolSizeRequest {
            handler: "fast-runc".into(),
            shape: "seccomp=runtime-default".into(),
            size: 1,
        })
        .await
        .expect_err("no such pool");
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown.message().contains("runtime-default"),
        "{}",
        unknown.message()
    );
    let huge = client
        .set_pool_size(SetPoolSizeRequest {
            handler: "fast-runc".into(),
            shape: "seccomp=unconfined".into(),
            size: 100_000,
        })
        .await
        .expect_err("too large");
    assert_eq!(huge.code(), Code::InvalidArgument);
    assert!(huge.message().contains("size"), "{}", huge.message());
    assert_eq!(rig.manager.stats()[0].desired, 3);
}
