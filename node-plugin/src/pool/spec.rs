//! What a pool is configured with: its [`PoolSpec`] and the manager's
//! [`ManagerConfig`]. A leaf of the pool (the config file and the node agent
//! read these names without depending on the pool itself).

use std::{path::PathBuf, time::Duration};

use fast_sandbox_shim::slots::PoolKey;
use serde::Deserialize;

use crate::network::CniSettings;

/// Largest pool a config may ask for: each slot holds a netns, an IP, a
/// shim and a pause, so typos like `size = 4000` are refused.
pub const MAX_POOL_SIZE: usize = 256;

/// How a slot's network identity is handled at claim (docs/design.md,
/// "Network identity").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Serve the slot's CNI attachment as is: only for identity-free CNIs
    /// (bridge/host-local), never for policy-aware ones.
    #[default]
    Keep,
    /// CNI DEL/ADD with the real pod's identity at claim.
    Rebind,
}

/// One configured pool.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Name used in labels, metrics and records (e.g. `fast-runc`).
    pub name: String,
    /// The handler kubelet asks for.
    pub exposed_handler: String,
    pub key: PoolKey,
    /// Free slots to keep.
    pub size: usize,
    /// How a claimed slot's network identity is handled.
    pub network: NetworkMode,
}

/// Settings of the manager itself.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Where claim records and the token live.
    pub state_dir: PathBuf,
    /// containerd's directory of sandbox directories
    /// ([`crate::pool::records::sandboxes_dir`]): each claim record is
    /// copied into its sandbox's, so recovery survives a lost `claims/`.
    /// `None`: no copies.
    pub record_copies: Option<PathBuf>,
    /// cgroup parent under which placeholders are created; each slot gets
    /// its own child (`<root>/<slot uid>`), so upstream stats of an
    /// unclaimed slot are that slot's alone.
    pub placeholder_cgroup_root: String,
    /// Namespace of placeholder pods (never a real namespace's name).
    pub placeholder_namespace: String,
    /// Deadline for one upstream call made by the pool, and for one file
    /// or cgroup operation it runs on a blocking thread.
    pub upstream_timeout: Duration,
    /// Pause between two slot creations, so refill never monopolises
    /// containerd while cold pods start.
    pub refill_interval: Duration,
    /// After a claim, how long the pool waits before refilling, so the
    /// refill does not compete with the pod that just started (its
    /// `CreateContainer`/`StartContainer` follow within milliseconds).
    pub refill_delay: Duration,
    /// How often free slots are checked for health.
    pub health_interval: Duration,
    /// containerd's CNI configuration: read at start when a pool has
    /// `network = "rebind"`.
    pub cni: CniSettings,
}
