//! The two serving commands: `extender` (the extender verbs from a
//! snapshot file) and `run` (the reconcilers and the extender against a
//! cluster, the reconcilers only while this replica leads).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::FutureExt;
use tokio::signal::unix::{signal, SignalKind};

use fast_sandbox_controller::agent::{self, AgentConfig, AgentDirectory};
use fast_sandbox_controller::events::KubeEvents;
use fast_sandbox_controller::extender::{self, Extender, ExtenderConfig};
use fast_sandbox_controller::leader::{self, Elector, LeaseConfig, Shutdown};
use fast_sandbox_controller::links;
use fast_sandbox_controller::metrics::Metrics;
use fast_sandbox_controller::nodes::{NodeDirectory, StaticNodes};
use fast_sandbox_controller::reconcile::{ReconcileConfig, DEFAULT_IMAGE_PULL_GRACE};
use fast_sandbox_controller::run::{self, Instruments, Served};
use fast_sandbox_controller::scoring::Snapshot;

use crate::flags::{agent_entries, policy, KubeArgs, PlacementArgs, Slots};

/// The flags of `extender`.
#[derive(Debug, clap::Args)]
pub struct ExtenderArgs {
    #[arg(long, default_value = "127.0.0.1:8888")]
    listen: SocketAddr,
    /// A JSON list of node states (see docs/scheduling.md).
    #[arg(long)]
    snapshot: PathBuf,
    #[command(flatten)]
    placement: PlacementArgs,
}

/// The flags of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    kube: KubeArgs,
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
    /// The reconcilers' settings: the extender's classes and seccomp, the
    /// `Sandbox` path's own slot policy and image-pull grace.
    fn reconcile_config(&self, extender: &ExtenderConfig) -> ReconcileConfig {
        ReconcileConfig {
            fast_classes: extender.fast_classes.clone(),
            default_seccomp: self.placement.default_seccomp.clone(),
            sandbox_policy: policy(self.sandbox_slots, self.placement.stale_after_ms),
            image_pull_grace: Duration::from_secs(self.image_pull_grace_seconds),
        }
    }

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

/// The snapshot-file directory, re-read on SIGHUP (a bad file keeps the
/// current snapshot).
fn static_nodes(path: PathBuf, initial: Snapshot) -> anyhow::Result<Arc<dyn NodeDirectory>> {
    let nodes = Arc::new(StaticNodes::new(initial));
    let reloaded = nodes.clone();
    reload_on_sighup(path, move |snapshot| reloaded.replace(snapshot))?;
    Ok(nodes)
}

/// A client of the API server `args` name, checked by a preflight.
pub async fn kube_client(args: &KubeArgs) -> anyhow::Result<(kube::Client, run::Served)> {
    let options = kube::config::KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
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

/// Logs to stderr, as JSON lines when `json`.
pub fn init_logging(json: bool) {
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
pub fn extender(args: ExtenderArgs) -> anyhow::Result<()> {
    let ExtenderArgs {
        listen,
        snapshot,
        placement,
    } = args;
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
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.placement.log_json);
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
    let extender_config = args.placement.extender_config()?;
    let config = args.reconcile_config(&extender_config);
    let metrics = Arc::new(Metrics::default());
    let extender =
        Arc::new(Extender::new(extender_config, initial.clone()).with_metrics(metrics.clone()));
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(async move {
            let (client, served) = kube_client(&args.kube).await?;
            let nodes: Arc<dyn NodeDirectory> = match (args.snapshot.clone(), agent_config) {
                (Some(path), _) => static_nodes(path, initial)?,
                (None, Some(config)) => agent_nodes(&args, config, &agents, &client)?,
                (None, None) => anyhow::bail!("no node source: neither a snapshot nor agents"),
            };
            let instruments = Instruments {
                events: Arc::new(KubeEvents::start(
                    client.clone(),
                    args.identity(),
                    metrics.clone(),
                )),
                metrics,
            };
            let reconcilers = Reconcilers {
                client,
                nodes,
                config,
                instruments,
                served,
            };
            serve_cluster(&args, extender, reconcilers).await
        })
}

/// SIGTERM or Ctrl-C, shared by everything that stops on it.
fn shutdown_signal() -> anyhow::Result<Shutdown> {
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down");
    }
    .boxed()
    .shared())
}

/// Serves the extender and, while leading, runs the reconcilers, until
/// shutdown.
async fn serve_cluster(
    args: &RunArgs,
    extender: Arc<Extender>,
    reconcilers: Reconcilers,
) -> anyhow::Result<()> {
    let client = reconcilers.client.clone();
    let elector = args.elector(&client)?;
    let shutdown = shutdown_signal()?;
    let listen = args.listen;
    tokio::spawn(run::feed_extender(
        reconcilers.nodes.clone(),
        extender.clone(),
    ));
    tokio::spawn(run::follow_pending_pods(client.clone(), extender.clone()));
    let server = args.extender_tls.serve(listen, extender);
    tracing::info!(%listen, "serving the extender and /metrics");
    let reconciling = reconcile_while_leading(elector, shutdown, reconcilers);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Args, Command};
    use clap::Parser;
    use fast_sandbox_controller::extender::ExtenderConfig;

    impl Command {
        /// `run`'s arguments, if this is `run`.
        fn into_run(self) -> Option<RunArgs> {
            match self {
                Command::Run(args) => Some(*args),
                _ => None,
            }
        }
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
