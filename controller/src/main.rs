//! fast-sandbox-controller: the cluster side of fast-sandbox.
//!
//! `run` reconciles the CRDs and serves the extender against a cluster;
//! `extender` serves the extender alone from a snapshot file; `crdgen`
//! writes the CRD YAML; `bench` and `simulate` measure the placement.

use anyhow::Context;
use clap::{Parser, Subcommand};
use fast_sandbox_proto::shape::KUBELET_SANDBOX_SECCOMP;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

use fast_sandbox_controller::agent::{self, AgentConfig, AgentDirectory};
use fast_sandbox_controller::bench::{self, BenchConfig};
use fast_sandbox_controller::crd;
use fast_sandbox_controller::events::KubeEvents;
use fast_sandbox_controller::extender::{self, Extender, ExtenderConfig};
use fast_sandbox_controller::leader::{self, Elector, LeaseConfig, Shutdown};
use fast_sandbox_controller::metrics::Metrics;
use fast_sandbox_controller::nodes::{NodeDirectory, StaticNodes};
use fast_sandbox_controller::reconcile::{ReconcileConfig, DEFAULT_IMAGE_PULL_GRACE};
use fast_sandbox_controller::run::{self, Instruments, Served};
use fast_sandbox_controller::scoring::Snapshot;
use fast_sandbox_controller::scoring::{Policy, SlotPolicy};
use fast_sandbox_controller::sim::{self, SimConfig};
use fast_sandbox_controller::{certs, links};
use futures::FutureExt;

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
    Extender {
        #[arg(long, default_value = "127.0.0.1:8888")]
        listen: SocketAddr,
        /// A JSON list of node states (see docs/scheduling.md).
        #[arg(long)]
        snapshot: PathBuf,
        #[command(flatten)]
        placement: PlacementArgs,
    },
    /// Reconcile SandboxPools and Sandboxes against a cluster and serve the
    /// extender verbs, from one node directory.
    Run(Box<RunArgs>),
    /// Remove the controller's finalizer from every SandboxPool, so that
    /// pools and CRDs can be deleted without a controller running (see
    /// docs/deploy.md, "Uninstall").
    Uninstall {
        /// A kubeconfig file; without it: KUBECONFIG, ~/.kube/config, or
        /// the in-cluster service account.
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// The kubeconfig context (default: its current context).
        #[arg(long)]
        context: Option<String>,
    },
    /// Issue a NodeAgent link certificate (`tls.crt`, `tls.key`, `ca.crt`)
    /// from the CA in --ca-dir, which is created there when missing.
    Certs {
        #[arg(long)]
        ca_dir: PathBuf,
        /// A node agent's certificate, for this Kubernetes node name.
        #[arg(long, required_unless_present_any = ["controller", "server"])]
        node: Option<String>,
        /// A server certificate for this DNS name (the extender's Service:
        /// fast-sandbox-controller.fast-sandbox-system.svc).
        #[arg(long, conflicts_with_all = ["node", "controller"])]
        server: Option<String>,
        /// The controller's client certificate.
        #[arg(long, conflicts_with = "node")]
        controller: bool,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = certs::DEFAULT_DAYS)]
        days: u32,
    },
    /// Write the CRD YAML generated from the Rust types, one file per CRD.
    Crdgen {
        #[arg(long, default_value = "deploy/crds")]
        out: PathBuf,
    },
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
        /// kube-scheduler's percentageOfNodesToScore, which sets how many
        /// node names each extender call carries; 0 is its adaptive default.
        #[arg(long, default_value_t = 0)]
        percentage_of_nodes_to_score: u32,
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
        /// Drop an assumed placement this long after it was made, ms,
        /// instead of when the node's report covers it.
        #[arg(long)]
        settle_after_ms: Option<u64>,
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

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Slots {
    /// No free slot: filtered out (the pod waits for a warm slot).
    Require,
    /// No free slot: kept, scored low (the pod may start cold).
    Prefer,
}

/// The flags of `run`.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// A kubeconfig file; without it: KUBECONFIG, ~/.kube/config, or
    /// the in-cluster service account.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long)]
    context: Option<String>,
    /// Where the extender listens.
    #[arg(long, default_value = "0.0.0.0:8888")]
    listen: SocketAddr,
    /// Node states from a JSON file (re-read on SIGHUP) instead of the
    /// node agents (tests, demos).
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// A node agent, `NODE=HOST:PORT` (repeatable): follow these instead
    /// of discovering agents from the Kubernetes Nodes (development).
    #[arg(long, value_name = "NODE=ADDR", conflicts_with = "snapshot")]
    agent: Vec<String>,
    #[command(flatten)]
    agent_link: links::AgentLinkArgs,
    #[command(flatten)]
    extender_tls: links::ExtenderTlsArgs,
    /// The port node agents serve on, at each Node's InternalIP.
    #[arg(long, default_value_t = agent::DEFAULT_AGENT_PORT)]
    agent_port: u16,
    /// The Nodes that run a node agent (label selector; "" for all).
    #[arg(long, default_value = agent::DEFAULT_NODE_SELECTOR)]
    agent_node_selector: String,
    /// Sandboxes: whether a node needs a free warm slot to be chosen
    /// (`require`: a Sandbox waits for one).
    #[arg(long, value_enum, default_value_t = Slots::Require)]
    sandbox_slots: Slots,
    /// Sandboxes: how long a pod may fail to pull its image before the
    /// Sandbox fails and the pod is deleted (releasing its warm slot).
    #[arg(long, default_value_t = DEFAULT_IMAGE_PULL_GRACE.as_secs())]
    image_pull_grace_seconds: u64,
    /// On shutdown, remove the controller's finalizer from every
    /// SandboxPool, so pools and CRDs can then be deleted in any order
    /// without a controller (for uninstalling; `uninstall` does the same
    /// once).
    #[arg(long)]
    remove_finalizers_on_shutdown: bool,
    /// Elect a leader among the replicas through a coordination.k8s.io
    /// Lease: only the leader reconciles (writes); every replica serves the
    /// extender. `--leader-elect=false` for a single replica.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// The Lease's namespace: the controller's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "fast-sandbox-system")]
    leader_elect_namespace: String,
    /// This replica's name in the Lease and in its Events (default: the
    /// POD_NAME, else HOSTNAME, environment variable).
    #[arg(long, env = "POD_NAME")]
    leader_elect_identity: Option<String>,
    #[command(flatten)]
    placement: PlacementArgs,
}

impl RunArgs {
    /// This replica's name: `--leader-elect-identity`, else `HOSTNAME`.
    fn identity(&self) -> Option<String> {
        self.leader_elect_identity
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|name| !name.is_empty())
    }

    /// The elector, when leader election is on.
    fn elector(&self, client: &kube::Client) -> anyhow::Result<Option<Elector>> {
        if !self.leader_elect {
            return Ok(None);
        }
        let identity = self.identity().unwrap_or_default();
        let config = LeaseConfig::new(&self.leader_elect_namespace, &identity);
        Ok(Some(Elector::new(client.clone(), config).context(
            "--leader-elect: pass --leader-elect-identity, or set POD_NAME",
        )?))
    }
}

/// How fast pods are recognised and nodes judged: the flags `extender`
/// and `run` share.
#[derive(Debug, clap::Args)]
struct PlacementArgs {
    /// Fast RuntimeClasses, `CLASS` or `CLASS=HANDLER` (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fast-runc,fast-crun,fast-gvisor,fast-kata"
    )]
    fast_class: Vec<String>,
    /// Extender: let the filter verb remove nodes (opt-in). Off, every
    /// node passes and nodes are only scored, so a fast pod goes wherever
    /// it would go without the extender and at worst starts cold. On, nodes
    /// without a warm pool of the pod's handler and shape, whose node
    /// plugin is not ready, or (with --slots require) without a free slot
    /// are filtered out. The cost: a pod no warm slot fits (another shape,
    /// every slot taken, node plugin down) stays Pending instead of
    /// starting cold.
    #[arg(long)]
    extender_filter: bool,
    /// Extender, with --extender-filter: whether a node needs a free warm
    /// slot to pass the filter.
    #[arg(long, value_enum, default_value_t = Slots::Prefer)]
    slots: Slots,
    /// Ignore nodes whose status is older than this.
    #[arg(long)]
    stale_after_ms: Option<u64>,
    /// The seccomp shape of every pod's sandbox (kubelet always asks
    /// RuntimeDefault for it), and of pools that set none.
    #[arg(long, default_value = KUBELET_SANDBOX_SECCOMP)]
    default_seccomp: String,
    /// Extender: count the best node of each fast pod as one slot fewer for
    /// this long (ms), until its status shows the claim; 0 turns it off.
    #[arg(long, default_value_t = extender::DEFAULT_ASSUME_TTL_MS)]
    assume_ttl_ms: u64,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

impl PlacementArgs {
    fn extender_config(&self) -> anyhow::Result<ExtenderConfig> {
        Ok(ExtenderConfig {
            fast_classes: fast_classes(&self.fast_class)?,
            policy: policy(self.slots, self.stale_after_ms),
            filter_nodes: self.extender_filter,
            default_seccomp: self.default_seccomp.clone(),
            assume_ttl_ms: (self.assume_ttl_ms > 0).then_some(self.assume_ttl_ms),
        })
    }
}

/// The node states in the JSON file `path`.
fn read_snapshot(path: &Path) -> anyhow::Result<Snapshot> {
    let json = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    extender::parse_snapshot(&json).with_context(|| format!("loading {}", path.display()))
}

/// Re-reads the snapshot file `path` on every SIGHUP and hands it to
/// `replace`; a file that does not load keeps the current snapshot.
fn reload_on_sighup(
    path: PathBuf,
    replace: impl Fn(Snapshot) + Send + 'static,
) -> anyhow::Result<()> {
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match read_snapshot(&path) {
                Ok(snapshot) => {
                    tracing::info!(nodes = snapshot.len(), "snapshot reloaded");
                    replace(snapshot);
                }
                Err(error) => tracing::warn!(error = format!("{error:#}"), "snapshot not reloaded"),
            }
        }
    });
    Ok(())
}

fn fast_classes(specs: &[String]) -> anyhow::Result<HashMap<String, String>> {
    specs
        .iter()
        .map(|spec| {
            let (class, handler) = spec.split_once('=').unwrap_or((spec, spec));
            anyhow::ensure!(
                !class.is_empty() && !handler.is_empty(),
                "--fast-class {spec:?}: expected CLASS or CLASS=HANDLER"
            );
            Ok((class.to_owned(), handler.to_owned()))
        })
        .collect()
}

/// `--agent NODE=ADDR` entries.
fn agent_entries(specs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    specs
        .iter()
        .map(|spec| match spec.split_once('=') {
            Some((node, address)) if !node.is_empty() && !address.is_empty() => {
                Ok((node.to_owned(), address.to_owned()))
            }
            _ => anyhow::bail!("--agent {spec:?}: expected NODE=HOST:PORT"),
        })
        .collect()
}

/// The snapshot-file directory, re-read on SIGHUP (a bad file keeps the
/// current snapshot).
fn static_nodes(path: PathBuf, initial: Snapshot) -> anyhow::Result<Arc<dyn NodeDirectory>> {
    let nodes = Arc::new(StaticNodes::new(initial));
    let reloaded = nodes.clone();
    reload_on_sighup(path, move |snapshot| reloaded.replace(snapshot))?;
    Ok(nodes)
}

fn policy(slots: Slots, stale_after_ms: Option<u64>) -> Policy {
    Policy {
        slots: match slots {
            Slots::Require => SlotPolicy::Require,
            Slots::Prefer => SlotPolicy::Prefer,
        },
        stale_after_ms,
    }
}

async fn kube_client(
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
) -> anyhow::Result<(kube::Client, run::Served)> {
    let options = kube::config::KubeConfigOptions {
        context,
        ..Default::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None if options.context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .context("using the default kubeconfig")?,
        None => kube::Config::infer().await.context(
            "no Kubernetes configuration: pass --kubeconfig, set KUBECONFIG, or run in a cluster",
        )?,
    };
    let url = config.cluster_url.to_string();
    let client =
        kube::Client::try_from(config).with_context(|| format!("building a client for {url}"))?;
    let served = run::preflight(&client, &url).await?;
    Ok((client, served))
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `extender`: the extender verbs from a snapshot file.
fn serve_extender(
    listen: SocketAddr,
    snapshot: PathBuf,
    placement: &PlacementArgs,
) -> anyhow::Result<()> {
    init_logging(placement.log_json);
    let nodes = read_snapshot(&snapshot)?;
    let extender = Arc::new(Extender::new(placement.extender_config()?, nodes));
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(async {
            let reloaded = extender.clone();
            reload_on_sighup(snapshot, move |nodes| reloaded.replace_snapshot(nodes))?;
            extender::listen(listen, extender)
                .await
                .with_context(|| format!("serving the extender on {listen}"))
        })
}

/// `run`: the reconcilers and the extender against a cluster.
fn run_controller(args: RunArgs) -> anyhow::Result<()> {
    let placement = &args.placement;
    init_logging(placement.log_json);
    let agents = agent_entries(&args.agent)?;
    let initial = match &args.snapshot {
        Some(path) => read_snapshot(path)?,
        None => Snapshot::default(),
    };
    // Without a snapshot file the node agents are the source; their
    // credential is needed before anything starts.
    let agent_config = match &args.snapshot {
        Some(_) => None,
        None => Some(args.agent_link.config()?),
    };
    let extender_config = placement.extender_config()?;
    let config = ReconcileConfig {
        fast_classes: extender_config.fast_classes.clone(),
        default_seccomp: placement.default_seccomp.clone(),
        sandbox_policy: policy(args.sandbox_slots, placement.stale_after_ms),
        image_pull_grace: std::time::Duration::from_secs(args.image_pull_grace_seconds),
    };
    let metrics = Arc::new(Metrics::default());
    let extender =
        Arc::new(Extender::new(extender_config, initial.clone()).with_metrics(metrics.clone()));
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(async move {
            let (client, served) =
                kube_client(args.kubeconfig.clone(), args.context.clone()).await?;
            let elector = args.elector(&client)?;
            let nodes: Arc<dyn NodeDirectory> = match (args.snapshot.clone(), agent_config) {
                (Some(path), _) => static_nodes(path, initial)?,
                (None, Some(config)) => agent_nodes(&args, config, &agents, &client)?,
                (None, None) => anyhow::bail!("no node source: neither a snapshot nor agents"),
            };
            let mut terminate =
                signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
            let shutdown: Shutdown = async move {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
                tracing::info!("shutting down");
            }
            .boxed()
            .shared();
            let listen = args.listen;
            tokio::spawn(run::feed_extender(nodes.clone(), extender.clone()));
            tokio::spawn(run::follow_pending_pods(client.clone(), extender.clone()));
            let server = args.extender_tls.serve(listen, extender);
            tracing::info!(%listen, "serving the extender and /metrics");
            let instruments = Instruments {
                events: Arc::new(KubeEvents::start(
                    client.clone(),
                    args.identity(),
                    metrics.clone(),
                )),
                metrics,
            };
            let reconciling = reconcile_while_leading(
                elector,
                shutdown,
                Reconcilers {
                    client: client.clone(),
                    nodes,
                    config,
                    instruments,
                    served,
                },
            );
            tokio::select! {
                result = server => result?,
                () = reconciling => {}
            }
            if args.remove_finalizers_on_shutdown {
                let removed = run::remove_finalizers(&client)
                    .await
                    .context("removing the SandboxPool finalizers")?;
                tracing::info!(removed, "SandboxPool finalizers removed on shutdown");
            }
            Ok(())
        })
}

/// What the leader runs: both reconcilers.
struct Reconcilers {
    client: kube::Client,
    nodes: Arc<dyn NodeDirectory>,
    config: ReconcileConfig,
    instruments: Instruments,
    served: Served,
}

impl Reconcilers {
    /// Runs them until `stop`, with the leader gauge up meanwhile.
    async fn run(&self, stop: Shutdown) {
        let metrics = self.instruments.metrics.clone();
        metrics.leader.set(1);
        tracing::info!("reconciling SandboxPools and Sandboxes");
        run::controllers(
            self.client.clone(),
            self.nodes.clone(),
            self.config.clone(),
            self.instruments.clone(),
            self.served,
            stop,
        )
        .await;
        metrics.leader.set(0);
    }
}

/// Runs the reconcilers until `shutdown`: always without an elector,
/// otherwise while this replica leads. A leader that stops releases the
/// lease once its reconcilers have finished.
async fn reconcile_while_leading(
    elector: Option<Elector>,
    shutdown: Shutdown,
    reconcilers: Reconcilers,
) {
    let Some(elector) = elector else {
        return reconcilers.run(shutdown).await;
    };
    let (leading, follow) = tokio::sync::watch::channel(false);
    let electing = tokio::spawn(elector.run(leading, shutdown.clone()));
    leader::lead(follow, shutdown, |stop| reconcilers.run(stop)).await;
    match electing.await {
        Ok(mut elector) => {
            if let Err(error) = elector.release().await {
                tracing::warn!(%error, "leader lease not released; another replica takes over when it expires");
            }
        }
        Err(error) => tracing::warn!(%error, "leader election task failed"),
    }
}

/// The node agents' directory: the agents given with `--agent`, or those
/// of the Nodes the selector picks.
fn agent_nodes(
    args: &RunArgs,
    agent_config: AgentConfig,
    agents: &[(String, String)],
    client: &kube::Client,
) -> anyhow::Result<Arc<dyn NodeDirectory>> {
    let directory = Arc::new(AgentDirectory::new(agent_config));
    if agents.is_empty() {
        let discovering = directory.clone();
        let nodes = kube::Api::all(client.clone());
        let selector = args.agent_node_selector.clone();
        let port = args.agent_port;
        tracing::info!(selector = %selector, port, "following the node agents of the selected Nodes");
        tokio::spawn(async move {
            discovering.discover(nodes, Some(&selector), port).await;
        });
    } else {
        for (node, address) in agents {
            directory
                .upsert(node, address)
                .with_context(|| format!("--agent {node}={address}"))?;
        }
    }
    Ok(directory)
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Extender {
            listen,
            snapshot,
            placement,
        } => serve_extender(listen, snapshot, &placement)?,
        Command::Run(args) => run_controller(*args)?,
        Command::Certs {
            ca_dir,
            node,
            server,
            controller: _,
            out,
            days,
        } => {
            let subject = match (node, server) {
                (Some(node), _) => certs::Subject::Node(node),
                (None, Some(name)) => certs::Subject::Server(name),
                (None, None) => certs::Subject::Controller,
            };
            certs::issue_into(&ca_dir, &subject, days, &out)
                .with_context(|| format!("issuing a certificate into {}", out.display()))?;
        }
        Command::Uninstall {
            kubeconfig,
            context,
        } => {
            init_logging(false);
            tokio::runtime::Runtime::new()
                .context("starting the async runtime")?
                .block_on(async {
                    let (client, _) = kube_client(kubeconfig, context).await?;
                    let removed = run::remove_finalizers(&client)
                        .await
                        .context("removing the SandboxPool finalizers")?;
                    println!("removed the finalizer of {removed} SandboxPools");
                    anyhow::Ok(())
                })?;
        }
        Command::Crdgen { out } => {
            for path in crd::write_crds(&out)? {
                println!("{}", path.display());
            }
        }
        Command::Bench {
            nodes,
            decisions,
            apps,
            seed,
            percentage_of_nodes_to_score,
        } => {
            let report = bench::run(BenchConfig {
                nodes,
                decisions,
                apps,
                seed,
                percentage_of_nodes_to_score,
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
            settle_after_ms,
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
                settle_after_ms,
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

#[cfg(test)]
impl Command {
    /// `run`'s arguments, if this is `run`.
    fn into_run(self) -> Option<RunArgs> {
        match self {
            Command::Run(args) => Some(*args),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_class_specs() {
        let classes = fast_classes(&["fast-runc".into(), "warm=fast-crun".into()]).unwrap();
        assert_eq!(classes["fast-runc"], "fast-runc");
        assert_eq!(classes["warm"], "fast-crun");
        assert!(fast_classes(&["=x".into()]).is_err());
        assert!(fast_classes(&["x=".into()]).is_err());
    }

    #[test]
    fn agent_specs_and_flags() {
        assert_eq!(
            agent_entries(&["a=127.0.0.1:9465".into()]).unwrap(),
            [("a".to_owned(), "127.0.0.1:9465".to_owned())]
        );
        for bad in ["a", "=127.0.0.1:1", "a="] {
            let error = agent_entries(&[bad.into()]).unwrap_err().to_string();
            assert!(error.contains("NODE=HOST:PORT"), "{error}");
        }
        let run = |extra: &[&str]| {
            let mut argv = vec!["fast-sandbox-controller", "run"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).map(|a| a.command)
        };
        match run(&[]).unwrap().into_run() {
            Some(RunArgs {
                agent_link,
                extender_tls,
                agent_port,
                agent_node_selector,
                snapshot: None,
                ..
            }) => {
                assert_eq!(
                    agent_link.agent_tls_dir,
                    PathBuf::from("/etc/fast-sandbox-agent-tls")
                );
                assert!(!agent_link.agent_insecure && agent_link.agent_token_file.is_none());
                assert!(!extender_tls.extender_insecure);
                assert_eq!(agent_port, 9465);
                assert_eq!(
                    agent_node_selector,
                    "node-restriction.kubernetes.io/fast-sandbox=true"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(run(&["--agent=a=127.0.0.1:1", "--agent=b=127.0.0.1:2"]).is_ok());
        assert!(run(&["--agent=a=127.0.0.1:1", "--snapshot=nodes.json"]).is_err());
    }

    /// `run` with the flags `extra`.
    fn run_args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["fast-sandbox-controller", "run"];
        argv.extend_from_slice(extra);
        match Args::try_parse_from(argv).unwrap().command {
            Command::Run(args) => *args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn leader_election_is_on_by_default_and_can_be_turned_off() {
        let parse = run_args;
        assert!(parse(&[]).leader_elect);
        assert!(!parse(&["--leader-elect=false"]).leader_elect);
        let named = parse(&["--leader-elect-identity=replica-a"]);
        assert_eq!(named.identity().as_deref(), Some("replica-a"));
    }

    /// `run` with the flags it is deployed with judges pods like
    /// `ExtenderConfig::default()` (what tests/manifests.rs checks against
    /// the shipped pools): no filtering, kubelet's sandbox seccomp.
    #[test]
    fn default_flags_never_filter_and_use_kubelets_sandbox_seccomp() {
        let parse = |extra: &[&str]| run_args(extra).placement.extender_config().unwrap();
        let config = parse(&[]);
        let defaults = ExtenderConfig::default();
        assert!(!config.filter_nodes);
        assert_eq!(config.filter_nodes, defaults.filter_nodes);
        assert_eq!(config.default_seccomp, "runtime-default");
        assert_eq!(config.default_seccomp, defaults.default_seccomp);
        assert_eq!(config.policy, defaults.policy);
        assert!(parse(&["--extender-filter"]).filter_nodes);
    }

    /// The Deployment's command is one `run` accepts, and its TLS
    /// directories are where their Secrets are mounted.
    #[test]
    fn the_deployments_command_parses_and_finds_its_credentials() {
        use k8s_openapi::api::apps::v1::Deployment;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/controller/deployment.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let deployment: Deployment = serde_saphyr::from_str(&text).unwrap();
        let spec = deployment.spec.unwrap();
        // Highly available: two replicas, one leader.
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.unwrap();
        let container = &pod.containers[0];
        let command = container.command.clone().unwrap();
        let Some(RunArgs {
            agent_link,
            extender_tls,
            snapshot: None,
            leader_elect: true,
            placement: PlacementArgs { log_json: true, .. },
            ..
        }) = Args::try_parse_from(&command).unwrap().command.into_run()
        else {
            panic!(
                "{command:?} is not `run` fed by the node agents, electing a leader, logging JSON"
            );
        };
        // Each replica's Lease identity is its pod name.
        let pod_name = container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "POD_NAME");
        let field = pod_name
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(field, Some("metadata.name"));
        assert!(!agent_link.agent_insecure && !extender_tls.extender_insecure);
        for (dir, secret) in [
            (
                &agent_link.agent_tls_dir,
                "fast-sandbox-controller-agent-tls",
            ),
            (&extender_tls.extender_tls_dir, "fast-sandbox-extender-tls"),
        ] {
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(secret))
                .unwrap_or_else(|| panic!("no volume of Secret {secret}"));
            let mounted = container.volume_mounts.iter().flatten().any(|m| {
                m.name == volume.name && dir.as_path() == std::path::Path::new(&m.mount_path)
            });
            assert!(mounted, "{} is not Secret {secret}'s mount", dir.display());
        }
    }
}
