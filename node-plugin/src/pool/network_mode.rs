//! Each pool's network mode, decided once from containerd's CNI
//! configuration (docs/design.md, "Network identity").
//!
//! On a new node the CNI's own pods start through this CRI before the CNI
//! writes its configuration, so CRI is served without it: the decision is
//! made at start when the configuration is there, else by the refill task
//! as soon as it appears ([`PoolManager::await_network`]). No slot is
//! created and no slot is handed out before it.

use std::sync::Arc;

use super::{spec::KeepRefused, NetworkMode, PoolError, PoolManager, PoolSpec};
use crate::{
    blocking::{asyncify, chain},
    network::{Cni, CniError, CniSettings, NetworkList, PluginExec},
};

/// The pools' modes on containerd's network.
#[derive(Debug)]
pub(super) struct NetworkDecision {
    /// Per pool, in spec order: `Keep` or `Rebind`, or why `keep` was
    /// refused (that pool stays empty).
    modes: Vec<Result<NetworkMode, KeepRefused>>,
    /// containerd's network, when a pool rebinds.
    cni: Option<Cni>,
}

impl NetworkDecision {
    /// The modes of `specs` on `list`; `Err` when a `rebind` pool's
    /// plugins are not all in `settings.bin_dirs` (yet).
    fn decide(
        specs: &[PoolSpec],
        list: Option<NetworkList>,
        settings: &CniSettings,
        exec: Arc<dyn PluginExec>,
    ) -> Result<Self, CniError> {
        let Some(list) = list else {
            return Ok(Self {
                modes: Vec::new(),
                cni: None,
            });
        };
        let modes: Vec<_> = specs
            .iter()
            .map(|s| s.network.resolve(&s.name, &list))
            .collect();
        let cni = if modes.contains(&Ok(NetworkMode::Rebind)) {
            Some(Cni::with_list(list, settings.clone(), exec).checked()?)
        } else {
            None
        };
        Ok(Self { modes, cni })
    }

    /// The first pool whose `keep` was refused.
    fn refused(&self) -> Option<&KeepRefused> {
        self.modes.iter().find_map(|m| m.as_ref().err())
    }

    /// Pool `i`'s mode, or why it has none.
    pub(super) fn mode(&self, i: usize) -> Result<NetworkMode, PoolError> {
        match self.modes.get(i) {
            Some(Ok(mode)) => Ok(*mode),
            Some(Err(refused)) => Err(PoolError::KeepRefused(refused.clone())),
            None => Err(PoolError::NoCni),
        }
    }

    /// containerd's network, when a pool rebinds.
    pub(super) fn cni(&self) -> Option<&Cni> {
        self.cni.as_ref()
    }
}

impl PoolManager {
    /// The decision: made now if containerd's CNI configuration exists
    /// (once; later calls return it), else why not.
    pub(super) async fn network(&self) -> Result<&NetworkDecision, PoolError> {
        self.network.get_or_try_init(|| self.decide_network()).await
    }

    async fn decide_network(&self) -> Result<NetworkDecision, PoolError> {
        let list = if self.specs.is_empty() {
            None
        } else {
            let dir = self.cfg.cni.conf_dir.clone();
            let list = asyncify(self.cfg.upstream_timeout, move || NetworkList::load(&dir))
                .await
                .map_err(PoolError::CniBlocked)?
                .map_err(PoolError::CniConfig)?;
            Some(list)
        };
        let (name, file) = list
            .as_ref()
            .map(|l| (l.name().to_owned(), l.file().to_owned()))
            .unwrap_or_default();
        let bound: Vec<String> = list
            .as_ref()
            .map(|l| {
                l.identity_bound_plugins()
                    .into_iter()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let decision =
            NetworkDecision::decide(&self.specs, list, &self.cfg.cni, Arc::clone(&self.cni_exec))
                .map_err(PoolError::CniConfig)?;
        for (spec, mode) in self.specs.iter().zip(&decision.modes) {
            match mode {
                Ok(mode) => tracing::info!(
                    pool = %spec.name, mode = mode.as_str(), configured = spec.network.as_str(),
                    network = %name, file = %file.display(), identity_bound_plugins = ?bound,
                    "network mode decided from containerd's CNI configuration"
                ),
                Err(refused) => tracing::error!(
                    error = %refused,
                    "this pool keeps no warm slot"
                ),
            }
        }
        Ok(decision)
    }

    /// Waits until the pools' network modes are decided, re-reading the
    /// CNI configuration every `cni.recheck`; logs why it waits once per
    /// reason.
    pub(super) async fn await_network(&self) {
        let mut said: Option<String> = None;
        loop {
            let why = match self.network().await {
                Ok(_) => return,
                Err(e) => e,
            };
            let reason = chain(&why);
            if said.as_deref() != Some(reason.as_str()) {
                let recheck = self.cfg.cni.recheck;
                if matches!(why, PoolError::CniConfig(CniError::NoConfig { .. })) {
                    tracing::info!(reason = %reason, ?recheck,
                        "no warm slot until containerd's CNI configuration exists (CRI is served meanwhile)");
                } else {
                    tracing::warn!(reason = %reason, ?recheck,
                        "no warm slot until containerd's CNI configuration can be used");
                }
                said = Some(reason);
            }
            tokio::time::sleep(self.cfg.cni.recheck).await;
        }
    }

    /// At start (`serve`, not `uninstall`): decides the pools' network
    /// modes now when containerd's CNI configuration exists, so a refused
    /// `keep` stops the start; without it, the refill task decides later.
    ///
    /// # Errors
    /// [`PoolError::KeepRefused`] for the first pool whose `keep` is
    /// refused.
    pub async fn decide_at_start(&self) -> Result<(), PoolError> {
        match self.network().await {
            Ok(decision) => match decision.refused() {
                Some(refused) => Err(PoolError::KeepRefused(refused.clone())),
                None => Ok(()),
            },
            Err(e) => {
                tracing::info!(reason = %chain(&e),
                    "network modes are decided when containerd's CNI configuration appears");
                Ok(())
            }
        }
    }

    /// Pool `i`'s decided mode; `None` while undecided or when refused.
    pub(super) fn decided_mode(&self, i: usize) -> Option<NetworkMode> {
        self.network.get().and_then(|d| d.mode(i).ok())
    }

    /// Each pool's network mode (`Keep` or `Rebind`) or why `keep` was
    /// refused, in config order; `None` until containerd's CNI
    /// configuration has been seen.
    pub fn network_modes(&self) -> Option<Vec<Result<NetworkMode, KeepRefused>>> {
        self.network.get().map(|d| d.modes.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use fast_sandbox_shim::slots::PoolKey;

    use super::*;

    fn spec(name: &str, network: NetworkMode) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            exposed_handler: name.into(),
            key: PoolKey {
                upstream_handler: "runc".into(),
                shape: Default::default(),
            },
            size: 1,
            network,
        }
    }

    #[derive(Debug)]
    struct NoExec;

    #[tonic::async_trait]
    impl PluginExec for NoExec {
        async fn exec(
            &self,
            _: &Path,
            _: &[(&'static str, String)],
            _: Vec<u8>,
            _: std::time::Duration,
        ) -> Result<Vec<u8>, String> {
            Err("not run in this test".into())
        }
    }

    #[test]
    fn a_rebind_pool_needs_every_plugin_binary_and_keep_pools_none() {
        let list = NetworkList::parse(
            Path::new("/etc/cni/net.d/10-calico.conflist"),
            br#"{"name":"k8s-pod-network","cniVersion":"0.3.1",
                "plugins":[{"type":"calico","ipam":{"type":"calico-ipam"}}]}"#,
        )
        .unwrap();
        let bin = tempfile::tempdir().unwrap();
        let settings = CniSettings {
            bin_dirs: vec![bin.path().to_owned()],
            ..CniSettings::default()
        };
        let specs = [spec("a", NetworkMode::Auto), spec("k", NetworkMode::Keep)];
        let err = NetworkDecision::decide(&specs, Some(list.clone()), &settings, Arc::new(NoExec))
            .unwrap_err();
        assert!(err.to_string().contains("\"calico\""), "{err}");
        for p in ["calico", "calico-ipam"] {
            std::fs::write(bin.path().join(p), b"").unwrap();
        }
        let d = NetworkDecision::decide(&specs, Some(list), &settings, Arc::new(NoExec)).unwrap();
        assert_eq!(d.mode(0).unwrap(), NetworkMode::Rebind);
        assert!(d.cni().is_some());
        let refused = d.refused().expect("keep on calico refused").to_string();
        assert!(refused.contains("pool \"k\""), "{refused}");
        assert!(matches!(d.mode(1), Err(PoolError::KeepRefused(_))));
    }
}
