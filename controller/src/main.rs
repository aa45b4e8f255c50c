//! fast-sandbox-controller. The scheduler extender, CRD reconcilers and pool
//! sizing are tracked in the "Cluster side" issue; until they land this
//! binary only parses its arguments and refuses to run.

use clap::Parser;

/// Cluster side of fast-sandbox.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Path to a kubeconfig; in-cluster configuration when absent.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("fast-sandbox-controller is not implemented yet (see the cluster-side issue)")
}
