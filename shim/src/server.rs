//! The CRI server: `RuntimeService` and `ImageService` on the shim's socket.
//!
//! Every RPC is forwarded to upstream through [`Upstream::forward`]. Plain
//! pass-through calls are generated from the tables below; calls the shim
//! will intercept or rewrite are written out (or grouped) so that work has an
//! obvious home.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use fast_sandbox_proto::cri::{
    self,
    image_service_server::{ImageService, ImageServiceServer},
    runtime_service_server::{RuntimeService, RuntimeServiceServer},
};
use futures::{Stream, StreamExt};
use tokio::{sync::watch, time::Instant};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{transport::Server, Request, Response, Status};
use tracing::Instrument;

use crate::{
    deadline::CallerDeadlineLayer,
    error::ShimError,
    request::cri_span,
    socket::{self, SocketConfig},
    upstream::{pass_status, Upstream, MAX_MESSAGE_SIZE},
};

/// Server-side HTTP/2 keepalive towards kubelet: reaps connections of a
/// wedged client holding long-lived streams. kubelet's gRPC-Go client does not
/// police pings, so this may be more frequent than the upstream side.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2 * 60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// After shutdown is requested, how long in-flight calls may finish before
/// [`serve`] returns anyway (an image pull can take far longer).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The CRI service: forwards to [`Upstream`], and is where warm-sandbox
/// interception and list/status rewriting will plug in (through a slot source
/// held here next to `upstream`).
#[derive(Debug)]
pub struct Shim {
    upstream: Upstream,
    /// Set on shutdown; ends long-lived streams so the server can drain.
    stopping: watch::Sender<bool>,
}

impl Shim {
    pub fn new(upstream: Upstream) -> Self {
        Shim {
            upstream,
            stopping: watch::Sender::new(false),
        }
    }
}

/// Serves CRI on `socket` until `shutdown` completes, then stops accepting,
/// ends event streams, lets in-flight calls finish (bounded) and removes the
/// socket file.
pub async fn serve(
    shim: Shim,
    socket: &SocketConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ShimError> {
    let (listener, _socket_guard) = socket::bind(socket).await?;
    tracing::info!(path = %socket.path.display(), "serving CRI");

    let shim = Arc::new(shim);
    let runtime = RuntimeServiceServer::from_arc(Arc::clone(&shim))
        .max_decoding_message_size(MAX_MESSAGE_SIZE);
    let image =
        ImageServiceServer::from_arc(Arc::clone(&shim)).max_decoding_message_size(MAX_MESSAGE_SIZE);

    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let stopping = Arc::clone(&shim);
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down the CRI server");
        stopping.stopping.send_replace(true);
        let _ = draining_tx.send(());
    };

    let server = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(CallerDeadlineLayer)
        .add_service(runtime)
        .add_service(image)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal);
    let drain_expired = async {
        match draining_rx.await {
            Ok(()) => tokio::time::sleep(DRAIN_TIMEOUT).await,
            // The signal never fired: the server ended on its own.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        result = server => result.map_err(ShimError::Serve),
        () = drain_expired => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "CRI calls still in flight at shutdown; abandoning them");
            Ok(())
        }
    }
}

fn elapsed_us(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Forwards one call inside its `cri` span and logs the outcome at the
/// call's level.
macro_rules! forward {
    ($self:ident, $client:ident, $level:ident, $name:literal, $method:ident, $request:ident) => {{
        let span = cri_span!($level, $name, $request.get_ref());
        let upstream = &$self.upstream;
        let mut client = upstream.$client();
        async move {
            let started = Instant::now();
            let result = upstream
                .forward($name, $request, |r| async move { client.$method(r).await })
                .await;
            match &result {
                Ok(_) => ::tracing::event!(
                    ::tracing::Level::$level,
                    elapsed_us = elapsed_us(started),
                    "ok"
                ),
                Err(status) => ::tracing::event!(
                    ::tracing::Level::$level,
                    elapsed_us = elapsed_us(started),
                    code = ?status.code(),
                    message = status.message(),
                    "failed"
                ),
            }
            result
        }
        .instrument(span)
        .await
    }};
}

/// Implements a CRI service trait: one forwarding method per table row, plus
/// the hand-written items that follow the table.
///
/// Row: `LEVEL "GrpcName" method(Request) -> Response;` where LEVEL is the
/// tracing level of the call's span: DEBUG for calls kubelet makes every
/// second or so (relist, status, stats, probes), INFO for the rest.
macro_rules! cri_service {
    (
        impl $service:ident via $client:ident {
            $( $level:ident $name:literal $method:ident($req:ident) -> $resp:ident; )*
        }
        $($custom:tt)*
    ) => {
        #[tonic::async_trait]
        impl $service for Shim {
            $(
                async fn $method(
                    &self,
                    request: Request<cri::$req>,
                ) -> Result<Response<cri::$resp>, Status> {
                    forward!(self, $client, $level, $name, $method, request)
                }
            )*
            $($custom)*
        }
    };
}

/// The container event stream handed to the caller.
type EventStream =
    Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send + 'static>>;

cri_service! {
    impl RuntimeService via runtime {
        DEBUG "Version" version(VersionRequest) -> VersionResponse;
        INFO "StopPodSandbox" stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse;
        INFO "RemovePodSandbox" remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse;
        INFO "CreateContainer" create_container(CreateContainerRequest) -> CreateContainerResponse;
        INFO "StartContainer" start_container(StartContainerRequest) -> StartContainerResponse;
        INFO "StopContainer" stop_container(StopContainerRequest) -> StopContainerResponse;
        INFO "RemoveContainer" remove_container(RemoveContainerRequest) -> RemoveContainerResponse;
        INFO "UpdateContainerResources" update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse;
        INFO "ReopenContainerLog" reopen_container_log(ReopenContainerLogRequest) -> ReopenContainerLogResponse;
        DEBUG "ExecSync" exec_sync(ExecSyncRequest) -> ExecSyncResponse;
        // Streaming URLs are upstream's, returned unchanged: the caller
        // talks to containerd's streaming server directly.
        INFO "Exec" exec(ExecRequest) -> ExecResponse;
        INFO "Attach" attach(AttachRequest) -> AttachResponse;
        INFO "PortForward" port_forward(PortForwardRequest) -> PortForwardResponse;
        INFO "UpdateRuntimeConfig" update_runtime_config(UpdateRuntimeConfigRequest) -> UpdateRuntimeConfigResponse;
        DEBUG "Status" status(StatusRequest) -> StatusResponse;
        INFO "CheckpointContainer" checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse;
        DEBUG "ListMetricDescriptors" list_metric_descriptors(ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse;
        DEBUG "RuntimeConfig" runtime_config(RuntimeConfigRequest) -> RuntimeConfigResponse;

        // Forwarded unchanged for now. Once slots exist these hide unclaimed
        // slots and report claimed ones with the pod's own metadata
        // (rewrite.rs); they move out of this table then.
        DEBUG "PodSandboxStatus" pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse;
        DEBUG "ListPodSandbox" list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse;
        DEBUG "ListContainers" list_containers(ListContainersRequest) -> ListContainersResponse;
        DEBUG "ContainerStatus" container_status(ContainerStatusRequest) -> ContainerStatusResponse;
        DEBUG "ContainerStats" container_stats(ContainerStatsRequest) -> ContainerStatsResponse;
        DEBUG "ListContainerStats" list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse;
        DEBUG "PodSandboxStats" pod_sandbox_stats(PodSandboxStatsRequest) -> PodSandboxStatsResponse;
        DEBUG "ListPodSandboxStats" list_pod_sandbox_stats(ListPodSandboxStatsRequest) -> ListPodSandboxStatsResponse;
        DEBUG "ListPodSandboxMetrics" list_pod_sandbox_metrics(ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse;
    }

    /// The claim point: a warm handler will be served from a pre-created
    /// slot here (intercept.rs). Until then, the cold path for everyone.
    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        forward!(self, runtime, INFO, "RunPodSandbox", run_pod_sandbox, request)
    }

    type GetContainerEventsStream = EventStream;

    /// Server-streaming: upstream's stream is relayed item by item (upstream
    /// errors unchanged) until either side ends it or the shim shuts down.
    async fn get_container_events(
        &self,
        request: Request<cri::GetEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let response =
            forward!(self, runtime, INFO, "GetContainerEvents", get_container_events, request)?;
        let mut stopping = self.stopping.subscribe();
        let stopped = async move {
            // Err: the shim is gone, which also means stop.
            let _ = stopping.wait_for(|stopping| *stopping).await;
        };
        Ok(response.map(|events| {
            events
                .map(|item| item.map_err(pass_status))
                .take_until(stopped)
                .boxed()
        }))
    }
}

cri_service! {
    impl ImageService via image {
        DEBUG "ListImages" list_images(ListImagesRequest) -> ListImagesResponse;
        DEBUG "ImageStatus" image_status(ImageStatusRequest) -> ImageStatusResponse;
        INFO "PullImage" pull_image(PullImageRequest) -> PullImageResponse;
        INFO "RemoveImage" remove_image(RemoveImageRequest) -> RemoveImageResponse;
        DEBUG "ImageFsInfo" image_fs_info(ImageFsInfoRequest) -> ImageFsInfoResponse;
    }
}
