//! The flags several commands share (`#[command(flatten)]`), and their
//! parsing into the library's settings.

use std::collections::HashMap;
use std::path::PathBuf;

use fast_sandbox_controller::extender::{self, ExtenderConfig};
use fast_sandbox_controller::scoring::{Policy, SlotPolicy};
use fast_sandbox_proto::shape::KUBELET_SANDBOX_SECCOMP;

/// Whether a node needs a free warm slot to be chosen.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Slots {
    /// No free slot: filtered out (the pod waits for a warm slot).
    Require,
    /// No free slot: kept, scored low (the pod may start cold).
    Prefer,
}

/// Where the API server is: the flags `run` and `uninstall` share.
#[derive(Debug, clap::Args)]
pub struct KubeArgs {
    /// A kubeconfig file; without it: KUBECONFIG, ~/.kube/config, or
    /// the in-cluster service account.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long)]
    pub context: Option<String>,
}

/// How fast pods are recognised and nodes judged: the flags `extender`
/// and `run` share.
#[derive(Debug, clap::Args)]
pub struct PlacementArgs {
    /// Fast RuntimeClasses, `CLASS` or `CLASS=HANDLER` (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fast-runc,fast-crun,fast-gvisor,fast-kata"
    )]
    pub fast_class: Vec<String>,
    /// Extender: let the filter verb remove nodes (opt-in). Off, every
    /// node passes and nodes are only scored, so a fast pod goes wherever
    /// it would go without the extender and at worst starts cold. On, nodes
    /// without a warm pool of the pod's handler and shape, whose node
    /// plugin is not ready, or (with --slots require) without a free slot
    /// are filtered out. The cost: a pod no warm slot fits (another shape,
    /// every slot taken, node plugin down) stays Pending instead of
    /// starting cold.
    #[arg(long)]
    pub extender_filter: bool,
    /// Extender, with --extender-filter: whether a node needs a free warm
    /// slot to pass the filter.
    #[arg(long, value_enum, default_value_t = Slots::Prefer)]
    pub slots: Slots,
    /// Ignore nodes whose status is older than this.
    #[arg(long)]
    pub stale_after_ms: Option<u64>,
    /// The seccomp shape of every pod's sandbox (kubelet always asks
    /// RuntimeDefault for it), and of pools that set none.
    #[arg(long, default_value = KUBELET_SANDBOX_SECCOMP)]
    pub default_seccomp: String,
    /// Extender: count the best node of each fast pod as one slot fewer for
    /// this long (ms), until its status shows the claim; 0 turns it off.
    #[arg(long, default_value_t = extender::DEFAULT_ASSUME_TTL_MS)]
    pub assume_ttl_ms: u64,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

impl PlacementArgs {
    pub fn extender_config(&self) -> anyhow::Result<ExtenderConfig> {
        Ok(ExtenderConfig {
            fast_classes: fast_classes(&self.fast_class)?,
            policy: policy(self.slots, self.stale_after_ms),
            filter_nodes: self.extender_filter,
            default_seccomp: self.default_seccomp.clone(),
            assume_ttl_ms: (self.assume_ttl_ms > 0).then_some(self.assume_ttl_ms),
        })
    }
}

/// `--fast-class CLASS[=HANDLER]` entries: class → handler.
pub fn fast_classes(specs: &[String]) -> anyhow::Result<HashMap<String, String>> {
    specs
        .iter()
        .map(|spec| {
            let (class, handler) = spec.split_once('=').unwrap_or((spec, spec));
            anyhow::ensure!(
                !class.is_empty() && !handler.is_empty(),
                "--fast-class {spec:?}: expected CLASS or CLASS=HANDLER"
            );
            Ok((class.to_owned(), handler.to_owned()))
        })
        .collect()
}

/// `--agent NODE=ADDR` entries.
pub fn agent_entries(specs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    specs
        .iter()
        .map(|spec| match spec.split_once('=') {
            Some((node, address)) if !node.is_empty() && !address.is_empty() => {
                Ok((node.to_owned(), address.to_owned()))
            }
            _ => anyhow::bail!("--agent {spec:?}: expected NODE=HOST:PORT"),
        })
        .collect()
}

/// The placement policy of `slots` and `--stale-after-ms`.
pub fn policy(slots: Slots, stale_after_ms: Option<u64>) -> Policy {
    Policy {
        slots: match slots {
            Slots::Require => SlotPolicy::Require,
            Slots::Prefer => SlotPolicy::Prefer,
        },
        stale_after_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_class_specs() {
        let classes = fast_classes(&["fast-runc".into(), "warm=fast-crun".into()]).unwrap();
        assert_eq!(classes["fast-runc"], "fast-runc");
        assert_eq!(classes["warm"], "fast-crun");
        assert!(fast_classes(&["=x".into()]).is_err());
        assert!(fast_classes(&["x=".into()]).is_err());
    }
}
