//! fast-sandbox benchmarks. Every figure is a comparison measured in one run
//! (direct vs through the shim, cold vs warm), interleaved so machine noise
//! hits both sides alike; report the ratio, not the absolute times.

mod common;
mod load;
mod pipe;
mod proxy;
mod restart;
mod stats;
mod warm;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about = "fast-sandbox benchmarks")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Proxy overhead: unary CRI calls and a full pod lifecycle, straight to
    /// containerd vs through a `fast-sandbox-node` process.
    Proxy(proxy::Opts),
    /// Warm vs cold pod starts through `fast-sandbox-node` with warm pools:
    /// RunPodSandbox and pod start (to container running), concurrent
    /// claims, and the memory an idle slot costs.
    Warm(warm::Opts),
    /// Sustained mixed load: kubelet's relist and status polls for many
    /// pods every second plus create/delete churn (warm and cold), p50/p99
    /// per call type, straight to containerd vs through the shim.
    Load(load::Opts),
    /// Restart of the node plugin with a full pool: time to the first CRI
    /// answer and free slots adopted, after kill -9 and a graceful stop.
    Restart(restart::Opts),
    /// (Used by `proxy`.) A byte pipe between a socket and containerd: the
    /// cost of one more process hop, the floor for any proxy.
    #[command(hide = true)]
    Pipe(pipe::Opts),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Proxy(opts) => proxy::run(opts).await,
        Cmd::Warm(opts) => warm::run(opts).await,
        Cmd::Load(opts) => load::run(opts).await,
        Cmd::Restart(opts) => restart::run(opts).await,
        Cmd::Pipe(opts) => pipe::run(&opts).await,
    }
}
