//! Proxy overhead of the shim: the same CRI calls straight to containerd and
//! through a real `fast-sandbox-node` process, interleaved call by call.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use fast_sandbox_proto::cri::{
    runtime_service_client::RuntimeServiceClient, ContainerConfig, ContainerMetadata,
    CreateContainerRequest, DnsConfig, ImageSpec, LinuxPodSandboxConfig, ListContainersRequest,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
    VersionRequest,
};
use tonic::transport::Channel;

use crate::stats::{ratio, Pretty, Samples};

type Runtime = RuntimeServiceClient<Channel>;

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// containerd's CRI endpoint.
    #[arg(long, env = "FAST_SANDBOX_CONTAINERD_ENDPOINT")]
    upstream: String,
    /// Image for the lifecycle pods (already present; never pulled).
    #[arg(long, env = "FAST_SANDBOX_TEST_IMAGE")]
    image: String,
    /// The `fast-sandbox-node` binary; defaults to the one beside this binary.
    #[arg(long)]
    node_binary: Option<PathBuf>,
    /// Calls of each unary kind on each side.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Full pod lifecycles on each side.
    #[arg(long, default_value_t = 20)]
    pods: usize,
    /// Runtime handler for the lifecycle pods.
    #[arg(long, default_value = "runc")]
    handler: String,
}

/// A `fast-sandbox-node serve` child process, killed when dropped.
struct NodeProcess {
    /// Killed on drop (`kill_on_drop`).
    _child: tokio::process::Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl NodeProcess {
    async fn spawn(binary: &Path, upstream: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fs-bench-").tempdir()?;
        let socket = dir.path().join("cri.sock");
        let child = tokio::process::Command::new(binary)
            .arg("serve")
            .arg("--upstream-endpoint")
            .arg(upstream)
            .arg("--socket")
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            _child: child,
            socket,
            _dir: dir,
        })
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

fn client(endpoint: &str) -> anyhow::Result<Runtime> {
    let channel = fast_sandbox_shim::cri_channel(endpoint)?;
    Ok(RuntimeServiceClient::new(channel))
}

/// Waits until `rt` answers `Version`, bounded by `deadline`.
async fn wait_ready(rt: &mut Runtime, deadline: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        match rt.version(VersionRequest::default()).await {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > deadline => bail!("shim not ready after {deadline:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn sandbox_config(name: &str) -> PodSandboxConfig {
    let uid = format!("bench-{name}");
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.clone(),
            namespace: "fast-sandbox-bench".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.209.0.10".into()],
            ..Default::default()
        }),
        labels: HashMap::from([("fast-sandbox.bench".into(), "proxy".into())]),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("/kubepods/besteffort/pod{uid}"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One full pod: sandbox, container started, stopped, removed.
async fn pod_lifecycle(
    rt: &mut Runtime,
    name: &str,
    handler: &str,
    image: &str,
) -> anyhow::Result<Duration> {
    let config = sandbox_config(name);
    let start = Instant::now();
    let sid = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    let result = async {
        let cid = rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sid.clone(),
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
        rt.start_container(StartContainerRequest {
            container_id: cid.clone(),
        })
        .await
        .context("StartContainer")?;
        rt.stop_container(StopContainerRequest {
            container_id: cid,
            timeout: 0,
        })
        .await
        .context("StopContainer")?;
        anyhow::Ok(())
    }
    .await;
    // Always tear the sandbox down, also when a step failed.
    let stop = rt
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sid.clone(),
        })
        .await;
    let remove = rt
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: sid,
        })
        .await;
    let elapsed = start.elapsed();
    remove_pod_cgroup(&config);
    result?;
    stop.context("StopPodSandbox")?;
    remove.context("RemovePodSandbox")?;
    Ok(elapsed)
}

/// Removes the pod-level cgroup runc created under the cgroup parent
/// (kubelet's job; the bench has no kubelet).
fn remove_pod_cgroup(config: &PodSandboxConfig) {
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

struct Row {
    what: &'static str,
    direct: Samples,
    shim: Samples,
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<22} {:>6} {:>10} {:>10} {:>10} {:>10} {:>11} {:>8}",
        "call", "n", "direct p50", "direct p99", "shim p50", "shim p99", "added p50", "ratio"
    );
    for r in rows {
        let (d, s) = (r.direct.summary(), r.shim.summary());
        println!(
            "{:<22} {:>6} {:>10} {:>10} {:>10} {:>10} {:>11} {:>7.3}x",
            r.what,
            d.n,
            Pretty(d.p50).to_string(),
            Pretty(d.p99).to_string(),
            Pretty(s.p50).to_string(),
            Pretty(s.p99).to_string(),
            Pretty(s.p50.saturating_sub(d.p50)).to_string(),
            ratio(s.p50, d.p50),
        );
    }
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let binary = match &opts.node_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary has no directory")?
            .join("fast-sandbox-node"),
    };
    let node = NodeProcess::spawn(&binary, &opts.upstream).await?;
    let mut direct = client(&opts.upstream)?;
    let mut shim = client(&node.endpoint())?;
    wait_ready(&mut shim, Duration::from_secs(10)).await?;

    // A pod for the status calls, created straight on containerd.
    let probe_config = sandbox_config("proxy-probe");
    let probe = direct
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(probe_config.clone()),
            runtime_handler: opts.handler.clone(),
        })
        .await
        .context("RunPodSandbox for the probe pod")?
        .into_inner()
        .pod_sandbox_id;
    let result = measure(&opts, &mut direct, &mut shim, &probe).await;
    let _ = direct
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: probe.clone(),
        })
        .await;
    let _ = direct
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: probe,
        })
        .await;
    remove_pod_cgroup(&probe_config);
    drop(node);
    let rows = result?;
    print_table(&rows);
    Ok(())
}

async fn measure(
    opts: &Opts,
    direct: &mut Runtime,
    shim: &mut Runtime,
    probe: &str,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = vec![
        Row {
            what: "Version",
            direct: Samples::default(),
            shim: Samples::default(),
        },
        Row {
            what: "PodSandboxStatus",
            direct: Samples::default(),
            shim: Samples::default(),
        },
        Row {
            what: "ListContainers",
            direct: Samples::default(),
            shim: Samples::default(),
        },
    ];
    let warmup = opts.calls / 10;
    eprintln!(
        "unary calls: {} of each kind per side (+{warmup} warm-up)",
        opts.calls
    );
    for i in 0..opts.calls + warmup {
        for (side, rt) in [(0, &mut *direct), (1, &mut *shim)] {
            let t = Instant::now();
            rt.version(VersionRequest::default()).await?;
            let v = t.elapsed();
            let t = Instant::now();
            rt.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: probe.into(),
                verbose: false,
            })
            .await?;
            let s = t.elapsed();
            let t = Instant::now();
            rt.list_containers(ListContainersRequest::default()).await?;
            let l = t.elapsed();
            if i >= warmup {
                for (row, d) in rows.iter_mut().zip([v, s, l]) {
                    if side == 0 {
                        row.direct.push(d)
                    } else {
                        row.shim.push(d)
                    }
                }
            }
        }
    }
    let mut pods = Row {
        what: "pod lifecycle",
        direct: Samples::default(),
        shim: Samples::default(),
    };
    eprintln!("pod lifecycles: {} per side on {}", opts.pods, opts.handler);
    for i in 0..opts.pods {
        let d = pod_lifecycle(
            direct,
            &format!("proxy-direct-{i}"),
            &opts.handler,
            &opts.image,
        )
        .await?;
        pods.direct.push(d);
        let s = pod_lifecycle(shim, &format!("proxy-shim-{i}"), &opts.handler, &opts.image).await?;
        pods.shim.push(s);
        eprint!("\r  {}/{}", i + 1, opts.pods);
    }
    eprintln!();
    rows.push(pods);
    Ok(rows)
}
