//! The shipped manifests start `rebind` (issue 14, item 3): the node
//! plugin's DaemonSet and ConfigMap, as committed, on a fake node running a
//! Calico-like CNI. The node's file tree is a tempdir; the container's view
//! of it is another, where every hostPath mount of the DaemonSet is a
//! symlink to its host directory (and nothing else of the host is
//! visible). In that view the node plugin starts with the shipped config
//! before the CNI is installed (a new node: CRI first), then, once the CNI
//! wrote its conflist and plugins, its pools decide `rebind` and load the
//! network, and the paths the plugins use on the node are reachable (and
//! writable where they write). Removing any of the mounts this needs fails
//! the check, naming the path.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use fast_sandbox_node::{
    config::Settings,
    metrics::Metrics,
    network::{Cni, CniSettings, RealExec},
    pool::{ManagerConfig, NetworkMode, PoolManager, PoolParts},
};
use fast_sandbox_tests::fake_cri::NoFixup;
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A Calico install: the conflist its installer writes, and its plugins.
const CALICO_CONFLIST: &str = r#"{"name":"k8s-pod-network","cniVersion":"0.3.1","plugins":[
  {"type":"calico","datastore_type":"kubernetes","nodename_file":"/var/lib/calico/nodename",
   "log_file_path":"/var/log/calico/cni/cni.log","ipam":{"type":"calico-ipam"},
   "policy":{"type":"k8s"},"kubernetes":{"kubeconfig":"/etc/cni/net.d/calico-kubeconfig"}},
  {"type":"bandwidth","capabilities":{"bandwidth":true}},
  {"type":"portmap","snat":true,"capabilities":{"portMappings":true}}]}"#;
const CALICO_PLUGINS: [&str; 4] = ["calico", "calico-ipam", "bandwidth", "portmap"];

/// What the plugins of a rebind read or write on the node, as
/// (path, written): Calico's files, host-local's state directory and the
/// directory of Cilium's agent socket.
const PLUGIN_PATHS: [(&str, bool); 6] = [
    ("/etc/cni/net.d/calico-kubeconfig", false),
    ("/var/lib/calico/nodename", false),
    ("/var/run/calico", true),
    ("/var/log/calico/cni", true),
    ("/var/lib/cni", true),
    ("/var/run/cilium", true),
];

fn deploy_file<T: DeserializeOwned>(file: &str, kind: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
    let doc = docs
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("{file}: no {kind}"));
    serde_json::from_value(doc).unwrap_or_else(|e| panic!("{file}: {kind}: {e}"))
}

fn shipped() -> (DaemonSet, String) {
    let ds: DaemonSet = deploy_file("node-plugin/daemonset.yaml", "DaemonSet");
    let map: ConfigMap = deploy_file("node-plugin/configmap.yaml", "ConfigMap");
    let toml = map
        .data
        .and_then(|d| d.get("node.toml").cloned())
        .expect("ConfigMap data node.toml");
    (ds, toml)
}

/// One hostPath mount of the container: where, from where, how.
#[derive(Debug, Clone)]
struct HostMount {
    container: PathBuf,
    host: PathBuf,
    read_only: bool,
}

/// The node's tree and the container's view of it.
struct Node {
    host: tempfile::TempDir,
    view: tempfile::TempDir,
    mounts: Vec<HostMount>,
}

/// `root` joined with absolute `path`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

impl Node {
    /// A new node (containerd's directories only), and the DaemonSet's
    /// pod started on it: hostPath types checked as kubelet does, each
    /// hostPath mount linked into the view.
    fn start(ds: &DaemonSet) -> Result<Self, String> {
        let pod = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.clone())
            .ok_or("no pod spec")?;
        let host = tempfile::tempdir().map_err(|e| e.to_string())?;
        for existing in ["/run/containerd", "/sys/fs/cgroup"] {
            std::fs::create_dir_all(under(host.path(), Path::new(existing)))
                .map_err(|e| e.to_string())?;
        }
        let mut sources = BTreeMap::new();
        for v in pod.volumes.iter().flatten() {
            let Some(hp) = &v.host_path else { continue };
            let on_host = under(host.path(), Path::new(&hp.path));
            match hp.type_.as_deref() {
                Some("DirectoryOrCreate") => {
                    std::fs::create_dir_all(&on_host).map_err(|e| e.to_string())?;
                }
                Some("Directory") if on_host.is_dir() => {}
                other => {
                    return Err(format!(
                        "volume {}: hostPath {} of type {other:?} does not exist on a new node \
                         (the CNI creates it later): the pod would not start",
                        v.name, hp.path
                    ))
                }
            }
            sources.insert(v.name.clone(), PathBuf::from(&hp.path));
        }
        let container = pod.containers.first().ok_or("no container")?;
        let mut mounts: Vec<HostMount> = container
            .volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| {
                Some(HostMount {
                    container: PathBuf::from(&m.mount_path),
                    host: sources.get(&m.name)?.clone(),
                    read_only: m.read_only == Some(true),
                })
            })
            .collect();
        mounts.sort_by_key(|m| m.container.components().count());
        let view = tempfile::tempdir().map_err(|e| e.to_string())?;
        for m in &mounts {
            let link = under(view.path(), &m.container);
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::os::unix::fs::symlink(under(host.path(), &m.host), &link)
                .map_err(|e| format!("{}: {e}", link.display()))?;
        }
        Ok(Self { host, view, mounts })
    }

    /// The container's path `path` in the view.
    fn seen(&self, path: &Path) -> PathBuf {
        under(self.view.path(), path)
    }

    /// The node's path `path`.
    fn on_host(&self, path: &str) -> PathBuf {
        under(self.host.path(), Path::new(path))
    }

    /// Checks that the container reaches host path `path` at the same path,
    /// writable when `write`.
    fn reaches(&self, path: &str, write: bool) -> Result<(), String> {
        let path = Path::new(path);
        let mount = self
            .mounts
            .iter()
            .filter(|m| path.starts_with(&m.container))
            .max_by_key(|m| m.container.components().count())
            .ok_or_else(|| format!("{}: no hostPath mount covers it", path.display()))?;
        let rest = path
            .strip_prefix(&mount.container)
            .map_err(|e| e.to_string())?;
        if mount.host.join(rest) != path {
            return Err(format!(
                "{}: mounted from host path {}, not the same path",
                path.display(),
                mount.host.join(rest).display()
            ));
        }
        if write && mount.read_only {
            return Err(format!("{}: mounted read-only", path.display()));
        }
        if !self.seen(path).exists() {
            return Err(format!("{}: not visible in the container", path.display()));
        }
        Ok(())
    }

    /// The CNI's DaemonSet installs it: conflist, kubeconfig, plugins, and
    /// the node name calico-node writes.
    fn install_calico(&self) {
        let write = |path: &str, text: &str| {
            let path = self.on_host(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
            std::fs::write(&path, text).expect("write");
        };
        write("/etc/cni/net.d/10-calico.conflist", CALICO_CONFLIST);
        write(
            "/etc/cni/net.d/calico-kubeconfig",
            "apiVersion: v1\nkind: Config\n",
        );
        write("/var/lib/calico/nodename", "node-1\n");
        for plugin in CALICO_PLUGINS {
            write(&format!("/opt/cni/bin/{plugin}"), "#!/bin/sh\n");
        }
        for dir in ["/var/run/calico", "/var/log/calico/cni", "/var/run/cilium"] {
            std::fs::create_dir_all(self.on_host(dir)).expect("dir");
        }
    }
}

/// How the pools came up.
enum Started {
    Decided(Vec<NetworkMode>),
    /// No network modes yet, and why.
    Undecided(String),
}

/// Starts the node plugin's pools as `serve` does, with the shipped
/// config, in the container's view; `Err` when they do not start.
async fn start_pools(node: &Node, toml: &str) -> Result<Started, String> {
    let config = node.seen(Path::new("/etc/fast-sandbox/node.toml"));
    std::fs::create_dir_all(config.parent().expect("parent")).map_err(|e| e.to_string())?;
    std::fs::write(&config, toml).map_err(|e| e.to_string())?;
    let file = fast_sandbox_node::config::load(&config).map_err(|e| format!("{e:#}"))?;
    let specs = fast_sandbox_node::config::pool_specs(&file.pools).map_err(|e| format!("{e:#}"))?;
    let settings = Settings::resolve(file, Default::default());
    let cfg = ManagerConfig {
        state_dir: node.seen(&settings.slots.state_dir),
        record_copies: None,
        placeholder_cgroup_root: "/fast-sandbox-test/shipped".into(),
        placeholder_namespace: "fast-sandbox-slots".into(),
        upstream_timeout: Duration::from_secs(5),
        refill_interval: settings.slots.refill_interval,
        refill_delay: settings.slots.refill_delay,
        health_interval: settings.slots.health_interval,
        cni: CniSettings {
            conf_dir: node.seen(&settings.slots.cni_conf_dir),
            bin_dirs: settings
                .slots
                .cni_bin_dirs
                .iter()
                .map(|d| node.seen(d))
                .collect(),
            ..CniSettings::default()
        },
    };
    // Never dialled: starting the pools makes no upstream call.
    let upstream = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
    let parts = PoolParts::new(upstream, Arc::new(NoFixup), Arc::new(Metrics::default()));
    let cni = cfg.cni.clone();
    let manager = PoolManager::start_with(specs, cfg, parts)
        .await
        .map_err(|e| format!("{e:#}"))?;
    // As `serve` does.
    manager
        .decide_at_start()
        .await
        .map_err(|e| format!("{e:#}"))?;
    let Some(modes) = manager.network_modes() else {
        // Why, as the refill task would log it.
        let why = Cni::new(cni, Arc::new(RealExec)).err();
        return Ok(Started::Undecided(why.map_or_else(
            || "the network loads now".into(),
            |e| e.to_string(),
        )));
    };
    modes
        .into_iter()
        .map(|m| m.map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()
        .map(Started::Decided)
}

/// The whole story on `ds` and `toml`: the pod starts on a new node, the
/// pools start before the CNI exists, and after its install they rebind.
async fn rebind_starts(ds: &DaemonSet, toml: &str) -> Result<Vec<NetworkMode>, String> {
    let node = Node::start(ds)?;
    if let Started::Decided(modes) = start_pools(&node, toml)
        .await
        .map_err(|e| format!("before the CNI is installed: {e}"))?
    {
        return Err(format!("decided without a CNI: {modes:?}"));
    }
    node.install_calico();
    let modes = match start_pools(&node, toml).await? {
        Started::Decided(modes) => modes,
        Started::Undecided(why) => return Err(format!("undecided with the CNI installed: {why}")),
    };
    for (path, write) in PLUGIN_PATHS {
        node.reaches(path, write)?;
    }
    Ok(modes)
}

#[tokio::test]
async fn the_shipped_manifests_start_rebind_on_a_policy_cni() {
    let (ds, toml) = shipped();
    let modes = rebind_starts(&ds, &toml)
        .await
        .unwrap_or_else(|e| panic!("deploy/node-plugin on a Calico node: {e}"));
    assert!(!modes.is_empty(), "the ConfigMap has pools");
    assert!(
        modes.iter().all(|m| *m == NetworkMode::Rebind),
        "every shipped pool rebinds on Calico: {modes:?}"
    );
}

#[tokio::test]
async fn each_mount_rebind_needs_is_named_when_missing() {
    let (ds, toml) = shipped();
    for (volume, path) in [
        ("cni-conf", "/etc/cni/net.d"),
        ("cni-bin", "/opt/cni/bin"),
        ("cni-state", "/var/lib/cni"),
        ("calico-run", "/var/run/calico"),
        ("calico-lib", "/var/lib/calico"),
        ("calico-log", "/var/log/calico/cni"),
        ("cilium-run", "/var/run/cilium"),
    ] {
        let mut without = ds.clone();
        let pod = without
            .spec
            .as_mut()
            .and_then(|s| s.template.spec.as_mut())
            .expect("pod spec");
        let mounts = pod.containers[0].volume_mounts.as_mut().expect("mounts");
        let before = mounts.len();
        mounts.retain(|m| m.name != volume);
        assert_eq!(mounts.len(), before - 1, "the DaemonSet mounts {volume}");
        let err = rebind_starts(&without, &toml)
            .await
            .expect_err("rebind cannot work without it");
        assert!(err.contains(path), "without {volume}: {err}");
    }
}
