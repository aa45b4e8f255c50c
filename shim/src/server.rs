//! The CRI server: `RuntimeService` and `ImageService` on the shim's socket.
//!
//! Every RPC is forwarded to upstream through [`Upstream::forward`]. Plain
//! pass-through calls are generated from the tables below; the calls the
//! shim intercepts (`RunPodSandbox`, the claim point: intercept.rs), guards
//! (calls that name a sandbox by id: an unclaimed slot is refused as
//! containerd refuses an unknown id) or rewrites (sandbox list, status,
//! stats and events: rewrite.rs) are written out after them.
//!
//! Guarded calls resolve the id they name without upstream when it is a
//! full containerd id (kubelet only ever sends those): the slot source knows
//! every slot it made by id. Only a shorter id (a prefix, as crictl users
//! type) costs one upstream `PodSandboxStatus` to learn which sandbox it
//! names. Calls that carry a container id need nothing: a slot's pause is
//! not a CRI container, so upstream answers them as for an unknown id.

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc, time::Duration};

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
    authority::Normalized,
    deadline::{CallerDeadline, CallerDeadlineLayer},
    error::ShimError,
    intercept::make_cold,
    request::cri_span,
    rewrite,
    slots::{Claim, HandlerMap, MissReason, NoSlot, PoolKey, SlotSource, SlotView},
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

/// The CRI service: forwards to [`Upstream`]; with slots, serves warm
/// handlers from a [`SlotSource`] and keeps its slots out of sight.
#[derive(Debug)]
pub struct Shim {
    upstream: Upstream,
    slots: Option<Arc<Slots>>,
    /// Set on shutdown; ends long-lived streams so the server can drain.
    stopping: watch::Sender<bool>,
}

/// The warm handlers and where their slots come from.
#[derive(Debug)]
pub(crate) struct Slots {
    pub(crate) handlers: HandlerMap,
    pub(crate) source: Arc<dyn SlotSource>,
}

/// What a call that names a sandbox by id is about.
#[derive(Debug, PartialEq, Eq)]
enum Named {
    /// An unclaimed slot: answered as containerd answers an unknown id.
    Unclaimed,
    /// Anything else: forwarded. `Some` holds the full id a prefix named.
    Visible(Option<String>),
}

/// Whether `id` is a whole containerd sandbox id (64 lowercase hex digits,
/// containerd's `GenerateID`), so no other id can start with it: it names
/// that sandbox or none.
fn is_full_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Shim {
    /// `ListPodSandboxStats` with a label selector, through slots: see
    /// `list_pod_sandbox_stats`.
    async fn selected_sandbox_stats(
        &self,
        slots: &Slots,
        mut request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let started = Instant::now();
        let metadata = request.metadata().clone();
        let filter = request.get_mut().filter.take().unwrap_or_default();
        // Sub-requests carry the caller's metadata, and so its deadline.
        fn sub<T>(metadata: &tonic::metadata::MetadataMap, msg: T) -> Request<T> {
            Request::from_parts(metadata.clone(), tonic::Extensions::new(), msg)
        }
        let mut client = self.upstream.runtime();
        let list = sub(
            &metadata,
            cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    id: filter.id,
                    // Filtered stats skip sandboxes that are not ready.
                    state: Some(cri::PodSandboxStateValue {
                        state: cri::PodSandboxState::SandboxReady as i32,
                    }),
                    label_selector: HashMap::new(),
                }),
            },
        );
        let mut items = self
            .upstream
            .forward("ListPodSandbox", list, |r| async move {
                client.list_pod_sandbox(r).await
            })
            .await?
            .into_inner()
            .items;
        rewrite::list_pod_sandbox(slots, &mut items, &filter.label_selector);
        let mut stats = Vec::with_capacity(items.len());
        for item in items {
            let mut client = self.upstream.runtime();
            let one = sub(
                &metadata,
                cri::ListPodSandboxStatsRequest {
                    filter: Some(cri::PodSandboxStatsFilter {
                        id: item.id,
                        label_selector: HashMap::new(),
                    }),
                },
            );
            match self
                .upstream
                .forward("ListPodSandboxStats", one, |r| async move {
                    client.list_pod_sandbox_stats(r).await
                })
                .await
            {
                Ok(r) => stats.extend(r.into_inner().stats),
                // Removed since it was listed: as if listed a moment later.
                Err(status) if status.code() == tonic::Code::NotFound => {}
                Err(status) => return Err(status),
            }
        }
        rewrite::list_pod_sandbox_stats(slots, &mut stats, &HashMap::new());
        tracing::debug!(
            elapsed_us = elapsed_us(started),
            selected = stats.len(),
            "ok"
        );
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }
    /// A plain forwarding shim: no warm handlers, every call unchanged.
    pub fn new(upstream: Upstream) -> Self {
        Shim {
            upstream,
            slots: None,
            stopping: watch::Sender::new(false),
        }
    }

    /// A shim serving the exposed handlers of `handlers` from `slots`.
    pub fn with_slots(
        upstream: Upstream,
        handlers: HandlerMap,
        slots: Arc<dyn SlotSource>,
    ) -> Self {
        Shim {
            slots: Some(Arc::new(Slots {
                handlers,
                source: slots,
            })),
            ..Shim::new(upstream)
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
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener).map(|accepted| accepted.map(Normalized::new)),
            signal,
        );
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

/// Forwards one call and logs the outcome at the call's level, in the
/// current span.
macro_rules! forward_in_span {
    ($self:ident, $client:ident, $level:ident, $name:literal, $method:ident, $request:ident) => {{
        let upstream = &$self.upstream;
        let mut client = upstream.$client();
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
    }};
}

/// Forwards one call inside its `cri` span and logs the outcome at the
/// call's level.
macro_rules! forward {
    ($self:ident, $client:ident, $level:ident, $name:literal, $method:ident, $request:ident) => {{
        let span = cri_span!($level, $name, $request.get_ref());
        async move { forward_in_span!($self, $client, $level, $name, $method, $request) }
            .instrument(span)
            .await
    }};
}

/// A sandbox answer rewritten for slots (rewrite.rs): `$prepare` may edit
/// the request before it is forwarded and returns what `$rewrite` needs
/// afterwards; `$rewrite` edits the answer or turns it into an error.
/// Without slots, the call is forwarded unchanged.
macro_rules! rewritten {
    (
        $self:ident, $level:ident, $name:literal, $method:ident, $request:ident,
        |$req:ident| $prepare:expr,
        |$slots:ident, $response:ident, $state:ident| $rewrite:expr
    ) => {{
        let Some(slots) = &$self.slots else {
            return forward!($self, runtime, $level, $name, $method, $request);
        };
        let span = cri_span!($level, $name, $request.get_ref());
        async move {
            let $state = {
                let $req = $request.get_mut();
                $prepare
            };
            let mut response =
                forward_in_span!($self, runtime, $level, $name, $method, $request)?;
            let $slots: &Slots = slots;
            let $response = response.get_mut();
            match $rewrite {
                Ok(()) => Ok(response),
                Err(err) => {
                    let status = Status::from(err);
                    ::tracing::event!(
                        ::tracing::Level::$level,
                        code = ?status.code(),
                        "hidden: an unclaimed slot"
                    );
                    Err(status)
                }
            }
        }
        .instrument(span)
        .await
    }};
}

/// A call that names a sandbox by id (`$id`, read from the request `$req`):
/// when it names an unclaimed slot, answered with `$hidden` (given the id as
/// requested: what containerd answers for an unknown id) and not forwarded;
/// otherwise forwarded. Without slots, forwarded unchanged.
macro_rules! guarded {
    (
        $self:ident, $level:ident, $name:literal, $method:ident, $request:ident,
        |$req:ident| $id:expr,
        |$requested:ident| $hidden:expr
    ) => {{
        let Some(slots) = &$self.slots else {
            return forward!($self, runtime, $level, $name, $method, $request);
        };
        let span = cri_span!($level, $name, $request.get_ref());
        async move {
            let hidden = {
                let $req = $request.get_ref();
                let $requested: &str = $id;
                match $self.named(slots, &$request, $requested).await {
                    Named::Unclaimed => Some($hidden),
                    Named::Visible(_) => None,
                }
            };
            if let Some(answer) = hidden {
                ::tracing::event!(
                    ::tracing::Level::$level,
                    "names an unclaimed slot: answered as for an unknown sandbox"
                );
                return answer;
            }
            forward_in_span!($self, runtime, $level, $name, $method, $request)
        }
        .instrument(span)
        .await
    }};
}

impl Shim {
    /// What sandbox `id` names, for a call that names one (`request` gives
    /// the caller's deadline). A full id is resolved by the slot source
    /// alone; a prefix by one upstream `PodSandboxStatus`, whose full id and
    /// labels the slot source then judges. An id upstream does not resolve
    /// (unknown, ambiguous, empty) is `Visible`: upstream answers the call
    /// itself.
    async fn named<T>(&self, slots: &Slots, request: &Request<T>, id: &str) -> Named {
        if id.is_empty() {
            return Named::Visible(None);
        }
        match slots.source.view(id, &HashMap::new()) {
            SlotView::Unclaimed => return Named::Unclaimed,
            SlotView::Claimed(_) => return Named::Visible(None),
            SlotView::NotASlot if is_full_id(id) => return Named::Visible(None),
            SlotView::NotASlot => {}
        }
        let mut lookup = Request::new(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: false,
        });
        if let Some(deadline) = request.extensions().get::<CallerDeadline>() {
            lookup.extensions_mut().insert(*deadline);
        }
        let mut client = self.upstream.runtime();
        let found = self
            .upstream
            .forward("PodSandboxStatus", lookup, |r| async move {
                client.pod_sandbox_status(r).await
            })
            .await;
        match found.map(|r| r.into_inner().status) {
            Ok(Some(status)) => match slots.source.view(&status.id, &status.labels) {
                SlotView::Unclaimed => Named::Unclaimed,
                SlotView::NotASlot | SlotView::Claimed(_) => Named::Visible(Some(status.id)),
            },
            Ok(None) => Named::Visible(None),
            Err(status) => {
                tracing::debug!(
                    code = ?status.code(),
                    message = status.message(),
                    "sandbox id prefix not resolved; forwarding the call as is"
                );
                Named::Visible(None)
            }
        }
    }

    /// The claim decision for a `RunPodSandbox` of an exposed handler: the
    /// slot's sandbox id, or why the pod starts cold.
    async fn claim(&self, slots: &Slots, request: &cri::RunPodSandboxRequest) -> Option<String> {
        let started = Instant::now();
        let handler = request.runtime_handler.as_str();
        let claim = match Claim::from_request(request, &slots.handlers) {
            Ok(claim) => claim,
            Err(ineligible) => {
                let reason = ineligible.reason();
                tracing::info!(%reason, cause = %ineligible, "warm miss: not eligible, starting cold");
                slots.source.missed(handler, None, reason);
                return None;
            }
        };
        let miss = |key: &PoolKey, reason: MissReason| {
            slots.source.missed(handler, Some(key), reason);
        };
        match slots.source.claim(&claim).await {
            Ok(Ok(slot)) => {
                tracing::Span::current().record("pod_sandbox_id", slot.sandbox_id.as_str());
                tracing::info!(
                    pool = %claim.key,
                    elapsed_us = elapsed_us(started),
                    "warm hit"
                );
                Some(slot.sandbox_id)
            }
            Ok(Err(no_slot)) => {
                let reason = match no_slot {
                    NoSlot::NoPool => MissReason::NoPool,
                    NoSlot::PoolEmpty => MissReason::PoolEmpty,
                };
                tracing::info!(
                    %reason,
                    pool = %claim.key,
                    elapsed_us = elapsed_us(started),
                    "warm miss: starting cold"
                );
                miss(&claim.key, reason);
                None
            }
            Err(failed) => {
                tracing::warn!(
                    reason = %MissReason::ClaimFailed,
                    pool = %claim.key,
                    error = %failed,
                    elapsed_us = elapsed_us(started),
                    "warm miss: claim failed, starting cold"
                );
                miss(&claim.key, MissReason::ClaimFailed);
                None
            }
        }
    }
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
        INFO "UpdateRuntimeConfig" update_runtime_config(UpdateRuntimeConfigRequest) -> UpdateRuntimeConfigResponse;
        DEBUG "Status" status(StatusRequest) -> StatusResponse;
        INFO "CheckpointContainer" checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse;
        DEBUG "ListMetricDescriptors" list_metric_descriptors(ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse;
        DEBUG "RuntimeConfig" runtime_config(RuntimeConfigRequest) -> RuntimeConfigResponse;

        // Containers carry their own config, labels and annotations, and
        // a slot has no containers before its claim: nothing to rewrite.
        DEBUG "ContainerStatus" container_status(ContainerStatusRequest) -> ContainerStatusResponse;
        DEBUG "ContainerStats" container_stats(ContainerStatsRequest) -> ContainerStatsResponse;
        // containerd 1.6 does not implement it (Unimplemented). One that
        // does would report unclaimed slots here: hide them when moving on.
        DEBUG "ListPodSandboxMetrics" list_pod_sandbox_metrics(ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse;
    }

    /// The claim point: an exposed handler with an eligible pod is served
    /// from a free slot; anything else for an exposed handler goes cold with
    /// the handler rewritten to its upstream name and the exposed one kept
    /// in a reserved label, so answers about it report what kubelet asked
    /// for ([`make_cold`]; a miss is never an error the cold path would not
    /// give); other handlers are forwarded untouched.
    ///
    /// The claim runs within the caller's deadline: if kubelet gives up,
    /// the claim future is dropped (the slot source must be cancel-safe).
    async fn run_pod_sandbox(
        &self,
        mut request: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let span = cri_span!(INFO, "RunPodSandbox", request.get_ref());
        async move {
            if let Some(slots) = &self.slots {
                let handler = request.get_ref().runtime_handler.as_str();
                match slots.handlers.upstream_for(handler) {
                    Some(upstream_handler) => {
                        if let Some(pod_sandbox_id) = self.claim(slots, request.get_ref()).await {
                            return Ok(Response::new(cri::RunPodSandboxResponse {
                                pod_sandbox_id,
                            }));
                        }
                        let exposed = handler.to_owned();
                        make_cold(request.get_mut(), &exposed, upstream_handler);
                    }
                    None => slots.source.missed(handler, None, MissReason::NotFastHandler),
                }
            }
            forward_in_span!(self, runtime, INFO, "RunPodSandbox", run_pod_sandbox, request)
        }
        .instrument(span)
        .await
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let Some(slots) = &self.slots else {
            return forward!(self, runtime, INFO, "StopPodSandbox", stop_pod_sandbox, request);
        };
        let span = cri_span!(INFO, "StopPodSandbox", request.get_ref());
        async move {
            let requested = request.get_ref().pod_sandbox_id.clone();
            match self.named(slots, &request, &requested).await {
                Named::Unclaimed => {
                    tracing::info!("names an unclaimed slot: answered as for an unknown sandbox");
                    return Err(ShimError::HiddenSandboxStop {
                        requested_id: requested,
                    }
                    .into());
                }
                Named::Visible(full_id) => {
                    let id = full_id.unwrap_or(requested);
                    if matches!(
                        slots.source.view(&id, &HashMap::new()),
                        SlotView::Claimed(_)
                    ) {
                        slots.source.stopping(&id).await;
                    }
                }
            }
            forward_in_span!(self, runtime, INFO, "StopPodSandbox", stop_pod_sandbox, request)
        }
        .instrument(span)
        .await
    }

    /// Forwarded; once upstream removed the sandbox, the slot source
    /// forgets it (by its full id, also when a prefix named it). An
    /// unclaimed slot is not removed: containerd answers success for an
    /// unknown id, and so does the shim, without forwarding.
    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let Some(slots) = &self.slots else {
            return forward!(self, runtime, INFO, "RemovePodSandbox", remove_pod_sandbox, request);
        };
        let span = cri_span!(INFO, "RemovePodSandbox", request.get_ref());
        async move {
            let requested = request.get_ref().pod_sandbox_id.clone();
            let id = match self.named(slots, &request, &requested).await {
                Named::Unclaimed => {
                    tracing::info!("names an unclaimed slot: answered as for an unknown sandbox");
                    return Ok(Response::new(cri::RemovePodSandboxResponse {}));
                }
                Named::Visible(full_id) => full_id.unwrap_or(requested),
            };
            let response =
                forward_in_span!(self, runtime, INFO, "RemovePodSandbox", remove_pod_sandbox, request)?;
            slots.source.removed(&id).await;
            Ok(response)
        }
        .instrument(span)
        .await
    }

    /// Guarded like [`Shim::port_forward`], and held until the sandbox may
    /// get containers ([`SlotSource::ready_for_containers`]): a claimed
    /// slot whose identity step runs after the claim's answer (a gVisor
    /// slot's hostname) gets its first container only once that step is
    /// done, so no process in the pod ever sees the placeholder's identity.
    /// Only `CreateContainer` needs the barrier: every other call that runs
    /// something in a sandbox (`ExecSync`, `Exec`, `Attach`, `StartContainer`)
    /// names a container, which exists only once this call passed.
    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let Some(slots) = &self.slots else {
            return forward!(self, runtime, INFO, "CreateContainer", create_container, request);
        };
        let span = cri_span!(INFO, "CreateContainer", request.get_ref());
        async move {
            let requested = request.get_ref().pod_sandbox_id.clone();
            let id = match self.named(slots, &request, &requested).await {
                Named::Unclaimed => {
                    tracing::info!("names an unclaimed slot: answered as for an unknown sandbox");
                    return Err(ShimError::HiddenSandboxCreateContainer {
                        requested_id: requested,
                    }
                    .into());
                }
                Named::Visible(full_id) => full_id.unwrap_or(requested),
            };
            let started = Instant::now();
            if let Err(not_ready) = slots.source.ready_for_containers(&id).await {
                tracing::error!(
                    sandbox = %id,
                    error = %not_ready,
                    elapsed_us = elapsed_us(started),
                    "refusing CreateContainer: the claimed sandbox is not ready for containers"
                );
                return Err(not_ready.into());
            }
            forward_in_span!(self, runtime, INFO, "CreateContainer", create_container, request)
        }
        .instrument(span)
        .await
    }

    /// Streaming URLs are upstream's, returned unchanged.
    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        guarded!(
            self, INFO, "PortForward", port_forward, request,
            |req| &req.pod_sandbox_id,
            |requested| Err(ShimError::HiddenSandboxPortForward {
                requested_id: requested.to_owned(),
            }
            .into())
        )
    }

    /// A filter naming an unclaimed slot gets the empty list containerd
    /// gives for an unknown sandbox id. kubelet's relist sends no sandbox
    /// id: no lookup at all.
    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        guarded!(
            self, DEBUG, "ListContainers", list_containers, request,
            |req| req.filter.as_ref().map_or("", |f| f.pod_sandbox_id.as_str()),
            |_requested| Ok(Response::new(cri::ListContainersResponse::default()))
        )
    }

    /// As [`Shim::list_containers`].
    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        guarded!(
            self, DEBUG, "ListContainerStats", list_container_stats, request,
            |req| req.filter.as_ref().map_or("", |f| f.pod_sandbox_id.as_str()),
            |_requested| Ok(Response::new(cri::ListContainerStatsResponse::default()))
        )
    }

    async fn list_pod_sandbox(
        &self,
        mut request: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        rewritten!(
            self, DEBUG, "ListPodSandbox", list_pod_sandbox, request,
            |req| rewrite::take_sandbox_selector(&mut req.filter),
            |slots, response, selector| {
                rewrite::list_pod_sandbox(slots, &mut response.items, &selector);
                Ok::<(), ShimError>(())
            }
        )
    }

    async fn pod_sandbox_status(
        &self,
        mut request: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        rewritten!(
            self, DEBUG, "PodSandboxStatus", pod_sandbox_status, request,
            |_req| (),
            |slots, response, _unit| rewrite::pod_sandbox_status(slots, response)
        )
    }

    /// With a label selector (kubelet selects a pod's sandboxes by uid),
    /// upstream cannot filter: it only knows placeholder labels. Rather than
    /// asking it for the stats of every sandbox on the node — where any one
    /// failing sandbox (one being created or stopped, a runtime crashing on
    /// its metrics) fails the whole call — the shim lists sandboxes, selects
    /// on the labels kubelet sees, and asks for the stats of the selected
    /// ones only, as containerd itself would.
    async fn list_pod_sandbox_stats(
        &self,
        mut request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let selects = request
            .get_ref()
            .filter
            .as_ref()
            .is_some_and(|f| !f.label_selector.is_empty());
        if let (true, Some(slots)) = (selects, &self.slots) {
            let span = cri_span!(DEBUG, "ListPodSandboxStats", request.get_ref());
            return self.selected_sandbox_stats(slots, request).instrument(span).await;
        }
        rewritten!(
            self, DEBUG, "ListPodSandboxStats", list_pod_sandbox_stats, request,
            |req| rewrite::take_stats_selector(&mut req.filter),
            |slots, response, selector| {
                rewrite::list_pod_sandbox_stats(slots, &mut response.stats, &selector);
                Ok::<(), ShimError>(())
            }
        )
    }

    async fn pod_sandbox_stats(
        &self,
        mut request: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        rewritten!(
            self, DEBUG, "PodSandboxStats", pod_sandbox_stats, request,
            |req| req.pod_sandbox_id.clone(),
            |slots, response, requested_id| {
                rewrite::pod_sandbox_stats(slots, response, &requested_id)
            }
        )
    }

    type GetContainerEventsStream = EventStream;

    /// Server-streaming: upstream's stream is relayed item by item (upstream
    /// errors unchanged) until either side ends it or the shim shuts down.
    /// With slots, events about unclaimed slots are dropped and the sandbox
    /// status of the others rewritten as in `PodSandboxStatus`.
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
        let slots = self.slots.clone();
        Ok(response.map(|events| {
            events
                .filter_map(move |item| {
                    let item = match item {
                        Ok(mut event) => match &slots {
                            Some(slots) if !rewrite::container_event(slots, &mut event) => None,
                            _ => Some(Ok(event)),
                        },
                        Err(status) => Some(Err(pass_status(status))),
                    };
                    std::future::ready(item)
                })
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
