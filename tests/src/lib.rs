//! Harness shared by the integration tests: the development node started by
//! `hack/dev-node.sh`, CRI clients over unix sockets, an in-process shim, and
//! kubelet-shaped pod configurations.
//!
//! Tests that need the development node call [`DevNode::require`]. Locally it
//! returns `None` (and the test says why it skipped) when the node is not up
//! or the test does not run as root; under `CI=true` it panics instead, so a
//! CI run can never pass by skipping.

pub mod census;
pub mod clients;
pub mod equiv;
pub mod fake_cri;
pub mod kubelet;
pub mod pod;
pub mod replay;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use fast_sandbox_proto::cri::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::Channel;

/// A CRI v1 client pair sharing one channel.
#[derive(Debug, Clone)]
pub struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    pub image: ImageServiceClient<Channel>,
}

/// CRI message size limit, as kubelet's client sets it (16 MiB).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

impl Cri {
    /// The pod sandboxes whose labels include `key=value`.
    pub async fn list_by_label(
        &mut self,
        key: &str,
        value: &str,
    ) -> Result<Vec<fast_sandbox_proto::cri::PodSandbox>, tonic::Status> {
        use fast_sandbox_proto::cri::{ListPodSandboxRequest, PodSandboxFilter};
        Ok(self
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: [(key.to_owned(), value.to_owned())].into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .items)
    }

    /// Stops and removes pod sandbox `id`.
    pub async fn remove_sandbox(&mut self, id: &str) -> Result<(), tonic::Status> {
        use fast_sandbox_proto::cri::{RemovePodSandboxRequest, StopPodSandboxRequest};
        self.runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            })
            .await?;
        self.runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// The PID of a sandbox's pause process, from containerd's verbose
    /// status (through the shim, a claimed slot's status is containerd's).
    pub async fn pause_pid(&mut self, id: &str) -> anyhow::Result<i64> {
        self.verbose_info(id)
            .await?
            .get("pid")
            .and_then(serde_json::Value::as_i64)
            .filter(|pid| *pid > 0)
            .with_context(|| format!("no pause pid in the verbose status of {id}"))
    }

    /// containerd's verbose `info` of a sandbox (pid, runtimeSpec, …).
    pub async fn verbose_info(&mut self, id: &str) -> anyhow::Result<serde_json::Value> {
        let info = self
            .runtime
            .pod_sandbox_status(fast_sandbox_proto::cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: true,
            })
            .await?
            .into_inner()
            .info;
        let text = info
            .get("info")
            .with_context(|| format!("no verbose info for {id}"))?;
        serde_json::from_str(text).with_context(|| format!("verbose info of {id}"))
    }

    /// A sandbox's pod IP, from its (non-verbose) status.
    pub async fn pod_ip(&mut self, id: &str) -> anyhow::Result<String> {
        self.runtime
            .pod_sandbox_status(fast_sandbox_proto::cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty())
            .with_context(|| format!("no pod IP in the status of {id}"))
    }

    /// The network namespace path in a sandbox's OCI spec.
    pub async fn netns_path(&mut self, id: &str) -> anyhow::Result<String> {
        let info = self.verbose_info(id).await?;
        info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .map(str::to_owned)
            .with_context(|| format!("no network namespace path in {id}'s spec"))
    }

    /// The hostname in a sandbox's UTS namespace, as its containers see it.
    pub async fn uts_hostname(&mut self, id: &str) -> anyhow::Result<String> {
        let pid = self.pause_pid(id).await?;
        let out = std::process::Command::new("nsenter")
            .arg(format!("--uts=/proc/{pid}/ns/uts"))
            .arg("hostname")
            .output()
            .context("running nsenter")?;
        anyhow::ensure!(out.status.success(), "nsenter: {out:?}");
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Connects lazily to a CRI endpoint (`unix:///path` or a bare path),
    /// with the shim's own client dialler.
    pub fn connect(endpoint: &str) -> anyhow::Result<Self> {
        let channel = fast_sandbox_shim::cri_channel(endpoint)?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            image: ImageServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        })
    }
}

/// A CRI runtime client over plain hyper on a unix socket. tonic's channel
/// enforces `grpc-timeout` itself (answering `Cancelled` locally), which
/// would hide the server's own answer at a deadline; this one waits for it.
pub fn plain_runtime_client(socket: &Path) -> PlainRuntimeClient {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build(UnixConnector(socket.to_owned()));
    RuntimeServiceClient::with_origin(
        client,
        tonic::codegen::http::Uri::from_static("http://localhost"),
    )
}

/// See [`plain_runtime_client`].
pub type PlainRuntimeClient =
    RuntimeServiceClient<hyper_util::client::legacy::Client<UnixConnector, tonic::body::Body>>;

/// Dials a unix socket for [`plain_runtime_client`].
#[derive(Debug, Clone)]
pub struct UnixConnector(PathBuf);

impl tower::Service<tonic::codegen::http::Uri> for UnixConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move {
            Ok(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(path).await?,
            ))
        })
    }
}

/// The development node started by `hack/dev-node.sh up`, described by the
/// environment variables that script writes to its env file.
#[derive(Debug, Clone)]
pub struct DevNode {
    /// containerd's CRI endpoint (`unix:///…`).
    pub containerd_endpoint: String,
    /// containerd's `root` directory.
    pub containerd_root: PathBuf,
    /// containerd's `state` directory.
    pub containerd_state: PathBuf,
    /// Imported busybox image, never pulled.
    pub test_image: String,
    /// The same image in the registry on 127.0.0.1, for `PullImage`.
    pub registry_image: String,
    /// `hack/containerd-instance.sh`, to start private instances of our own.
    pub instance_script: PathBuf,
    /// The `fast-sandbox-dev` binary.
    pub devtool: PathBuf,
}

fn var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

/// True when running under CI, where no test may skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Which of the development node's containerd instances the tests use:
/// `FAST_SANDBOX_UPSTREAM=containerd2` picks the containerd 2.x instance
/// (`FAST_SANDBOX_CONTAINERD2_*`, started by `FAST_SANDBOX_CONTAINERD2=1
/// hack/dev-node.sh up`); unset or `containerd` the default (1.6) one.
pub fn upstream_prefix() -> Result<&'static str, String> {
    match std::env::var("FAST_SANDBOX_UPSTREAM").as_deref() {
        Err(_) | Ok("" | "containerd") => Ok("FAST_SANDBOX_CONTAINERD"),
        Ok("containerd2") => Ok("FAST_SANDBOX_CONTAINERD2"),
        Ok(other) => Err(format!(
            "FAST_SANDBOX_UPSTREAM={other:?}: expected containerd or containerd2"
        )),
    }
}

impl DevNode {
    fn from_env() -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("the test needs root (containerd's socket, netns, cgroups)".into());
        }
        let upstream = upstream_prefix()?;
        Ok(Self {
            containerd_endpoint: var(&format!("{upstream}_ENDPOINT"))?,
            containerd_root: var(&format!("{upstream}_ROOT"))?.into(),
            containerd_state: var(&format!("{upstream}_STATE"))?.into(),
            test_image: var("FAST_SANDBOX_TEST_IMAGE")?,
            registry_image: var("FAST_SANDBOX_REGISTRY_IMAGE")?,
            instance_script: var("FAST_SANDBOX_INSTANCE_SCRIPT")?.into(),
            devtool: var("FAST_SANDBOX_DEVTOOL")?.into(),
        })
    }

    /// The development node, or `None` after saying why the test skips.
    ///
    /// # Panics
    /// Under `CI=true` when the node is not available: CI must not skip.
    pub fn require(test: &str) -> Option<Self> {
        match Self::from_env() {
            Ok(node) => Some(node),
            Err(why) if in_ci() => {
                panic!("{test}: CI=true but the development node is unavailable: {why}")
            }
            Err(why) => {
                eprintln!(
                    "SKIP {test}: {why}; run `hack/test.sh` (or `hack/dev-node.sh up` and source \
                     its env file) as root"
                );
                None
            }
        }
    }

    pub fn cri(&self) -> anyhow::Result<Cri> {
        Cri::connect(&self.containerd_endpoint)
    }

    /// The runsc the node's runsc handler runs, chosen as the adapter
    /// chooses it: `FAST_SANDBOX_RUNSC`, else a `runsc` beside
    /// `FAST_SANDBOX_RUNSC_ADAPTER`, else `/usr/bin/runsc`. Commands that
    /// talk to the node's sandboxes (`runsc exec`) must use this one: a
    /// runsc of another release cannot read the sandbox's state.
    pub fn runsc() -> PathBuf {
        if let Some(r) = std::env::var_os("FAST_SANDBOX_RUNSC") {
            return r.into();
        }
        std::env::var_os("FAST_SANDBOX_RUNSC_ADAPTER")
            .and_then(|a| Some(PathBuf::from(a).parent()?.join("runsc")))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("/usr/bin/runsc"))
    }
}

/// Waits until `probe` returns `Some`, retrying every `interval` until
/// `deadline` has passed. Bounded in time, so a test never hangs.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    let interval = Duration::from_millis(50);
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(interval).await;
    }
}

/// A shim served in-process on a socket in its own temporary directory,
/// stopped when dropped.
#[derive(Debug)]
pub struct InProcessShim {
    socket: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), fast_sandbox_shim::ShimError>>>,
    _dir: tempfile::TempDir,
}

impl InProcessShim {
    /// Starts a shim forwarding to `upstream` and waits until its socket exists.
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let cfg = fast_sandbox_shim::UpstreamConfig {
            endpoint: upstream.to_owned(),
            ..fast_sandbox_shim::UpstreamConfig::default()
        };
        Self::start_with(cfg).await
    }

    /// Starts a shim with an explicit upstream configuration.
    pub async fn start_with(cfg: fast_sandbox_shim::UpstreamConfig) -> anyhow::Result<Self> {
        let upstream = fast_sandbox_shim::Upstream::connect_lazy(&cfg)?;
        Self::serve(fast_sandbox_shim::Shim::new(upstream)).await
    }

    /// Serves `shim` (e.g. one with warm slots).
    pub async fn serve(shim: fast_sandbox_shim::Shim) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fs-shim-").tempdir()?;
        let socket = dir.path().join("cri.sock");
        let socket_cfg = fast_sandbox_shim::SocketConfig {
            path: socket.clone(),
            group: None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            fast_sandbox_shim::serve(shim, &socket_cfg, async {
                let _ = rx.await;
            })
            .await
        });
        let probe_path = socket.clone();
        wait_for("the shim's socket", Duration::from_secs(5), || {
            let p = probe_path.clone();
            async move { p.exists().then_some(()) }
        })
        .await?;
        Ok(Self {
            socket,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn cri(&self) -> anyhow::Result<Cri> {
        Cri::connect(&self.endpoint())
    }

    /// True while the serving task is still running.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the shim and returns what `serve` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.context("shim task panicked")??;
        }
        Ok(())
    }
}

impl Drop for InProcessShim {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Removes every sandbox labelled with test case `case` (see
/// [`pod::TEST_LABEL`]) straight on containerd, with its pod cgroups.
pub async fn remove_case(endpoint: &str, case: &str) -> anyhow::Result<usize> {
    let mut cri = Cri::connect(endpoint)?;
    let items = cri.list_by_label(pod::TEST_LABEL, case).await?;
    for sb in &items {
        cri.remove_sandbox(&sb.id).await?;
        if let Some(uid) = sb.metadata.as_ref().map(|m| m.uid.clone()) {
            pod::remove_cgroup_dirs(&format!("/kubepods/besteffort/pod{uid}"));
        }
    }
    Ok(items.len())
}

/// Cleans up a test case's pods when dropped — also when the test panics —
/// and once when created, in case an earlier failed run left some behind.
#[derive(Debug)]
pub struct CaseGuard {
    endpoint: String,
    case: String,
}

impl CaseGuard {
    pub async fn new(node: &DevNode, case: &str) -> anyhow::Result<Self> {
        remove_case(&node.containerd_endpoint, case).await?;
        Ok(Self {
            endpoint: node.containerd_endpoint.clone(),
            case: case.to_owned(),
        })
    }
}

impl Drop for CaseGuard {
    fn drop(&mut self) {
        let (endpoint, case) = (self.endpoint.clone(), self.case.clone());
        // Own thread and runtime: Drop may run inside (or while unwinding
        // out of) the test's runtime, which cannot be blocked on.
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(remove_case(&endpoint, &case))
        })
        .join();
        if let Ok(Err(e)) = cleaned {
            eprintln!("cleaning up test case {}: {e:#}", self.case);
        }
    }
}
