//! Test doubles: a fake upstream CRI server on a temporary unix socket, a shim
//! served in-process in front of it, and a raw-bytes codec for malformed
//! traffic. No root and no containerd needed.

#![allow(dead_code)] // each test binary uses a different subset

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use fast_sandbox_proto::cri::{
    self,
    image_service_client::ImageServiceClient,
    image_service_server::{ImageService, ImageServiceServer},
    runtime_service_client::RuntimeServiceClient,
    runtime_service_server::{RuntimeService, RuntimeServiceServer},
};
use fast_sandbox_shim::{
    cri_channel, serve, Shim, ShimError, SocketConfig, Upstream, UpstreamConfig, MAX_MESSAGE_SIZE,
};
use futures::Stream;
use hyper_util::{
    client::legacy::Client as LegacyClient,
    rt::{TokioExecutor, TokioIo},
};
use prost::bytes::{Buf, BufMut};
use tokio::{net::UnixListener, sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{
    body::Body,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http,
    metadata::MetadataMap,
    server::NamedService,
    transport::{Channel, Server},
    Request, Response, Status,
};

/// Waits for `probe` to return `Some`, polling every few milliseconds, for at
/// most `limit`. Panics naming `what` on timeout.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let give_up = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Payload of the error the fake returns for container id `missing`.
pub const NOT_FOUND_DETAILS: &[u8] = b"\x08\x05\x12\x07missing";
/// Container id for which `ContainerStatus` hangs forever.
pub const HANG: &str = "hang";
/// `ListContainers` filter id that makes the fake answer with a large list.
pub const BIG_LIST: &str = "big";
/// Request header asking the fake to keep the event stream open.
pub const HOLD_OPEN: &str = "x-hold-open";

/// What the fake upstream saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Metadata of every request, in arrival order.
    pub metadata: Mutex<Vec<MetadataMap>>,
}

impl Seen {
    pub fn record<T>(&self, request: &Request<T>) {
        self.metadata
            .lock()
            .expect("lock")
            .push(request.metadata().clone());
    }

    pub fn last(&self) -> MetadataMap {
        self.metadata
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("the fake saw a request")
    }

    pub fn count(&self) -> usize {
        self.metadata.lock().expect("lock").len()
    }
}

/// A fake CRI runtime: answers what the tests need, `Unimplemented` otherwise.
#[derive(Debug, Clone, Default)]
pub struct Fake {
    pub seen: Arc<Seen>,
}

pub fn version_response(version: &str) -> cri::VersionResponse {
    cri::VersionResponse {
        version: version.to_owned(),
        runtime_name: "fake-runtime".into(),
        runtime_version: "1.2.3".into(),
        runtime_api_version: "v1".into(),
    }
}

pub fn sandboxes() -> Vec<cri::PodSandbox> {
    (0..3)
        .map(|i| cri::PodSandbox {
            id: format!("sandbox-{i}"),
            metadata: Some(cri::PodSandboxMetadata {
                name: format!("pod-{i}"),
                uid: format!("uid-{i}"),
                namespace: "default".into(),
                attempt: i,
            }),
            state: cri::PodSandboxState::SandboxReady as i32,
            created_at: 1_700_000_000_000_000_000 + i64::from(i),
            labels: HashMap::from([("app".into(), format!("a{i}"))]),
            annotations: HashMap::from([("note".into(), "x".repeat(40))]),
            runtime_handler: "runc".into(),
        })
        .collect()
}

pub fn events() -> Vec<cri::ContainerEventResponse> {
    (0..3)
        .map(|i| cri::ContainerEventResponse {
            container_id: format!("c{i}"),
            container_event_type: cri::ContainerEventType::ContainerStartedEvent as i32,
            created_at: i,
            ..Default::default()
        })
        .collect()
}

/// About 5 MiB: above tonic's 4 MiB default, below kubelet's 16 MiB.
pub fn big_container_list() -> Vec<cri::Container> {
    (0..50)
        .map(|i| cri::Container {
            id: format!("big-{i}"),
            labels: HashMap::from([("blob".into(), "y".repeat(100 * 1024))]),
            ..Default::default()
        })
        .collect()
}

/// Implements a CRI trait for a fake with a `seen: Arc<Seen>` field ([`Fake`]
/// unless named): the listed methods answer `Unimplemented`, the items after
/// the list are real.
macro_rules! fake_service {
    (
        impl $service:ident {
            $($rest:tt)*
        }
    ) => {
        fake_service! { impl $service for Fake { $($rest)* } }
    };
    (
        impl $service:ident for $fake:ty {
            unimplemented { $( $method:ident($req:ident) -> $resp:ident; )* }
            $($custom:tt)*
        }
    ) => {
        #[tonic::async_trait]
        impl $service for $fake {
            $(
                async fn $method(
                    &self,
                    request: Request<cri::$req>,
                ) -> Result<Response<cri::$resp>, Status> {
                    self.seen.record(&request);
                    Err(Status::unimplemented(concat!("fake upstream: ", stringify!($method))))
                }
            )*
            $($custom)*
        }
    };
}

type EventStream =
    Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send + 'static>>;

pub mod pods;
pub mod scripted;
pub mod slots;

fake_service! {
    impl RuntimeService {
        unimplemented {
            stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse;
            remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse;
            pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse;
            create_container(CreateContainerRequest) -> CreateContainerResponse;
            start_container(StartContainerRequest) -> StartContainerResponse;
            stop_container(StopContainerRequest) -> StopContainerResponse;
            remove_container(RemoveContainerRequest) -> RemoveContainerResponse;
            update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse;
            reopen_container_log(ReopenContainerLogRequest) -> ReopenContainerLogResponse;
            exec_sync(ExecSyncRequest) -> ExecSyncResponse;
            attach(AttachRequest) -> AttachResponse;
            port_forward(PortForwardRequest) -> PortForwardResponse;
            container_stats(ContainerStatsRequest) -> ContainerStatsResponse;
            list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse;
            pod_sandbox_stats(PodSandboxStatsRequest) -> PodSandboxStatsResponse;
            list_pod_sandbox_stats(ListPodSandboxStatsRequest) -> ListPodSandboxStatsResponse;
            update_runtime_config(UpdateRuntimeConfigRequest) -> UpdateRuntimeConfigResponse;
            status(StatusRequest) -> StatusResponse;
            checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse;
            list_metric_descriptors(ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse;
            list_pod_sandbox_metrics(ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse;
            runtime_config(RuntimeConfigRequest) -> RuntimeConfigResponse;
        }

        async fn version(
            &self,
            request: Request<cri::VersionRequest>,
        ) -> Result<Response<cri::VersionResponse>, Status> {
            self.seen.record(&request);
            let mut response = Response::new(version_response(&request.get_ref().version));
            response
                .metadata_mut()
                .insert("x-fake-upstream", "yes".parse().expect("ascii"));
            Ok(response)
        }

        async fn run_pod_sandbox(
            &self,
            request: Request<cri::RunPodSandboxRequest>,
        ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
            self.seen.record(&request);
            let name = request
                .get_ref()
                .config
                .as_ref()
                .and_then(|c| c.metadata.as_ref())
                .map(|m| m.name.clone())
                .ok_or_else(|| Status::invalid_argument("sandbox config metadata is required"))?;
            Ok(Response::new(cri::RunPodSandboxResponse {
                pod_sandbox_id: format!("sb-{name}"),
            }))
        }

        async fn list_pod_sandbox(
            &self,
            request: Request<cri::ListPodSandboxRequest>,
        ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
            self.seen.record(&request);
            Ok(Response::new(cri::ListPodSandboxResponse { items: sandboxes() }))
        }

        async fn list_containers(
            &self,
            request: Request<cri::ListContainersRequest>,
        ) -> Result<Response<cri::ListContainersResponse>, Status> {
            self.seen.record(&request);
            let big = request.get_ref().filter.as_ref().is_some_and(|f| f.id == BIG_LIST);
            let containers = if big { big_container_list() } else { Vec::new() };
            Ok(Response::new(cri::ListContainersResponse { containers }))
        }

        async fn container_status(
            &self,
            request: Request<cri::ContainerStatusRequest>,
        ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
            self.seen.record(&request);
            let id = request.get_ref().container_id.clone();
            match id.as_str() {
                "" => Err(Status::invalid_argument("container id must not be empty")),
                "missing" => {
                    let mut metadata = MetadataMap::new();
                    metadata.insert("x-fake-reason", "gone".parse().expect("ascii"));
                    Err(Status::with_details_and_metadata(
                        tonic::Code::NotFound,
                        "an error occurred when try to find container \"missing\": not found",
                        NOT_FOUND_DETAILS.to_vec().into(),
                        metadata,
                    ))
                }
                HANG => std::future::pending().await,
                _ => Ok(Response::new(cri::ContainerStatusResponse {
                    status: Some(cri::ContainerStatus {
                        id,
                        state: cri::ContainerState::ContainerRunning as i32,
                        ..Default::default()
                    }),
                    info: HashMap::from([("pid".into(), "4242".into())]),
                })),
            }
        }

        async fn exec(
            &self,
            request: Request<cri::ExecRequest>,
        ) -> Result<Response<cri::ExecResponse>, Status> {
            self.seen.record(&request);
            Ok(Response::new(cri::ExecResponse {
                url: format!("http://127.0.0.1:10010/exec/{}", request.get_ref().container_id),
            }))
        }

        type GetContainerEventsStream = EventStream;

        async fn get_container_events(
            &self,
            request: Request<cri::GetEventsRequest>,
        ) -> Result<Response<EventStream>, Status> {
            self.seen.record(&request);
            let hold_open = request.metadata().get(HOLD_OPEN).is_some();
            let sent = futures::stream::iter(events().into_iter().map(Ok));
            let stream: EventStream = if hold_open {
                Box::pin(futures::StreamExt::chain(sent, futures::stream::pending()))
            } else {
                Box::pin(sent)
            };
            Ok(Response::new(stream))
        }
    }
}

fake_service! {
    impl ImageService {
        unimplemented {
            image_status(ImageStatusRequest) -> ImageStatusResponse;
            pull_image(PullImageRequest) -> PullImageResponse;
            remove_image(RemoveImageRequest) -> RemoveImageResponse;
            image_fs_info(ImageFsInfoRequest) -> ImageFsInfoResponse;
        }

        async fn list_images(
            &self,
            request: Request<cri::ListImagesRequest>,
        ) -> Result<Response<cri::ListImagesResponse>, Status> {
            self.seen.record(&request);
            Ok(Response::new(cri::ListImagesResponse {
                images: vec![cri::Image {
                    id: "sha256:abc".into(),
                    repo_tags: vec!["127.0.0.1:5000/busybox:latest".into()],
                    size: 1234,
                    ..Default::default()
                }],
            }))
        }
    }
}

/// A server on a unix socket, stopped gracefully by [`Served::stop`].
#[derive(Debug)]
pub struct Served {
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<()>,
}

impl Served {
    pub fn new(stop: oneshot::Sender<()>, join: JoinHandle<()>) -> Self {
        Served {
            stop: Some(stop),
            join,
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.join)
            .await
            .expect("server stops within 10 s")
            .expect("server task");
    }
}

fn listen(path: &Path) -> UnixListenerStream {
    // A previous instance leaves its socket file behind.
    let _ = std::fs::remove_file(path);
    UnixListenerStream::new(UnixListener::bind(path).expect("bind fake upstream"))
}

/// Serves `fake` as upstream CRI on `path`.
pub fn start_fake(path: &Path, fake: Fake) -> Served {
    let incoming = listen(path);
    let (stop, stopped) = oneshot::channel::<()>();
    let join = tokio::spawn(async move {
        Server::builder()
            .add_service(
                RuntimeServiceServer::new(fake.clone()).max_decoding_message_size(MAX_MESSAGE_SIZE),
            )
            .add_service(ImageServiceServer::new(fake))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .expect("fake upstream serves");
    });
    Served {
        stop: Some(stop),
        join,
    }
}

/// Serves a broken upstream on `path`: `Version` answers bytes that are not a
/// protobuf message, `ContainerStatus` answers a status whose details are not
/// base64, `Status` answers correctly (an empty message).
pub fn start_broken_upstream(path: &Path) -> Served {
    let incoming = listen(path);
    let (stop, stopped) = oneshot::channel::<()>();
    let join = tokio::spawn(async move {
        Server::builder()
            .add_service(BrokenRuntime)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .expect("broken upstream serves");
    });
    Served {
        stop: Some(stop),
        join,
    }
}

#[derive(Debug, Clone)]
struct BrokenRuntime;

impl NamedService for BrokenRuntime {
    const NAME: &'static str = "runtime.v1.RuntimeService";
}

impl tower::Service<http::Request<Body>> for BrokenRuntime {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(async move {
            let reply = |bytes: &'static [u8]| {
                tower::service_fn(move |_: Request<Vec<u8>>| async move {
                    Ok::<_, Status>(Response::new(bytes.to_vec()))
                })
            };
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(match request.uri().path() {
                "/runtime.v1.RuntimeService/Version" => {
                    grpc.unary(reply(b"\xff\xff\xff\xff"), request).await
                }
                "/runtime.v1.RuntimeService/Status" => grpc.unary(reply(b""), request).await,
                _ => http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "5")
                    .header("grpc-message", "broken")
                    .header("grpc-status-details-bin", "!!! not base64 !!!")
                    .body(Body::default())
                    .expect("response"),
            })
        })
    }
}

/// A codec that sends and receives message bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug)]
pub struct RawEncoder;

#[derive(Debug)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// Sends `payload` as the message of `path` over `channel`, bypassing protobuf.
pub async fn raw_call(
    channel: Channel,
    path: &'static str,
    payload: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(Request::new(payload), path, RawCodec)
        .await
        .map(Response::into_inner)
}

/// Dials a unix socket for [`plain_runtime_client`].
#[derive(Debug, Clone)]
pub struct UnixConnector(PathBuf);

impl tower::Service<http::Uri> for UnixConnector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) })
    }
}

pub type PlainClient = RuntimeServiceClient<LegacyClient<UnixConnector, Body>>;

/// A CRI client over plain hyper. tonic's channel enforces `grpc-timeout`
/// itself (answering `Cancelled` locally), which would hide the shim's own
/// answer at a deadline; this one just waits for the server.
pub fn plain_runtime_client(socket: &Path) -> PlainClient {
    let client = LegacyClient::builder(TokioExecutor::new())
        .http2_only(true)
        .build(UnixConnector(socket.to_owned()));
    RuntimeServiceClient::with_origin(client, http::Uri::from_static("http://localhost"))
}

/// One unary call over plain hyper, `message` framed as gRPC: the answer's
/// head and body as received, nothing interpreted.
pub async fn plain_http_call(
    socket: &Path,
    path: &str,
    message: &impl prost::Message,
) -> (http::response::Parts, bytes::Bytes) {
    use http_body_util::BodyExt as _;
    let client: LegacyClient<UnixConnector, http_body_util::Full<bytes::Bytes>> =
        LegacyClient::builder(TokioExecutor::new())
            .http2_only(true)
            .build(UnixConnector(socket.to_owned()));
    let encoded = message.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(encoded.len()).expect("small").to_be_bytes());
    body.extend_from_slice(&encoded);
    let request = http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("request");
    let response = client.request(request).await.expect("an HTTP answer");
    let (head, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (head, body)
}

/// Upstream settings for tests: short timeouts, everything else default.
pub fn upstream_config(endpoint: &Path) -> UpstreamConfig {
    UpstreamConfig {
        endpoint: format!("unix://{}", endpoint.display()),
        call_timeout: Duration::from_secs(5),
        pull_image_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
    }
}

/// A shim served in-process with [`serve`].
#[derive(Debug)]
pub struct ShimUnderTest {
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<Result<(), ShimError>>,
}

impl ShimUnderTest {
    /// Serves a shim for `cfg` on `socket` and waits until it answers.
    pub async fn start(cfg: &UpstreamConfig, socket: PathBuf) -> Self {
        Self::start_shim(cfg, socket, Shim::new).await
    }

    /// Serves the shim `make` builds on the upstream of `cfg`.
    pub async fn start_shim(
        cfg: &UpstreamConfig,
        socket: PathBuf,
        make: impl FnOnce(Upstream) -> Shim,
    ) -> Self {
        let upstream = Upstream::connect_lazy(cfg).expect("upstream config");
        let shim = make(upstream);
        let (stop, stopped) = oneshot::channel::<()>();
        let socket_cfg = SocketConfig {
            path: socket.clone(),
            group: None,
        };
        let join = tokio::spawn(async move {
            serve(shim, &socket_cfg, async {
                let _ = stopped.await;
            })
            .await
        });
        let probe = socket.clone();
        wait_for("the shim's socket", Duration::from_secs(5), || {
            let probe = probe.clone();
            async move { tokio::net::UnixStream::connect(&probe).await.ok() }
        })
        .await;
        ShimUnderTest {
            socket,
            stop: Some(stop),
            join,
        }
    }

    pub fn channel(&self) -> Channel {
        cri_channel(&self.socket.display().to_string()).expect("shim endpoint")
    }

    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel()).max_decoding_message_size(MAX_MESSAGE_SIZE)
    }

    pub fn image(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel())
    }

    pub fn is_serving(&self) -> bool {
        !self.join.is_finished()
    }

    /// Requests shutdown and returns what `serve` returned.
    pub async fn stop(mut self) -> Result<(), ShimError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.join)
            .await
            .expect("shim stops within 5 s")
            .expect("shim task")
    }
}

/// A fake upstream and a shim in front of it, in one temporary directory.
#[derive(Debug)]
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub fake: Fake,
    pub upstream: Option<Served>,
    pub shim: ShimUnderTest,
}

impl Rig {
    pub fn upstream_path(&self) -> PathBuf {
        self.dir.path().join("upstream.sock")
    }

    pub async fn start() -> Self {
        Self::start_with(|cfg| cfg).await
    }

    pub async fn start_with(adjust: impl FnOnce(UpstreamConfig) -> UpstreamConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream_path = dir.path().join("upstream.sock");
        let fake = Fake::default();
        let upstream = start_fake(&upstream_path, fake.clone());
        let cfg = adjust(upstream_config(&upstream_path));
        let shim = ShimUnderTest::start(&cfg, dir.path().join("shim.sock")).await;
        Rig {
            dir,
            fake,
            upstream: Some(upstream),
            shim,
        }
    }

    /// A client talking to the fake directly, for comparisons.
    pub fn direct(&self) -> RuntimeServiceClient<Channel> {
        let endpoint = self.upstream_path().display().to_string();
        RuntimeServiceClient::new(cri_channel(&endpoint).expect("endpoint"))
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
    }
}
