//! Entry points for the `cargo fuzz` targets in `fuzz/` (feature
//! `fuzzing`, off in every normal build): the crate-private rewriting of
//! `rewrite.rs`, driven exactly as `server.rs` drives it, and the
//! field-preserving edit of `preserve.rs` that carries it to the wire,
//! without a socket or an upstream. Not an API: nothing but the fuzz
//! targets uses it.

use std::sync::Arc;

use bytes::Bytes;
use fast_sandbox_proto::cri;
use prost::Message;

pub use crate::preserve::WireError;
use crate::{
    error::ShimError,
    intercept::make_cold,
    preserve, rewrite,
    slots::{HandlerMap, SlotSource, Slots},
};

/// `original` (an encoding of `M`, named `message` in the CRI schema, e.g.
/// `.runtime.v1.PodSandboxStatusResponse`) with `edit` applied as the
/// handlers apply their edits: every field `edit` did not change, unknown
/// fields at any depth included, as it was.
pub fn preserve_rewrite<M>(
    message: &str,
    original: &[u8],
    edit: impl FnOnce(&mut M),
) -> Result<Vec<u8>, WireError>
where
    M: Message + Default + Clone + PartialEq,
{
    let original = Bytes::copy_from_slice(original);
    let (out, ()) = preserve::rewrite(message, &original, edit)?;
    Ok(out.to_vec())
}

/// The list form of [`preserve_rewrite`]: `edit` sees each item (repeated
/// field `items`, of type `item` in the schema) and keeps it (`true`) or
/// drops it.
pub fn preserve_rewrite_items<M>(
    item: &str,
    items: u32,
    original: &[u8],
    edit: impl FnMut(&mut M) -> bool,
) -> Result<Vec<u8>, WireError>
where
    M: Message + Default + Clone + PartialEq,
{
    let original = Bytes::copy_from_slice(original);
    Ok(preserve::rewrite_items(item, items, &original, edit)?.to_vec())
}

/// The shim's view of slots: its exposed handlers and a slot source.
#[derive(Debug)]
pub struct Rewriter(Slots);

impl Rewriter {
    pub fn new(handlers: HandlerMap, source: Arc<dyn SlotSource>) -> Self {
        Rewriter(Slots { handlers, source })
    }

    /// `ListPodSandbox`: the selector is taken off `request` as the server
    /// does, and applied to upstream's `items`.
    pub fn list_pod_sandbox(
        &self,
        request: &mut cri::ListPodSandboxRequest,
        items: &mut Vec<cri::PodSandbox>,
    ) {
        let selector = rewrite::take_sandbox_selector(&mut request.filter);
        rewrite::list_pod_sandbox(&self.0, items, &selector);
    }

    /// `PodSandboxStatus` of upstream's `response`.
    pub fn pod_sandbox_status(
        &self,
        response: &mut cri::PodSandboxStatusResponse,
    ) -> Result<(), ShimError> {
        rewrite::pod_sandbox_status(&self.0, response)
    }

    /// `ListPodSandboxStats` (no selector path through upstream lists).
    pub fn list_pod_sandbox_stats(
        &self,
        request: &mut cri::ListPodSandboxStatsRequest,
        stats: &mut Vec<cri::PodSandboxStats>,
    ) {
        let selector = rewrite::take_stats_selector(&mut request.filter);
        rewrite::list_pod_sandbox_stats(&self.0, stats, &selector);
    }

    /// `PodSandboxStats` of upstream's `response` for `requested_id`.
    pub fn pod_sandbox_stats(
        &self,
        response: &mut cri::PodSandboxStatsResponse,
        requested_id: &str,
    ) -> Result<(), ShimError> {
        rewrite::pod_sandbox_stats(&self.0, response, requested_id)
    }

    /// One container event; `false`: dropped.
    pub fn container_event(&self, event: &mut cri::ContainerEventResponse) -> bool {
        rewrite::container_event(&self.0, event)
    }
}

/// The cold request the server forwards for a miss of exposed handler
/// `exposed` (intercept.rs).
pub fn make_cold_request(
    request: &mut cri::RunPodSandboxRequest,
    exposed: &str,
    upstream_handler: &str,
) {
    make_cold(request, exposed, upstream_handler);
}
