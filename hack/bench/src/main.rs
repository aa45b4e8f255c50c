//! fast-sandbox benchmarks. Every figure is a comparison measured in one run
//! (direct vs through the shim, cold vs warm), interleaved so machine noise
//! hits both sides alike; report the ratio, not the absolute times.

mod proxy;
mod stats;

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
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Proxy(opts) => proxy::run(opts).await,
    }
}
