//! The one-shot commands: `certs`, `crdgen`, `uninstall`, and the
//! measurements `bench` and `simulate`.

use std::path::PathBuf;

use anyhow::Context;

use fast_sandbox_controller::{certs as ca, crd, run};

use crate::bench::{self as benchmark, BenchConfig};
use crate::flags::KubeArgs;
use crate::serve::{init_logging, kube_client};
use crate::sim::{self, SimConfig};

/// The flags of `certs`.
#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// A node agent's certificate, for this Kubernetes node name.
    #[arg(long, required_unless_present_any = ["controller", "server"])]
    pub node: Option<String>,
    /// A server certificate for this DNS name (the extender's Service:
    /// fast-sandbox-controller.fast-sandbox-system.svc).
    #[arg(long, conflicts_with_all = ["node", "controller"])]
    pub server: Option<String>,
    /// The controller's client certificate.
    #[arg(long, conflicts_with = "node")]
    pub controller: bool,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = ca::DEFAULT_DAYS)]
    pub days: u32,
}

/// The flags of `crdgen`.
#[derive(Debug, clap::Args)]
pub struct CrdgenArgs {
    #[arg(long, default_value = "deploy/crds")]
    pub out: PathBuf,
}

/// The flags of `bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 5_000)]
    pub nodes: usize,
    #[arg(long, default_value_t = 5_000)]
    pub decisions: usize,
    /// Application images in the catalog nodes draw from.
    #[arg(long, default_value_t = 400)]
    pub apps: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// kube-scheduler's percentageOfNodesToScore, which sets how many
    /// node names each extender call carries; 0 is its adaptive default.
    #[arg(long, default_value_t = 0)]
    pub percentage_of_nodes_to_score: u32,
}

/// The flags of `simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    #[arg(long, default_value_t = 8)]
    pub slots: u32,
    /// Mean time to refill a claimed slot, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub refill_s: f64,
    /// Mean pod lifetime, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub lifetime_s: f64,
    /// How late node reports reach the controller, ms.
    #[arg(long, default_value_t = 100)]
    pub status_delay_ms: u64,
    /// How late the controller counts its own placements, ms (0: at
    /// decision, as the direct path and an extender that binds do).
    #[arg(long, default_value_t = 0)]
    pub assume_delay_ms: u64,
    /// Drop an assumed placement this long after it was made, ms,
    /// instead of when the node's report covers it.
    #[arg(long)]
    pub settle_after_ms: Option<u64>,
    /// Pods per load point.
    #[arg(long, default_value_t = 40_000)]
    pub arrivals: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value = "docs/scheduling-hit-rate.csv")]
    pub csv: PathBuf,
    #[arg(long, default_value = "docs/scheduling-hit-rate.svg")]
    pub svg: PathBuf,
}

/// `certs`: one certificate from the CA in `--ca-dir`.
pub fn certs(args: &CertsArgs) -> anyhow::Result<()> {
    let subject = match (&args.node, &args.server) {
        (Some(node), _) => ca::Subject::Node(node.clone()),
        (None, Some(name)) => ca::Subject::Server(name.clone()),
        (None, None) => ca::Subject::Controller,
    };
    ca::issue_into(&args.ca_dir, &subject, args.days, &args.out)
        .with_context(|| format!("issuing a certificate into {}", args.out.display()))
}

/// `crdgen`: the CRD YAML files, their paths printed.
pub fn crdgen(args: &CrdgenArgs) -> anyhow::Result<()> {
    for path in crd::write_crds(&args.out)? {
        println!("{}", path.display());
    }
    Ok(())
}

/// `uninstall`: every SandboxPool's finalizer removed, once.
pub fn uninstall(kube: KubeArgs) -> anyhow::Result<()> {
    init_logging(false);
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(async {
            let (client, _) = kube_client(&kube).await?;
            let removed = run::remove_finalizers(&client)
                .await
                .context("removing the SandboxPool finalizers")?;
            println!("removed the finalizer of {removed} SandboxPools");
            anyhow::Ok(())
        })
}

/// `bench`: the report on stdout.
pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let report = benchmark::run(BenchConfig {
        nodes: args.nodes,
        decisions: args.decisions,
        apps: args.apps,
        seed: args.seed,
        percentage_of_nodes_to_score: args.percentage_of_nodes_to_score,
    })
    .context("building the synthetic snapshot")?;
    print!("{report}");
    Ok(())
}

/// `simulate`: the CSV and SVG written, the CSV also on stdout.
pub fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let config = SimConfig {
        nodes: args.nodes,
        slots: args.slots,
        refill_mean_s: args.refill_s,
        lifetime_mean_s: args.lifetime_s,
        status_delay_ms: args.status_delay_ms,
        assume_delay_ms: args.assume_delay_ms,
        settle_after_ms: args.settle_after_ms,
        arrivals: args.arrivals,
        seed: args.seed,
        ..SimConfig::default()
    };
    let points = sim::run(&config).context("building the simulated snapshot")?;
    let table = sim::csv(&points);
    std::fs::write(&args.csv, &table).with_context(|| format!("writing {}", args.csv.display()))?;
    std::fs::write(&args.svg, sim::svg(&points, &config))
        .with_context(|| format!("writing {}", args.svg.display()))?;
    print!("{table}");
    Ok(())
}
