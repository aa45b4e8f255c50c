//! fast-sandbox-controller: the cluster side of fast-sandbox.
//!
//! The CRD reconcilers and the node-status watch are tracked in the
//! "Cluster side" issue; the placement decision and its tools are here.

use anyhow::Context;
use clap::{Parser, Subcommand};
use fast_sandbox_controller::bench::{self, BenchConfig};

/// Cluster side of fast-sandbox.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Time placement decisions on a synthetic cluster.
    Bench {
        #[arg(long, default_value_t = 5_000)]
        nodes: usize,
        #[arg(long, default_value_t = 5_000)]
        decisions: usize,
        /// Application images in the catalog nodes draw from.
        #[arg(long, default_value_t = 400)]
        apps: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Bench {
            nodes,
            decisions,
            apps,
            seed,
        } => {
            let report = bench::run(BenchConfig {
                nodes,
                decisions,
                apps,
                seed,
            })
            .context("building the synthetic snapshot")?;
            print!("{report}");
        }
    }
    Ok(())
}
