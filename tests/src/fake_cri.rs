//! A node's pool manager in process, without root or containerd: a small
//! fake CRI upstream that keeps sandboxes and images in memory, served over
//! real gRPC on 127.0.0.1, and a [`PoolManager`] keeping one pool of warm
//! slots in it ([`PoolRig`]). Tests put the node agent (or anything else
//! that speaks to the pool manager or to upstream) in front of it.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    marker::PhantomData,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use fast_sandbox_node::{
    agent::{AgentParts, Token},
    fixup::{Fixup, FixupFailed, SlotFacts},
    metrics::Metrics,
    pool::{ManagerConfig, PoolManager, PoolSpec},
};
use fast_sandbox_proto::cri;
use fast_sandbox_shim::slots::{Claim, PoolKey, Shape, SlotSource};
use tonic::{
    codegen::{http, BoxFuture, Service},
    server::{Grpc, NamedService, UnaryService},
    transport::{server::TcpIncoming, Channel, Server},
    Request, Response, Status,
};

/// The in-memory state of the fake containerd.
#[derive(Debug, Default)]
pub struct CriState {
    next: u32,
    /// Pod sandboxes, in the order they were run.
    pub sandboxes: Vec<cri::PodSandbox>,
    /// What `ListImages` answers.
    pub images: Vec<cri::Image>,
}

/// A fake containerd with the CRI calls a pool manager and a node agent
/// make: `RunPodSandbox`, `ListPodSandbox` (by label), `PodSandboxStatus`,
/// `StopPodSandbox`, `RemovePodSandbox` and `ListImages`. Every other call
/// is `Unimplemented`. Clones share one state.
#[derive(Debug, Clone, Default)]
pub struct FakeCri(Arc<Mutex<CriState>>);

impl FakeCri {
    /// The shared state, to seed it or look at it.
    pub fn state(&self) -> MutexGuard<'_, CriState> {
        self.0.lock().expect("fake CRI state")
    }

    /// Serves the runtime and image services on a free port of 127.0.0.1
    /// until the test's runtime ends; returns a lazy channel to them.
    pub async fn serve(&self) -> Channel {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake CRI");
        let address = listener.local_addr().expect("fake CRI address");
        tokio::spawn(
            Server::builder()
                .add_service(Served::<Runtime>::new(self))
                .add_service(Served::<Images>::new(self))
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        Channel::from_shared(format!("http://{address}"))
            .expect("fake CRI URI")
            .connect_lazy()
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

/// Decodes `req`, answers it with `f` and encodes the answer.
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

/// One gRPC service of the fake CRI: its name, and how it answers a call.
trait CriService {
    /// The service's full gRPC name, as tonic's router matches it.
    const NAME: &'static str;

    /// Answers `req`, a call of `method` (the last segment of its path).
    fn answer(
        cri: FakeCri,
        method: &str,
        req: http::Request<tonic::body::Body>,
    ) -> impl Future<Output = http::Response<tonic::body::Body>> + Send;
}

/// A [`CriService`] of `cri`, as a tonic service.
#[derive(Debug)]
struct Served<S> {
    cri: FakeCri,
    service: PhantomData<fn() -> S>,
}

impl<S> Served<S> {
    fn new(cri: &FakeCri) -> Self {
        Self {
            cri: cri.clone(),
            service: PhantomData,
        }
    }
}

impl<S> Clone for Served<S> {
    fn clone(&self) -> Self {
        Self::new(&self.cri)
    }
}

impl<S: CriService> NamedService for Served<S> {
    const NAME: &'static str = S::NAME;
}

impl<S: CriService> Service<http::Request<tonic::body::Body>> for Served<S> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let cri = self.cri.clone();
        Box::pin(async move {
            let method = req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            Ok(S::answer(cri, &method, req).await)
        })
    }
}

/// `runtime.v1.RuntimeService`: the calls the pool manager makes.
#[derive(Debug)]
struct Runtime;

impl CriService for Runtime {
    const NAME: &'static str = "runtime.v1.RuntimeService";

    async fn answer(
        cri: FakeCri,
        method: &str,
        req: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        match method {
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
        }
    }
}

/// `runtime.v1.ImageService`: `ListImages` only.
#[derive(Debug)]
struct Images;

impl CriService for Images {
    const NAME: &'static str = "runtime.v1.ImageService";

    async fn answer(
        cri: FakeCri,
        method: &str,
        req: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        if method == "ListImages" {
            unary(req, move |_: cri::ListImagesRequest| {
                Ok(cri::ListImagesResponse {
                    images: cri.state().images.clone(),
                })
            })
            .await
        } else {
            Status::unimplemented("fake CRI image service").into_http()
        }
    }
}

/// A fix-up that changes nothing (the fix-ups have their own tests).
#[derive(Debug)]
pub struct NoFixup;

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

/// The key of a [`PoolRig`]'s pool: upstream handler `runc`, default shape
/// (`seccomp=unconfined`).
pub fn runc_key() -> PoolKey {
    PoolKey {
        upstream_handler: "runc".into(),
        shape: Shape::default(),
    }
}

/// The image the fake upstream of a [`PoolRig`] holds: tagged
/// `127.0.0.1:5000/busybox:v1`, digest `127.0.0.1:5000/busybox@sha256:1`,
/// 1 234 567 bytes.
pub fn busybox_image() -> cri::Image {
    cri::Image {
        id: "sha256:1".into(),
        repo_tags: vec!["127.0.0.1:5000/busybox:v1".into()],
        repo_digests: vec!["127.0.0.1:5000/busybox@sha256:1".into()],
        size: 1_234_567,
        ..Default::default()
    }
}

/// A [`FakeCri`] holding [`busybox_image`], served on 127.0.0.1, and a
/// [`PoolManager`] keeping one pool of warm slots in it. Both run until the
/// test's runtime ends; the manager's state directory lives as long as the
/// rig.
#[derive(Debug)]
pub struct PoolRig {
    /// The fake upstream's state.
    pub cri: FakeCri,
    /// A channel to the fake upstream.
    pub upstream: Channel,
    /// The pool manager.
    pub manager: Arc<PoolManager>,
    /// The pool's name, which is also its exposed handler.
    pool: String,
    _dir: tempfile::TempDir,
}

impl PoolRig {
    /// Starts the fake upstream and a pool manager keeping `size` slots in
    /// one pool named `pool` (exposed as runtime handler `pool`, with key
    /// [`runc_key`]). Claimed slots are not refilled while a test runs, so
    /// a claim's change is the only one.
    pub async fn start(pool: &str, size: usize) -> Self {
        let cri = FakeCri::default();
        cri.state().images.push(busybox_image());
        let upstream = cri.serve().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = ManagerConfig {
            state_dir: dir.path().join("state"),
            placeholder_cgroup_root: "/fast-sandbox-test".into(),
            placeholder_namespace: "fast-sandbox-slots".into(),
            upstream_timeout: Duration::from_secs(5),
            refill_interval: Duration::from_millis(1),
            refill_delay: Duration::from_secs(600),
            health_interval: Duration::from_secs(600),
            cni: fast_sandbox_node::network::CniSettings {
                conf_dir: dir.path().join("cni"),
                bin_dirs: Vec::new(),
                timeout: Duration::from_secs(1),
            },
        };
        let specs = vec![PoolSpec {
            name: pool.into(),
            exposed_handler: pool.into(),
            key: runc_key(),
            size,
            network: Default::default(),
        }];
        let manager = PoolManager::start(
            specs,
            cfg,
            upstream.clone(),
            Arc::new(NoFixup),
            Arc::new(Metrics::default()),
        )
        .await
        .expect("pool manager starts");
        tokio::spawn(Arc::clone(&manager).run(std::future::pending()));
        Self {
            cri,
            upstream,
            manager,
            pool: pool.into(),
            _dir: dir,
        }
    }

    /// What a node agent named `node_name`, accepting `token`, needs to
    /// serve this rig's pools and images (images re-listed every 10 min,
    /// so in a test only at start).
    pub fn agent_parts(&self, node_name: &str, token: &str) -> AgentParts {
        AgentParts {
            pools: Some(Arc::clone(&self.manager)),
            upstream: self.upstream.clone(),
            upstream_timeout: Duration::from_secs(5),
            token: Token::new(token),
            node_name: node_name.into(),
            image_interval: Duration::from_secs(600),
        }
    }

    /// Claims a slot of the pool for a default pod config, as the shim
    /// does for a pod; returns the claimed sandbox's id.
    ///
    /// # Panics
    /// When the claim fails or no slot is free.
    pub async fn claim(&self) -> String {
        self.manager
            .claim(&Claim {
                exposed_handler: self.pool.clone(),
                key: runc_key(),
                config: cri::PodSandboxConfig::default(),
            })
            .await
            .expect("claim")
            .expect("a free slot")
            .sandbox_id
    }
}
