//! Entry points for the `cargo fuzz` targets in `fuzz/` (feature
//! `fuzzing`, off in every normal build): the crate-private rewriting of
//! `rewrite.rs`, driven exactly as `server.rs` drives it, without a socket
//! or an upstream. Not an API: nothing but the fuzz targets uses it.

use std::sync::Arc;

use fast_sandbox_proto::cri;

use crate::{
    error::ShimError,
    intercept::make_cold,
    rewrite,
    slots::{HandlerMap, SlotSource, Slots},
};

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
