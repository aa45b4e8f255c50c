//! A node's pool manager in process, without root or containerd: a small
//! fake CRI upstream that keeps sandboxes and images in memory, served over
//! real gRPC on 127.0.0.1, and a [`PoolManager`] keeping one pool of warm
//! slots in it ([`PoolRig`]). Tests put the node agent (or anything else
//! that speaks to the pool manager or to upstream) in front of it.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    future::Future,
    marker::PhantomData,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use fast_sandbox_node::{
    agent::{AgentParts, Token},
    fixup::{Fixup, FixupFailed, SlotFacts},
    health::Health,
    metrics::Metrics,
    pool::{ManagerConfig, NetworkMode, PoolError, PoolManager, PoolParts, PoolSpec},
    usage::Cgroups,
};
use fast_sandbox_proto::cri;
use fast_sandbox_shim::slots::{Claim, PoolKey, Shape, SlotSource};
use tokio::sync::watch;
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
    /// Methods (`RunPodSandbox`, …) that never answer from now on.
    hung: HashSet<String>,
    /// Calls that reached a hang, by method.
    hung_calls: HashMap<String, usize>,
    /// Methods whose calls wait until their gate opens.
    gates: HashMap<String, watch::Receiver<bool>>,
}

/// A fake containerd with the CRI calls a pool manager, a node agent and
/// the shim in front of them make: `Version`, `RunPodSandbox`,
/// `ListPodSandbox` (by label), `PodSandboxStatus`, `PodSandboxStats`,
/// `StopPodSandbox`, `RemovePodSandbox` and `ListImages`. Every other call
/// is `Unimplemented`. Any method can be made to hang ([`FakeCri::hang`])
/// or to wait for a gate ([`FakeCri::gate`]). Clones share one state.
#[derive(Debug, Clone, Default)]
pub struct FakeCri(Arc<Mutex<CriState>>);

/// Holds the calls of one method of a [`FakeCri`] until opened (or
/// dropped).
#[derive(Debug)]
pub struct Gate(watch::Sender<bool>);

impl Gate {
    /// Lets every waiting and later call through.
    pub fn open(&self) {
        self.0.send_replace(true);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open();
    }
}

impl FakeCri {
    /// The shared state, to seed it or look at it.
    pub fn state(&self) -> MutexGuard<'_, CriState> {
        self.0.lock().expect("fake CRI state")
    }

    /// From now on, calls of `method` (e.g. `"RunPodSandbox"`) never
    /// answer; each is counted in [`FakeCri::hung_calls`].
    pub fn hang(&self, method: &str) {
        self.state().hung.insert(method.to_owned());
    }

    /// How many calls of `method` reached a hang.
    pub fn hung_calls(&self, method: &str) -> usize {
        self.state().hung_calls.get(method).copied().unwrap_or(0)
    }

    /// Calls of `method` wait, from now on, until the returned gate is
    /// opened or dropped.
    pub fn gate(&self, method: &str) -> Gate {
        let (tx, rx) = watch::channel(false);
        self.state().gates.insert(method.to_owned(), rx);
        Gate(tx)
    }

    /// Waits as a hang or a gate of `method` says.
    async fn hold(&self, method: &str) {
        let gate = {
            let mut state = self.state();
            if state.hung.contains(method) {
                *state.hung_calls.entry(method.to_owned()).or_default() += 1;
                None
            } else {
                Some(state.gates.get(method).cloned())
            }
        };
        match gate {
            None => std::future::pending().await,
            Some(Some(mut gate)) => {
                let _ = gate.wait_for(|open| *open).await;
            }
            Some(None) => {}
        }
    }

    /// The runtime and image services.
    fn router(&self) -> tonic::transport::server::Router {
        Server::builder()
            .add_service(Served::<Runtime>::new(self))
            .add_service(Served::<Images>::new(self))
    }

    /// Serves the runtime and image services on a free port of 127.0.0.1
    /// until the test's runtime ends; returns a lazy channel to them.
    pub async fn serve(&self) -> Channel {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake CRI");
        let address = listener.local_addr().expect("fake CRI address");
        tokio::spawn(
            self.router()
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        Channel::from_shared(format!("http://{address}"))
            .expect("fake CRI URI")
            .connect_lazy()
    }

    /// Serves the runtime and image services on the unix socket `path`
    /// (as containerd does; what the shim's upstream connects to) until the
    /// test's runtime ends; returns the endpoint, `unix://<path>`.
    pub fn serve_unix(&self, path: &Path) -> String {
        let listener = tokio::net::UnixListener::bind(path).expect("bind fake CRI socket");
        tokio::spawn(
            self.router()
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        format!("unix://{}", path.display())
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
                labels: sb.labels.clone(),
                ..Default::default()
            }),
            info: HashMap::from([("info".to_owned(), r#"{"pid": 4242}"#.to_owned())]),
            ..Default::default()
        })
    }

    /// Stats of a sandbox: its attributes and empty Linux numbers (those of
    /// a claimed slot are the pool's to fill in).
    fn stats(
        &self,
        req: &cri::PodSandboxStatsRequest,
    ) -> Result<cri::PodSandboxStatsResponse, Status> {
        let state = self.state();
        let sb = state
            .sandboxes
            .iter()
            .find(|s| s.id == req.pod_sandbox_id)
            .ok_or_else(|| Status::not_found("no such sandbox"))?;
        Ok(cri::PodSandboxStatsResponse {
            stats: Some(cri::PodSandboxStats {
                attributes: Some(cri::PodSandboxAttributes {
                    id: sb.id.clone(),
                    metadata: sb.metadata.clone(),
                    labels: sb.labels.clone(),
                    annotations: sb.annotations.clone(),
                }),
                linux: Some(cri::LinuxPodSandboxStats::default()),
                windows: None,
            }),
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
            cri.hold(&method).await;
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
            "Version" => {
                unary(req, |_: cri::VersionRequest| {
                    Ok(cri::VersionResponse {
                        version: "0.1.0".into(),
                        runtime_name: "fake".into(),
                        runtime_version: "1".into(),
                        runtime_api_version: "v1".into(),
                    })
                })
                .await
            }
            "ListPodSandbox" => unary(req, move |r| Ok(cri.list(r))).await,
            // The fake runs no containers (the pool's start-up asks, to tell
            // claimed slots from free ones).
            "ListContainers" => {
                unary(req, |_: cri::ListContainersRequest| {
                    Ok(cri::ListContainersResponse::default())
                })
                .await
            }
            "PodSandboxStats" => unary(req, move |r| cri.stats(&r)).await,
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
/// [`PoolManager`] keeping warm slots in it. Both run until the test's
/// runtime ends; the manager's state directory lives as long as the rig.
#[derive(Debug)]
pub struct PoolRig {
    /// The fake upstream's state.
    pub cri: FakeCri,
    /// A channel to the fake upstream.
    pub upstream: Channel,
    /// The fake upstream's unix socket endpoint, when asked for
    /// ([`RigBuilder::unix_socket`]), for a shim in front of the pools.
    pub endpoint: Option<String>,
    /// The pool manager.
    pub manager: Arc<PoolManager>,
    /// The health the rig's node agent reports: ready at start; a test
    /// flips it (`set_upstream`) to play an upstream that stops answering.
    pub health: Health,
    /// The first pool's exposed handler.
    pool: String,
    /// The first pool's key.
    key: PoolKey,
    _dir: tempfile::TempDir,
}

/// How a [`PoolRig`] is built: its pools, fix-up, cgroup reader and
/// manager settings.
#[derive(Debug)]
pub struct RigBuilder {
    pools: Vec<PoolSpec>,
    fixup: Arc<dyn Fixup>,
    cgroups: Option<Arc<dyn Cgroups>>,
    unix_socket: bool,
    /// containerd's CNI configuration at start (`None`: not there yet).
    cni: Option<&'static str>,
    tune: Vec<fn(&mut ManagerConfig)>,
}

/// The CNI configuration a [`PoolRig`] writes by default: identity-free,
/// so a pool with `network` unset keeps slots' attachments.
pub const BRIDGE_CONFLIST: &str = r#"{"cniVersion":"1.0.0","name":"rig",
  "plugins":[{"type":"bridge","ipam":{"type":"host-local"}},{"type":"portmap"}]}"#;

impl RigBuilder {
    /// Adds a pool `name` exposed as handler `exposed`, keyed `key`,
    /// keeping `size` free slots.
    #[must_use]
    pub fn pool(mut self, name: &str, exposed: &str, key: PoolKey, size: usize) -> Self {
        self.pools.push(PoolSpec {
            name: name.into(),
            exposed_handler: exposed.into(),
            key,
            size,
            network: Default::default(),
        });
        self
    }

    /// Uses `fixup` instead of [`NoFixup`].
    #[must_use]
    pub fn fixup(mut self, fixup: Arc<dyn Fixup>) -> Self {
        self.fixup = fixup;
        self
    }

    /// Reads pods' cgroups through `cgroups` instead of cgroupfs.
    #[must_use]
    pub fn cgroups(mut self, cgroups: Arc<dyn Cgroups>) -> Self {
        self.cgroups = Some(cgroups);
        self
    }

    /// Serves the fake upstream on a unix socket too ([`PoolRig::endpoint`]).
    #[must_use]
    pub fn unix_socket(mut self) -> Self {
        self.unix_socket = true;
        self
    }

    /// Starts without containerd's CNI configuration (a new node whose CNI
    /// is not installed yet): write it in [`PoolRig::cni_dir`] later.
    #[must_use]
    pub fn without_cni(mut self) -> Self {
        self.cni = None;
        self
    }

    /// Starts with `conflist` as containerd's CNI configuration instead of
    /// [`BRIDGE_CONFLIST`].
    #[must_use]
    pub fn conflist(mut self, conflist: &'static str) -> Self {
        self.cni = Some(conflist);
        self
    }

    /// Sets the network mode of the pool added last.
    ///
    /// # Panics
    /// When no pool was added yet.
    #[must_use]
    pub fn network(mut self, mode: NetworkMode) -> Self {
        self.pools.last_mut().expect("a pool first").network = mode;
        self
    }

    /// Changes the manager's settings (the defaults: 5 s upstream deadline,
    /// refill every 1 ms, no refill for 10 min after a claim, health check
    /// every 10 min).
    #[must_use]
    pub fn tune(mut self, f: fn(&mut ManagerConfig)) -> Self {
        self.tune.push(f);
        self
    }

    /// Starts the fake upstream and the pool manager (its refill task
    /// too).
    ///
    /// # Panics
    /// When no pool was added or the manager does not start.
    pub async fn start(self) -> PoolRig {
        self.try_start().await.expect("pool manager starts")
    }

    /// [`RigBuilder::start`], returning why the manager does not start.
    ///
    /// # Errors
    /// What [`PoolManager::start_with`] returns.
    ///
    /// # Panics
    /// When no pool was added.
    pub async fn try_start(self) -> Result<PoolRig, PoolError> {
        let first = self.pools.first().expect("a rig has a pool").clone();
        let cri = FakeCri::default();
        cri.state().images.push(busybox_image());
        let upstream = cri.serve().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = self
            .unix_socket
            .then(|| cri.serve_unix(&dir.path().join("upstream.sock")));
        let mut cfg = ManagerConfig {
            state_dir: dir.path().join("state"),
            record_copies: None,
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
                recheck: Duration::from_millis(20),
            },
        };
        if let Some(conflist) = self.cni {
            std::fs::create_dir(dir.path().join("cni")).expect("CNI conf dir");
            std::fs::write(dir.path().join("cni/10-rig.conflist"), conflist).expect("CNI conflist");
        }
        for tune in self.tune {
            tune(&mut cfg);
        }
        let channel = match &endpoint {
            Some(endpoint) => fast_sandbox_shim::cri_channel(endpoint).expect("channel"),
            None => upstream.clone(),
        };
        let mut parts = PoolParts::new(channel, self.fixup, Arc::new(Metrics::default()));
        if let Some(cgroups) = self.cgroups {
            parts = parts.with_cgroups(cgroups);
        }
        let manager = PoolManager::start_with(self.pools, cfg, parts).await?;
        // As `serve` does.
        manager.decide_at_start().await?;
        tokio::spawn(Arc::clone(&manager).run(std::future::pending()));
        Ok(PoolRig {
            cri,
            upstream,
            endpoint,
            manager,
            health: Health::ready(),
            pool: first.exposed_handler,
            key: first.key,
            _dir: dir,
        })
    }
}

impl PoolRig {
    /// Starts the fake upstream and a pool manager keeping `size` slots in
    /// one pool named `pool` (exposed as runtime handler `pool`, with key
    /// [`runc_key`]). Claimed slots are not refilled while a test runs, so
    /// a claim's change is the only one.
    pub async fn start(pool: &str, size: usize) -> Self {
        Self::builder()
            .pool(pool, pool, runc_key(), size)
            .start()
            .await
    }

    /// A rig with no pool yet and [`NoFixup`].
    pub fn builder() -> RigBuilder {
        RigBuilder {
            pools: Vec::new(),
            fixup: Arc::new(NoFixup),
            cgroups: None,
            unix_socket: false,
            cni: Some(BRIDGE_CONFLIST),
            tune: Vec::new(),
        }
    }

    /// containerd's CNI `conf_dir` of the rig (see
    /// [`RigBuilder::without_cni`]).
    pub fn cni_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("cni")
    }

    /// Waits until the first pool has `n` free slots.
    ///
    /// # Panics
    /// After 10 s.
    pub async fn wait_free(&self, n: usize) {
        let mut changes = self.manager.subscribe();
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.manager.stats()[0].free < n {
                changes.changed().await.expect("manager alive");
            }
        })
        .await
        .expect("slots created");
    }

    /// What a node agent named `node_name`, accepting `token`, needs to
    /// serve this rig's pools and images (images re-listed every 10 min,
    /// so in a test only at start).
    pub fn agent_parts(&self, node_name: &str, token: &str) -> AgentParts {
        AgentParts {
            pools: Some(Arc::clone(&self.manager)),
            upstream: self.upstream.clone(),
            upstream_timeout: Duration::from_secs(5),
            token: Some(Token::new(token)),
            tls: None,
            max_slots: fast_sandbox_node::config::DEFAULT_MAX_SLOTS,
            node_name: node_name.into(),
            image_interval: Duration::from_secs(600),
            health: self.health.clone(),
        }
    }

    /// Claims a slot of the first pool for a default pod config, as the
    /// shim does for a pod; returns the claimed sandbox's id.
    ///
    /// # Panics
    /// When the claim fails or no slot is free.
    pub async fn claim(&self) -> String {
        self.claim_for(cri::PodSandboxConfig::default()).await
    }

    /// Claims a slot of the first pool for a pod of `config`.
    ///
    /// # Panics
    /// When the claim fails or no slot is free.
    pub async fn claim_for(&self, config: cri::PodSandboxConfig) -> String {
        self.manager
            .claim(&Claim {
                exposed_handler: self.pool.clone(),
                key: self.key.clone(),
                config,
            })
            .await
            .expect("claim")
            .expect("a free slot")
            .sandbox_id
    }
}
