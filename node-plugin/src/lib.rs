//! The node plugin's library side: what its binary and its root tests share.

pub mod admin;
pub mod agent;
pub mod blocking;
pub mod config;
pub mod fault;
pub mod fixup;
pub mod health;
pub mod metrics;
pub mod network;
pub mod pool;
pub mod random;
pub mod supervisor;
pub mod usage;
