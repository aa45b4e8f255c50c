//! fast-sandbox-controller: the cluster side of fast-sandbox.
//!
//! `run` reconciles the CRDs and serves the extender against a cluster
//! ([`serve`]); `extender` serves the extender alone from a snapshot file;
//! `crdgen`, `certs` and `uninstall` are one-shot tools ([`tools`]);
//! `bench` and `simulate` measure the placement ([`bench`], [`sim`], on the
//! synthetic fleets of [`fleet`]). The flags several commands share are in
//! [`flags`]. Only this binary holds the measuring code: the library is
//! what runs in a cluster.

mod bench;
mod flags;
mod fleet;
mod serve;
mod sim;
mod tools;

use clap::{Parser, Subcommand};

/// `--version`, with the git revision.
const VERSION: &str = fast_sandbox_proto::version!();

/// Cluster side of fast-sandbox.
#[derive(Debug, Parser)]
#[command(version = VERSION, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve kube-scheduler's extender verbs (`/filter`, `/prioritize`)
    /// from a JSON snapshot of node states (re-read on SIGHUP).
    Extender(serve::ExtenderArgs),
    /// Reconcile SandboxPools and Sandboxes against a cluster and serve the
    /// extender verbs, from one node directory.
    Run(Box<serve::RunArgs>),
    /// Remove the controller's finalizer from every SandboxPool, so that
    /// pools and CRDs can be deleted without a controller running (see
    /// docs/deploy.md, "Uninstall").
    Uninstall(flags::KubeArgs),
    /// Issue a NodeAgent link certificate (`tls.crt`, `tls.key`, `ca.crt`)
    /// from the CA in --ca-dir, which is created there when missing.
    Certs(tools::CertsArgs),
    /// Write the CRD YAML generated from the Rust types, one file per CRD.
    Crdgen(tools::CrdgenArgs),
    /// Time placement decisions on a synthetic cluster.
    Bench(tools::BenchArgs),
    /// Simulate pod arrivals and compare warm-hit rates with slot-blind
    /// placement across loads; write a CSV and an SVG plot.
    Simulate(tools::SimulateArgs),
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Extender(args) => serve::extender(args),
        Command::Run(args) => serve::run(*args),
        Command::Uninstall(kube) => tools::uninstall(kube),
        Command::Certs(args) => tools::certs(&args),
        Command::Crdgen(args) => tools::crdgen(&args),
        Command::Bench(args) => tools::bench(args),
        Command::Simulate(args) => tools::simulate(args),
    }
}
