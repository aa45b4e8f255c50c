//! `network = "rebind"`: give a claimed slot the pod's own network identity
//! (docs/design.md, "Network identity").
//!
//! A slot's interface was attached by containerd's CNI ADD for the
//! placeholder pod. Policy-aware CNIs (Calico, Cilium) bind the endpoint, and
//! so NetworkPolicy, to the `K8S_POD_*` arguments of that ADD. At claim the
//! pool therefore runs, in the pause's network namespace and with
//! containerd's own CNI configuration:
//!
//! 1. CNI DEL with the placeholder's arguments (releases its IP);
//! 2. CNI ADD with the pod's arguments (a new IP, owned by the pod);
//!
//! and the shim reports the new IP in `PodSandboxStatus`. Before the pod's
//! `StopPodSandbox` is forwarded, the pool runs CNI DEL with the pod's
//! arguments, so the CNI sees the pod leave under the name it joined with;
//! containerd's own DEL that follows is a repeat, which CNI requires plugins
//! to accept.
//!
//! The plugins are run the way containerd 1.6 runs them (go-cni over
//! libcni): the first configuration file of `conf_dir` in name order
//! (`max_conf_num = 1`), interface `eth0`, container id = sandbox id,
//! `CNI_ARGS` = `IgnoreUnknown=1;K8S_POD_NAMESPACE=…;K8S_POD_NAME=…;
//! K8S_POD_INFRA_CONTAINER_ID=…;K8S_POD_UID=…`, each plugin of a list fed
//! the previous one's result as `prevResult` on ADD and run in reverse on
//! DEL, and `runtimeConfig` filled for the capabilities a plugin declares
//! (`portMappings`: none, since pods with host ports never get a slot;
//! `dns`: the pod's `dns_config`). The namespace is named by
//! `/proc/<pause pid>/ns/net`, which stays valid while the pause lives.
//!
//! Executing a plugin is the privileged operation, behind [`PluginExec`] so
//! the sequencing is tested with a fake.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use fast_sandbox_proto::cri::PodSandboxConfig;
use fast_sandbox_shim::slots::PodIps;
use serde_json::{json, Map, Value};

/// The interface containerd 1.6 names the pod's network `eth0`.
pub const IFNAME: &str = "eth0";

/// Where containerd's CNI configuration and plugins are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniSettings {
    /// containerd's `plugins."io.containerd.grpc.v1.cri".cni.conf_dir`.
    pub conf_dir: PathBuf,
    /// containerd's `bin_dir` (one directory; a list is searched in order).
    pub bin_dirs: Vec<PathBuf>,
    /// Bound on one plugin run.
    pub timeout: Duration,
    /// While `conf_dir` holds no configuration yet (the CNI's own pods are
    /// still starting, through this very CRI), how often it is re-read.
    pub recheck: Duration,
}

impl Default for CniSettings {
    /// containerd's defaults.
    fn default() -> Self {
        Self {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            bin_dirs: vec![PathBuf::from("/opt/cni/bin")],
            timeout: Duration::from_secs(10),
            recheck: Duration::from_secs(5),
        }
    }
}

/// CNI plugin types that are *identity-free*: nothing they do is keyed to
/// the `K8S_POD_*` arguments of the ADD (no endpoint, IP reservation or
/// policy is recorded under the pod's name, namespace or uid), so a slot
/// attached as a placeholder serves a real pod as well as a fresh
/// attachment would (`network = "keep"`). The reference plugins of
/// containernetworking/plugins (main, IPAM and meta) and flannel. Any other
/// type (calico, cilium-cni, antrea, weave-net, kube-ovn, aws-cni, multus,
/// whereabouts, …) makes an unset `network` mean `rebind`.
pub const IDENTITY_FREE_PLUGINS: &[&str] = &[
    "bandwidth",
    "bridge",
    "dhcp",
    "dummy",
    "firewall",
    "flannel",
    "host-device",
    "host-local",
    "ipvlan",
    "loopback",
    "macvlan",
    "portmap",
    "ptp",
    "sbr",
    "static",
    "tap",
    "tuning",
    "vlan",
    "vrf",
];

/// A failure of a CNI operation, naming the plugin and what it said.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no CNI configuration in {dir} yet (no .conflist, .conf or .json file)")]
    NoConfig { dir: PathBuf },
    #[error("CNI configuration in {dir}: {reason}")]
    Config { dir: PathBuf, reason: String },
    #[error("CNI plugin {plugin:?} not found in {dirs:?}")]
    NotFound { plugin: String, dirs: Vec<PathBuf> },
    #[error("CNI {command} of plugin {plugin}: {reason}")]
    Plugin {
        command: &'static str,
        plugin: String,
        reason: String,
    },
    #[error("CNI ADD result has no IP address: {0}")]
    NoIp(String),
}

/// Runs one CNI plugin binary: the privileged operation of a rebind.
#[tonic::async_trait]
pub trait PluginExec: Send + Sync + fmt::Debug {
    /// Runs `plugin` with the CNI environment `env` and `stdin`; returns
    /// its standard output, or the error it reported.
    async fn exec(
        &self,
        plugin: &Path,
        env: &[(&'static str, String)],
        stdin: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, String>;
}

/// [`PluginExec`] that runs the binary.
#[derive(Debug, Default)]
pub struct RealExec;

#[tonic::async_trait]
impl PluginExec for RealExec {
    async fn exec(
        &self,
        plugin: &Path,
        env: &[(&'static str, String)],
        stdin: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        use tokio::io::AsyncWriteExt as _;
        let mut child = tokio::process::Command::new(plugin)
            .env_clear()
            // Plugins such as portmap call iptables.
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", plugin.display()))?;
        if let Some(mut input) = child.stdin.take() {
            input
                .write_all(&stdin)
                .await
                .map_err(|e| format!("writing its configuration: {e}"))?;
        }
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
            .map_err(|e| format!("waiting for it: {e}"))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        // Errors come as a JSON object on stdout (CNI spec, "Error").
        let msg = serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| {
                let msg = v.get("msg")?.as_str()?.to_owned();
                let details = v.get("details").and_then(Value::as_str).unwrap_or("");
                Some(if details.is_empty() {
                    msg
                } else {
                    format!("{msg}: {details}")
                })
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_owned());
        Err(format!("{} ({})", msg, out.status))
    }
}

/// containerd's network: the plugins of its first configuration file.
#[derive(Debug, Clone)]
pub struct NetworkList {
    /// The file it was read from.
    file: PathBuf,
    name: String,
    cni_version: String,
    plugins: Vec<Map<String, Value>>,
}

impl NetworkList {
    /// Loads the first `*.conflist`, `*.conf` or `*.json` of `dir` in name
    /// order, as containerd does with `max_conf_num = 1`.
    pub fn load(dir: &Path) -> Result<Self, CniError> {
        let bad = |reason: String| CniError::Config {
            dir: dir.to_owned(),
            reason,
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CniError::NoConfig {
                    dir: dir.to_owned(),
                })
            }
            Err(e) => return Err(bad(e.to_string())),
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
            })
            .collect();
        files.sort();
        let first = files.first().ok_or_else(|| CniError::NoConfig {
            dir: dir.to_owned(),
        })?;
        let text = std::fs::read(first).map_err(|e| bad(format!("{}: {e}", first.display())))?;
        Self::parse(first, &text).map_err(|reason| bad(format!("{}: {reason}", first.display())))
    }

    /// Parses `file`'s text: a list (`*.conflist`) or a single plugin's
    /// configuration.
    pub fn parse(file: &Path, text: &[u8]) -> Result<Self, String> {
        let is_list = file.extension().is_some_and(|x| x == "conflist");
        let v: Value = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        let obj = v.as_object().ok_or("not a JSON object")?;
        let field = |k: &str| {
            obj.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("field {k:?} missing or not a string"))
        };
        let name = field("name")?;
        let cni_version = field("cniVersion")?;
        let plugins = if is_list {
            obj.get("plugins")
                .and_then(Value::as_array)
                .ok_or("field \"plugins\" missing or not a list")?
                .iter()
                .map(|p| p.as_object().cloned().ok_or("a plugin is not an object"))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            vec![obj.clone()]
        };
        if plugins.is_empty() {
            return Err("field \"plugins\" is empty".into());
        }
        for (i, p) in plugins.iter().enumerate() {
            if !p.get("type").is_some_and(Value::is_string) {
                return Err(format!("plugins[{i}].type missing or not a string"));
            }
        }
        Ok(Self {
            file: file.to_owned(),
            name,
            cni_version,
            plugins,
        })
    }

    /// The network's name (host-local keeps its allocations under it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configuration file the network was read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Every plugin type the chain runs: each plugin's `type`, its IPAM
    /// plugin's (`ipam.type`) and a delegating plugin's delegate
    /// (`delegate.type`, flannel's), in order, once each.
    pub fn plugin_types(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for p in &self.plugins {
            let nested = |k: &str| p.get(k).and_then(|v| v.get("type")).and_then(Value::as_str);
            let own = p.get("type").and_then(Value::as_str);
            for t in [own, nested("ipam"), nested("delegate")]
                .into_iter()
                .flatten()
            {
                if !out.contains(&t) {
                    out.push(t);
                }
            }
        }
        out
    }

    /// The plugin types of the chain that are not identity-free
    /// ([`IDENTITY_FREE_PLUGINS`]): empty when `network = "keep"` is safe.
    pub fn identity_bound_plugins(&self) -> Vec<&str> {
        self.plugin_types()
            .into_iter()
            .filter(|t| !IDENTITY_FREE_PLUGINS.contains(t))
            .collect()
    }
}

/// One attachment of a sandbox to the network.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    /// A path naming the network namespace.
    pub netns: PathBuf,
    /// `K8S_POD_*` arguments, in containerd's order.
    pub args: Vec<(String, String)>,
    /// The pod's DNS settings, for plugins declaring the `dns` capability.
    pub dns: Option<Value>,
}

impl Attachment {
    /// The attachment of sandbox `id` (pause `pid`) for a pod `config`.
    pub fn of(id: &str, pid: i32, config: &PodSandboxConfig) -> Self {
        let meta = config.metadata.clone().unwrap_or_default();
        let dns = config
            .dns_config
            .as_ref()
            .map(|d| json!({ "servers": d.servers, "searches": d.searches, "options": d.options }));
        Self {
            container_id: id.to_owned(),
            netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), meta.namespace),
                ("K8S_POD_NAME".into(), meta.name),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), id.to_owned()),
                ("K8S_POD_UID".into(), meta.uid),
            ],
            dns,
        }
    }
}

/// CNI operations on containerd's network.
#[derive(Debug, Clone)]
pub struct Cni {
    list: NetworkList,
    settings: CniSettings,
    exec: Arc<dyn PluginExec>,
}

impl Cni {
    /// Loads containerd's network from `settings.conf_dir`, and checks
    /// that every plugin it runs is in `settings.bin_dirs`.
    pub fn new(settings: CniSettings, exec: Arc<dyn PluginExec>) -> Result<Self, CniError> {
        let list = NetworkList::load(&settings.conf_dir)?;
        Self::with_list(list, settings, exec).checked()
    }

    /// `self`, once every plugin type of the network is found in the
    /// plugin directories (a missing mount or binary is reported at start,
    /// not at the first claim).
    pub fn checked(self) -> Result<Self, CniError> {
        for t in self.list.plugin_types() {
            self.binary(t)?;
        }
        Ok(self)
    }

    /// With an already parsed network.
    pub fn with_list(list: NetworkList, settings: CniSettings, exec: Arc<dyn PluginExec>) -> Self {
        Self {
            list,
            settings,
            exec,
        }
    }

    /// The network containerd attaches pods to.
    pub fn network(&self) -> &NetworkList {
        &self.list
    }

    fn binary(&self, plugin: &str) -> Result<PathBuf, CniError> {
        // A type is a file name, never a path (libcni's FindInPath).
        if !plugin.is_empty() && !plugin.contains('/') && plugin != "." && plugin != ".." {
            for dir in &self.settings.bin_dirs {
                let p = dir.join(plugin);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        Err(CniError::NotFound {
            plugin: plugin.to_owned(),
            dirs: self.settings.bin_dirs.clone(),
        })
    }

    /// The configuration one plugin reads on stdin.
    fn stdin(
        &self,
        plugin: &Map<String, Value>,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Vec<u8> {
        let mut conf = plugin.clone();
        conf.insert("name".into(), Value::String(self.list.name.clone()));
        conf.insert(
            "cniVersion".into(),
            Value::String(self.list.cni_version.clone()),
        );
        let mut runtime = Map::new();
        if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
            let on = |k: &str| caps.get(k).and_then(Value::as_bool).unwrap_or(false);
            if on("portMappings") {
                runtime.insert("portMappings".into(), Value::Array(Vec::new()));
            }
            if on("dns") {
                if let Some(dns) = &att.dns {
                    runtime.insert("dns".into(), dns.clone());
                }
            }
        }
        conf.remove("runtimeConfig");
        if !runtime.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        conf.remove("prevResult");
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        serde_json::to_vec(&Value::Object(conf)).unwrap_or_default()
    }

    fn env(&self, command: &'static str, att: &Attachment) -> Vec<(&'static str, String)> {
        let args = att
            .args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";");
        let path = self
            .settings
            .bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        vec![
            ("CNI_COMMAND", command.to_owned()),
            ("CNI_CONTAINERID", att.container_id.clone()),
            ("CNI_NETNS", att.netns.display().to_string()),
            ("CNI_IFNAME", IFNAME.to_owned()),
            ("CNI_ARGS", args),
            ("CNI_PATH", path),
        ]
    }

    async fn run(
        &self,
        command: &'static str,
        plugin: &Map<String, Value>,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<Vec<u8>, CniError> {
        let kind = plugin
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let binary = self.binary(kind)?;
        self.exec
            .exec(
                &binary,
                &self.env(command, att),
                self.stdin(plugin, att, prev),
                self.settings.timeout,
            )
            .await
            .map_err(|reason| CniError::Plugin {
                command,
                plugin: kind.to_owned(),
                reason,
            })
    }

    /// CNI ADD through every plugin of the list; the last one's result.
    pub async fn add(&self, att: &Attachment) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for plugin in &self.list.plugins {
            let out = self.run("ADD", plugin, att, prev.as_ref()).await?;
            let result: Value = serde_json::from_slice(&out).map_err(|e| CniError::Plugin {
                command: "ADD",
                plugin: plugin
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                reason: format!("result is not JSON: {e}"),
            })?;
            prev = Some(result);
        }
        prev.ok_or_else(|| CniError::NoIp("the network has no plugins".into()))
    }

    /// CNI DEL through every plugin, last first. `prev` is the attachment's
    /// ADD result when known.
    pub async fn del(&self, att: &Attachment, prev: Option<&Value>) -> Result<(), CniError> {
        for plugin in self.list.plugins.iter().rev() {
            self.run("DEL", plugin, att, prev).await?;
        }
        Ok(())
    }
}

/// The pod's IPs from a CNI result, as containerd 1.6 picks them for
/// `eth0`: the first IPv4 address is the primary one, the others follow in
/// order (an IPv6-only pod's first IPv6 address is primary).
pub fn pod_ips(result: &Value) -> Result<PodIps, CniError> {
    let addrs: Vec<std::net::IpAddr> = result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address").and_then(Value::as_str))
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect();
    let primary = addrs
        .iter()
        .position(std::net::IpAddr::is_ipv4)
        .or(if addrs.is_empty() { None } else { Some(0) })
        .ok_or_else(|| CniError::NoIp(result.to_string()))?;
    let ip = addrs[primary].to_string();
    let additional = addrs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != primary)
        .map(|(_, a)| a.to_string())
        .collect();
    Ok(PodIps { ip, additional })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use fast_sandbox_proto::cri::{DnsConfig, PodSandboxMetadata};

    use super::*;

    /// One plugin run: its name, environment and configuration.
    type Run = (String, Vec<(&'static str, String)>, Value);

    /// Records every run; answers ADD with an IP per plugin index.
    #[derive(Debug, Default)]
    struct Fake {
        runs: Mutex<Vec<Run>>,
        fail: Option<&'static str>,
    }

    #[tonic::async_trait]
    impl PluginExec for Fake {
        async fn exec(
            &self,
            plugin: &Path,
            env: &[(&'static str, String)],
            stdin: Vec<u8>,
            _: Duration,
        ) -> Result<Vec<u8>, String> {
            let name = plugin
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let conf: Value = serde_json::from_slice(&stdin).map_err(|e| e.to_string())?;
            self.runs
                .lock()
                .unwrap()
                .push((name.clone(), env.to_vec(), conf.clone()));
            if self.fail == Some(name.as_str()) {
                return Err("injected".into());
            }
            let mut result = conf
                .get("prevResult")
                .cloned()
                .unwrap_or(json!({ "cniVersion": "1.0.0", "ips": [] }));
            if name == "bridge" {
                result["ips"] = json!([
                    { "address": "fd00::5/64" },
                    { "address": "10.209.0.77/16", "gateway": "10.209.0.1" }
                ]);
            }
            Ok(serde_json::to_vec(&result).unwrap())
        }
    }

    const LIST: &str = r#"{
        "cniVersion": "1.0.0", "name": "net",
        "plugins": [
            { "type": "bridge", "bridge": "fsb0", "ipam": { "type": "host-local" } },
            { "type": "portmap", "capabilities": { "portMappings": true } },
            { "type": "loopback" }
        ]
    }"#;

    fn cni_with(fake: Arc<Fake>) -> (Cni, tempfile::TempDir) {
        let bin = tempfile::tempdir().unwrap();
        for p in ["bridge", "host-local", "portmap", "loopback"] {
            std::fs::write(bin.path().join(p), b"").unwrap();
        }
        let settings = CniSettings {
            conf_dir: PathBuf::from("/nonexistent"),
            bin_dirs: vec![PathBuf::from("/nonexistent"), bin.path().to_owned()],
            timeout: Duration::from_secs(1),
            recheck: Duration::from_secs(1),
        };
        let list = NetworkList::parse(Path::new("10-net.conflist"), LIST.as_bytes()).unwrap();
        (Cni::with_list(list, settings, fake), bin)
    }

    fn pod() -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web-0".into(),
                uid: "u-1".into(),
                namespace: "shop".into(),
                attempt: 0,
            }),
            dns_config: Some(DnsConfig {
                servers: vec!["10.96.0.10".into()],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn add_chains_results_and_passes_the_pods_identity() {
        let fake = Arc::new(Fake::default());
        let (cni, _bin) = cni_with(Arc::clone(&fake));
        let att = Attachment::of("abc", 42, &pod());
        let result = cni.add(&att).await.unwrap();
        let ips = pod_ips(&result).unwrap();
        assert_eq!(ips.ip, "10.209.0.77", "IPv4 first, as containerd picks");
        assert_eq!(ips.additional, vec!["fd00::5".to_owned()]);

        let runs = fake.runs.lock().unwrap();
        let names: Vec<&str> = runs.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(names, ["bridge", "portmap", "loopback"]);
        let env = |i: usize, k: &str| {
            runs[i]
                .1
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(env(0, "CNI_COMMAND"), "ADD");
        assert_eq!(env(0, "CNI_CONTAINERID"), "abc");
        assert_eq!(env(0, "CNI_NETNS"), "/proc/42/ns/net");
        assert_eq!(env(0, "CNI_IFNAME"), "eth0");
        assert_eq!(
            env(0, "CNI_ARGS"),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
        );
        assert_eq!(runs[0].2["name"], "net");
        assert_eq!(runs[0].2["cniVersion"], "1.0.0");
        assert!(runs[0].2.get("prevResult").is_none());
        assert_eq!(
            runs[1].2["prevResult"]["ips"][1]["address"], "10.209.0.77/16",
            "the next plugin gets the previous result"
        );
        assert_eq!(runs[1].2["runtimeConfig"], json!({ "portMappings": [] }));
        assert!(runs[2].2.get("runtimeConfig").is_none());
    }

    #[tokio::test]
    async fn del_runs_the_list_backwards_and_stops_at_an_error() {
        let fake = Arc::new(Fake::default());
        let (cni, _bin) = cni_with(Arc::clone(&fake));
        cni.del(&Attachment::of("abc", 42, &pod()), None)
            .await
            .unwrap();
        let names: Vec<String> = fake
            .runs
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.0.clone())
            .collect();
        assert_eq!(names, ["loopback", "portmap", "bridge"]);

        let fake = Arc::new(Fake {
            fail: Some("portmap"),
            ..Default::default()
        });
        let (cni, _bin) = cni_with(Arc::clone(&fake));
        let err = cni
            .del(&Attachment::of("abc", 42, &pod()), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("DEL of plugin portmap: injected"), "{err}");
        assert_eq!(fake.runs.lock().unwrap().len(), 2, "bridge not run");
    }

    #[test]
    fn plugin_types_are_names_not_paths() {
        let (cni, _bin) = cni_with(Arc::new(Fake::default()));
        for t in ["../bin/sh", "/bin/sh", "", ".."] {
            assert!(
                matches!(cni.binary(t), Err(CniError::NotFound { .. })),
                "{t:?}"
            );
        }
        assert!(cni.binary("bridge").is_ok());
    }

    #[test]
    fn plugins_are_identity_free_only_when_every_type_is_listed() {
        for (plugins, bound) in [
            (
                r#"[{"type":"bridge","ipam":{"type":"host-local"}},{"type":"portmap"}]"#,
                &[][..],
            ),
            (r#"[{"type":"flannel","delegate":{"type":"bridge"}}]"#, &[]),
            (
                r#"[{"type":"calico","ipam":{"type":"calico-ipam"}},{"type":"bandwidth"}]"#,
                &["calico", "calico-ipam"],
            ),
            (r#"[{"type":"cilium-cni"}]"#, &["cilium-cni"]),
            // An identity-keyed IPAM under an identity-free main plugin.
            (
                r#"[{"type":"macvlan","ipam":{"type":"whereabouts"}}]"#,
                &["whereabouts"],
            ),
            (
                r#"[{"type":"flannel","delegate":{"type":"calico"}}]"#,
                &["calico"],
            ),
        ] {
            let text = format!(r#"{{"name":"n","cniVersion":"1.0.0","plugins":{plugins}}}"#);
            let list = NetworkList::parse(Path::new("n.conflist"), text.as_bytes()).unwrap();
            assert_eq!(list.identity_bound_plugins(), bound, "{plugins}");
        }
    }

    #[test]
    fn a_plugin_missing_from_the_bin_dirs_is_named_at_load() {
        let conf = tempfile::tempdir().unwrap();
        std::fs::write(conf.path().join("10-net.conflist"), LIST).unwrap();
        let bin = tempfile::tempdir().unwrap();
        let settings = CniSettings {
            conf_dir: conf.path().to_owned(),
            bin_dirs: vec![bin.path().to_owned()],
            ..CniSettings::default()
        };
        for p in ["bridge", "host-local", "loopback"] {
            std::fs::write(bin.path().join(p), b"").unwrap();
        }
        let err = Cni::new(settings.clone(), Arc::new(Fake::default())).unwrap_err();
        assert!(
            matches!(&err, CniError::NotFound { plugin, .. } if plugin == "portmap"),
            "{err}"
        );
        std::fs::write(bin.path().join("portmap"), b"").unwrap();
        let cni = Cni::new(settings, Arc::new(Fake::default())).unwrap();
        assert_eq!(cni.network().file(), conf.path().join("10-net.conflist"));
    }

    #[test]
    fn bad_configurations_name_what_is_wrong() {
        let list = Path::new("10-n.conflist");
        for (text, want) in [
            ("[]", "not a JSON object"),
            (r#"{"cniVersion":"1.0.0"}"#, "\"name\""),
            (r#"{"name":"n","cniVersion":"1.0.0"}"#, "\"plugins\""),
            (
                r#"{"name":"n","cniVersion":"1.0.0","plugins":[{"x":1}]}"#,
                "plugins[0].type",
            ),
        ] {
            let err = NetworkList::parse(list, text.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        let single = NetworkList::parse(
            Path::new("10-n.conf"),
            br#"{"name":"n","cniVersion":"0.4.0","type":"bridge"}"#,
        )
        .unwrap();
        assert_eq!(single.plugins.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let err = NetworkList::load(dir.path()).unwrap_err();
        assert!(matches!(err, CniError::NoConfig { .. }), "{err}");
        assert!(err.to_string().contains("no .conflist"), "{err}");
        let err = NetworkList::load(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(err, CniError::NoConfig { .. }), "{err}");
    }

    #[test]
    fn a_result_without_ips_is_an_error() {
        assert!(pod_ips(&json!({ "ips": [] })).is_err());
        let v6 = pod_ips(&json!({ "ips": [{ "address": "fd00::9/64" }] })).unwrap();
        assert_eq!(v6.ip, "fd00::9");
    }
}
