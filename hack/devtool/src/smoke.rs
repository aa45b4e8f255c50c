//! `cri smoke`: one pod with one busybox container through the CRI, checked
//! from the inside and torn down again. Proves a node (or the shim in front
//! of it) can run pods with a given runtime handler.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, DnsConfig, ExecSyncRequest, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxState, PodSandboxStatusRequest, PortMapping, Protocol, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopContainerRequest,
    StopPodSandboxRequest,
};
use tonic::transport::Channel;

use crate::cri::{self, Runtime};

const SMOKE_NAMESPACE: &str = "fast-sandbox-smoke";
const SMOKE_LABEL: &str = "fast-sandbox.io/smoke";
const LOG_MARKER: &str = "smoke-ok";

#[derive(Debug, Clone)]
pub struct Options {
    pub image: String,
    /// Empty selects containerd's default handler.
    pub handler: String,
    pub pull: bool,
    pub host_network: bool,
    pub keep: bool,
    pub dns_server: String,
    pub log_root: PathBuf,
    /// Map this host port to the pod's port 8080 (exercises CNI portmap).
    pub host_port: Option<u16>,
}

/// What the smoke run saw.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub sandbox_id: String,
    pub ip: String,
    pub timings: Vec<(&'static str, Duration)>,
}

pub async fn run(channel: Channel, options: &Options) -> Result<Outcome> {
    if options.pull {
        let started = Instant::now();
        let id = cri::pull(channel.clone(), &options.image).await?;
        eprintln!(
            "pulled {} as {id} in {} ms",
            options.image,
            started.elapsed().as_millis()
        );
    } else if cri::image_id(channel.clone(), &options.image)
        .await?
        .is_none()
    {
        bail!(
            "image {} is not on the node; import it (ctr -n k8s.io images import) or pass --pull",
            options.image
        );
    }

    let unique = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default()
    );
    let handler_label = if options.handler.is_empty() {
        "default"
    } else {
        options.handler.as_str()
    };
    let pod_name = format!("smoke-{handler_label}-{unique}");
    let uid = format!("uid-{unique}");
    let hostname = format!("smoke-{handler_label}");
    let log_dir = options
        .log_root
        .join(format!("{SMOKE_NAMESPACE}_{pod_name}_{uid}"));
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("create log directory {}", log_dir.display()))?;

    let network = if options.host_network {
        NamespaceMode::Node
    } else {
        NamespaceMode::Pod
    };
    let namespaces = NamespaceOption {
        network: network.into(),
        pid: NamespaceMode::Container.into(),
        ipc: NamespaceMode::Pod.into(),
        ..Default::default()
    };
    let sandbox_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: pod_name.clone(),
            uid: uid.clone(),
            namespace: SMOKE_NAMESPACE.into(),
            attempt: 0,
        }),
        hostname: if options.host_network {
            String::new()
        } else {
            hostname.clone()
        },
        log_directory: log_dir.display().to_string(),
        // Never the host's resolv.conf: nothing in a smoke pod resolves names.
        dns_config: Some(DnsConfig {
            servers: vec![options.dns_server.clone()],
            ..Default::default()
        }),
        labels: HashMap::from([(SMOKE_LABEL.to_owned(), "true".to_owned())]),
        port_mappings: options
            .host_port
            .map(|host_port| PortMapping {
                protocol: Protocol::Tcp.into(),
                container_port: 8080,
                host_port: host_port.into(),
                host_ip: String::new(),
            })
            .into_iter()
            .collect(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    let mut client = Runtime::new(channel);
    let mut timings = Vec::new();
    let started = Instant::now();
    let sandbox_id = client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: options.handler.clone(),
        })
        .await
        .with_context(|| format!("RunPodSandbox (handler {handler_label:?})"))?
        .into_inner()
        .pod_sandbox_id;
    timings.push(("RunPodSandbox", started.elapsed()));
    eprintln!("pod sandbox {sandbox_id} ({SMOKE_NAMESPACE}/{pod_name}, handler {handler_label})");

    let checked = check_pod(
        &mut client,
        options,
        &sandbox_id,
        &sandbox_config,
        &namespaces,
        &hostname,
        &mut timings,
    )
    .await;
    let log_file = log_dir.join("smoke/0.log");
    let teardown = if options.keep {
        eprintln!(
            "keeping pod sandbox {sandbox_id} (--keep); logs in {}",
            log_dir.display()
        );
        Ok(())
    } else {
        let started = Instant::now();
        let result = teardown(&mut client, &sandbox_id).await;
        timings.push(("teardown", started.elapsed()));
        if result.is_ok() && checked.is_ok() {
            std::fs::remove_dir_all(&log_dir)
                .with_context(|| format!("remove {}", log_dir.display()))?;
            // Only succeeds when no other smoke run uses it.
            let _ = std::fs::remove_dir(&options.log_root);
        }
        result
    };
    let ip = checked.with_context(|| {
        format!(
            "smoke check of pod {sandbox_id} (log {})",
            log_file.display()
        )
    })?;
    teardown?;
    Ok(Outcome {
        sandbox_id,
        ip,
        timings,
    })
}

/// Status, container start, in-pod identity and log checks; returns the IP.
async fn check_pod(
    client: &mut Runtime,
    options: &Options,
    sandbox_id: &str,
    sandbox_config: &PodSandboxConfig,
    namespaces: &NamespaceOption,
    hostname: &str,
    timings: &mut Vec<(&'static str, Duration)>,
) -> Result<String> {
    let status = client
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: sandbox_id.to_owned(),
            verbose: false,
        })
        .await
        .context("PodSandboxStatus")?
        .into_inner()
        .status
        .context("PodSandboxStatus: empty response")?;
    ensure!(
        status.state == i32::from(PodSandboxState::SandboxReady),
        "pod sandbox state is {:?}, expected SANDBOX_READY",
        PodSandboxState::try_from(status.state)
    );
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    ensure!(
        options.host_network || !ip.is_empty(),
        "pod sandbox has no IP (CNI not configured?)"
    );

    let started = Instant::now();
    let container_id = client
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sandbox_id.to_owned(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "smoke".into(),
                    attempt: 0,
                }),
                image: Some(cri::image_spec(&options.image)),
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("echo {LOG_MARKER} $(hostname); exec sleep 3600"),
                ],
                log_path: "smoke/0.log".into(),
                labels: HashMap::from([(SMOKE_LABEL.to_owned(), "true".to_owned())]),
                linux: Some(LinuxContainerConfig {
                    security_context: Some(LinuxContainerSecurityContext {
                        namespace_options: Some(namespaces.clone()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config.clone()),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    timings.push(("CreateContainer", started.elapsed()));
    let started = Instant::now();
    client
        .start_container(StartContainerRequest {
            container_id: container_id.clone(),
        })
        .await
        .context("StartContainer")?;
    timings.push(("StartContainer", started.elapsed()));

    let state = client
        .container_status(ContainerStatusRequest {
            container_id: container_id.clone(),
            verbose: false,
        })
        .await
        .context("ContainerStatus")?
        .into_inner()
        .status
        .context("ContainerStatus: empty response")?
        .state;
    ensure!(
        state == i32::from(ContainerState::ContainerRunning),
        "container state is {:?}, expected CONTAINER_RUNNING",
        ContainerState::try_from(state)
    );

    let started = Instant::now();
    let seen_hostname = exec(client, &container_id, &["hostname"]).await?;
    timings.push(("ExecSync", started.elapsed()));
    if !options.host_network {
        ensure!(
            seen_hostname == hostname,
            "hostname inside the pod is {seen_hostname:?}, expected {hostname:?}"
        );
        let etc_hostname = exec(client, &container_id, &["cat", "/etc/hostname"]).await?;
        ensure!(
            etc_hostname == hostname,
            "/etc/hostname is {etc_hostname:?}, expected {hostname:?}"
        );
        let addresses = exec(
            client,
            &container_id,
            &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
        )
        .await?;
        ensure!(
            addresses.contains(&format!(" {ip}/")),
            "eth0 inside the pod does not carry the reported IP {ip}: {addresses}"
        );
    }
    let resolv = exec(client, &container_id, &["cat", "/etc/resolv.conf"]).await?;
    ensure!(
        resolv.contains(&format!("nameserver {}", options.dns_server)),
        "/etc/resolv.conf does not use the pod's dns_config: {resolv}"
    );

    let log_file = Path::new(&sandbox_config.log_directory).join("smoke/0.log");
    let expected = format!("{LOG_MARKER} {seen_hostname}");
    wait_for_log(&log_file, &expected, Duration::from_secs(10)).await?;
    Ok(ip)
}

async fn exec(client: &mut Runtime, container_id: &str, cmd: &[&str]) -> Result<String> {
    let response = client
        .exec_sync(ExecSyncRequest {
            container_id: container_id.to_owned(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: 10,
        })
        .await
        .with_context(|| format!("ExecSync {cmd:?}"))?
        .into_inner();
    ensure!(
        response.exit_code == 0,
        "ExecSync {cmd:?} exited {}: {}",
        response.exit_code,
        String::from_utf8_lossy(&response.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&response.stdout).trim().to_owned())
}

async fn wait_for_log(path: &Path, expected: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match std::fs::read_to_string(path) {
            Ok(text) if text.lines().any(|line| line.ends_with(expected)) => return Ok(()),
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error).with_context(|| format!("read {}", path.display())),
        }
        if Instant::now() >= deadline {
            bail!(
                "container log {} has no line ending in {expected:?} after {timeout:?}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn teardown(client: &mut Runtime, sandbox_id: &str) -> Result<()> {
    for container in cri::containers_of(client, sandbox_id).await? {
        client
            .stop_container(StopContainerRequest {
                container_id: container.id.clone(),
                timeout: 0,
            })
            .await
            .with_context(|| format!("StopContainer {}", container.id))?;
        client
            .remove_container(RemoveContainerRequest {
                container_id: container.id.clone(),
            })
            .await
            .with_context(|| format!("RemoveContainer {}", container.id))?;
    }
    client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sandbox_id.to_owned(),
        })
        .await
        .context("StopPodSandbox")?;
    client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: sandbox_id.to_owned(),
        })
        .await
        .context("RemovePodSandbox")?;
    let listed = client
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .context("ListPodSandbox")?
        .into_inner()
        .items;
    ensure!(
        listed.iter().all(|s| s.id != sandbox_id),
        "pod sandbox {sandbox_id} is still listed after RemovePodSandbox"
    );
    Ok(())
}
