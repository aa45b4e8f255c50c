//! The seam between the shim and whatever makes warm sandboxes.
//!
//! The shim knows nothing about how slots are made: it validates a
//! `RunPodSandbox` into a [`Claim`] once, asks a [`SlotSource`] for a slot of
//! exactly that [`PoolKey`], and asks it again, for every sandbox id it
//! reports, whether that id is an unclaimed slot (hidden) or a claimed one
//! (reported with the pod's own identity).

use std::{collections::HashMap, fmt, sync::Arc};

use fast_sandbox_proto::cri::PodSandboxConfig;

/// Label on every placeholder sandbox: its value is a per-node secret, so a
/// pod's own labels can never make a sandbox look like a slot.
pub const SLOT_TOKEN_LABEL: &str = "fast-sandbox.io/slot-token";
/// Label on every placeholder sandbox naming its pool.
pub const POOL_LABEL: &str = "fast-sandbox.io/pool";
/// Label on every placeholder sandbox: `unclaimed` when created.
pub const SLOT_LABEL: &str = "fast-sandbox.io/slot";
/// Value of [`SLOT_LABEL`] on a placeholder.
pub const SLOT_UNCLAIMED: &str = "unclaimed";
/// The default pod namespace of placeholder sandboxes.
pub const SLOT_NAMESPACE: &str = "fast-sandbox-slots";
/// Label the shim puts on the config of a cold-started sandbox of an exposed
/// handler: its value is the handler kubelet asked for (`fast-runc`), while
/// upstream runs the sandbox with the mapped one (`runc`). Every answer
/// about the sandbox strips it and reports that handler instead, so a cold
/// miss looks like a warm hit. Upstream keeps it, so this survives restarts
/// of the shim and the node plugin. Reserved: a pod's own value of it is
/// replaced on fast handlers and never shown (see `rewrite.rs`).
pub const RUNTIME_HANDLER_LABEL: &str = "fast-sandbox.io/runtime-handler";

pub use crate::misses::{Ineligible, MissReason};

/// The warm handlers and where their slots come from: what the server and
/// the rewriting know of slots.
#[derive(Debug)]
pub(crate) struct Slots {
    pub(crate) handlers: HandlerMap,
    pub(crate) source: Arc<dyn SlotSource>,
}

/// What the pool chooses for one placeholder sandbox; everything else in the
/// placeholder's config follows from its [`PoolKey`] ([`placeholder_config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placeholder<'a> {
    /// Pod name (also the placeholder's hostname): unique per slot.
    pub name: &'a str,
    /// Pod namespace, normally [`SLOT_NAMESPACE`].
    pub namespace: &'a str,
    /// Pod uid: unique per slot.
    pub uid: &'a str,
    /// The pool's name ([`POOL_LABEL`]).
    pub pool: &'a str,
    /// The node's secret slot token ([`SLOT_TOKEN_LABEL`]).
    pub token: &'a str,
    /// The slot's own, existing cgroup. Must not be empty: containerd 1.6
    /// reads sandbox stats from it and fails every `ListPodSandboxStats`
    /// otherwise.
    pub cgroup_parent: &'a str,
}

/// The full config of a placeholder of `key`: the same as
/// [`PoolKey::placeholder_config`].
pub fn placeholder_config(key: &PoolKey, slot: &Placeholder<'_>) -> PodSandboxConfig {
    key.placeholder_config(slot)
}

/// Exposed runtime handler → upstream runtime handler, e.g.
/// `fast-runc → runc`. A handler not in the map is forwarded untouched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandlerMap(HashMap<String, String>);

impl HandlerMap {
    pub fn new<I, K, V>(entries: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self(
            entries
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    /// The upstream handler an exposed handler maps to, if it is ours.
    pub fn upstream_for(&self, exposed: &str) -> Option<&str> {
        self.0.get(exposed).map(String::as_str)
    }

    /// Whether `handler` is one of the exposed handlers.
    pub fn is_exposed(&self, handler: &str) -> bool {
        self.0.contains_key(handler)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Seccomp profile of the pause process: fixed when the sandbox starts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum SeccompShape {
    #[default]
    Unconfined,
    RuntimeDefault,
    Localhost(String),
}

/// SELinux options of the pause process: fixed when the sandbox starts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SeLinuxShape {
    pub user: String,
    pub role: String,
    pub r#type: String,
    pub level: String,
}

/// The fields of a pod's sandbox config that cannot be changed once the
/// sandbox runs, so a slot can only serve a pod whose shape equals the one
/// it was built with. Everything else is fixed up at claim or rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Shape {
    pub seccomp: SeccompShape,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub supplemental_groups: Vec<i64>,
    pub selinux: Option<SeLinuxShape>,
}

/// What a pool is keyed by: a slot serves only requests of the same key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// The upstream handler the slot was created with (`runc`), never the
    /// exposed one: the handler-isolation invariant is about this.
    pub upstream_handler: String,
    pub shape: Shape,
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:?}", self.upstream_handler, self.shape.seccomp)?;
        if let Some(u) = self.shape.run_as_user {
            write!(f, "/uid={u}")?;
        }
        if let Some(g) = self.shape.run_as_group {
            write!(f, "/gid={g}")?;
        }
        Ok(())
    }
}

/// A `RunPodSandbox` for a warm handler, validated once at the shim's edge.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The handler kubelet asked for (`fast-runc`), reported back in status.
    pub exposed_handler: String,
    pub key: PoolKey,
    /// The pod's real sandbox config, less any value of the reserved
    /// [`RUNTIME_HANDLER_LABEL`] (a cold start of the pod would not show it
    /// either).
    pub config: PodSandboxConfig,
}

/// A slot handed to a pod.
#[derive(Debug, Clone)]
pub struct ClaimedSlot {
    pub sandbox_id: String,
}

/// Why a claim found no slot (the pod then starts cold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoSlot {
    /// No pool is configured for this key.
    NoPool,
    /// A pool exists but has no free slot right now.
    PoolEmpty,
    /// A pool exists but cannot serve this pod (one of the pool-specific
    /// miss reasons, e.g. [`MissReason::NoHostname`]); decided before any
    /// slot was touched, so the pool is as it was.
    CannotServe(MissReason),
}

/// A claim that took a slot but could not finish (fix-up failed, the slot
/// died): the source has already destroyed the slot; the pod starts cold.
#[derive(Debug, thiserror::Error)]
#[error("claim of slot {sandbox_id} failed: {reason}")]
pub struct ClaimFailed {
    pub sandbox_id: String,
    pub reason: String,
}

/// Why a claimed sandbox may not get containers (yet): its pending identity
/// step ([`SlotSource::ready_for_containers`]) did not finish in time or
/// failed. `CreateContainer` fails with it and is not forwarded, so no
/// container ever runs in a half-fixed sandbox; kubelet retries the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// Still running when the wait's bound passed.
    #[error("sandbox {sandbox_id} is not ready for containers: setting up its identity (hostname) did not finish within {waited:?}")]
    Pending {
        sandbox_id: String,
        waited: std::time::Duration,
    },
    /// Failed (after a retry), or was abandoned because the sandbox is
    /// being removed: no container is created in it.
    #[error("sandbox {sandbox_id} is not ready for containers: setting up its identity (hostname) failed: {reason}")]
    Failed { sandbox_id: String, reason: String },
}

// The shim's own errors map to the wire in `error.rs`; this one belongs to
// the slot seam, whose source produces it.
impl From<NotReady> for tonic::Status {
    fn from(err: NotReady) -> Self {
        let code = match &err {
            // Transient: the step may still finish.
            NotReady::Pending { .. } => tonic::Code::Unavailable,
            NotReady::Failed { .. } => tonic::Code::Internal,
        };
        tonic::Status::new(code, err.to_string())
    }
}

/// The identity a claimed slot is reported with.
#[derive(Debug, Clone)]
pub struct ClaimedPod {
    /// The pod's real sandbox config (metadata, labels, annotations, …).
    pub config: PodSandboxConfig,
    /// The handler kubelet asked for.
    pub exposed_handler: String,
    /// When the claim happened, in ns since the epoch: the pod's
    /// `created_at`, as a cold sandbox created then would report.
    pub claimed_at_ns: i64,
    /// The pod's own IPs when the slot's network was rebound to it
    /// (`network = "rebind"`); `None`: the slot's IP is the pod's.
    pub network: Option<PodIps>,
}

/// A claimed pod's CPU and memory, as `PodSandboxStats` reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct PodUsage {
    pub cpu: fast_sandbox_proto::cri::CpuUsage,
    pub memory: fast_sandbox_proto::cri::MemoryUsage,
}

/// A pod's IPs as `PodSandboxStatus` reports them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodIps {
    /// The primary IP (`network.ip`).
    pub ip: String,
    /// `network.additional_ips`, in order.
    pub additional: Vec<String>,
}

/// What the shim must show for one upstream sandbox.
#[derive(Debug, Clone)]
pub enum SlotView {
    /// An ordinary sandbox: report upstream's answer unchanged.
    NotASlot,
    /// A pre-created slot no pod owns: invisible through the shim.
    Unclaimed,
    /// A slot a pod owns: report it with the pod's identity.
    Claimed(Arc<ClaimedPod>),
}

/// Whatever makes and hands out warm slots (the node plugin's pools).
#[tonic::async_trait]
pub trait SlotSource: fmt::Debug + Send + Sync + 'static {
    /// Takes a free slot of exactly `claim.key`, records the claim durably,
    /// applies the fix-ups, and returns it. `Ok(Err(_))`: no slot, start
    /// cold. Everything that makes a pod one the pool cannot serve must be
    /// decided before a slot is taken ([`NoSlot::CannotServe`]): `Err` is
    /// for a claim that could have worked and did not. The future is dropped if the caller (kubelet) gives up on the
    /// `RunPodSandbox`, so it must leave no half-claimed slot behind when
    /// cancelled.
    async fn claim(&self, claim: &Claim) -> Result<Result<ClaimedSlot, NoSlot>, ClaimFailed>;

    /// What sandbox `id` is, given the labels upstream reports for it.
    /// Called for every sandbox in every list/status answer: must be cheap
    /// and must not block.
    ///
    /// Calls that only name a sandbox (`StopPodSandbox`, `CreateContainer`,
    /// ...) ask with the full id and *no* labels when kubelet sent a full
    /// id: the answer must then come from what the source knows by id (every
    /// slot it made). A labels-only fallback (the slot token) need not match
    /// there: a slot not known by id yet is still being created, and its id
    /// never went through the shim.
    fn view(&self, sandbox_id: &str, upstream_labels: &HashMap<String, String>) -> SlotView;

    /// Upstream removed sandbox `id` (after `RemovePodSandbox` succeeded):
    /// forget its claim record.
    async fn removed(&self, sandbox_id: &str);

    /// Claimed sandbox `id` is about to be stopped (before its
    /// `StopPodSandbox` is forwarded): undo what the claim attached under
    /// the pod's identity (a rebound network). Called for every stop of a
    /// claimed slot, so it must be idempotent.
    async fn stopping(&self, _sandbox_id: &str) {}

    /// Waits until sandbox `id` may get containers: a claimed slot whose
    /// identity step was deferred past the claim's answer (a gVisor slot's
    /// UTS hostname, set inside the sandbox; nothing in a pod can observe
    /// it before the pod's first container exists) has finished it.
    /// Called before every `CreateContainer` the shim forwards (with the
    /// full id), so for any other sandbox — unknown ids, cold sandboxes,
    /// slots with nothing pending (runc, crun) — it must answer at once
    /// without I/O. The wait must be bounded. `Err`: the container is not
    /// created.
    async fn ready_for_containers(&self, _sandbox_id: &str) -> Result<(), NotReady> {
        Ok(())
    }

    /// CPU and memory of claimed sandbox `id` measured on the pod's own
    /// cgroup (upstream measures the placeholder's), for `PodSandboxStats`;
    /// `None`: pass upstream's numbers on. Called once per claimed sandbox
    /// in every stats answer: must be cheap and must not block for long.
    fn pod_usage(&self, _sandbox_id: &str, _pod: &ClaimedPod) -> Option<PodUsage> {
        None
    }

    /// A `RunPodSandbox` with runtime handler `handler` started cold, for
    /// `reason` (for the misses-by-reason metric). Called once per cold
    /// `RunPodSandbox`, including the misses [`SlotSource::claim`] itself
    /// reported, and with [`MissReason::NotFastHandler`] for handlers the
    /// shim does not expose. `key` is `None` when the request was not
    /// eligible. Must not block.
    fn missed(&self, handler: &str, key: Option<&PoolKey>, reason: MissReason) {
        let _ = (handler, key, reason);
    }
}
