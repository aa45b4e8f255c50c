//! Kubelet-shaped CRI requests: what kubelet v1.26+ sends for an ordinary pod
//! (see kubelet's `kuberuntime_sandbox.go` and `kuberuntime_container.go`).

use std::{collections::HashMap, path::PathBuf};

use fast_sandbox_proto::cri::{
    ContainerConfig, ContainerMetadata, DnsConfig, ImageSpec, KeyValue, LinuxContainerConfig,
    LinuxContainerResources, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PortMapping, Protocol, SecurityProfile,
};
use fast_sandbox_proto::cri::{
    CreateContainerRequest, ExecSyncRequest, RunPodSandboxRequest, StartContainerRequest,
};

use crate::{Cri, DevNode};

/// Label every test pod carries, so list calls can be filtered to one test
/// and stay deterministic while other tests run beside it.
pub const TEST_LABEL: &str = "fast-sandbox.test/case";

/// Nameserver given to test pods: inside the test's own range, never used to
/// resolve anything (the network rule in ENVIRONMENT.md).
pub const TEST_NAMESERVER: &str = "10.209.0.10";
/// A container script that runs until stopped and exits 0 on `SIGTERM`.
pub const IDLE_SCRIPT: &str = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done";

/// One test pod: the identity kubelet would derive from the Pod object.
#[derive(Debug, Clone)]
pub struct TestPod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// Value of [`TEST_LABEL`].
    pub case: String,
    /// Host port mapped to container port 80 on 127.0.0.1, if any.
    pub host_port: Option<i32>,
    /// Directory kubelet would create as `/var/log/pods/<ns>_<name>_<uid>`.
    pub log_directory: PathBuf,
}

impl TestPod {
    /// A pod named `name` in namespace `fast-sandbox-test`, with a uid
    /// derived from the name (stable, so two runs of the same spec match)
    /// and a log directory under `log_root`.
    pub fn new(case: &str, name: &str, log_root: &std::path::Path) -> Self {
        let namespace = "fast-sandbox-test".to_owned();
        let uid = stable_uid(name);
        let log_directory = log_root.join(format!("{namespace}_{name}_{uid}"));
        Self {
            name: name.to_owned(),
            namespace,
            uid,
            case: case.to_owned(),
            host_port: None,
            log_directory,
        }
    }

    /// Kubelet's cgroupfs-driver parent for a BestEffort pod.
    pub fn cgroup_parent(&self) -> String {
        format!("/kubepods/besteffort/pod{}", self.uid)
    }

    pub fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            ("io.kubernetes.pod.name".into(), self.name.clone()),
            ("io.kubernetes.pod.namespace".into(), self.namespace.clone()),
            ("io.kubernetes.pod.uid".into(), self.uid.clone()),
            (TEST_LABEL.into(), self.case.clone()),
            ("app".into(), "demo".into()),
        ])
    }

    /// The `PodSandboxConfig` kubelet builds for this pod.
    pub fn sandbox_config(&self) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            hostname: self.name.clone(),
            log_directory: self.log_directory.display().to_string(),
            dns_config: Some(DnsConfig {
                servers: vec![TEST_NAMESERVER.into()],
                searches: vec![
                    format!("{}.svc.cluster.local", self.namespace),
                    "svc.cluster.local".into(),
                    "cluster.local".into(),
                ],
                options: vec!["ndots:5".into()],
            }),
            port_mappings: self
                .host_port
                .map(|host_port| PortMapping {
                    protocol: Protocol::Tcp as i32,
                    container_port: 80,
                    host_port,
                    host_ip: "127.0.0.1".into(),
                })
                .into_iter()
                .collect(),
            labels: self.labels(),
            annotations: HashMap::from([
                ("kubernetes.io/config.source".into(), "api".into()),
                (
                    "kubernetes.io/config.seen".into(),
                    "2026-11-28T00:00:00Z".into(),
                ),
            ]),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    seccomp: Some(SecurityProfile::default()),
                    ..Default::default()
                }),
                sysctls: HashMap::from([(
                    "net.ipv4.ip_unprivileged_port_start".into(),
                    "0".into(),
                )]),
                overhead: None,
                resources: Some(LinuxContainerResources {
                    cpu_shares: 2,
                    ..Default::default()
                }),
            }),
            windows: None,
        }
    }

    /// The `ContainerConfig` kubelet builds for a busybox container that
    /// runs `args` under `sh -c`.
    pub fn container_config(&self, name: &str, image: &str, script: &str) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.to_owned(),
                ..Default::default()
            }),
            command: vec!["/bin/sh".into(), "-c".into()],
            args: vec![script.to_owned()],
            envs: vec![KeyValue {
                key: "POD_NAME".into(),
                value: self.name.clone(),
            }],
            labels: HashMap::from([
                ("io.kubernetes.container.name".into(), name.to_owned()),
                ("io.kubernetes.pod.name".into(), self.name.clone()),
                ("io.kubernetes.pod.namespace".into(), self.namespace.clone()),
                ("io.kubernetes.pod.uid".into(), self.uid.clone()),
            ]),
            annotations: HashMap::from([(
                "io.kubernetes.container.restartCount".into(),
                "0".into(),
            )]),
            log_path: format!("{name}/0.log"),
            linux: Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources {
                    cpu_shares: 2,
                    cpu_period: 100_000,
                    oom_score_adj: 1000,
                    ..Default::default()
                }),
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    seccomp: Some(SecurityProfile::default()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    /// Creates the directories kubelet creates before `RunPodSandbox`
    /// (the pod log directory) and `CreateContainer` (the container's).
    pub fn prepare_log_dirs(&self, containers: &[&str]) -> std::io::Result<()> {
        for c in containers {
            std::fs::create_dir_all(self.log_directory.join(c))?;
        }
        Ok(())
    }

    /// Removes the pod-level cgroup directories runc created for the
    /// cgroup parent (kubelet would remove them; the test has no kubelet).
    pub fn remove_pod_cgroups(&self) {
        remove_cgroup_dirs(&self.cgroup_parent());
    }
}

/// What kubelet sends for an ordinary pod: its own network and IPC
/// namespaces, a PID namespace per container.
fn pod_namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A uid that looks like a Kubernetes one and is stable for a name.
pub fn stable_uid(name: &str) -> String {
    // FNV-1a over the name, spread into the 8-4-4-4-12 shape.
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in name.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    let hex = format!("{h:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Removes the directory `rel` in every mounted cgroup hierarchy. Missing
/// directories are fine. Ancestors stay: kubelet keeps its QoS-level
/// cgroups, and removing them would race with pods other tests start.
pub fn remove_cgroup_dirs(rel: &str) {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for h in hierarchies.flatten() {
        let _ = std::fs::remove_dir(h.path().join(rel.trim_start_matches('/')));
    }
}

/// Runs `pod`'s sandbox on `handler` (log directory prepared); returns its id.
pub async fn run_pod(cri: &mut Cri, pod: &TestPod, handler: &str) -> anyhow::Result<String> {
    pod.prepare_log_dirs(&[])?;
    Ok(cri
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod.sandbox_config()),
            runtime_handler: handler.into(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id)
}

/// Creates and starts container `name` running `script`; returns its id.
pub async fn start_container(
    cri: &mut Cri,
    node: &DevNode,
    pod: &TestPod,
    sid: &str,
    name: &str,
    script: &str,
    tty: bool,
) -> anyhow::Result<String> {
    pod.prepare_log_dirs(&[name])?;
    let mut config = pod.container_config(name, &node.test_image, script);
    config.tty = tty;
    let cid = cri
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sid.to_owned(),
            config: Some(config),
            sandbox_config: Some(pod.sandbox_config()),
        })
        .await?
        .into_inner()
        .container_id;
    cri.runtime
        .start_container(StartContainerRequest {
            container_id: cid.clone(),
        })
        .await?;
    Ok(cid)
}

/// Runs `script` under `sh -c` in container `cid`; its exit code and stdout.
pub async fn exec(cri: &mut Cri, cid: &str, script: &str) -> anyhow::Result<(i32, String)> {
    let r = cri
        .runtime
        .exec_sync(ExecSyncRequest {
            container_id: cid.to_owned(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 10,
        })
        .await?
        .into_inner();
    Ok((r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_uid_is_stable_and_distinct() {
        assert_eq!(stable_uid("a"), stable_uid("a"));
        assert_ne!(stable_uid("a"), stable_uid("b"));
        assert_eq!(stable_uid("a").len(), 36);
    }
}
