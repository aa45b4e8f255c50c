//! The CRI shim: serves CRI v1 on a unix socket and forwards every call to the
//! upstream CRI endpoint (containerd).
//!
//! ```no_run
//! # async fn run() -> Result<(), fast_sandbox_shim::ShimError> {
//! use fast_sandbox_shim::{serve, Shim, SocketConfig, Upstream, UpstreamConfig};
//!
//! let upstream = Upstream::connect_lazy(&UpstreamConfig::default())?;
//! let socket = SocketConfig::default();
//! serve(Shim::new(upstream), &socket, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

mod authority;
mod capture;
mod codec;
mod deadline;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod h2channel;
mod handlers;
mod hpack_scan;
mod intercept;
mod methods;
mod misses;
mod preserve;
mod request;
mod rewrite;
mod server;
pub mod slots;
mod socket;
mod state;
mod upstream;

pub use capture::Capture;
pub use error::{DeadlineSource, ShimError};
pub use server::{serve, Shim};
pub use socket::{SocketConfig, SocketGroup};
pub use upstream::{
    cri_channel, Upstream, UpstreamConfig, DEFAULT_UPSTREAM_ENDPOINT, MAX_MESSAGE_SIZE,
};
