//! Node plugin configuration: a strict TOML file, overridden by flags and
//! environment variables, over defaults that work on a stock containerd.
//!
//! ```toml
//! [upstream]
//! endpoint = "unix:///run/containerd/containerd.sock"
//! call_timeout = "2m"
//! pull_image_timeout = "30m"
//! connect_timeout = "5s"
//!
//! [socket]
//! path = "/run/fast-sandbox/cri.sock"
//! group = "kube"          # or a gid: group = 990
//!
//! [log]
//! format = "json"         # or "text"
//! filter = "info,fast_sandbox_shim=debug"   # RUST_LOG wins when set
//!
//! [slots]
//! state_dir = "/var/lib/fast-sandbox"            # claim records, slot token
//! containerd_root = "/var/lib/containerd"        # containerd's `root`
//! # default: "/fast-sandbox-slots/<instance id>", the id derived from the
//! # token in state_dir, so two node plugins on one host never share it
//! placeholder_cgroup_root = "/fast-sandbox-slots/a1b2c3d4e5f6"
//! refill_interval = "50ms"  # pause between two slot creations
//! refill_delay = "500ms"    # after a claim, before refilling that pool
//! health_interval = "10s"
//! cni_conf_dir = "/etc/cni/net.d"   # containerd's CNI conf_dir (decides `network`)
//! cni_bin_dirs = ["/opt/cni/bin"]   # containerd's CNI bin_dir (rebind pools)
//!
//! [[pool]]                  # one per warm handler and shape
//! handler = "fast-runc"     # what RuntimeClasses name; "" = the default handler
//! upstream = "runc"         # containerd's handler
//! size = 4                  # free slots kept
//! # network unset (or "auto"): decided from containerd's CNI conflist,
//! # "keep" when every plugin is identity-free (bridge, host-local, flannel…),
//! # "rebind" otherwise; "keep" on any other CNI is refused; "rebind" always works
//! # network = "rebind"
//! shape = { seccomp = "runtime-default" }   # the default: what kubelet sends; or "unconfined", "localhost/<path>"
//! fixup = "setns"           # or "guest-exec" (default for runsc*/gvisor*/kata* upstreams)
//! # guest_exec = ["/usr/bin/runsc", "--root", "/run/containerd/runc/k8s.io", "exec",
//! #   "--cap", "CAP_SYS_ADMIN", "{sandbox_id}", "/pause", "--set-hostname", "{hostname}"]
//! # guest_sysctls = "ignore"  # or "refuse" (default for non-runsc guest-exec)
//! ```

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use anyhow::Context as _;
use fast_sandbox_shim::{
    slots::{PoolKey, SeccompShape, Shape},
    SocketConfig, SocketGroup, UpstreamConfig,
};
use serde::Deserialize;

pub use crate::pool::{NetworkMode, MAX_POOL_SIZE};
use crate::{
    fixup::{ChannelTemplate, ExecTemplate, GuestExecSettings, Mechanism, SysctlPolicy},
    pool::PoolSpec,
};

/// The config file as written. Every field is optional; unknown fields are
/// errors, so a typo never silently falls back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub upstream: UpstreamSection,
    pub socket: SocketSection,
    pub log: LogSection,
    pub slots: SlotsSection,
    pub admin: AdminSection,
    pub agent: AgentSection,
    #[serde(rename = "pool")]
    pub pools: Vec<PoolSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlotsSection {
    pub state_dir: Option<PathBuf>,
    pub containerd_root: Option<PathBuf>,
    pub placeholder_cgroup_root: Option<String>,
    pub refill_interval: Option<HumanDuration>,
    pub refill_delay: Option<HumanDuration>,
    pub health_interval: Option<HumanDuration>,
    /// containerd's CNI `conf_dir`: its first file decides each pool's
    /// network mode, and `network = "rebind"` runs it.
    pub cni_conf_dir: Option<PathBuf>,
    /// containerd's CNI `bin_dir`(s); used by `network = "rebind"` pools.
    pub cni_bin_dirs: Option<Vec<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Address of the metrics/pools/health endpoint; `""` disables it.
    pub address: Option<String>,
    /// A second listener serving `/metrics` only, for in-cluster scraping
    /// (`--metrics-addr` wins); unset or `""`: none.
    pub metrics_address: Option<String>,
    /// File holding the bearer token `metrics_address` requires (a mounted
    /// Secret; re-read on every scrape, so a rotated token takes effect
    /// without a restart). Required unless `metrics_address` is loopback.
    pub metrics_token_file: Option<PathBuf>,
}

/// The `/metrics` listener for scrapers, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    pub address: std::net::SocketAddr,
    /// `None` only on a loopback address.
    pub token_file: Option<PathBuf>,
}

/// `[admin] metrics_address` (or `address_override`, `--metrics-addr`),
/// validated: `None` when unset. A non-loopback address needs
/// `metrics_token_file`.
pub fn metrics_settings(
    section: &AdminSection,
    address_override: Option<&str>,
) -> anyhow::Result<Option<MetricsSettings>> {
    let Some(address) = address_override
        .or(section.metrics_address.as_deref())
        .filter(|a| !a.is_empty())
    else {
        return Ok(None);
    };
    let address: std::net::SocketAddr = address
        .parse()
        .with_context(|| format!("admin.metrics_address: {address:?} is not an ip:port"))?;
    let token_file = section.metrics_token_file.clone();
    anyhow::ensure!(
        token_file.is_some() || address.ip().is_loopback(),
        "admin.metrics_token_file: required when admin.metrics_address ({address}) \
         is not loopback (scrapes are authenticated)"
    );
    Ok(Some(MetricsSettings {
        address,
        token_file,
    }))
}

/// `[agent]`: the NodeAgent gRPC endpoint the controller calls.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSection {
    /// `ip:port` to serve on; unset or `""`: no agent.
    pub address: Option<String>,
    /// File holding a bearer token every call must carry as well: required
    /// with `insecure`, optional with TLS.
    pub token_file: Option<PathBuf>,
    /// Directory with this node's credential: `tls.crt` and `tls.key`
    /// (issued for this node's name) and `ca.crt` (the CA the controller's
    /// client certificate must chain to). Re-read when they change.
    pub tls_dir: Option<PathBuf>,
    /// Serve cleartext HTTP/2 with the bearer token only: development only.
    pub insecure: bool,
    /// Most free slots all pools together may be asked for by the
    /// controller (default 256).
    pub max_slots: Option<usize>,
    /// The Kubernetes node name to report; default: this host's name.
    pub node_name: Option<String>,
    /// How often containerd's image list is re-read (default 10s).
    pub image_interval: Option<HumanDuration>,
}

/// One `[[pool]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    /// Defaults to the handler (or `default` for the default handler).
    pub name: Option<String>,
    pub handler: String,
    pub upstream: String,
    pub size: usize,
    #[serde(default)]
    pub network: NetworkMode,
    #[serde(default)]
    pub shape: ShapeSection,
    /// How claimed slots are fixed up; default from `upstream` (see
    /// [`FixupMode::default_for`]).
    pub fixup: Option<FixupMode>,
    /// `guest-exec`: the command that sets the hostname inside the
    /// sandbox, with whole arguments `{sandbox_id}`, `{hostname}` and
    /// optionally `{exec_id}` replaced. Default for runsc handlers:
    /// `runsc --root /run/containerd/runc/k8s.io exec --cap CAP_SYS_ADMIN
    /// {sandbox_id} /pause --set-hostname {hostname}`; required otherwise.
    pub guest_exec: Option<Vec<String>>,
    /// `guest-exec`: `"ignore"` (the runtime never applies spec sysctls:
    /// runsc, the default for runsc handlers) or `"refuse"` (pods with
    /// sysctls start cold: the default otherwise, e.g. Kata).
    pub guest_sysctls: Option<GuestSysctls>,
    /// `guest-exec`: the directory of a sandbox's hostname channel (an
    /// absolute path with `{sandbox_id}` as a component), tried before
    /// `guest_exec`; `""` turns it off. Default for runsc handlers: the
    /// runsc adapter's, `<runsc root>.adapter/{sandbox_id}`, the root being
    /// `guest_exec`'s `--root` (else containerd's default); none otherwise.
    pub guest_channel: Option<String>,
}

/// `[[pool]] fixup`: the claim-time mechanism (docs/runtimes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FixupMode {
    /// The pause is a host process (runc, crun): `setns` + `sethostname`.
    Setns,
    /// The pause lives in a sentry or a VM (gVisor, Kata): a command run
    /// inside the sandbox.
    GuestExec,
}

impl FixupMode {
    /// `guest-exec` for upstream handlers whose name says gVisor or Kata
    /// (`runsc*`, `gvisor*`, `kata*`), `setns` otherwise.
    pub fn default_for(upstream: &str) -> Self {
        if is_runsc(upstream) || upstream.starts_with("kata") {
            Self::GuestExec
        } else {
            Self::Setns
        }
    }
}

fn is_runsc(upstream: &str) -> bool {
    upstream.starts_with("runsc") || upstream.starts_with("gvisor")
}

/// `[[pool]] guest_sysctls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestSysctls {
    Ignore,
    Refuse,
}

/// Where containerd's runc v2 shim keeps runsc's state for the `k8s.io`
/// namespace when the runtime sets no `Root` option.
pub const DEFAULT_RUNSC_ROOT: &str = "/run/containerd/runc/k8s.io";

/// The fix-up mechanism of every upstream handler of `pools`; two pools of
/// one upstream handler must agree.
pub fn fixup_mechanisms(pools: &[PoolSection]) -> anyhow::Result<HashMap<String, Mechanism>> {
    let mut out: HashMap<String, Mechanism> = HashMap::new();
    for (i, p) in pools.iter().enumerate() {
        let at = format!("pool[{i}] ({:?})", p.name.as_deref().unwrap_or(&p.handler));
        let mode = p
            .fixup
            .unwrap_or_else(|| FixupMode::default_for(&p.upstream));
        let mechanism = match mode {
            FixupMode::Setns => {
                anyhow::ensure!(
                    p.guest_exec.is_none()
                        && p.guest_sysctls.is_none()
                        && p.guest_channel.is_none(),
                    "{at}: guest_exec, guest_sysctls and guest_channel need fixup = \"guest-exec\""
                );
                Mechanism::Setns
            }
            FixupMode::GuestExec => {
                let command = match &p.guest_exec {
                    Some(argv) => ExecTemplate::new(argv.clone())
                        .map_err(|e| anyhow::anyhow!("{at}.guest_exec: {e}"))?,
                    None if is_runsc(&p.upstream) => {
                        ExecTemplate::runsc("/usr/bin/runsc", DEFAULT_RUNSC_ROOT)
                    }
                    None => anyhow::bail!(
                        "{at}.guest_exec: required for upstream {:?} (no default command sets a hostname inside it)",
                        p.upstream
                    ),
                };
                let sysctls = match p.guest_sysctls {
                    Some(GuestSysctls::Ignore) => SysctlPolicy::Ignore,
                    Some(GuestSysctls::Refuse) => SysctlPolicy::Refuse,
                    None if is_runsc(&p.upstream) => SysctlPolicy::Ignore,
                    None => SysctlPolicy::Refuse,
                };
                let channel = guest_channel(p, &command)
                    .map_err(|e| anyhow::anyhow!("{at}.guest_channel: {e}"))?;
                Mechanism::GuestExec(GuestExecSettings {
                    command,
                    sysctls,
                    channel,
                })
            }
        };
        if let Some(prev) = out.get(&p.upstream) {
            anyhow::ensure!(
                *prev == mechanism,
                "{at}.fixup: upstream {:?} already has another fix-up in an earlier pool",
                p.upstream
            );
        }
        out.insert(p.upstream.clone(), mechanism);
    }
    Ok(out)
}

/// `[[pool]] guest_channel`, or its default for runsc upstreams: beside the
/// runsc root `command` names with `--root`.
fn guest_channel(
    p: &PoolSection,
    command: &ExecTemplate,
) -> Result<Option<ChannelTemplate>, String> {
    match p.guest_channel.as_deref() {
        Some("") => Ok(None),
        Some(template) => ChannelTemplate::new(template).map(Some),
        None if is_runsc(&p.upstream) => {
            let argv = command.argv();
            let root = argv
                .iter()
                .position(|a| a == "--root")
                .and_then(|i| argv.get(i + 1))
                .map_or(DEFAULT_RUNSC_ROOT, String::as_str);
            Ok(Some(ChannelTemplate::runsc_adapter(root)))
        }
        None => Ok(None),
    }
}

/// The pool's shape: sandbox fields fixed once the pause runs. Each unset
/// field is what kubelet sends for an ordinary pod's sandbox
/// (docs/warm-slots.md, "What kubelet sends"), so a pool without a `shape`
/// serves kubelet's pods.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShapeSection {
    /// Default `runtime-default`: kubelet (v1.26 on) always asks seccomp
    /// `RuntimeDefault` for a pod sandbox, whatever the pod says.
    pub seccomp: Option<String>,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub supplemental_groups: Vec<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSection {
    pub endpoint: Option<String>,
    pub call_timeout: Option<HumanDuration>,
    pub pull_image_timeout: Option<HumanDuration>,
    pub connect_timeout: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketSection {
    pub path: Option<PathBuf>,
    pub group: Option<GroupValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    pub format: Option<LogFormat>,
    /// A `tracing` filter directive; the `RUST_LOG` environment variable wins.
    pub filter: Option<String>,
}

/// A socket group in the file: a gid or a group name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum GroupValue {
    Id(u32),
    Name(String),
}

impl From<GroupValue> for SocketGroup {
    fn from(value: GroupValue) -> Self {
        match value {
            GroupValue::Id(gid) => SocketGroup::Id(gid),
            GroupValue::Name(name) => SocketGroup::Name(name),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A duration written as an integer and a unit: `500ms`, `30s`, `2m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || {
            format!("invalid duration {s:?}: expected a whole number followed by ms, s, m or h (e.g. \"30s\")")
        };
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(invalid)?;
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| invalid())?;
        let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
        let duration = match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" => secs(1),
            "m" => secs(60),
            "h" => secs(3600),
            _ => None,
        };
        duration.map(HumanDuration).ok_or_else(invalid)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Per-node overrides from flags or the environment; they win over the file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Upstream CRI endpoint (unix socket path or unix:// URL).
    #[arg(long, env = "FAST_SANDBOX_UPSTREAM_ENDPOINT", value_name = "ENDPOINT")]
    pub upstream_endpoint: Option<String>,
    /// Path of the CRI socket the shim serves.
    #[arg(long, env = "FAST_SANDBOX_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Group (name or gid) allowed to use the socket; it is then 0660, else 0600.
    #[arg(long, env = "FAST_SANDBOX_SOCKET_GROUP", value_name = "GROUP")]
    pub socket_group: Option<SocketGroup>,
    /// Default deadline of a unary upstream call the caller gave none (e.g. 2m).
    #[arg(long, env = "FAST_SANDBOX_CALL_TIMEOUT", value_name = "DURATION")]
    pub call_timeout: Option<HumanDuration>,
    /// Default deadline of PullImage (e.g. 30m).
    #[arg(long, env = "FAST_SANDBOX_PULL_IMAGE_TIMEOUT", value_name = "DURATION")]
    pub pull_image_timeout: Option<HumanDuration>,
    /// Limit for connecting to upstream (e.g. 5s).
    #[arg(long, env = "FAST_SANDBOX_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub connect_timeout: Option<HumanDuration>,
    /// Log format.
    #[arg(long, value_enum, env = "FAST_SANDBOX_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// The Kubernetes node name the agent reports (a DaemonSet sets it from
    /// `spec.nodeName`).
    #[arg(long, env = "FAST_SANDBOX_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// The IP the agent binds instead of `agent.address`'s (the DaemonSet
    /// sets it from the downward API's `status.hostIP`).
    #[arg(long, env = "FAST_SANDBOX_AGENT_IP", value_name = "IP")]
    pub agent_ip: Option<std::net::IpAddr>,
    /// Serve `/metrics` for scrapers on this address too ([admin]
    /// metrics_address); a non-loopback one requires a bearer token
    /// ([admin] metrics_token_file).
    #[arg(long, env = "FAST_SANDBOX_METRICS_ADDR", value_name = "IP:PORT")]
    pub metrics_addr: Option<String>,
}

/// Everything `serve` needs, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub upstream: UpstreamConfig,
    pub socket: SocketConfig,
    pub log_format: LogFormat,
    pub log_filter: Option<String>,
    pub slots: SlotSettings,
    /// `None`: no admin endpoint.
    pub admin: Option<String>,
}

/// Where slots keep state and how the refill behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSettings {
    pub state_dir: PathBuf,
    pub containerd_root: PathBuf,
    /// `None`: [`SlotSettings::cgroup_root_of`] the instance's token.
    pub placeholder_cgroup_root: Option<String>,
    pub refill_interval: Duration,
    pub refill_delay: Duration,
    pub health_interval: Duration,
    /// containerd's CNI configuration: decides the pools' network modes,
    /// and `network = "rebind"` runs it.
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
}

impl SlotSettings {
    pub const DEFAULT_CNI_CONF_DIR: &'static str = "/etc/cni/net.d";
    pub const DEFAULT_CNI_BIN_DIR: &'static str = "/opt/cni/bin";
    pub const DEFAULT_STATE_DIR: &'static str = "/var/lib/fast-sandbox";
    pub const DEFAULT_CONTAINERD_ROOT: &'static str = "/var/lib/containerd";
    pub const DEFAULT_PLACEHOLDER_CGROUP_ROOT: &'static str = "/fast-sandbox-slots";

    /// The placeholder cgroup root of the instance whose slot token is
    /// `token`: the configured one, else one of its own under
    /// [`Self::DEFAULT_PLACEHOLDER_CGROUP_ROOT`], named by
    /// [`crate::pool::records::instance_id`].
    pub fn cgroup_root_of(&self, token: &str) -> String {
        self.placeholder_cgroup_root.clone().unwrap_or_else(|| {
            format!(
                "{}/{}",
                Self::DEFAULT_PLACEHOLDER_CGROUP_ROOT,
                crate::pool::records::instance_id(token)
            )
        })
    }
}

/// Default address of the admin endpoint (loopback only).
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9464";

/// Reads and strictly parses the config file at `path`.
pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

impl Settings {
    /// Flags/env over file over defaults.
    pub fn resolve(file: FileConfig, overrides: Overrides) -> Settings {
        let defaults = UpstreamConfig::default();
        let duration = |flag: Option<HumanDuration>, file: Option<HumanDuration>, default| {
            flag.or(file).map_or(default, |d| d.0)
        };
        let upstream = UpstreamConfig {
            endpoint: overrides
                .upstream_endpoint
                .or(file.upstream.endpoint)
                .unwrap_or(defaults.endpoint),
            call_timeout: duration(
                overrides.call_timeout,
                file.upstream.call_timeout,
                defaults.call_timeout,
            ),
            pull_image_timeout: duration(
                overrides.pull_image_timeout,
                file.upstream.pull_image_timeout,
                defaults.pull_image_timeout,
            ),
            connect_timeout: duration(
                overrides.connect_timeout,
                file.upstream.connect_timeout,
                defaults.connect_timeout,
            ),
        };
        let socket = SocketConfig {
            path: overrides
                .socket
                .or(file.socket.path)
                .unwrap_or_else(|| SocketConfig::default().path),
            group: overrides
                .socket_group
                .or(file.socket.group.map(SocketGroup::from)),
        };
        let slots = SlotSettings {
            state_dir: file
                .slots
                .state_dir
                .unwrap_or_else(|| SlotSettings::DEFAULT_STATE_DIR.into()),
            containerd_root: file
                .slots
                .containerd_root
                .unwrap_or_else(|| SlotSettings::DEFAULT_CONTAINERD_ROOT.into()),
            placeholder_cgroup_root: file.slots.placeholder_cgroup_root,
            refill_interval: file
                .slots
                .refill_interval
                .map_or(Duration::from_millis(50), |d| d.0),
            refill_delay: file
                .slots
                .refill_delay
                .map_or(Duration::from_millis(500), |d| d.0),
            health_interval: file
                .slots
                .health_interval
                .map_or(Duration::from_secs(10), |d| d.0),
            cni_conf_dir: file
                .slots
                .cni_conf_dir
                .unwrap_or_else(|| SlotSettings::DEFAULT_CNI_CONF_DIR.into()),
            cni_bin_dirs: file
                .slots
                .cni_bin_dirs
                .unwrap_or_else(|| vec![SlotSettings::DEFAULT_CNI_BIN_DIR.into()]),
        };
        let admin = match file.admin.address {
            Some(a) if a.is_empty() => None,
            Some(a) => Some(a),
            None => Some(DEFAULT_ADMIN_ADDRESS.to_owned()),
        };
        Settings {
            upstream,
            socket,
            log_format: overrides.log_format.or(file.log.format).unwrap_or_default(),
            log_filter: file.log.filter,
            slots,
            admin,
        }
    }
}

/// Default of `agent.max_slots`: enough for every pool a node sensibly
/// runs, far below a /24 host-local range.
pub const DEFAULT_MAX_SLOTS: usize = 256;

/// `[agent]`, validated: `None` when no address is set. `node_name` (a flag
/// or the environment) wins over the file; the host name is the default.
pub fn agent_settings(
    section: &AgentSection,
    node_name: Option<String>,
    ip: Option<std::net::IpAddr>,
) -> anyhow::Result<Option<crate::agent::AgentSettings>> {
    let Some(address) = section.address.as_deref().filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    let mut address: std::net::SocketAddr = address
        .parse()
        .with_context(|| format!("agent.address: {address:?} is not an ip:port"))?;
    if let Some(ip) = ip {
        address.set_ip(ip);
    }
    let tls = match (&section.tls_dir, section.insecure) {
        (Some(_), true) => anyhow::bail!("agent.insecure: must not be set with agent.tls_dir"),
        (Some(dir), false) => Some(fast_sandbox_proto::tls::TlsFiles::in_dir(dir)),
        (None, true) => None,
        (None, false) => anyhow::bail!(
            "agent.tls_dir: required when agent.address is set (or agent.insecure = true, \
             for development only)"
        ),
    };
    anyhow::ensure!(
        tls.is_some() || section.token_file.is_some(),
        "agent.token_file: required with agent.insecure (every call is authenticated)"
    );
    let max_slots = section.max_slots.unwrap_or(DEFAULT_MAX_SLOTS);
    anyhow::ensure!(max_slots > 0, "agent.max_slots: must be at least 1");
    let node_name = match node_name.or_else(|| section.node_name.clone()) {
        Some(name) => name,
        None => nix::unistd::gethostname()
            .context("agent.node_name: unset, and the host name is unreadable")?
            .into_string()
            .map_err(|_| {
                anyhow::anyhow!("agent.node_name: unset, and the host name is not UTF-8")
            })?,
    };
    anyhow::ensure!(!node_name.is_empty(), "agent.node_name: must not be empty");
    Ok(Some(crate::agent::AgentSettings {
        address,
        token_file: section.token_file.clone(),
        tls,
        max_slots,
        node_name,
        image_interval: section
            .image_interval
            .map_or(Duration::from_secs(10), |d| d.0),
    }))
}

/// The configured pools, validated: each error names the pool and field.
pub fn pool_specs(pools: &[PoolSection]) -> anyhow::Result<Vec<PoolSpec>> {
    let mut specs: Vec<PoolSpec> = Vec::with_capacity(pools.len());
    for (i, p) in pools.iter().enumerate() {
        let name = p.name.clone().unwrap_or_else(|| {
            if p.handler.is_empty() {
                "default".to_owned()
            } else {
                p.handler.clone()
            }
        });
        let at = format!("pool[{i}] ({name:?})");
        anyhow::ensure!(
            !name.is_empty()
                && name.len() <= 40
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "{at}.name: must be 1-40 characters of [A-Za-z0-9-]"
        );
        anyhow::ensure!(
            !p.upstream.is_empty(),
            "{at}.upstream: must name containerd's runtime handler"
        );
        anyhow::ensure!(
            p.size <= MAX_POOL_SIZE,
            "{at}.size: {} is more than the maximum of {MAX_POOL_SIZE}",
            p.size
        );
        let seccomp = match p.shape.seccomp.as_deref() {
            Some("unconfined") => SeccompShape::Unconfined,
            None | Some("runtime-default") => SeccompShape::RuntimeDefault,
            Some(other) => match other.strip_prefix("localhost/") {
                Some(path) if !path.is_empty() => SeccompShape::Localhost(path.to_owned()),
                _ => anyhow::bail!(
                    "{at}.shape.seccomp: {other:?} is not \"unconfined\", \"runtime-default\" or \"localhost/<profile>\""
                ),
            },
        };
        let mut supplemental_groups = p.shape.supplemental_groups.clone();
        supplemental_groups.sort_unstable();
        supplemental_groups.dedup();
        let key = PoolKey {
            upstream_handler: p.upstream.clone(),
            shape: Shape {
                seccomp,
                run_as_user: p.shape.run_as_user,
                run_as_group: p.shape.run_as_group,
                supplemental_groups,
                selinux: None,
            },
        };
        if let Some(prev) = specs.iter().find(|s| s.name == name) {
            anyhow::bail!("{at}.name: duplicates the pool named {:?}", prev.name);
        }
        if let Some(prev) = specs
            .iter()
            .find(|s| s.exposed_handler == p.handler && s.key == key)
        {
            anyhow::bail!("{at}: same handler and shape as pool {:?}", prev.name);
        }
        if let Some(prev) = specs
            .iter()
            .find(|s| s.exposed_handler == p.handler && s.key.upstream_handler != p.upstream)
        {
            anyhow::bail!(
                "{at}.upstream: handler {:?} already maps to {:?} in pool {:?}",
                p.handler,
                prev.key.upstream_handler,
                prev.name
            );
        }
        specs.push(PoolSpec {
            name,
            exposed_handler: p.handler.clone(),
            key,
            size: p.size,
            network: p.network,
        });
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    #[test]
    fn unknown_field_is_named_with_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "[upstream]\nendpont = \"unix:///x.sock\"\n");
        let err = format!("{:#}", load(&path).expect_err("typo"));
        assert!(err.contains("unknown field `endpont`"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");

        let path = write(&dir, "pools = 3\n");
        let err = format!("{:#}", load(&path).expect_err("unknown section"));
        assert!(err.contains("unknown field `pools`"), "{err}");

        let path = write(
            &dir,
            "[[pool]]\nhandler = \"fast-runc\"\nupstream = \"runc\"\nsize = 1\nsise = 2\n",
        );
        let err = format!("{:#}", load(&path).expect_err("typo in a pool"));
        assert!(err.contains("unknown field `sise`"), "{err}");
    }

    #[test]
    fn bad_values_are_explained() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "[upstream]\ncall_timeout = \"5\"\n");
        let err = format!("{:#}", load(&path).expect_err("no unit"));
        assert!(err.contains("invalid duration \"5\""), "{err}");

        let path = write(&dir, "[log]\nformat = \"yaml\"\n");
        let err = format!("{:#}", load(&path).expect_err("bad format"));
        assert!(err.contains("yaml"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = format!(
            "{:#}",
            load(Path::new("/nonexistent/node.toml")).expect_err("missing")
        );
        assert!(err.contains("/nonexistent/node.toml"), "{err}");
    }

    #[test]
    fn empty_file_gives_stock_containerd_defaults() {
        let file: FileConfig = toml::from_str("").expect("empty");
        let settings = Settings::resolve(file, Overrides::default());
        assert_eq!(settings.upstream, UpstreamConfig::default());
        assert_eq!(
            settings.upstream.endpoint,
            "unix:///run/containerd/containerd.sock"
        );
        assert_eq!(settings.upstream.call_timeout, Duration::from_secs(120));
        assert_eq!(
            settings.socket.path,
            PathBuf::from("/run/fast-sandbox/cri.sock")
        );
        assert_eq!(settings.socket.group, None);
        assert_eq!(settings.log_format, LogFormat::Text);
    }

    #[test]
    fn full_file_parses() {
        let file: FileConfig = toml::from_str(
            r#"
            [upstream]
            endpoint = "/run/k3s/containerd/containerd.sock"
            call_timeout = "90s"
            pull_image_timeout = "1h"
            connect_timeout = "500ms"
            [socket]
            path = "/run/fs/cri.sock"
            group = 990
            [log]
            format = "json"
            filter = "debug"
            "#,
        )
        .expect("valid");
        let settings = Settings::resolve(file, Overrides::default());
        assert_eq!(
            settings.upstream,
            UpstreamConfig {
                endpoint: "/run/k3s/containerd/containerd.sock".into(),
                call_timeout: Duration::from_secs(90),
                pull_image_timeout: Duration::from_secs(3600),
                connect_timeout: Duration::from_millis(500),
            }
        );
        assert_eq!(settings.socket.group, Some(SocketGroup::Id(990)));
        assert_eq!(settings.log_format, LogFormat::Json);
        assert_eq!(settings.log_filter.as_deref(), Some("debug"));

        let named: FileConfig = toml::from_str("[socket]\ngroup = \"kube\"\n").expect("group name");
        assert_eq!(named.socket.group, Some(GroupValue::Name("kube".into())));
    }

    #[test]
    fn overrides_win_over_the_file() {
        let file: FileConfig = toml::from_str(
            "[upstream]\nendpoint = \"/file.sock\"\ncall_timeout = \"1m\"\n\
             [socket]\npath = \"/file/cri.sock\"\ngroup = \"file\"\n",
        )
        .expect("valid");
        let overrides = Overrides {
            upstream_endpoint: Some("unix:///flag.sock".into()),
            socket_group: Some(SocketGroup::Id(7)),
            log_format: Some(LogFormat::Json),
            ..Overrides::default()
        };
        let settings = Settings::resolve(file, overrides);
        assert_eq!(settings.upstream.endpoint, "unix:///flag.sock");
        assert_eq!(settings.upstream.call_timeout, Duration::from_secs(60));
        assert_eq!(settings.socket.path, PathBuf::from("/file/cri.sock"));
        assert_eq!(settings.socket.group, Some(SocketGroup::Id(7)));
        assert_eq!(settings.log_format, LogFormat::Json);
    }

    #[test]
    fn a_non_loopback_metrics_address_needs_a_token_file() {
        let section = |toml_text: &str| -> AdminSection {
            let file: FileConfig = toml::from_str(toml_text).expect("valid");
            file.admin
        };
        assert_eq!(metrics_settings(&section(""), None).expect("none"), None);
        let loopback = metrics_settings(&section(""), Some("127.0.0.1:9466"))
            .expect("loopback needs no token")
            .expect("set");
        assert_eq!(loopback.token_file, None);
        let error = metrics_settings(&section(""), Some("0.0.0.0:9466"))
            .expect_err("no token")
            .to_string();
        assert!(error.contains("admin.metrics_token_file"), "{error}");
        let open =
            section("[admin]\nmetrics_address = \"0.0.0.0:9466\"\nmetrics_token_file = \"/t\"\n");
        let settings = metrics_settings(&open, None).expect("valid").expect("set");
        assert_eq!(settings.token_file, Some(PathBuf::from("/t")));
        // The flag wins over the file.
        let flagged = metrics_settings(&open, Some("10.0.0.1:1")).expect("valid");
        assert_eq!(flagged.map(|m| m.address.port()), Some(1));
        let error = metrics_settings(&section(""), Some("nope"))
            .expect_err("bad")
            .to_string();
        assert!(error.contains("admin.metrics_address"), "{error}");
    }

    #[test]
    fn agent_section() {
        let agent = |text: &str, name: Option<&str>| {
            let file: FileConfig = toml::from_str(text).expect("valid toml");
            agent_settings(&file.agent, name.map(str::to_owned), None).map_err(|e| format!("{e:#}"))
        };
        assert!(agent("", None).expect("no agent").is_none());
        assert!(agent("[agent]\naddress = \"\"\n", None)
            .expect("off")
            .is_none());
        let on = agent(
            "[agent]\naddress = \"0.0.0.0:9465\"\ntls_dir = \"/tls\"\nnode_name = \"n1\"\nimage_interval = \"30s\"\n",
            None,
        )
        .expect("valid")
        .expect("on");
        assert_eq!(on.address.port(), 9465);
        assert_eq!(on.token_file, None);
        assert_eq!(
            on.tls.as_ref().map(|t| t.cert.clone()),
            Some(PathBuf::from("/tls/tls.crt"))
        );
        assert_eq!(on.max_slots, DEFAULT_MAX_SLOTS);
        assert_eq!(on.node_name, "n1");
        assert_eq!(on.image_interval, Duration::from_secs(30));
        let flag = agent(
            "[agent]\naddress = \"127.0.0.1:1\"\ninsecure = true\ntoken_file = \"/t\"\nnode_name = \"file\"\nmax_slots = 8\n",
            Some("flag"),
        )
        .expect("valid")
        .expect("on");
        assert_eq!(flag.node_name, "flag");
        assert_eq!(flag.max_slots, 8);
        assert!(flag.tls.is_none());
        let host = agent(
            "[agent]\naddress = \"127.0.0.1:1\"\ntls_dir = \"/tls\"\n",
            None,
        )
        .expect("valid")
        .expect("on");
        assert!(!host.node_name.is_empty());

        let bad = [
            ("address = \"127.0.0.1:1\"\n", "agent.tls_dir: required"),
            (
                "address = \"127.0.0.1:1\"\ninsecure = true\n",
                "agent.token_file",
            ),
            (
                "address = \"127.0.0.1:1\"\ninsecure = true\ntls_dir = \"/t\"\n",
                "agent.insecure",
            ),
            (
                "address = \"127.0.0.1:1\"\ntls_dir = \"/t\"\nmax_slots = 0\n",
                "agent.max_slots",
            ),
            (
                "address = \"localhost\"\ntls_dir = \"/t\"\n",
                "agent.address",
            ),
        ];
        for (section, field) in bad {
            let err = agent(&format!("[agent]\n{section}"), None).expect_err(section);
            assert!(err.contains(field), "{section}: {err}");
        }
        let err = toml::from_str::<FileConfig>("[agent]\ntoken = \"x\"\n")
            .expect_err("unknown field")
            .to_string();
        assert!(err.contains("unknown field `token`"), "{err}");
    }

    /// The DaemonSet's host IP replaces the configured address's IP, so
    /// the agent never listens on every interface of the node.
    #[test]
    fn the_agent_binds_the_host_ip() {
        let file: FileConfig =
            toml::from_str("[agent]\naddress = \"0.0.0.0:9465\"\ntls_dir = \"/t\"\n")
                .expect("valid");
        let ip = "10.1.2.3".parse().expect("ip");
        let on = agent_settings(&file.agent, Some("n".into()), Some(ip))
            .expect("valid")
            .expect("on");
        assert_eq!(on.address, "10.1.2.3:9465".parse().expect("addr"));
    }

    #[test]
    fn durations() {
        let ok = [
            ("250ms", Duration::from_millis(250)),
            ("30s", Duration::from_secs(30)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
        ];
        for (text, want) in ok {
            assert_eq!(text.parse::<HumanDuration>(), Ok(HumanDuration(want)));
        }
        for bad in [
            "",
            "5",
            "s",
            "1.5s",
            "-1s",
            "10 s",
            "3d",
            "99999999999999999999h",
        ] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad:?}");
        }
    }

    fn pools(text: &str) -> anyhow::Result<Vec<PoolSpec>> {
        let file: FileConfig = toml::from_str(text)?;
        pool_specs(&file.pools)
    }

    #[test]
    fn pools_parse_with_shapes() {
        let specs = pools(
            r#"
            [[pool]]
            handler = "fast-runc"
            upstream = "runc"
            size = 4
            [[pool]]
            name = "runc-restricted"
            handler = "fast-runc"
            upstream = "runc"
            size = 2
            shape = { seccomp = "runtime-default", run_as_user = 1000, supplemental_groups = [3, 1, 3] }
            [[pool]]
            handler = ""
            upstream = "crun"
            size = 0
            network = "keep"
            "#,
        )
        .expect("valid");
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[0].name, "fast-runc");
        assert_eq!(
            specs[0].network,
            NetworkMode::Auto,
            "unset: decided from containerd's CNI configuration"
        );
        assert_eq!(specs[2].network, NetworkMode::Keep);
        assert_eq!(
            specs[0].key.shape,
            Shape {
                seccomp: SeccompShape::RuntimeDefault,
                ..Shape::default()
            },
            "a pool without a shape serves what kubelet sends"
        );
        assert_eq!(specs[1].key.shape.seccomp, SeccompShape::RuntimeDefault);
        assert_eq!(specs[1].key.shape.supplemental_groups, vec![1, 3]);
        assert_eq!(specs[2].name, "default");
        assert_eq!(specs[2].exposed_handler, "");
    }

    #[test]
    fn bad_pools_are_explained() {
        let one = |extra: &str| {
            format!("[[pool]]\nhandler = \"fast-runc\"\nupstream = \"runc\"\nsize = 1\n{extra}")
        };
        let cases = [
            (one("network = \"renumber\""), "network"),
            (one("shape = { seccomp = \"strict\" }"), "shape.seccomp"),
            (one("name = \"../x\""), ".name"),
            (
                "[[pool]]\nhandler = \"h\"\nupstream = \"\"\nsize = 1\n".into(),
                ".upstream",
            ),
            (
                "[[pool]]\nhandler = \"h\"\nupstream = \"runc\"\nsize = 4000\n".into(),
                ".size",
            ),
            (one("") + &one(""), "duplicates"),
            (
                one("")
                    + &one("name = \"b\"\nshape = { seccomp = \"unconfined\" }\n")
                    + &one("name = \"c\"").replace("\"runc\"", "\"crun\""),
                "already maps",
            ),
            (one("size = 2"), "duplicate key"),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", pools(&text).expect_err(&text));
            assert!(err.contains(want), "{text}\n=> {err}");
        }
    }

    fn mechanisms(text: &str) -> anyhow::Result<HashMap<String, Mechanism>> {
        let file: FileConfig = toml::from_str(text)?;
        fixup_mechanisms(&file.pools)
    }

    #[test]
    fn fixup_defaults_follow_the_upstream_runtime() {
        let m = mechanisms(
            r#"
            [[pool]]
            handler = "fast-runc"
            upstream = "runc"
            size = 1
            [[pool]]
            handler = "fast-gvisor"
            upstream = "runsc"
            size = 1
            [[pool]]
            handler = "fast-kata"
            upstream = "kata"
            size = 1
            guest_exec = ["/usr/local/bin/fsb-kata-exec", "{sandbox_id}", "{hostname}"]
            "#,
        )
        .expect("valid");
        assert_eq!(m["runc"], Mechanism::Setns);
        assert_eq!(
            m["runsc"],
            Mechanism::GuestExec(GuestExecSettings {
                command: ExecTemplate::runsc("/usr/bin/runsc", DEFAULT_RUNSC_ROOT),
                sysctls: SysctlPolicy::Ignore,
                channel: Some(ChannelTemplate::runsc_adapter(DEFAULT_RUNSC_ROOT)),
            })
        );
        let Mechanism::GuestExec(kata) = &m["kata"] else {
            panic!("kata must use guest-exec: {:?}", m["kata"]);
        };
        assert_eq!(
            kata.sysctls,
            SysctlPolicy::Refuse,
            "a VM applies sysctls at boot"
        );
        assert_eq!(kata.command.argv()[0], "/usr/local/bin/fsb-kata-exec");
        assert_eq!(kata.channel, None, "only the runsc adapter makes one");
    }

    #[test]
    fn guest_channel_follows_guest_exec_s_root_or_is_set_or_off() {
        let runsc = |extra: &str| {
            let text = format!(
                "[[pool]]\nhandler = \"fast-gvisor\"\nupstream = \"runsc\"\nsize = 1\n{extra}"
            );
            mechanisms(&text).map(|m| match &m["runsc"] {
                Mechanism::GuestExec(s) => s.channel.as_ref().map(|c| c.render("ID")),
                other => panic!("{other:?}"),
            })
        };
        let exec = r#"guest_exec = ["/opt/runsc", "--root", "/dev-node/runsc/k8s.io", "exec", "{sandbox_id}", "/pause", "--set-hostname", "{hostname}"]"#;
        assert_eq!(
            runsc(exec).expect("derived"),
            Some("/dev-node/runsc/k8s.io.adapter/ID".into())
        );
        assert_eq!(
            runsc("guest_channel = \"/x/{sandbox_id}\"").expect("set"),
            Some("/x/ID".into())
        );
        assert_eq!(runsc("guest_channel = \"\"").expect("off"), None);
        let err = format!("{:#}", runsc("guest_channel = \"/x\"").expect_err("no id"));
        assert!(
            err.contains("pool[0] (\"fast-gvisor\").guest_channel"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            mechanisms("[[pool]]\nhandler = \"fast-runc\"\nupstream = \"runc\"\nsize = 1\nguest_channel = \"/x/{sandbox_id}\"\n")
                .expect_err("setns")
        );
        assert!(err.contains("guest_channel need fixup"), "{err}");
    }

    #[test]
    fn fixup_can_be_chosen_and_bad_choices_are_explained() {
        let m = mechanisms(
            r#"
            [[pool]]
            handler = "fast-sentry"
            upstream = "sentry"
            size = 1
            fixup = "guest-exec"
            guest_exec = ["/opt/runsc", "--root", "/r", "exec", "{sandbox_id}", "/pause", "--set-hostname", "{hostname}"]
            guest_sysctls = "ignore"
            "#,
        )
        .expect("valid");
        assert!(
            matches!(&m["sentry"], Mechanism::GuestExec(g) if g.sysctls == SysctlPolicy::Ignore)
        );

        let base = "[[pool]]\nhandler = \"fast-x\"\nsize = 1\n";
        for (extra, want) in [
            ("upstream = \"kata\"\n", "pool[0] (\"fast-x\").guest_exec: required"),
            ("upstream = \"runc\"\nguest_sysctls = \"ignore\"\n", "need fixup = \"guest-exec\""),
            ("upstream = \"runsc\"\nguest_exec = [\"runsc\", \"{sandbox_id}\", \"{hostname}\"]\n", "must be an absolute path"),
            ("upstream = \"runsc\"\nguest_exec = [\"/x\", \"{hostname}\"]\n", "\"{sandbox_id}\""),
            ("upstream = \"runsc\"\nfixup = \"exec\"\n", "unknown variant `exec`"),
            ("upstream = \"runsc\"\nguest_sysctls = \"apply\"\n", "unknown variant `apply`"),
            (
                "upstream = \"runsc\"\n[[pool]]\nhandler = \"fast-y\"\nupstream = \"runsc\"\nsize = 1\nfixup = \"setns\"\n",
                "pool[1] (\"fast-y\").fixup: upstream \"runsc\" already has another fix-up",
            ),
        ] {
            let text = format!("{base}{extra}");
            let err = format!("{:#}", mechanisms(&text).expect_err(&text));
            assert!(err.contains(want), "{text}\n=> {err}");
        }
    }
}
