//! Cluster side of fast-sandbox: where sandboxes go.
//!
//! - [`scoring`]: the placement decision, a pure function over a snapshot of
//!   node states (free warm slots per pool, cached images).

pub mod scoring;
