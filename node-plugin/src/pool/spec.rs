//! What a pool is configured with: its [`PoolSpec`] and the manager's
//! [`ManagerConfig`]. A leaf of the pool (the config file and the node agent
//! read these names without depending on the pool itself).

use std::{path::PathBuf, time::Duration};

use fast_sandbox_shim::slots::PoolKey;
use serde::Deserialize;

use crate::network::{CniSettings, NetworkList};

/// Largest pool a config may ask for: each slot holds a netns, an IP, a
/// shim and a pause, so typos like `size = 4000` are refused.
pub const MAX_POOL_SIZE: usize = 256;

/// How a slot's network identity is handled at claim (docs/design.md,
/// "Network identity").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Decided from containerd's CNI configuration once it exists
    /// ([`NetworkMode::resolve`]): `keep` when every plugin of the chain is
    /// identity-free, `rebind` otherwise. What an unset `network` means.
    #[default]
    Auto,
    /// Serve the slot's CNI attachment as is: only for identity-free CNIs
    /// (bridge/host-local), refused for policy-aware ones.
    Keep,
    /// CNI DEL/ADD with the real pod's identity at claim.
    Rebind,
}

/// `network = "keep"` on a network whose plugins key identity to the pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "pool {pool:?}: network = \"keep\" is refused: containerd's network {network:?} \
     ({}) runs plugin type(s) {}, which bind the pod's network identity (and so \
     NetworkPolicy) to the placeholder a warm slot was created as; use \
     network = \"rebind\" or leave network unset",
    file.display(),
    plugins.join(", ")
)]
pub struct KeepRefused {
    pub pool: String,
    /// The network's `name`.
    pub network: String,
    /// The configuration file it was read from.
    pub file: PathBuf,
    /// The plugin types that are not identity-free.
    pub plugins: Vec<String>,
}

impl NetworkMode {
    /// The mode of pool `pool` on containerd's network `list`: `Keep` or
    /// `Rebind`, never `Auto`. `Auto` is `Keep` only when every plugin of
    /// the chain is identity-free ([`crate::network::IDENTITY_FREE_PLUGINS`]);
    /// an explicit `Keep` on any other chain is refused.
    pub fn resolve(self, pool: &str, list: &NetworkList) -> Result<NetworkMode, KeepRefused> {
        let bound = list.identity_bound_plugins();
        match self {
            Self::Rebind => Ok(Self::Rebind),
            Self::Auto if bound.is_empty() => Ok(Self::Keep),
            Self::Auto => Ok(Self::Rebind),
            Self::Keep if bound.is_empty() => Ok(Self::Keep),
            Self::Keep => Err(KeepRefused {
                pool: pool.to_owned(),
                network: list.name().to_owned(),
                file: list.file().to_owned(),
                plugins: bound.into_iter().map(str::to_owned).collect(),
            }),
        }
    }

    /// The name a config file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Keep => "keep",
            Self::Rebind => "rebind",
        }
    }
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
    /// How a claimed slot's network identity is handled, as configured
    /// (`Auto`: decided when containerd's CNI configuration exists).
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
    /// containerd's CNI configuration: read at start, or as soon as it
    /// exists, to decide each pool's network mode and run `rebind`.
    pub cni: CniSettings,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn list(file: &str, plugins: &str) -> NetworkList {
        let text =
            format!(r#"{{"name":"k8s-pod-network","cniVersion":"0.3.1","plugins":{plugins}}}"#);
        NetworkList::parse(Path::new(file), text.as_bytes()).expect("valid conflist")
    }

    #[test]
    fn unset_network_follows_the_cni_and_keep_is_refused_on_a_policy_cni() {
        let bridge = list(
            "/etc/cni/net.d/10-bridge.conflist",
            r#"[{"type":"bridge","ipam":{"type":"host-local"}},{"type":"portmap"}]"#,
        );
        let calico = list(
            "/etc/cni/net.d/10-calico.conflist",
            r#"[{"type":"calico","ipam":{"type":"calico-ipam"}},{"type":"portmap"}]"#,
        );
        use NetworkMode::{Auto, Keep, Rebind};
        for (configured, on, want) in [
            (Auto, &bridge, Keep),
            (Keep, &bridge, Keep),
            (Rebind, &bridge, Rebind),
            (Auto, &calico, Rebind),
            (Rebind, &calico, Rebind),
        ] {
            assert_eq!(
                configured.resolve("p", on).expect("allowed"),
                want,
                "{configured:?} on {}",
                on.file().display()
            );
        }
        let err = Keep
            .resolve("fast-runc", &calico)
            .expect_err("keep on calico");
        assert_eq!(err.plugins, ["calico", "calico-ipam"]);
        let msg = err.to_string();
        for part in [
            "pool \"fast-runc\"",
            "\"k8s-pod-network\"",
            "/etc/cni/net.d/10-calico.conflist",
            "calico, calico-ipam",
        ] {
            assert!(msg.contains(part), "{part} not in: {msg}");
        }
    }
}
