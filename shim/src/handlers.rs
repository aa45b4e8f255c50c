//! The calls the shim handles itself when it serves slots (methods.rs lists
//! them as [`Intercepted`]):
//!
//! - `RunPodSandbox`, the claim point: an exposed handler with an eligible
//!   pod is served from a free slot; anything else for an exposed handler
//!   goes cold with the handler rewritten to its upstream name and the
//!   exposed one kept in a reserved label ([`make_cold`]); other handlers
//!   are forwarded untouched.
//! - Calls that name a sandbox by id: an unclaimed slot is answered as
//!   containerd answers an unknown id, without forwarding. A full containerd
//!   id (kubelet only ever sends those) is resolved by the slot source
//!   alone; a shorter one (a prefix, as crictl users type) costs one
//!   upstream `PodSandboxStatus`.
//! - Answers rewritten for slots (rewrite.rs): sandbox list, status, stats,
//!   container events; and `Status`, whose handler list gains every exposed
//!   handler with its upstream handler's features.
//!
//! Messages stay bytes: a request is decoded to read it, and an edit goes
//! through preserve.rs, which keeps every field the shim does not own.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use bytes::Bytes;
use fast_sandbox_proto::cri;
use futures::future::BoxFuture;
use prost::Message;
use tokio::time::Instant;
use tonic::{Extensions, Request, Response, Status};
use tracing::Instrument;

pub(crate) mod events;

use crate::{
    capture,
    codec::decode_status,
    deadline::{Budget, CallerDeadline},
    error::ShimError,
    intercept::make_cold,
    methods::{self, Intercepted, Method},
    preserve::{self, WireError},
    rewrite,
    rewrite::Selector,
    slots::{Claim, HandlerMap, MissReason, NoSlot, PoolKey, SlotView, Slots},
    state::{elapsed_us, Shim},
    upstream::RawRequest,
};

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

/// The authority the server read, kept for the capture file.
#[derive(Debug, Clone)]
pub(crate) struct Authority(pub(crate) String);

/// One intercepted unary call, as tonic's server hands it over.
#[derive(Debug)]
pub(crate) struct Unary {
    pub(crate) shim: Arc<Shim>,
    pub(crate) method: &'static Method,
    pub(crate) which: Intercepted,
}

impl tonic::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = BoxFuture<'static, Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let (shim, method, which) = (Arc::clone(&self.shim), self.method, self.which);
        Box::pin(async move { shim.unary(method, which, request).await })
    }
}

/// The pieces of an intercepted request.
struct Call {
    metadata: tonic::metadata::MetadataMap,
    deadline: Option<CallerDeadline>,
    bytes: Bytes,
    budget: Budget,
}

impl Call {
    fn request(&self, bytes: Bytes) -> Request<RawRequest> {
        sub_request(
            &self.metadata,
            self.deadline,
            RawRequest {
                bytes,
                budget: self.budget,
            },
        )
    }
}

/// A request to upstream made on behalf of a caller: its metadata, and so
/// its deadline.
fn sub_request<T>(
    metadata: &tonic::metadata::MetadataMap,
    deadline: Option<CallerDeadline>,
    message: T,
) -> Request<T> {
    let mut extensions = Extensions::new();
    if let Some(deadline) = deadline {
        extensions.insert(deadline);
    }
    Request::from_parts(metadata.clone(), extensions, message)
}

fn malformed_reply(method: &'static Method, err: &WireError) -> Status {
    tracing::error!(method = method.name, error = %err, "malformed reply from upstream CRI endpoint");
    ShimError::MalformedReply {
        method: method.name,
        reason: err.to_string(),
    }
    .into()
}

fn decode<M: Message + Default>(bytes: &Bytes) -> Result<M, Status> {
    M::decode(bytes.as_ref()).map_err(|err| decode_status(&err))
}

impl Shim {
    async fn unary(
        self: Arc<Self>,
        method: &'static Method,
        which: Intercepted,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, Status> {
        let span = methods::span(method.level, method.name);
        let wall = SystemTime::now();
        let started = Instant::now();
        let (metadata, extensions, bytes) = request.into_parts();
        let deadline = extensions.get::<CallerDeadline>().copied();
        let authority = extensions.get::<Authority>().map(|a| a.0.clone());
        let result = async {
            let budget = (method.inspect)(&bytes, &tracing::Span::current())
                .map_err(|err| decode_status(&err))?;
            let call = Call {
                metadata,
                deadline,
                bytes: bytes.clone(),
                budget,
            };
            let result = self.dispatch(method, which, call).await;
            match &result {
                Ok(_) => tracing::debug!(elapsed_us = elapsed_us(started), "ok"),
                Err(status) => tracing::info!(
                    elapsed_us = elapsed_us(started),
                    code = ?status.code(),
                    message = status.message(),
                    "failed"
                ),
            }
            result
        }
        .instrument(span)
        .await;
        if let Some(capture) = &self.capture {
            let (code, message) = match &result {
                Ok(_) => (0, String::new()),
                Err(status) => (status.code() as i32, status.message().to_owned()),
            };
            capture.record(&capture::Call {
                path: method.path,
                method: Some(method),
                authority: authority.as_deref(),
                started: wall,
                elapsed: started.elapsed(),
                request: &bytes,
                response: result.as_ref().ok().map(Response::get_ref),
                code,
                message: &message,
            });
        }
        result
    }

    async fn dispatch(
        &self,
        method: &'static Method,
        which: Intercepted,
        call: Call,
    ) -> Result<Response<Bytes>, Status> {
        let Some(slots) = self.slots.clone() else {
            return self
                .upstream
                .unary_raw(method, call.request(call.bytes.clone()))
                .await;
        };
        let slots = &*slots;
        match which {
            Intercepted::RunPodSandbox => self.run_pod_sandbox(slots, method, call).await,
            Intercepted::StopPodSandbox => self.stop_pod_sandbox(slots, method, call).await,
            Intercepted::RemovePodSandbox => self.remove_pod_sandbox(slots, method, call).await,
            Intercepted::CreateContainer => self.create_container(slots, method, call).await,
            Intercepted::PortForward => {
                let id = decode::<cri::PortForwardRequest>(&call.bytes)?.pod_sandbox_id;
                match self.named(slots, call.deadline, &id).await {
                    Named::Unclaimed => Err(hidden(ShimError::HiddenSandboxPortForward {
                        requested_id: id,
                    })),
                    Named::Visible(_) => self.forward(method, &call).await,
                }
            }
            // A filter naming an unclaimed slot gets the empty list
            // containerd gives for an unknown sandbox id. kubelet's relist
            // sends no sandbox id: no lookup at all.
            Intercepted::ListContainers => {
                let request = decode::<cri::ListContainersRequest>(&call.bytes)?;
                let id = request.filter.map(|f| f.pod_sandbox_id).unwrap_or_default();
                self.guarded_list(slots, method, call, &id).await
            }
            Intercepted::ListContainerStats => {
                let request = decode::<cri::ListContainerStatsRequest>(&call.bytes)?;
                let id = request.filter.map(|f| f.pod_sandbox_id).unwrap_or_default();
                self.guarded_list(slots, method, call, &id).await
            }
            Intercepted::ListPodSandbox => self.list_pod_sandbox(slots, method, call).await,
            Intercepted::PodSandboxStatus => self.pod_sandbox_status(slots, method, call).await,
            Intercepted::ListPodSandboxStats => {
                self.list_pod_sandbox_stats(slots, method, call).await
            }
            Intercepted::PodSandboxStats => self.pod_sandbox_stats(slots, method, call).await,
            Intercepted::Status => {
                let response = self.forward(method, &call).await?;
                map_answer(response, |answer| {
                    status_with_handlers(&slots.handlers, answer)
                        .map_err(|e| malformed_reply(method, &e))
                })
            }
            // Served by [`Events`].
            Intercepted::GetContainerEvents => {
                Err(Status::internal("GetContainerEvents is a stream"))
            }
        }
    }

    /// `StopPodSandbox`: refused for an unclaimed slot; a claimed one is told
    /// it is stopping before the stop is forwarded.
    async fn stop_pod_sandbox(
        &self,
        slots: &Slots,
        method: &'static Method,
        call: Call,
    ) -> Result<Response<Bytes>, Status> {
        let id = decode::<cri::StopPodSandboxRequest>(&call.bytes)?.pod_sandbox_id;
        match self.named(slots, call.deadline, &id).await {
            Named::Unclaimed => Err(hidden(ShimError::HiddenSandboxStop { requested_id: id })),
            Named::Visible(full_id) => {
                let id = full_id.unwrap_or(id);
                if matches!(
                    slots.source.view(&id, &HashMap::new()),
                    SlotView::Claimed(_)
                ) {
                    slots.source.stopping(&id).await;
                }
                self.forward(method, &call).await
            }
        }
    }

    /// `RemovePodSandbox`: an unclaimed slot answers as removed; a claimed
    /// one is forgotten once upstream removed it.
    async fn remove_pod_sandbox(
        &self,
        slots: &Slots,
        method: &'static Method,
        call: Call,
    ) -> Result<Response<Bytes>, Status> {
        let id = decode::<cri::RemovePodSandboxRequest>(&call.bytes)?.pod_sandbox_id;
        let id = match self.named(slots, call.deadline, &id).await {
            Named::Unclaimed => return Ok(unclaimed_empty()),
            Named::Visible(full_id) => full_id.unwrap_or(id),
        };
        let response = self.forward(method, &call).await?;
        slots.source.removed(&id).await;
        Ok(response)
    }

    /// `ListPodSandbox`: the slot selector is taken out of the filter, and
    /// the answer's items hidden or rewritten.
    async fn list_pod_sandbox(
        &self,
        slots: &Slots,
        method: &'static Method,
        call: Call,
    ) -> Result<Response<Bytes>, Status> {
        self.selected_list::<cri::ListPodSandboxRequest, cri::PodSandbox>(
            method,
            &call,
            (".runtime.v1.ListPodSandboxRequest", |r| {
                rewrite::take_sandbox_selector(&mut r.filter)
            }),
            (".runtime.v1.PodSandbox", |item, selector| {
                rewrite::sandbox_item(slots, item, selector)
            }),
        )
        .await
    }

    /// `PodSandboxStatus`: upstream's answer, a claimed slot's rewritten.
    async fn pod_sandbox_status(
        &self,
        slots: &Slots,
        method: &'static Method,
        call: Call,
    ) -> Result<Response<Bytes>, Status> {
        let response = self.forward(method, &call).await?;
        rewrite_answer::<cri::PodSandboxStatusResponse>(
            response,
            method,
            ".runtime.v1.PodSandboxStatusResponse",
            |r| rewrite::pod_sandbox_status(slots, r),
        )
    }

    /// `PodSandboxStats`: upstream's answer, a claimed slot's rewritten.
    async fn pod_sandbox_stats(
        &self,
        slots: &Slots,
        method: &'static Method,
        call: Call,
    ) -> Result<Response<Bytes>, Status> {
        let requested_id = decode::<cri::PodSandboxStatsRequest>(&call.bytes)?.pod_sandbox_id;
        let response = self.forward(method, &call).await?;
        rewrite_answer::<cri::PodSandboxStatsResponse>(
            response,
            method,
            ".runtime.v1.PodSandboxStatsResponse",
            |r| rewrite::pod_sandbox_stats(slots, r, &requested_id),
        )
    }

    /// A list call with its label selector taken out of the request
    /// (`request`: the request's protobuf name and the taker), forwarded,
    /// and each item of the answer (field 1; `item`: its name and the
    /// rewrite, `false` to drop it) hidden or rewritten under the selector.
    async fn selected_list<Req, Item>(
        &self,
        method: &'static Method,
        call: &Call,
        request: (&'static str, impl FnOnce(&mut Req) -> Selector),
        item: (&'static str, impl FnMut(&mut Item, &Selector) -> bool),
    ) -> Result<Response<Bytes>, Status>
    where
        Req: Message + Default + Clone + PartialEq,
        Item: Message + Default + Clone + PartialEq,
    {
        let (bytes, selector) = preserve::rewrite::<Req, _>(request.0, &call.bytes, request.1)
            .map_err(|e| decode_status(&e))?;
        let response = self.upstream.unary_raw(method, call.request(bytes)).await?;
        let (name, mut edit) = item;
        map_answer(response, |answer| {
            preserve::rewrite_items::<Item>(name, 1, answer, |i| edit(i, &selector))
                .map_err(|e| malformed_reply(method, &e))
        })
    }

    /// The request as it came, to upstream.
    async fn forward(
        &self,
        method: &'static Method,
        call: &Call,
    ) -> Result<Response<Bytes>, Status> {
        self.upstream
            .unary_raw(method, call.request(call.bytes.clone()))
            .await
    }

    async fn guarded_list(
        &self,
        slots: &Slots,
        method: &'static Method,
        call: Call,
        id: &str,
    ) -> Result<Response<Bytes>, Status> {
        match self.named(slots, call.deadline, id).await {
            Named::Unclaimed => Ok(unclaimed_empty()),
            Named::Visible(_) => self.forward(method, &call).await,
        }
    }

    async fn run_pod_sandbox(
        &self,
        slots: &Slots,
        method: &'static Method,
        call: Call,
    ) -> Result<Response<Bytes>, Status> {
        let request = decode::<cri::RunPodSandboxRequest>(&call.bytes)?;
        let handler = request.runtime_handler.as_str();
        let Some(upstream_handler) = slots.handlers.upstream_for(handler) else {
            slots
                .source
                .missed(handler, None, MissReason::NotFastHandler);
            return self.forward(method, &call).await;
        };
        if let Some(pod_sandbox_id) = self.claim(slots, &request).await {
            let answer = cri::RunPodSandboxResponse { pod_sandbox_id };
            return Ok(Response::new(Bytes::from(answer.encode_to_vec())));
        }
        let (cold, ()) = preserve::rewrite::<cri::RunPodSandboxRequest, _>(
            ".runtime.v1.RunPodSandboxRequest",
            &call.bytes,
            |r| make_cold(r, handler, upstream_handler),
        )
        .map_err(|e| decode_status(&e))?;
        self.upstream.unary_raw(method, call.request(cold)).await
    }

    /// Guarded like `PortForward`, and held until the sandbox may get
    /// containers ([`SlotSource::ready_for_containers`](crate::slots::SlotSource::ready_for_containers)):
    /// a claimed slot whose identity step runs after the claim's answer (a
    /// gVisor slot's hostname) gets its first container only once that step
    /// is done, so no process in the pod ever sees the placeholder's
    /// identity. Only `CreateContainer` needs the barrier: every other call
    /// that runs something in a sandbox names a container, which exists
    /// only once this call passed.
    async fn create_container(
        &self,
        slots: &Slots,
        method: &'static Method,
        call: Call,
    ) -> Result<Response<Bytes>, Status> {
        let requested = decode::<cri::CreateContainerRequest>(&call.bytes)?.pod_sandbox_id;
        let id = match self.named(slots, call.deadline, &requested).await {
            Named::Unclaimed => {
                return Err(hidden(ShimError::HiddenSandboxCreateContainer {
                    requested_id: requested,
                }))
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
        self.forward(method, &call).await
    }

    /// With a label selector (kubelet selects a pod's sandboxes by uid),
    /// upstream cannot filter: it only knows placeholder labels. Rather than
    /// asking it for the stats of every sandbox on the node — where any one
    /// failing sandbox (one being created or stopped, a runtime crashing on
    /// its metrics) fails the whole call — the shim lists sandboxes, selects
    /// on the labels kubelet sees, and asks for the stats of the selected
    /// ones only, as containerd itself would: each with the caller's
    /// request, its id set and its selector taken off. The answer holds the
    /// items of those answers (their other fields, if any, have no single
    /// source and are not kept).
    async fn list_pod_sandbox_stats(
        &self,
        slots: &Slots,
        method: &'static Method,
        call: Call,
    ) -> Result<Response<Bytes>, Status> {
        let request = decode::<cri::ListPodSandboxStatsRequest>(&call.bytes)?;
        if request
            .filter
            .as_ref()
            .is_some_and(|f| !f.label_selector.is_empty())
        {
            return self
                .selected_sandbox_stats(slots, method, &call, request)
                .await;
        }
        self.selected_list::<cri::ListPodSandboxStatsRequest, cri::PodSandboxStats>(
            method,
            &call,
            (".runtime.v1.ListPodSandboxStatsRequest", |r| {
                rewrite::take_stats_selector(&mut r.filter)
            }),
            (".runtime.v1.PodSandboxStats", |item, selector| {
                rewrite::stats_item(slots, item, selector)
            }),
        )
        .await
    }

    async fn selected_sandbox_stats(
        &self,
        slots: &Slots,
        method: &'static Method,
        call: &Call,
        request: cri::ListPodSandboxStatsRequest,
    ) -> Result<Response<Bytes>, Status> {
        let filter = request.filter.unwrap_or_default();
        let mut client = self.upstream.runtime();
        let list = sub_request(
            &call.metadata,
            call.deadline,
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
        let mut out = Vec::new();
        for item in items {
            // The caller's request for this one sandbox: every field the
            // shim does not own (a newer kubelet's filter fields) goes too.
            let (one, ()) = preserve::rewrite::<cri::ListPodSandboxStatsRequest, _>(
                ".runtime.v1.ListPodSandboxStatsRequest",
                &call.bytes,
                |r| {
                    let filter = r.filter.get_or_insert_with(Default::default);
                    filter.id = item.id;
                    filter.label_selector.clear();
                },
            )
            .map_err(|e| decode_status(&e))?;
            let answer = match self.upstream.unary_raw(method, call.request(one)).await {
                Ok(answer) => answer.into_inner(),
                // Removed since it was listed: as if listed a moment later.
                Err(status) if status.code() == tonic::Code::NotFound => continue,
                Err(status) => return Err(status),
            };
            let rewritten = preserve::rewrite_items::<cri::PodSandboxStats>(
                ".runtime.v1.PodSandboxStats",
                1,
                &answer,
                |stats| rewrite::stats_item(slots, stats, &HashMap::new()),
            )
            .map_err(|e| malformed_reply(method, &e))?;
            for stats in preserve::items(&rewritten, 1).map_err(|e| malformed_reply(method, &e))? {
                preserve::put_message_field(&mut out, 1, stats);
            }
        }
        Ok(Response::new(Bytes::from(out)))
    }

    /// What sandbox `id` names. A full id is resolved by the slot source
    /// alone; a prefix by one upstream `PodSandboxStatus` (within the
    /// caller's `deadline`), whose full id and labels the slot source then
    /// judges. An id upstream does not resolve (unknown, ambiguous, empty)
    /// is `Visible`: upstream answers the call itself.
    async fn named(&self, slots: &Slots, deadline: Option<CallerDeadline>, id: &str) -> Named {
        if id.is_empty() {
            return Named::Visible(None);
        }
        match slots.source.view(id, &HashMap::new()) {
            SlotView::Unclaimed => return Named::Unclaimed,
            SlotView::Claimed(_) => return Named::Visible(None),
            SlotView::NotASlot if is_full_id(id) => return Named::Visible(None),
            SlotView::NotASlot => {}
        }
        let lookup = sub_request(
            &tonic::metadata::MetadataMap::new(),
            deadline,
            cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: false,
            },
        );
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
    /// slot's sandbox id, or why the pod starts cold. Runs within the
    /// caller's deadline: if kubelet gives up, the claim future is dropped
    /// (the slot source must be cancel-safe).
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
                tracing::info!(pool = %claim.key, elapsed_us = elapsed_us(started), "warm hit");
                Some(slot.sandbox_id)
            }
            Ok(Err(no_slot)) => {
                let reason = match no_slot {
                    NoSlot::NoPool => MissReason::NoPool,
                    NoSlot::PoolEmpty => MissReason::PoolEmpty,
                    NoSlot::CannotServe(reason) => reason,
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

/// An answer for a call naming an unclaimed slot where containerd answers
/// an empty message (an empty list; `RemovePodSandbox` of an unknown id).
fn unclaimed_empty() -> Response<Bytes> {
    tracing::info!("names an unclaimed slot: answered as for an unknown sandbox");
    Response::new(Bytes::new())
}

fn hidden(err: ShimError) -> Status {
    tracing::info!("names an unclaimed slot: answered as for an unknown sandbox");
    err.into()
}

/// Upstream's answer (`message`, its protobuf type name) with `edit`
/// applied field-preservingly; a slot the edit must hide becomes the error
/// it returns.
fn rewrite_answer<M>(
    response: Response<Bytes>,
    method: &'static Method,
    message: &'static str,
    edit: impl FnOnce(&mut M) -> Result<(), ShimError>,
) -> Result<Response<Bytes>, Status>
where
    M: Message + Default + Clone + PartialEq,
{
    map_answer(response, |answer| {
        let (bytes, outcome) = preserve::rewrite::<M, _>(message, answer, edit)
            .map_err(|e| malformed_reply(method, &e))?;
        outcome.map_err(hidden)?;
        Ok(bytes)
    })
}

/// Upstream's answer with its message replaced by `edit`'s, metadata kept.
fn map_answer(
    response: Response<Bytes>,
    edit: impl FnOnce(&Bytes) -> Result<Bytes, Status>,
) -> Result<Response<Bytes>, Status> {
    let (metadata, answer, extensions) = response.into_parts();
    let edited = edit(&answer)?;
    Ok(Response::from_parts(metadata, edited, extensions))
}

/// Upstream's `Status` answer with every exposed handler that upstream does
/// not list itself added to `runtime_handlers`, as a copy of its upstream
/// handler's entry (features included, known to the schema or not) under
/// the exposed name. kubelet (1.30+) checks a pod's handler against this
/// list, with its features (recursive read-only mounts, user namespaces).
fn status_with_handlers(handlers: &HandlerMap, answer: &Bytes) -> Result<Bytes, WireError> {
    let status = cri::StatusResponse::decode(answer.as_ref())?;
    let entries = preserve::items(answer, 3)?;
    let mut out = answer.to_vec();
    for (exposed, upstream) in handlers.iter() {
        if status.runtime_handlers.iter().any(|h| h.name == exposed) {
            continue;
        }
        let Some(index) = status
            .runtime_handlers
            .iter()
            .position(|h| h.name == upstream)
        else {
            continue;
        };
        let Some(entry) = entries.get(index) else {
            continue;
        };
        let (renamed, ()) = preserve::rewrite::<cri::RuntimeHandler, _>(
            ".runtime.v1.RuntimeHandler",
            &Bytes::copy_from_slice(entry),
            |h| exposed.clone_into(&mut h.name),
        )?;
        preserve::put_message_field(&mut out, 3, &renamed);
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lists_exposed_handlers_with_their_upstream_features() {
        let runc = cri::RuntimeHandler {
            name: "runc".into(),
            features: Some(cri::RuntimeHandlerFeatures {
                recursive_read_only_mounts: true,
                user_namespaces: true,
            }),
        };
        let mut runc_raw = runc.encode_to_vec();
        // A feature newer than the compiled schema.
        runc_raw.extend_from_slice(&[0x12, 0x02, 0x18, 0x01]);
        let upstream = cri::StatusResponse {
            runtime_handlers: vec![
                cri::RuntimeHandler {
                    name: String::new(),
                    features: None,
                },
                cri::RuntimeHandler {
                    name: "crun".into(),
                    features: None,
                },
            ],
            ..Default::default()
        };
        let mut answer = upstream.encode_to_vec();
        preserve::put_message_field(&mut answer, 3, &runc_raw);
        let answer = Bytes::from(answer);
        let handlers = HandlerMap::new([
            ("fast-runc", "runc"),
            ("fast-kata", "kata"),
            ("crun", "crun"),
        ]);
        let out = status_with_handlers(&handlers, &answer).unwrap_or_else(|e| panic!("{e}"));
        let decoded = cri::StatusResponse::decode(out.as_ref()).unwrap_or_default();
        let names: Vec<_> = decoded
            .runtime_handlers
            .iter()
            .map(|h| h.name.as_str())
            .collect();
        // Upstream's entries first and unchanged; an exposed handler whose
        // upstream is absent (kata) or which upstream lists itself (crun)
        // is not added.
        assert_eq!(names, ["", "crun", "runc", "fast-runc"]);
        assert_eq!(decoded.runtime_handlers[3].features, runc.features);
        let entries = preserve::items(&out, 3).unwrap_or_default();
        assert!(
            entries[3].ends_with(&[0x12, 0x02, 0x18, 0x01]),
            "{:?}",
            entries[3]
        );
        assert!(out.starts_with(&answer));
    }
}
