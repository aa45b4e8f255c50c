//! fast-sandbox-controller: the cluster side of fast-sandbox.
//!
//! The CRD reconcilers and the node-status watch are tracked in the
//! "Cluster side" issue; the placement decision and its tools are here.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

use fast_sandbox_controller::bench::{self, BenchConfig};
use fast_sandbox_controller::sim::{self, SimConfig};

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
    /// Simulate pod arrivals and compare warm-hit rates with slot-blind
    /// placement across loads; write a CSV and an SVG plot.
    Simulate {
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        #[arg(long, default_value_t = 8)]
        slots: u32,
        /// Mean time to refill a claimed slot, seconds.
        #[arg(long, default_value_t = 2.0)]
        refill_s: f64,
        /// Mean pod lifetime, seconds.
        #[arg(long, default_value_t = 30.0)]
        lifetime_s: f64,
        /// How late node reports reach the controller, ms.
        #[arg(long, default_value_t = 100)]
        status_delay_ms: u64,
        /// How late the controller counts its own placements, ms (0: at
        /// decision, as the direct path and an extender that binds do).
        #[arg(long, default_value_t = 0)]
        assume_delay_ms: u64,
        /// Pods per load point.
        #[arg(long, default_value_t = 40_000)]
        arrivals: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value = "docs/scheduling-hit-rate.csv")]
        csv: PathBuf,
        #[arg(long, default_value = "docs/scheduling-hit-rate.svg")]
        svg: PathBuf,
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
        Command::Simulate {
            nodes,
            slots,
            refill_s,
            lifetime_s,
            status_delay_ms,
            assume_delay_ms,
            arrivals,
            seed,
            csv,
            svg,
        } => {
            let config = SimConfig {
                nodes,
                slots,
                refill_mean_s: refill_s,
                lifetime_mean_s: lifetime_s,
                status_delay_ms,
                assume_delay_ms,
                arrivals,
                seed,
                ..SimConfig::default()
            };
            let points = sim::run(&config).context("building the simulated snapshot")?;
            let table = sim::csv(&points);
            std::fs::write(&csv, &table).with_context(|| format!("writing {}", csv.display()))?;
            std::fs::write(&svg, sim::svg(&points, &config))
                .with_context(|| format!("writing {}", svg.display()))?;
            print!("{table}");
        }
    }
    Ok(())
}
