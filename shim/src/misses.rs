//! Why a `RunPodSandbox` for a warm handler is not a claim, and the miss
//! reason each cause is counted under. Part of the slot API
//! ([`crate::slots`] re-exports it); the decision itself is in
//! `intercept.rs`.

/// containerd picks its `untrusted` runtime for pods with this annotation
/// (`getSandboxRuntime`), whatever the handler.
pub const UNTRUSTED_WORKLOAD_ANNOTATION: &str = "io.kubernetes.cri.untrusted-workload";

/// Why a `RunPodSandbox` for a warm handler started cold. Stable names
/// ([`MissReason::as_str`]) for metrics labels and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum MissReason {
    /// The handler is not one the shim exposes.
    NotFastHandler,
    HostNetwork,
    HostPid,
    HostIpc,
    HostPort,
    Privileged,
    Untrusted,
    Bandwidth,
    /// The pod asks for its own user namespace, which no slot has.
    UserNamespace,
    /// The request is one upstream rejects (no config or metadata, an
    /// invalid seccomp profile, a group without a user): upstream gives its
    /// own error.
    InvalidConfig,
    /// No pool is configured for the pod's key.
    NoPool,
    /// The pool has no free slot right now.
    PoolEmpty,
    /// A slot was taken but the claim could not finish.
    ClaimFailed,
    /// The pod has no hostname and the pool's runtime sets it inside the
    /// sandbox (`guest-exec`), which does not guess one: decided before
    /// any slot is taken.
    NoHostname,
    /// The pod sets sysctls and the pool's runtime applies them only at
    /// sandbox start: decided before any slot is taken.
    SysctlsAtStartOnly,
    /// A field of the pod's config the pool's fix-up cannot reproduce in a
    /// slot (a relative cgroup parent, a sysctl outside the pod's
    /// namespaces, …): decided before any slot is taken.
    UnsupportedConfig,
}

impl MissReason {
    /// Every reason, for pre-registering metric series.
    pub const ALL: [MissReason; 16] = [
        MissReason::NotFastHandler,
        MissReason::HostNetwork,
        MissReason::HostPid,
        MissReason::HostIpc,
        MissReason::HostPort,
        MissReason::Privileged,
        MissReason::Untrusted,
        MissReason::Bandwidth,
        MissReason::UserNamespace,
        MissReason::InvalidConfig,
        MissReason::NoPool,
        MissReason::PoolEmpty,
        MissReason::ClaimFailed,
        MissReason::NoHostname,
        MissReason::SysctlsAtStartOnly,
        MissReason::UnsupportedConfig,
    ];

    /// The metric label value; never changes once released.
    pub const fn as_str(self) -> &'static str {
        match self {
            MissReason::NotFastHandler => "not_fast_handler",
            MissReason::HostNetwork => "host_network",
            MissReason::HostPid => "host_pid",
            MissReason::HostIpc => "host_ipc",
            MissReason::HostPort => "host_port",
            MissReason::Privileged => "privileged",
            MissReason::Untrusted => "untrusted",
            MissReason::Bandwidth => "bandwidth",
            MissReason::UserNamespace => "user_namespace",
            MissReason::InvalidConfig => "invalid_config",
            MissReason::NoPool => "no_pool",
            MissReason::PoolEmpty => "pool_empty",
            MissReason::ClaimFailed => "claim_failed",
            MissReason::NoHostname => "no_hostname",
            MissReason::SysctlsAtStartOnly => "sysctls_at_start_only",
            MissReason::UnsupportedConfig => "unsupported_config",
        }
    }
}

impl std::fmt::Display for MissReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a `RunPodSandbox` is not a claim. The first cause found is reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ineligible {
    #[error("runtime handler {0:?} is not a warm handler")]
    NotFastHandler(String),
    #[error("the request has no sandbox config")]
    MissingConfig,
    #[error("the sandbox config has no metadata")]
    MissingMetadata,
    #[error("the pod uses the host network")]
    HostNetwork,
    #[error("the pod uses the host PID namespace")]
    HostPid,
    #[error("the pod uses the host IPC namespace")]
    HostIpc,
    #[error("the pod maps container port {container_port} to host port {host_port}")]
    HostPort { container_port: i32, host_port: i32 },
    #[error("the pod is privileged")]
    Privileged,
    #[error("the pod carries the {UNTRUSTED_WORKLOAD_ANNOTATION} annotation")]
    Untrusted,
    #[error("the pod carries the {annotation} annotation")]
    Bandwidth { annotation: &'static str },
    #[error("the pod asks for a user namespace")]
    UserNamespace,
    #[error("invalid seccomp profile: {0}")]
    InvalidSeccomp(String),
    #[error("run_as_group is set without run_as_user")]
    GroupWithoutUser,
}

impl Ineligible {
    pub fn reason(&self) -> MissReason {
        match self {
            Ineligible::NotFastHandler(_) => MissReason::NotFastHandler,
            Ineligible::HostNetwork => MissReason::HostNetwork,
            Ineligible::HostPid => MissReason::HostPid,
            Ineligible::HostIpc => MissReason::HostIpc,
            Ineligible::HostPort { .. } => MissReason::HostPort,
            Ineligible::Privileged => MissReason::Privileged,
            Ineligible::Untrusted => MissReason::Untrusted,
            Ineligible::Bandwidth { .. } => MissReason::Bandwidth,
            Ineligible::UserNamespace => MissReason::UserNamespace,
            Ineligible::MissingConfig
            | Ineligible::MissingMetadata
            | Ineligible::InvalidSeccomp(_)
            | Ineligible::GroupWithoutUser => MissReason::InvalidConfig,
        }
    }
}
