//! Pieces shared by the benchmarks: the node plugin as a child process, CRI
//! clients, bench pod configs and their teardown.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use fast_sandbox_proto::cri::{
    runtime_service_client::RuntimeServiceClient, security_profile, ContainerConfig,
    ContainerMetadata, CreateContainerRequest, DnsConfig, ImageSpec, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListPodSandboxRequest, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest,
    SecurityProfile, StartContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use tonic::transport::Channel;

pub type Runtime = RuntimeServiceClient<Channel>;

/// Namespace of every pod a benchmark creates.
pub const BENCH_NAMESPACE: &str = "fast-sandbox-bench";

/// Where the node plugin under test runs: the options every bench that
/// starts one shares.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// containerd's CRI endpoint.
    #[arg(long, env = "FAST_SANDBOX_CONTAINERD_ENDPOINT")]
    pub upstream: String,
    /// containerd's root directory (fix-ups rewrite files under it).
    #[arg(long, env = "FAST_SANDBOX_CONTAINERD_ROOT")]
    pub containerd_root: PathBuf,
    /// The `fast-sandbox-node` binary; defaults to the one beside this binary.
    #[arg(long)]
    pub node_binary: Option<PathBuf>,
}

impl NodeArgs {
    /// [`dev_cni_conf_dir`] of this containerd.
    pub fn cni_conf_dir(&self) -> PathBuf {
        dev_cni_conf_dir(&self.containerd_root)
    }
}

/// containerd's CNI `conf_dir` on the development node whose containerd
/// root is `containerd_root` (`<instance>/cni/conf`, the instance being the
/// root's parent: hack/devtool's layout). The node plugin's config must
/// name it: the pools' network mode is decided from it.
pub fn dev_cni_conf_dir(containerd_root: &Path) -> PathBuf {
    containerd_root
        .parent()
        .unwrap_or(Path::new("/"))
        .join("cni/conf")
}

/// A child process serving CRI on a socket in a private directory — a
/// `fast-sandbox-node serve`, or the `proxy` bench's byte pipe — killed
/// when dropped.
#[derive(Debug)]
pub struct NodeProcess {
    child: tokio::process::Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// The `fast-sandbox-node` binary: `explicit`, else the one beside this one.
pub fn node_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    match explicit {
        Some(b) => Ok(b.to_owned()),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("binary has no directory")?
            .join("fast-sandbox-node")),
    }
}

/// `binary serve --config config`, logging at `RUST_LOG` (default warn),
/// killed when dropped.
pub fn spawn_serve(binary: &Path, config: &Path) -> anyhow::Result<tokio::process::Child> {
    tokio::process::Command::new(binary)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

impl NodeProcess {
    /// Starts the node plugin forwarding to `upstream`. `config` is TOML
    /// appended to the generated file (pools, slots); `{dir}` in it is
    /// replaced by the process's private directory.
    pub async fn spawn(binary: &Path, upstream: &str, config: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fs-bench-").tempdir()?;
        let socket = dir.path().join("cri.sock");
        let path = dir.path().join("node.toml");
        let text = format!(
            "[upstream]\nendpoint = {upstream:?}\n[socket]\npath = {:?}\n{}",
            socket.display().to_string(),
            config.replace("{dir}", &dir.path().display().to_string())
        );
        std::fs::write(&path, text)?;
        let child = spawn_serve(binary, &path)?;
        Ok(Self::serving(child, socket, dir))
    }

    /// `child`, serving on `socket` in `dir` (removed with it).
    pub fn serving(child: tokio::process::Child, socket: PathBuf, dir: tempfile::TempDir) -> Self {
        Self {
            child,
            socket,
            _dir: dir,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops the process with SIGTERM and waits for it (bounded).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => self.child.kill().await?,
        }
        Ok(())
    }
}

pub fn client(endpoint: &str) -> anyhow::Result<Runtime> {
    let channel = fast_sandbox_shim::cri_channel(endpoint)?;
    Ok(RuntimeServiceClient::new(channel))
}

/// Waits until `rt` answers `Version`, bounded by `deadline`.
pub async fn wait_ready(rt: &mut Runtime, deadline: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        match rt.version(VersionRequest::default()).await {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > deadline => bail!("shim not ready after {deadline:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A small kubelet-shaped sandbox config for pod `name`.
pub fn sandbox_config(name: &str) -> PodSandboxConfig {
    let uid = format!("bench-{name}");
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.clone(),
            namespace: BENCH_NAMESPACE.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.209.0.10".into()],
            ..Default::default()
        }),
        labels: HashMap::from([("fast-sandbox.bench".into(), "pod".into())]),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("/kubepods/besteffort/pod{uid}"),
            security_context: Some(kubelet_sandbox_security()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The sandbox security context kubelet (v1.26 on) sends for an ordinary
/// pod: its own network and IPC namespaces, a PID namespace per container,
/// seccomp `RuntimeDefault` always (docs/warm-slots.md, "What kubelet
/// sends"). A warm pool without a `shape` serves exactly this.
pub fn kubelet_sandbox_security() -> LinuxSandboxSecurityContext {
    LinuxSandboxSecurityContext {
        namespace_options: Some(NamespaceOption {
            network: NamespaceMode::Pod as i32,
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Pod as i32,
            ..Default::default()
        }),
        seccomp: Some(SecurityProfile {
            profile_type: security_profile::ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        }),
        ..Default::default()
    }
}

/// `RunPodSandbox` of `config` on `handler`: the sandbox's id, or an error
/// naming the pod and the handler.
pub async fn run_pod(
    rt: &mut Runtime,
    config: &PodSandboxConfig,
    handler: &str,
) -> anyhow::Result<String> {
    let name = config.metadata.as_ref().map_or("", |m| m.name.as_str());
    Ok(rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_owned(),
        })
        .await
        .with_context(|| format!("RunPodSandbox {name} on {handler}"))?
        .into_inner()
        .pod_sandbox_id)
}

/// Creates and starts a `sleep` container in sandbox `sid`.
pub async fn start_container(
    rt: &mut Runtime,
    sid: &str,
    config: &PodSandboxConfig,
    image: &str,
) -> anyhow::Result<String> {
    let cid = create_container(rt, sid, config, image).await?;
    rt.start_container(StartContainerRequest {
        container_id: cid.clone(),
    })
    .await
    .context("StartContainer")?;
    Ok(cid)
}

/// `CreateContainer` of the bench's one container (`sleep 3600` in `image`)
/// in sandbox `sid`; returns its id.
pub async fn create_container(
    rt: &mut Runtime,
    sid: &str,
    config: &PodSandboxConfig,
    image: &str,
) -> anyhow::Result<String> {
    let cid = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sid.to_owned(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                command: vec!["/bin/sleep".into(), "3600".into()],
                ..Default::default()
            }),
            sandbox_config: Some(config.clone()),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    Ok(cid)
}

/// Stops and removes sandbox `sid` (and its containers), then the pod-level
/// cgroup runc created (kubelet's job; the bench has no kubelet).
pub async fn remove_pod(
    rt: &mut Runtime,
    sid: &str,
    config: &PodSandboxConfig,
) -> anyhow::Result<()> {
    let stop = rt
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sid.to_owned(),
        })
        .await;
    let remove = rt
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: sid.to_owned(),
        })
        .await;
    remove_pod_cgroup(config);
    stop.context("StopPodSandbox")?;
    remove.context("RemovePodSandbox")?;
    Ok(())
}

/// Removes the pod-level cgroup directory of `config` in every hierarchy.
pub fn remove_pod_cgroup(config: &PodSandboxConfig) {
    let Some(parent) = config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.trim_start_matches('/'))
    else {
        return;
    };
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            let _ = std::fs::remove_dir(h.path().join(parent));
        }
    }
}

/// Removes every sandbox upstream in `namespace` (bench pods or slots a
/// stopped node plugin left behind). Returns how many.
pub async fn remove_namespace(rt: &mut Runtime, namespace: &str) -> anyhow::Result<usize> {
    let items = rt
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items;
    let mut n = 0;
    for sb in items {
        if sb
            .metadata
            .as_ref()
            .is_some_and(|m| m.namespace == namespace)
        {
            let _ = rt
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: sb.id.clone(),
                })
                .await;
            rt.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: sb.id.clone(),
            })
            .await?;
            n += 1;
        }
    }
    Ok(n)
}

/// A GET on the node plugin's admin endpoint.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    fast_sandbox_node::admin::get(addr, path).await
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("VmRSS missing")?;
    Ok(kb * 1024)
}

/// The host's `MemAvailable`, in bytes.
pub fn mem_available() -> anyhow::Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    let kb = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("MemAvailable missing")?;
    Ok(kb * 1024)
}

/// Removes `root` and every directory under it in each cgroup hierarchy.
pub fn remove_cgroup_tree(root: &str) {
    fn rm(p: &std::path::Path) {
        if let Ok(d) = std::fs::read_dir(p) {
            for e in d.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rm(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(p);
    }
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            rm(&h.path().join(root.trim_start_matches('/')));
        }
    }
}
