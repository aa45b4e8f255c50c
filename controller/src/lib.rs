//! Cluster side of fast-sandbox: where sandboxes go.
//!
//! - [`scoring`]: the placement decision, a pure function over a snapshot of
//!   node states (free warm slots per pool, cached images).
//! - [`extender`]: kube-scheduler extender endpoints over [`scoring`].
//! - [`synth`]: a seeded random number generator (jitter, randomized tests).
//! - [`nodes`]: where node states come from and pool sizes go
//!   ([`nodes::NodeDirectory`]); [`agent`]: the directory fed by the node
//!   agents' gRPC status streams.
//! - [`links`]: the TLS flags of `run`'s two links (agents, extender).
//! - [`certs`]: the CA and certificates of the agents' mutual TLS.
//! - [`crd`]: the `SandboxPool` and `Sandbox` custom resources.
//! - [`pool`], [`sandbox`]: their reconcilers, sharing [`reconcile`]'s
//!   context, errors and retry policy; [`run`] wires both to a cluster.
//!   Every API call they make (the RBAC they need) is listed in
//!   `docs/controller.md`.
//! - [`events`]: the Kubernetes Events the reconcilers emit; [`metrics`]:
//!   the controller's `/metrics`; [`leader`]: Lease-based leader election
//!   (only the leader runs the reconcilers).
//! - [`admit`]: what the `Sandbox` path checks because it binds by
//!   `nodeName`: taints, cordon, resource fit.
//!
//! The benchmark and the simulation (`fast-sandbox-controller bench`,
//! `simulate`) are the binary's own modules, not the library's.

pub mod admit;
pub mod agent;
pub mod certs;
pub mod crd;
pub mod events;
pub mod extender;
pub mod leader;
pub mod links;
pub mod metrics;
pub mod nodes;
pub mod pool;
pub mod reconcile;
pub mod run;
pub mod sandbox;
pub mod scoring;
pub mod synth;
