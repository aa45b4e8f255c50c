//! `GetContainerEvents`, the one server-streaming call the shim handles
//! itself.

use std::{pin::Pin, sync::Arc};

use bytes::Bytes;
use fast_sandbox_proto::cri;
use futures::{future::BoxFuture, Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{malformed_reply, Call};
use crate::{
    codec::decode_status, deadline::CallerDeadline, methods, preserve, rewrite, state::Shim,
    upstream::pass_status,
};

/// The container event stream handed to the caller.
type EventStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send + 'static>>;

/// `GetContainerEvents`, server-streaming: upstream's stream is relayed item
/// by item (upstream errors unchanged) until either side ends it or the shim
/// shuts down. With slots, events about unclaimed slots are dropped and the
/// sandbox status of the others rewritten as in `PodSandboxStatus`.
#[derive(Debug)]
pub(crate) struct Events(pub(crate) Arc<Shim>);

impl tonic::server::ServerStreamingService<Bytes> for Events {
    type Response = Bytes;
    type ResponseStream = EventStream;
    type Future = BoxFuture<'static, Result<Response<EventStream>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let shim = Arc::clone(&self.0);
        Box::pin(async move { shim.events(request).await })
    }
}

impl Shim {
    async fn events(
        self: Arc<Self>,
        request: Request<Bytes>,
    ) -> Result<Response<EventStream>, Status> {
        let Some(method) = methods::lookup("/runtime.v1.RuntimeService/GetContainerEvents") else {
            return Err(Status::internal(
                "GetContainerEvents is not in the method table",
            ));
        };
        let span = methods::span(method.level, method.name);
        let (metadata, extensions, bytes) = request.into_parts();
        let deadline = extensions.get::<CallerDeadline>().copied();
        let budget = (method.inspect)(&bytes, &span).map_err(|err| decode_status(&err))?;
        let call = Call {
            metadata,
            deadline,
            bytes,
            budget,
        };
        let response = self
            .upstream
            .streaming_raw(method, call.request(call.bytes.clone()))
            .instrument(span)
            .await?;
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
                        Ok(event) => match &slots {
                            Some(slots) => {
                                match preserve::rewrite::<cri::ContainerEventResponse, _>(
                                    ".runtime.v1.ContainerEventResponse",
                                    &event,
                                    |e| rewrite::container_event(slots, e),
                                ) {
                                    Ok((bytes, true)) => Some(Ok(bytes)),
                                    Ok((_, false)) => None,
                                    Err(err) => Some(Err(malformed_reply(method, &err))),
                                }
                            }
                            None => Some(Ok(event)),
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
