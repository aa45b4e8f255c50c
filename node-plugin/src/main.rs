//! `fast-sandbox-node`: the DaemonSet process. For now it serves the
//! forwarding CRI shim; slot pools come next.

mod config;

use std::{future::Future, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fast_sandbox_shim::{Shim, Upstream};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

use crate::config::{FileConfig, LogFormat, Overrides, Settings};

#[derive(Debug, Parser)]
#[command(name = "fast-sandbox-node", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve CRI on the shim's socket, forwarding to the upstream runtime.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML config file; flags and environment variables override it.
    #[arg(long, env = "FAST_SANDBOX_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => config::load(path)?,
        None => FileConfig::default(),
    };
    let settings = Settings::resolve(file, args.overrides);
    init_logging(&settings)?;

    let upstream = Upstream::connect_lazy(&settings.upstream)
        .context("configuring the upstream CRI client")?;
    // Install the handlers before binding, so a signal that arrives once the
    // socket exists is never lost.
    let shutdown = shutdown_signal()?;
    tracing::info!(
        upstream = %settings.upstream.endpoint,
        socket = %settings.socket.path.display(),
        "starting fast-sandbox-node"
    );
    fast_sandbox_shim::serve(Shim::new(upstream), &settings.socket, shutdown)
        .await
        .with_context(|| format!("serving CRI on {}", settings.socket.path.display()))?;
    tracing::info!("stopped");
    Ok(())
}

fn init_logging(settings: &Settings) -> anyhow::Result<()> {
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(&directives)
            .with_context(|| format!("invalid {} {directives:?}", EnvFilter::DEFAULT_ENV))?,
        _ => {
            let directives = settings.log_filter.as_deref().unwrap_or("info");
            EnvFilter::try_new(directives)
                .with_context(|| format!("invalid log filter {directives:?}"))?
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match settings.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!(e).context("installing the log subscriber"))
}

/// Completes on the first SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
    })
}
