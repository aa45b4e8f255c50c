//! The shim's state, shared by the server (server.rs) and the calls it
//! handles itself (handlers.rs): upstream, the slots it serves, the shutdown
//! signal and the capture file.

use std::sync::Arc;

use tokio::{sync::watch, time::Instant};

use crate::{
    capture::Capture,
    slots::{HandlerMap, SlotSource, Slots},
    upstream::Upstream,
};

/// The CRI service: forwards to [`Upstream`]; with slots, serves warm
/// handlers from a [`SlotSource`] and keeps its slots out of sight.
#[derive(Debug)]
pub struct Shim {
    pub(crate) upstream: Upstream,
    pub(crate) slots: Option<Arc<Slots>>,
    /// Set on shutdown; ends long-lived streams so the server can drain.
    pub(crate) stopping: watch::Sender<bool>,
    pub(crate) capture: Option<Capture>,
}

impl Shim {
    /// A plain forwarding shim: no warm handlers, every call unchanged.
    pub fn new(upstream: Upstream) -> Self {
        Shim {
            upstream,
            slots: None,
            stopping: watch::Sender::new(false),
            capture: None,
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

    /// Writes every call to `capture` (capture.rs).
    #[must_use]
    pub fn with_capture(mut self, capture: Capture) -> Self {
        self.capture = Some(capture);
        self
    }
}

/// Microseconds since `started`, for the `elapsed_us` log field.
pub(crate) fn elapsed_us(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}
