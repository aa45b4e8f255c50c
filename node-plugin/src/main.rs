//! `fast-sandbox-node`: the DaemonSet process. `serve` runs the CRI shim
//! with the node's warm slot pools behind it, the NodeAgent server and the
//! admin endpoint (metrics, pools, claims, health); `supervise -- serve ...`
//! keeps `serve` running (restarts it when it dies); `pools` and `claims`
//! read the admin endpoint of a running node plugin.

use std::{
    collections::HashMap, future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fast_sandbox_node::{
    admin,
    fixup::{ByRuntime, Mechanism, RealGuestOps, RealOps},
    health::{self, Health},
    metrics::Metrics,
    pool::{records, ManagerConfig, PoolManager, PoolSpec},
};
use fast_sandbox_shim::{
    slots::{HandlerMap, SlotSource, SLOT_NAMESPACE},
    Shim, Upstream,
};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

use fast_sandbox_node::config::{self, FileConfig, LogFormat, Overrides, Settings};

/// `--version`, with the git revision.
const VERSION: &str = fast_sandbox_proto::version!();

#[derive(Debug, Parser)]
#[command(name = "fast-sandbox-node", version = VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve CRI on the shim's socket, forwarding to the upstream runtime.
    Serve(ServeArgs),
    /// Remove every slot (free and claimed), claim record, token and
    /// placeholder cgroup of this node plugin: the uninstall path. The node
    /// plugin must be stopped first; a graceful stop keeps free slots for
    /// the next run, this removes them.
    Uninstall(UninstallArgs),
    /// Run `fast-sandbox-node ARGS` (normally `serve ...`) and restart it
    /// whenever it ends, without kubelet; forwards SIGTERM/SIGINT.
    Supervise(fast_sandbox_node::supervisor::SuperviseArgs),
    /// Show the warm pools of a running node plugin.
    Pools {
        /// The node plugin's admin endpoint.
        #[arg(long, env = "FAST_SANDBOX_ADMIN", default_value = config::DEFAULT_ADMIN_ADDRESS)]
        admin: SocketAddr,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the claimed slots of a running node plugin and their pods.
    Claims {
        /// The node plugin's admin endpoint.
        #[arg(long, env = "FAST_SANDBOX_ADMIN", default_value = config::DEFAULT_ADMIN_ADDRESS)]
        admin: SocketAddr,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML config file; flags and environment variables override it.
    #[arg(long, env = "FAST_SANDBOX_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Write every CRI call (method, request and answer as JSON and as
    /// base64 protobuf, timing) to FILE, one JSON object a line. Off by
    /// default; for recording what a real kubelet sends.
    #[arg(long, env = "FAST_SANDBOX_CRI_CAPTURE", value_name = "FILE")]
    cri_capture: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

#[derive(Debug, clap::Args)]
struct UninstallArgs {
    /// The node plugin's TOML config file (the same as `serve`'s).
    #[arg(long, env = "FAST_SANDBOX_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Supervise(args) = &cli.command {
        return supervise(args);
    }
    // One worker thread serves CRI: the proxy hop is dominated by kernel
    // wakeups, and cross-thread handoffs only add to them. A multi-thread
    // runtime with that one worker rather than a current-thread one, so a
    // synchronous call that must wait for the blocking pool (a pod's
    // cgroup read for `PodSandboxStats`) hands the worker's other tasks to
    // another thread instead of stalling them (`blocking::wait_in_place`).
    // Blocking-pool threads (fix-ups) are kept instead of re-created:
    // creating a thread waits behind any cgroup attach on the node, which
    // would put container starts elsewhere on the claim path.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Uninstall(args) => uninstall(args).await,
            Command::Pools { admin, json } => show_pools(admin, json).await,
            Command::Claims { admin, json } => show_claims(admin, json).await,
            Command::Supervise(_) => unreachable!("handled before the runtime starts"),
        }
    })
}

/// `fast-sandbox-node supervise`: on its own small runtime (it only waits
/// for signals and its child); exits with the stopped child's status.
fn supervise(args: &fast_sandbox_node::supervisor::SuperviseArgs) -> anyhow::Result<()> {
    let spawn = args.spawn()?;
    init_logging(&Settings::resolve(
        FileConfig::default(),
        Overrides::default(),
    ))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let code = runtime
        .block_on(fast_sandbox_node::supervisor::run(&spawn, args.backoff()))
        .context("supervising the serving process")?;
    drop(runtime);
    std::process::exit(code)
}

/// How long an idle blocking-pool thread is kept.
const BLOCKING_THREAD_KEEP_ALIVE: Duration = Duration::from_secs(24 * 3600);

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (file, specs, mechanisms) = read_config(args.config.as_deref())?;
    let agent = config::agent_settings(
        &file.agent,
        args.overrides.node_name.clone(),
        args.overrides.agent_ip,
    )
    .context("invalid [agent] configuration")?;
    let scrape = config::metrics_settings(&file.admin, args.overrides.metrics_addr.as_deref())
        .context("invalid [admin] configuration")?;
    let settings = Settings::resolve(file, args.overrides);
    init_logging(&settings)?;
    fast_sandbox_node::fault::setup()?;

    let upstream = Upstream::connect_lazy(&settings.upstream)
        .context("configuring the upstream CRI client")?;
    // Install the handlers before binding, so a signal that arrives once the
    // socket exists is never lost.
    let stopped = stop_on_signal()?;
    tracing::info!(
        upstream = %settings.upstream.endpoint,
        socket = %settings.socket.path.display(),
        pools = specs.len(),
        "starting fast-sandbox-node"
    );

    let metrics = Arc::new(Metrics::default());
    let health = watch_health(&settings, stopped())?;
    let pools = if specs.is_empty() {
        None
    } else {
        let (manager, handlers) = start_pools(&settings, specs, &mechanisms, &metrics).await?;
        // A pool's `keep` on a network that is not identity-free stops the
        // start when the CNI configuration is already there.
        manager
            .decide_at_start()
            .await
            .context("deciding the pools' network modes")?;
        Some((manager, handlers))
    };
    // Recovered once the pools have reconciled with upstream, which they
    // do in the background after CRI is served.
    match &pools {
        None => health.mark_recovered(),
        Some((manager, _)) => {
            let (manager, health) = (Arc::clone(manager), health.clone());
            tokio::spawn(async move {
                manager.recovered().await;
                health.mark_recovered();
            });
        }
    }
    let (shim, refill) = build_shim(
        upstream,
        &pools,
        &settings,
        &mechanisms,
        args.cri_capture.as_deref(),
        &stopped,
    )?;
    let pools = pools.map(|(manager, _)| manager);
    serve_side_endpoints(scrape, agent, &settings, pools, metrics, health, &stopped).await?;
    fast_sandbox_shim::serve(shim, &settings.socket, stopped())
        .await
        .with_context(|| format!("serving CRI on {}", settings.socket.path.display()))?;
    if let Some(refill) = refill {
        finish_refill(refill).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The CRI shim over upstream: backed by the pools when there are any
/// (their refill loop started, its handle returned), else hiding the slots
/// a run with pools left; capturing every call when asked.
fn build_shim(
    upstream: Upstream,
    pools: &Option<(Arc<PoolManager>, HandlerMap)>,
    settings: &Settings,
    mechanisms: &HashMap<String, Mechanism>,
    cri_capture: Option<&std::path::Path>,
    stopped: &(impl Fn() -> BoxedStop + Clone),
) -> anyhow::Result<(Shim, Option<tokio::task::JoinHandle<()>>)> {
    let mut refill = None;
    let shim = match pools {
        // No pools: still hide the slots a run with pools left.
        None => Shim::with_slots(
            upstream,
            HandlerMap::default(),
            Arc::new(
                fast_sandbox_node::pool::TokenOnly::open(
                    &settings.slots.state_dir,
                    real_fixup(settings, mechanisms),
                )
                .context("reading the slot token and claim records")?,
            ),
        ),
        Some((manager, handlers)) => {
            refill = Some(tokio::spawn(Arc::clone(manager).run(stopped())));
            Shim::with_slots(
                upstream,
                handlers.clone(),
                Arc::clone(manager) as Arc<dyn SlotSource>,
            )
        }
    };
    let Some(path) = cri_capture else {
        return Ok((shim, refill));
    };
    let capture = fast_sandbox_shim::Capture::open(path)
        .with_context(|| format!("opening the CRI capture file {}", path.display()))?;
    tracing::warn!(path = %path.display(), "capturing every CRI call (pod specs and env included)");
    Ok((shim.with_capture(capture), refill))
}

/// Starts what is served besides CRI, each when configured: `/metrics`,
/// the admin endpoints, the NodeAgent.
async fn serve_side_endpoints(
    scrape: Option<config::MetricsSettings>,
    agent: Option<fast_sandbox_node::agent::AgentSettings>,
    settings: &Settings,
    pools: Option<Arc<PoolManager>>,
    metrics: Arc<Metrics>,
    health: Health,
    stopped: &(impl Fn() -> BoxedStop + Clone),
) -> anyhow::Result<()> {
    if let Some(scrape) = scrape {
        let (pools, metrics) = (pools.clone(), Arc::clone(&metrics));
        serve_metrics(scrape, pools, metrics, health.clone(), stopped()).await?;
    }
    if let Some(address) = &settings.admin {
        serve_admin(address, pools.clone(), metrics, health.clone(), stopped()).await?;
    }
    if let Some(agent) = agent {
        serve_agent(agent, settings, pools, health, stopped()).await?;
    }
    Ok(())
}

/// The config file (or the defaults) and the pools and fix-up mechanisms
/// it configures.
fn read_config(
    path: Option<&std::path::Path>,
) -> anyhow::Result<(FileConfig, Vec<PoolSpec>, HashMap<String, Mechanism>)> {
    let file = match path {
        Some(path) => config::load(path)?,
        None => FileConfig::default(),
    };
    let specs = config::pool_specs(&file.pools).context("invalid [[pool]] configuration")?;
    let mechanisms =
        config::fixup_mechanisms(&file.pools).context("invalid [[pool]] configuration")?;
    Ok((file, specs, mechanisms))
}

/// `fast-sandbox-node uninstall`: everything `serve` left on the node.
async fn uninstall(args: UninstallArgs) -> anyhow::Result<()> {
    let (file, specs, mechanisms) = read_config(args.config.as_deref())?;
    let settings = Settings::resolve(file, args.overrides);
    init_logging(&settings)?;
    if std::os::unix::net::UnixStream::connect(&settings.socket.path).is_ok() {
        anyhow::bail!(
            "a node plugin is serving on {}; stop it before uninstalling",
            settings.socket.path.display()
        );
    }
    let metrics = Arc::new(Metrics::default());
    let (manager, _) = start_pools(&settings, specs, &mechanisms, &metrics).await?;
    let removed = manager
        .remove_everything()
        .await
        .context("removing the node's slots")?;
    match std::fs::remove_file(&settings.socket.path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e)
                .with_context(|| format!("removing the socket {}", settings.socket.path.display()))
        }
        _ => {}
    }
    println!("removed {removed} slots and the node plugin's state");
    Ok(())
}

/// The node plugin's health, with upstream checked in the background
/// until `stopped` (start-up marks recovery done).
fn watch_health(
    settings: &Settings,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Health> {
    let channel = fast_sandbox_shim::cri_channel(&settings.upstream.endpoint)
        .context("configuring the health check's upstream client")?;
    let health = Health::new();
    tokio::spawn(health::watch_upstream(
        health::CriVersion::new(channel, health::UPSTREAM_CHECK_TIMEOUT),
        health.clone(),
        health::UPSTREAM_CHECK_INTERVAL,
        stopped,
    ));
    Ok(health)
}

/// Starts the scrapers' `/metrics` listener in the background.
async fn serve_metrics(
    scrape: config::MetricsSettings,
    pools: Option<Arc<PoolManager>>,
    metrics: Arc<Metrics>,
    health: Health,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let authenticated = scrape.token_file.is_some();
    let (bound, server) = admin::bind_metrics(
        scrape.address,
        scrape.token_file,
        pools,
        metrics,
        health,
        stopped,
    )
    .await?;
    tracing::info!(address = %bound, authenticated, "serving /metrics for scrapers");
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    Ok(())
}

/// Starts the admin endpoint (metrics, pools, claims, health) in the
/// background.
async fn serve_admin(
    address: &str,
    pools: Option<Arc<PoolManager>>,
    metrics: Arc<Metrics>,
    health: Health,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr: SocketAddr = address
        .parse()
        .with_context(|| format!("invalid admin address {address:?}"))?;
    let (bound, server) = admin::bind(addr, pools, metrics, health, stopped).await?;
    tracing::info!(address = %bound, "serving metrics on /metrics, pools on /pools");
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "admin endpoint failed");
        }
    });
    Ok(())
}

/// Waits for the refill task to end at shutdown. A slot being created is
/// finished, not cancelled: containerd cleans up a cancelled
/// RunPodSandbox but not the cgroup parent runc made for it.
async fn finish_refill(refill: tokio::task::JoinHandle<()>) {
    if tokio::time::timeout(REFILL_STOP_TIMEOUT, refill)
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?REFILL_STOP_TIMEOUT, "a slot creation was still running at shutdown; abandoning it");
    }
}

/// How long shutdown waits for a slot creation in flight.
const REFILL_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts the node agent (the controller's NodeAgent API) in the background:
/// binding its address is retried there (the node's address may not be
/// assigned yet), so CRI is served meanwhile and a node agent that cannot
/// bind never takes kubelet's runtime down with it.
async fn serve_agent(
    agent: fast_sandbox_node::agent::AgentSettings,
    settings: &Settings,
    pools: Option<Arc<PoolManager>>,
    health: Health,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let token = agent
        .token_file
        .as_deref()
        .map(fast_sandbox_node::agent::Token::from_file)
        .transpose()?;
    if agent.tls.is_none() {
        tracing::warn!("agent.insecure: the node agent serves cleartext (development only)");
    }
    let upstream = fast_sandbox_shim::cri_channel(&settings.upstream.endpoint)
        .context("configuring the node agent's upstream client")?;
    let mut parts = fast_sandbox_node::agent::AgentParts {
        pools,
        upstream,
        upstream_timeout: settings.upstream.call_timeout,
        token,
        tls: None,
        max_slots: agent.max_slots,
        node_name: agent.node_name.clone(),
        image_interval: agent.image_interval,
        health,
    };
    let mut stopped = Box::pin(stopped);
    tokio::spawn(async move {
        if let Some(files) = &agent.tls {
            match await_credential(files, &mut stopped).await {
                Some(tls) => parts.tls = Some(tls),
                None => return,
            }
        }
        let (bound, server) =
            match fast_sandbox_node::agent::bind(agent.address, parts, stopped).await {
                Ok(bound) => bound,
                Err(e) => {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "node agent not served: the controller cannot see or size this node's pools"
                    );
                    return;
                }
            };
        tracing::info!(address = %bound, node = %agent.node_name, "serving the node agent");
        if let Err(e) = server.await {
            tracing::error!(error = format!("{e:#}"), "node agent failed");
        }
    });
    Ok(())
}

/// The agent's TLS credential, waited for until it loads (a node whose
/// credential is provisioned after the node plugin started gets its agent
/// without a restart) or `stopped` resolves (`None`). Meanwhile CRI is
/// served: kubelet's runtime never waits for the controller's link.
async fn await_credential(
    files: &fast_sandbox_proto::tls::TlsFiles,
    stopped: &mut (impl Future<Output = ()> + Unpin),
) -> Option<fast_sandbox_node::agent::ServerTls> {
    const RETRY: Duration = Duration::from_secs(10);
    let mut last = String::new();
    loop {
        match fast_sandbox_proto::tls::Reloading::new(
            files.clone(),
            fast_sandbox_proto::tls::server_config,
        ) {
            Ok(tls) => return Some(Arc::new(tls)),
            Err(error) => {
                let error = format!("{error:#}");
                if error != last {
                    tracing::error!(
                        %error,
                        retry_s = RETRY.as_secs(),
                        "node agent not served yet: no usable TLS credential in agent.tls_dir"
                    );
                    last = error;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY) => {}
            () = &mut *stopped => return None,
        }
    }
}

/// `fast-sandbox-node pools`: the pools of a running node plugin.
async fn show_pools(admin: SocketAddr, json: bool) -> anyhow::Result<()> {
    let body = admin::get(admin, "/pools").await?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let pools: Vec<serde_json::Value> =
        serde_json::from_str(&body).context("the admin endpoint's /pools is not a JSON list")?;
    println!(
        "{:<20} {:<14} {:<10} {:>5} {:>7} {:>7}  MISSES (per handler)",
        "POOL", "HANDLER", "UPSTREAM", "FREE", "DESIRED", "CLAIMED"
    );
    for p in &pools {
        let s = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
        let n = |k: &str| p[k].as_u64().unwrap_or(0);
        let misses: Vec<String> = p["misses"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(reason, count)| format!("{reason}={}", count.as_u64().unwrap_or(0)))
            .collect();
        println!(
            "{:<20} {:<14} {:<10} {:>5} {:>7} {:>7}  {}",
            s("name"),
            s("exposed_handler"),
            s("upstream_handler"),
            n("free"),
            n("desired"),
            n("claimed"),
            if misses.is_empty() {
                "-".to_owned()
            } else {
                misses.join(",")
            }
        );
    }
    Ok(())
}

/// `fast-sandbox-node claims`: claimed slots and the pods that own them.
async fn show_claims(admin: SocketAddr, json: bool) -> anyhow::Result<()> {
    let body = admin::get(admin, "/claims").await?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let claims: Vec<serde_json::Value> =
        serde_json::from_str(&body).context("the admin endpoint's /claims is not a JSON list")?;
    println!(
        "{:<14} {:<20} {:<14} {:<40}",
        "SANDBOX", "POOL", "HANDLER", "POD"
    );
    for c in &claims {
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
        let id = s("sandbox_id");
        println!(
            "{:<14} {:<20} {:<14} {}/{}",
            &id[..id.len().min(13)],
            s("pool"),
            s("exposed_handler"),
            s("pod_namespace"),
            s("pod_name")
        );
    }
    Ok(())
}

/// Reconciles and starts the warm pools.
async fn start_pools(
    settings: &Settings,
    specs: Vec<PoolSpec>,
    mechanisms: &HashMap<String, Mechanism>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Arc<PoolManager>, HandlerMap)> {
    let handlers = HandlerMap::new(
        specs
            .iter()
            .map(|s| (s.exposed_handler.clone(), s.key.upstream_handler.clone())),
    );
    let channel = fast_sandbox_shim::cri_channel(&settings.upstream.endpoint)
        .context("configuring the pools' upstream client")?;
    let fixup = real_fixup(settings, mechanisms);
    let token = instance_token(&settings.slots.state_dir)?;
    let cfg = ManagerConfig {
        state_dir: settings.slots.state_dir.clone(),
        record_copies: Some(records::sandboxes_dir(&settings.slots.containerd_root)),
        placeholder_cgroup_root: settings.slots.cgroup_root_of(&token),
        placeholder_namespace: SLOT_NAMESPACE.to_owned(),
        upstream_timeout: settings.upstream.call_timeout,
        refill_interval: settings.slots.refill_interval,
        refill_delay: settings.slots.refill_delay,
        health_interval: settings.slots.health_interval,
        cni: fast_sandbox_node::network::CniSettings {
            conf_dir: settings.slots.cni_conf_dir.clone(),
            bin_dirs: settings.slots.cni_bin_dirs.clone(),
            timeout: CNI_PLUGIN_TIMEOUT,
            recheck: CNI_RECHECK,
        },
    };
    let manager = PoolManager::start(specs, cfg, channel, fixup, Arc::clone(metrics))
        .await
        .context("starting the warm pools (reconciling with upstream)")?;
    Ok((manager, handlers))
}

/// One fix-up mechanism per upstream runtime: setns for runc/crun, a
/// command inside the sandbox for gVisor/Kata (docs/runtimes.md).
fn real_fixup(settings: &Settings, mechanisms: &HashMap<String, Mechanism>) -> Arc<ByRuntime> {
    Arc::new(ByRuntime::real(
        Arc::new(RealOps::new()),
        Arc::new(RealGuestOps),
        settings.slots.containerd_root.clone(),
        mechanisms,
        FIXUP_DEADLINE,
    ))
}

/// The slot token of the instance whose state is in `state_dir` (created
/// on first use).
fn instance_token(state_dir: &std::path::Path) -> anyhow::Result<String> {
    records::RecordStore::open(state_dir)
        .and_then(|r| r.token())
        .with_context(|| format!("reading the slot token in {}", state_dir.display()))
}

/// Upper bound of one claim's fix-up; past it the slot is destroyed and the
/// pod starts cold.
const FIXUP_DEADLINE: Duration = Duration::from_secs(2);

/// Upper bound of one CNI plugin run of a `rebind` claim (containerd's own
/// CNI calls have no bound of their own; the pod's would be kubelet's).
const CNI_PLUGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// While containerd's CNI configuration does not exist yet (a new node: the
/// CNI's own pods start through this CRI first), how often it is re-read.
const CNI_RECHECK: Duration = Duration::from_secs(5);

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

/// A maker of futures that resolve once SIGTERM or SIGINT has arrived
/// (the handlers are installed now).
fn stop_on_signal() -> anyhow::Result<impl Fn() -> BoxedStop + Clone> {
    let signal = shutdown_signal()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        signal.await;
        let _ = stop_tx.send(true);
    });
    Ok(move || -> BoxedStop {
        let mut rx = stop_rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|s| *s).await;
        })
    })
}

/// A future that resolves at shutdown.
type BoxedStop = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

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
