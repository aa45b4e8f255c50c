//! Structured inputs shared by the fuzz targets: a pod sandbox config built
//! from `arbitrary` data whose strings are drawn mostly from a vocabulary of
//! the names that matter (reserved `fast-sandbox.io/*` labels, the exposed
//! and upstream handlers, the annotations that make a pod ineligible), so
//! the fuzzer reaches the interesting branches without guessing them.
//! [`wire`]: the `preserve` target's oracle.

pub mod wire;

use std::collections::HashMap;

use arbitrary::Arbitrary;
use fast_sandbox_proto::cri;
use fast_sandbox_shim::slots::{
    HandlerMap, POOL_LABEL, RUNTIME_HANDLER_LABEL, SLOT_LABEL, SLOT_NAMESPACE, SLOT_TOKEN_LABEL,
    SLOT_UNCLAIMED,
};

/// The node's secret slot token in the fuzz targets. Pod-controlled strings
/// never draw it (a pod cannot know it); upstream's labels of a slot do.
pub const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// Exposed handler → upstream handler of the fuzz targets: two runtimes,
/// so handler isolation can be checked.
pub fn handlers() -> HandlerMap {
    HandlerMap::new([
        ("fast-runc", "runc"),
        ("fast-crun", "crun"),
        ("fast-gvisor", "runsc"),
        ("", "runc"),
    ])
}

/// Strings a pod (or upstream, for ordinary sandboxes) may carry.
const VOCABULARY: &[&str] = &[
    "",
    "fast-runc",
    "fast-crun",
    "fast-gvisor",
    "runc",
    "crun",
    "runsc",
    "kata",
    SLOT_TOKEN_LABEL,
    POOL_LABEL,
    SLOT_LABEL,
    SLOT_UNCLAIMED,
    RUNTIME_HANDLER_LABEL,
    SLOT_NAMESPACE,
    "io.kubernetes.cri.untrusted-workload",
    "kubernetes.io/ingress-bandwidth",
    "kubernetes.io/egress-bandwidth",
    "io.kubernetes.pod.uid",
    "io.kubernetes.pod.name",
    "app",
    "default",
    "localhost/",
    "localhost/profile.json",
    "localhost/localhost/profile.json",
    "/var/lib/kubelet/seccomp/profiles/audit.json",
    "runtime/default",
    "docker/default",
    "unconfined",
    "/kubepods/besteffort/pod1",
    "kubepods-besteffort-pod1.slice",
    "../../etc",
    "a/b",
    "\0",
    "\u{2028}<>&\"\\",
];

/// A string: usually from the vocabulary, sometimes anything.
#[derive(Debug, Clone, Arbitrary)]
pub enum Str {
    Vocab(u8),
    Any(String),
}

impl Str {
    pub fn get(&self) -> String {
        match self {
            Str::Vocab(i) => VOCABULARY[usize::from(*i) % VOCABULARY.len()].to_owned(),
            Str::Any(s) => s.clone(),
        }
    }
}

/// A string a pod controls: never the node's token.
pub fn pod_string(s: &Str) -> String {
    let s = s.get();
    if s == TOKEN {
        String::new()
    } else {
        s
    }
}

pub fn pod_map(pairs: &[(Str, Str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (pod_string(k), pod_string(v)))
        .collect()
}

/// An enum value: mostly in range, sometimes not (prost keeps unknown
/// values as they are).
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Enum {
    Known(u8),
    Raw(i32),
}

impl Enum {
    pub fn get(self, known: u8) -> i32 {
        match self {
            Enum::Known(v) => i32::from(v % known.max(1)),
            Enum::Raw(v) => v,
        }
    }
}

#[derive(Debug, Clone, Arbitrary)]
pub struct ArbNamespaces {
    pub network: Enum,
    pub pid: Enum,
    pub ipc: Enum,
    pub target_id: Str,
    pub userns_mode: Option<Enum>,
}

#[derive(Debug, Clone, Arbitrary)]
pub struct ArbSecurity {
    pub namespaces: Option<ArbNamespaces>,
    pub selinux: Option<(Str, Str, Str, Str)>,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub readonly_rootfs: bool,
    pub supplemental_groups: Vec<i64>,
    pub privileged: bool,
    pub seccomp: Option<(Enum, Str)>,
    pub seccomp_profile_path: Str,
}

#[derive(Debug, Clone, Arbitrary)]
pub struct ArbLinux {
    pub cgroup_parent: Str,
    pub security: Option<ArbSecurity>,
    pub sysctls: Vec<(Str, Str)>,
    /// cpu period, quota, shares, memory limit.
    pub resources: Option<(i64, i64, i64, i64)>,
}

/// A `PodSandboxConfig` as kubelet (or anyone on the socket) might send it.
#[derive(Debug, Clone, Arbitrary)]
pub struct ArbPod {
    pub metadata: Option<(Str, Str, Str, u32)>,
    pub hostname: Str,
    pub log_directory: Str,
    pub dns: Option<(Vec<Str>, Vec<Str>, Vec<Str>)>,
    pub ports: Vec<(Enum, i32, i32, Str)>,
    pub labels: Vec<(Str, Str)>,
    pub annotations: Vec<(Str, Str)>,
    pub linux: Option<ArbLinux>,
}

fn strings(v: &[Str]) -> Vec<String> {
    v.iter().map(pod_string).collect()
}

impl ArbSecurity {
    #[allow(deprecated)] // still sent by older kubelets, still honoured
    fn build(&self) -> cri::LinuxSandboxSecurityContext {
        cri::LinuxSandboxSecurityContext {
            namespace_options: self.namespaces.as_ref().map(|n| cri::NamespaceOption {
                network: n.network.get(4),
                pid: n.pid.get(4),
                ipc: n.ipc.get(4),
                target_id: pod_string(&n.target_id),
                userns_options: n.userns_mode.map(|m| cri::UserNamespace {
                    mode: m.get(4),
                    ..Default::default()
                }),
            }),
            selinux_options: self.selinux.as_ref().map(|(user, role, r#type, level)| {
                cri::SeLinuxOption {
                    user: pod_string(user),
                    role: pod_string(role),
                    r#type: pod_string(r#type),
                    level: pod_string(level),
                }
            }),
            run_as_user: self.run_as_user.map(|value| cri::Int64Value { value }),
            run_as_group: self.run_as_group.map(|value| cri::Int64Value { value }),
            readonly_rootfs: self.readonly_rootfs,
            supplemental_groups: self.supplemental_groups.clone(),
            privileged: self.privileged,
            seccomp: self
                .seccomp
                .as_ref()
                .map(|(kind, localhost_ref)| cri::SecurityProfile {
                    profile_type: kind.get(3),
                    localhost_ref: pod_string(localhost_ref),
                }),
            seccomp_profile_path: pod_string(&self.seccomp_profile_path),
            ..Default::default()
        }
    }
}

impl ArbPod {
    pub fn build(&self) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: self
                .metadata
                .as_ref()
                .map(|(name, uid, namespace, attempt)| cri::PodSandboxMetadata {
                    name: pod_string(name),
                    uid: pod_string(uid),
                    namespace: pod_string(namespace),
                    attempt: *attempt,
                }),
            hostname: pod_string(&self.hostname),
            log_directory: pod_string(&self.log_directory),
            dns_config: self
                .dns
                .as_ref()
                .map(|(servers, searches, options)| cri::DnsConfig {
                    servers: strings(servers),
                    searches: strings(searches),
                    options: strings(options),
                }),
            port_mappings: self
                .ports
                .iter()
                .map(
                    |(protocol, container_port, host_port, host_ip)| cri::PortMapping {
                        protocol: protocol.get(3),
                        container_port: *container_port,
                        host_port: *host_port,
                        host_ip: pod_string(host_ip),
                    },
                )
                .collect(),
            labels: pod_map(&self.labels),
            annotations: pod_map(&self.annotations),
            linux: self.linux.as_ref().map(|l| cri::LinuxPodSandboxConfig {
                cgroup_parent: pod_string(&l.cgroup_parent),
                security_context: l.security.as_ref().map(ArbSecurity::build),
                sysctls: pod_map(&l.sysctls),
                resources: l.resources.map(|(period, quota, shares, memory)| {
                    cri::LinuxContainerResources {
                        cpu_period: period,
                        cpu_quota: quota,
                        cpu_shares: shares,
                        memory_limit_in_bytes: memory,
                        ..Default::default()
                    }
                }),
                ..Default::default()
            }),
            windows: None,
        }
    }
}
