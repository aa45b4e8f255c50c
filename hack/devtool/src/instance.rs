//! The files of a private containerd instance: `config.toml` derived from
//! `containerd config default`, an optional CNI conflist, and `hosts.toml`
//! for plain-HTTP loopback registries. Everything the instance writes goes
//! under its directory, except what containerd 1.6 hard-codes (shim sockets
//! in `/run/containerd/s/`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use toml::{Table, Value};

const CRI: &str = "io.containerd.grpc.v1.cri";
/// Where Debian's containernetworking-plugins installs the CNI binaries.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The directory layout of one instance. `hack/containerd-instance.sh` uses
/// the same names.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Result<Self> {
        ensure!(
            dir.is_absolute(),
            "instance directory {} must be absolute",
            dir.display()
        );
        let dir = dir.to_path_buf();
        // sun_path holds 108 bytes including the NUL.
        let socket = dir.join("containerd.sock.ttrpc");
        ensure!(
            socket.as_os_str().len() < 108,
            "instance directory {} is too long for a unix socket path ({socket:?})",
            dir.display()
        );
        Ok(Self { dir })
    }
    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni/conf")
    }
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs.d")
    }
}

/// What varies between instances.
#[derive(Debug, Clone)]
pub struct Settings {
    pub sandbox_image: String,
    /// `host:port` of registries on 127.0.0.1 to pull from over plain HTTP.
    pub plain_http_registries: Vec<String>,
    pub network: Option<Network>,
    /// More handlers on containerd's runc v2 shim, each with its own
    /// `BinaryName` (e.g. `runsc` with the runsc adapter).
    pub extra_runtimes: Vec<ExtraRuntime>,
}

/// A runtime handler `name` run by the runc v2 shim with `binary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraRuntime {
    pub name: String,
    pub binary: PathBuf,
}

impl FromStr for ExtraRuntime {
    type Err = anyhow::Error;

    /// `NAME=/absolute/binary`.
    fn from_str(s: &str) -> Result<Self> {
        let (name, binary) = s
            .split_once('=')
            .with_context(|| format!("runtime {s:?}: expected NAME=/path/to/binary"))?;
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && name != "runc"
                && name != "crun",
            "runtime {s:?}: bad or reserved handler name"
        );
        let binary = PathBuf::from(binary);
        ensure!(
            binary.is_absolute(),
            "runtime {s:?}: the binary path must be absolute"
        );
        Ok(Self {
            name: name.to_owned(),
            binary,
        })
    }
}

/// A bridge network with host-local IPAM on a private IPv4 range.
#[derive(Debug, Clone)]
pub struct Network {
    pub subnet: Subnet,
    pub bridge: String,
}

/// An IPv4 CIDR in a private range (RFC 1918).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, prefix) = s
            .split_once('/')
            .with_context(|| format!("subnet {s:?}: expected a.b.c.d/len"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("subnet {s:?}: bad address"))?;
        let prefix: u8 = prefix
            .parse()
            .with_context(|| format!("subnet {s:?}: bad prefix length"))?;
        ensure!(
            (8..=28).contains(&prefix),
            "subnet {s:?}: prefix length must be 8..=28"
        );
        let mask = u32::MAX << (32 - prefix);
        ensure!(
            u32::from(addr) & !mask == 0,
            "subnet {s:?}: host bits are set"
        );
        ensure!(
            addr.is_private(),
            "subnet {s:?} is not a private (RFC 1918) range"
        );
        Ok(Self { addr, prefix })
    }
}

/// Linux interface names: at most 15 bytes, no `/`, whitespace or `:`.
fn check_bridge_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 15
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "bridge name {name:?}: 1-15 characters of [A-Za-z0-9_-]"
    );
    Ok(())
}

fn check_registry(host: &str) -> Result<()> {
    let (name, port) = host
        .rsplit_once(':')
        .with_context(|| format!("registry {host:?}: expected 127.0.0.1:PORT"))?;
    ensure!(
        matches!(name, "127.0.0.1" | "localhost"),
        "registry {host:?}: only registries on this machine (127.0.0.1) are allowed"
    );
    port.parse::<u16>()
        .with_context(|| format!("registry {host:?}: bad port"))?;
    Ok(())
}

/// Where a CRI setting lives in one containerd config format.
struct CriKeys {
    /// Image service settings (sandbox image, registry).
    images: &'static [&'static str],
    /// Runtime settings (OOM score, netns, CNI, runtimes).
    runtime: &'static [&'static str],
    /// The CRI gRPC service (streaming server).
    grpc: &'static [&'static str],
    /// The key naming the sandbox ("pause") image, under `images`.
    sandbox_image: &'static [&'static str],
}

/// containerd 1.6/1.7 (config version 2): one CRI plugin table.
const CRI_V2: CriKeys = CriKeys {
    images: &["plugins", CRI],
    runtime: &["plugins", CRI],
    grpc: &["plugins", CRI],
    sandbox_image: &["sandbox_image"],
};

/// containerd 2.x (config version 3): the CRI plugin split into images,
/// runtime and the gRPC service.
const CRI_V3: CriKeys = CriKeys {
    images: &["plugins", "io.containerd.cri.v1.images"],
    runtime: &["plugins", "io.containerd.cri.v1.runtime"],
    grpc: &["plugins", CRI],
    sandbox_image: &["pinned_images", "sandbox"],
};

/// `containerd config default` with this instance's paths and the tweaks
/// these machines need. The base's `version` picks the format: 2
/// (containerd 1.6) or 3 (containerd 2.x, written in its own format rather
/// than migrated at start-up).
pub fn render_config(base: &str, layout: &Layout, settings: &Settings) -> Result<String> {
    let mut config: Table = base.parse().context("parse the base containerd config")?;
    let version = config.get("version").and_then(Value::as_integer);
    let keys = match version {
        Some(2) => &CRI_V2,
        Some(3) => &CRI_V3,
        _ => bail!(
            "base config has version {version:?}; expected 2 (containerd 1.6) or 3 (containerd 2.x)"
        ),
    };

    let s = |v: &str| Value::String(v.to_owned());
    set(&mut config, &["root"], s(&layout.path("root")))?;
    set(&mut config, &["state"], s(&layout.path("state")))?;
    set(&mut config, &["temp"], s(&layout.path("tmp")))?;
    set(
        &mut config,
        &["grpc", "address"],
        s(&layout.path("containerd.sock")),
    )?;
    set(
        &mut config,
        &["ttrpc", "address"],
        s(&layout.path("containerd.sock.ttrpc")),
    )?;
    set(&mut config, &["debug", "address"], s(""))?;
    set(&mut config, &["metrics", "address"], s(""))?;
    set(
        &mut config,
        &["plugins", "io.containerd.internal.v1.opt", "path"],
        s(&layout.path("opt")),
    )?;

    let at = |table: &[&'static str], rest: &[&'static str]| -> Vec<&'static str> {
        [table, rest].concat()
    };
    let images = |rest: &[&'static str]| at(keys.images, rest);
    let rt = |rest: &[&'static str]| at(keys.runtime, rest);
    let grpc = |rest: &[&'static str]| at(keys.grpc, rest);
    set(
        &mut config,
        &images(keys.sandbox_image),
        s(&settings.sandbox_image),
    )?;
    // Without it, sandbox start fails on oom_score_adj permission errors.
    set(
        &mut config,
        &rt(&["restrict_oom_score_adj"]),
        Value::Boolean(true),
    )?;
    // Pod network namespaces under the instance's state dir, not /run/netns.
    set(
        &mut config,
        &rt(&["netns_mounts_under_state_dir"]),
        Value::Boolean(true),
    )?;
    set(
        &mut config,
        &grpc(&["stream_server_address"]),
        s("127.0.0.1"),
    )?;
    set(&mut config, &grpc(&["stream_server_port"]), s("0"))?;
    if version == Some(2) {
        // Version 3 has no such key: the runc options' SystemdCgroup decides.
        set(&mut config, &rt(&["systemd_cgroup"]), Value::Boolean(false))?;
    }
    if version == Some(3) {
        // containerd 2.1 searches `bin_dirs` (`bin_dir` is deprecated there).
        set(
            &mut config,
            &rt(&["cni", "bin_dirs"]),
            Value::Array(vec![s(CNI_BIN_DIR)]),
        )?;
    } else {
        set(&mut config, &rt(&["cni", "bin_dir"]), s(CNI_BIN_DIR))?;
    }
    set(
        &mut config,
        &rt(&["cni", "conf_dir"]),
        s(&layout.cni_conf_dir().display().to_string()),
    )?;
    set(
        &mut config,
        &rt(&["cni", "max_conf_num"]),
        Value::Integer(1),
    )?;
    set(
        &mut config,
        &images(&["registry", "config_path"]),
        s(&layout.certs_dir().display().to_string()),
    )?;
    set(
        &mut config,
        &rt(&["containerd", "default_runtime_name"]),
        s("runc"),
    )?;

    let runtimes = rt(&["containerd", "runtimes"]);
    let runc_path: Vec<&str> = [&runtimes[..], &["runc"]].concat();
    let mut runc = match get(&config, &runc_path) {
        Some(Value::Table(t)) => t.clone(),
        _ => Table::new(),
    };
    runc.insert("runtime_type".into(), s("io.containerd.runc.v2"));
    let mut crun = runc.clone();
    let mut extra: Vec<(Table, &str, String)> = settings
        .extra_runtimes
        .iter()
        .map(|r| {
            (
                runc.clone(),
                r.name.as_str(),
                r.binary.display().to_string(),
            )
        })
        .collect();
    for (table, name, binary) in [
        (&mut runc, "runc", "/usr/bin/runc"),
        (&mut crun, "crun", "/usr/bin/crun"),
    ]
    .into_iter()
    .chain(extra.iter_mut().map(|(t, n, b)| (t, *n, b.as_str())))
    {
        let options = table
            .entry("options")
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .context("runtime options is not a table")?;
        options.insert("BinaryName".into(), s(binary));
        options.insert("SystemdCgroup".into(), Value::Boolean(false));
        // The runtime's state (default /run/containerd/runc/<ns>) stays
        // under the instance too.
        options.insert("Root".into(), s(&layout.path(&format!("runtime/{name}"))));
    }
    set(&mut config, &runc_path, Value::Table(runc))?;
    set(
        &mut config,
        &[&runtimes[..], &["crun"]].concat(),
        Value::Table(crun),
    )?;
    for (table, name, _) in extra {
        set(
            &mut config,
            &[&runtimes[..], &[name]].concat(),
            Value::Table(table),
        )?;
    }

    toml::to_string(&config).context("serialise containerd config")
}

/// The CNI conflist: bridge + host-local on the subnet, portmap, loopback.
/// Pods get no default route: they reach the host (the bridge's gateway
/// address) and each other, nothing beyond.
pub fn render_conflist(layout: &Layout, network: &Network) -> Result<String> {
    check_bridge_name(&network.bridge)?;
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": network_name(&network.bridge),
        "plugins": [
            {
                "type": "bridge",
                "bridge": network.bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": network.subnet.to_string() }]],
                    "dataDir": layout.path("cni/ipam"),
                },
            },
            { "type": "portmap", "capabilities": { "portMappings": true } },
            { "type": "loopback" },
        ],
    });
    serde_json::to_string_pretty(&conflist).context("serialise CNI conflist")
}

/// The CNI network name; CNI plugins put it into iptables rule comments.
pub fn network_name(bridge: &str) -> String {
    format!("fast-sandbox-{bridge}")
}

/// `hosts.toml` making containerd pull from `host` over plain HTTP.
pub fn render_hosts_toml(host: &str) -> Result<String> {
    check_registry(host)?;
    Ok(format!(
        "# Written by fast-sandbox-dev: a registry on this machine, plain HTTP.\n\
         server = \"http://{host}\"\n\n\
         [host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    ))
}

/// Writes config.toml, the conflist (or removes a stale one) and hosts.toml
/// files into the instance directory.
pub fn write_files(base: &str, layout: &Layout, settings: &Settings) -> Result<()> {
    let config = render_config(base, layout, settings)?;
    write_atomic(&layout.config(), config.as_bytes())?;

    let conf_dir = layout.cni_conf_dir();
    std::fs::create_dir_all(&conf_dir).with_context(|| format!("create {}", conf_dir.display()))?;
    let conflist_path = conf_dir.join("10-fast-sandbox.conflist");
    match &settings.network {
        Some(network) => {
            write_atomic(&conflist_path, render_conflist(layout, network)?.as_bytes())?
        }
        None => match std::fs::remove_file(&conflist_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", conflist_path.display())),
        },
    }
    for host in &settings.plain_http_registries {
        let dir = layout.certs_dir().join(host);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        write_atomic(&dir.join("hosts.toml"), render_hosts_toml(host)?.as_bytes())?;
    }
    Ok(())
}

pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let file_name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", file_name.to_string_lossy()));
    std::fs::write(&tmp, data).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
}

fn get<'a>(table: &'a Table, path: &[&str]) -> Option<&'a Value> {
    let (last, parents) = path.split_last()?;
    let mut current = table;
    for key in parents {
        current = current.get(*key)?.as_table()?;
    }
    current.get(*last)
}

fn set(table: &mut Table, path: &[&str], value: Value) -> Result<()> {
    let Some((last, parents)) = path.split_last() else {
        bail!("empty key path");
    };
    let mut current = table;
    for key in parents {
        current = current
            .entry(*key)
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .with_context(|| format!("config key {key:?} (in {path:?}) is not a table"))?;
    }
    current.insert((*last).to_owned(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parts of containerd 1.6.20's `config default` that matter here.
    const BASE: &str = r#"
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
  max_recv_message_size = 16777216
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    restrict_oom_score_adj = false
    sandbox_image = "registry.k8s.io/pause:3.6"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/opt/cni/bin"
      conf_dir = "/etc/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = ""
        SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = ""
  [plugins."io.containerd.internal.v1.opt"]
    path = "/opt/containerd"
"#;

    fn settings() -> Settings {
        Settings {
            sandbox_image: "localhost/fast-sandbox/pause:v1".into(),
            plain_http_registries: vec!["127.0.0.1:5000".into()],
            network: Some(Network {
                subnet: "10.209.0.0/16".parse().expect("subnet"),
                bridge: "fsb0".into(),
            }),
            extra_runtimes: vec!["runsc=/opt/fsb/fast-sandbox-runsc"
                .parse()
                .expect("runtime")],
        }
    }

    fn rendered() -> Table {
        let layout = Layout::new(Path::new("/srv/inst")).expect("layout");
        render_config(BASE, &layout, &settings())
            .expect("render")
            .parse()
            .expect("valid TOML")
    }

    fn string(table: &Table, path: &[&str]) -> String {
        get(table, path)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{path:?} missing"))
            .to_owned()
    }

    #[test]
    fn everything_lives_under_the_instance_dir() {
        let config = rendered();
        assert_eq!(string(&config, &["root"]), "/srv/inst/root");
        assert_eq!(string(&config, &["state"]), "/srv/inst/state");
        assert_eq!(
            string(&config, &["grpc", "address"]),
            "/srv/inst/containerd.sock"
        );
        assert_eq!(
            string(&config, &["ttrpc", "address"]),
            "/srv/inst/containerd.sock.ttrpc"
        );
        assert_eq!(
            string(
                &config,
                &["plugins", "io.containerd.internal.v1.opt", "path"]
            ),
            "/srv/inst/opt"
        );
        assert_eq!(
            string(&config, &["plugins", CRI, "cni", "conf_dir"]),
            "/srv/inst/cni/conf"
        );
        assert_eq!(
            string(&config, &["plugins", CRI, "registry", "config_path"]),
            "/srv/inst/certs.d"
        );
        // Untouched defaults survive.
        assert_eq!(
            get(&config, &["grpc", "max_recv_message_size"]).and_then(Value::as_integer),
            Some(16777216)
        );
    }

    #[test]
    fn cri_tweaks() {
        let config = rendered();
        let cri = |rest: &[&str]| -> Vec<String> {
            ["plugins", CRI]
                .iter()
                .chain(rest)
                .map(|s| (*s).to_owned())
                .collect()
        };
        let at = |rest: &[&str]| {
            let path = cri(rest);
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            get(&config, &path)
                .cloned()
                .unwrap_or_else(|| panic!("{path:?} missing"))
        };
        assert_eq!(at(&["restrict_oom_score_adj"]), Value::Boolean(true));
        assert_eq!(
            at(&["sandbox_image"]).as_str(),
            Some("localhost/fast-sandbox/pause:v1")
        );
        assert_eq!(at(&["cni", "bin_dir"]).as_str(), Some(CNI_BIN_DIR));
        assert_eq!(at(&["stream_server_address"]).as_str(), Some("127.0.0.1"));
        for (name, binary) in [
            ("runc", "/usr/bin/runc"),
            ("crun", "/usr/bin/crun"),
            ("runsc", "/opt/fsb/fast-sandbox-runsc"),
        ] {
            let runtime = ["containerd", "runtimes", name];
            assert_eq!(
                at(&[&runtime[..], &["runtime_type"]].concat()).as_str(),
                Some("io.containerd.runc.v2")
            );
            assert_eq!(
                at(&[&runtime[..], &["options", "BinaryName"]].concat()).as_str(),
                Some(binary)
            );
            assert_eq!(
                at(&[&runtime[..], &["options", "SystemdCgroup"]].concat()),
                Value::Boolean(false)
            );
            let root = format!("/srv/inst/runtime/{name}");
            assert_eq!(
                at(&[&runtime[..], &["options", "Root"]].concat()).as_str(),
                Some(root.as_str())
            );
        }
    }

    /// The parts of containerd 2.1.9's `config default` (version 3) that
    /// matter here.
    const BASE_V3: &str = r#"
version = 3
root = '/var/lib/containerd'
state = '/run/containerd'
[grpc]
  address = '/run/containerd/containerd.sock'
[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = 'registry.k8s.io/pause:3.10'
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = ''
  [plugins.'io.containerd.cri.v1.runtime']
    restrict_oom_score_adj = false
    netns_mounts_under_state_dir = false
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes]
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
          runtime_type = 'io.containerd.runc.v2'
          sandboxer = 'podsandbox'
          [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
            BinaryName = ''
            Root = ''
            SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dir = ''
      bin_dirs = ['/usr/lib/cni', '/opt/cni/bin']
      conf_dir = '/etc/cni/net.d'
      max_conf_num = 1
  [plugins.'io.containerd.grpc.v1.cri']
    disable_tcp_service = true
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'
  [plugins.'io.containerd.internal.v1.opt']
    path = '/opt/containerd'
"#;

    #[test]
    fn version_3_is_written_in_its_own_format() {
        let layout = Layout::new(Path::new("/srv/inst")).expect("layout");
        let config: Table = render_config(BASE_V3, &layout, &settings())
            .expect("render")
            .parse()
            .expect("valid TOML");
        assert_eq!(config["version"].as_integer(), Some(3));
        let images = ["plugins", "io.containerd.cri.v1.images"];
        let runtime = ["plugins", "io.containerd.cri.v1.runtime"];
        let at = |table: &[&str], rest: &[&str]| -> Value {
            let path = [table, rest].concat();
            get(&config, &path)
                .cloned()
                .unwrap_or_else(|| panic!("{path:?} missing"))
        };
        assert_eq!(
            at(&images, &["pinned_images", "sandbox"]).as_str(),
            Some("localhost/fast-sandbox/pause:v1")
        );
        assert_eq!(
            at(&images, &["registry", "config_path"]).as_str(),
            Some("/srv/inst/certs.d")
        );
        assert_eq!(
            at(&runtime, &["restrict_oom_score_adj"]),
            Value::Boolean(true)
        );
        assert_eq!(
            at(&runtime, &["netns_mounts_under_state_dir"]),
            Value::Boolean(true)
        );
        assert_eq!(
            at(&runtime, &["cni", "bin_dirs"]),
            Value::Array(vec![Value::String(CNI_BIN_DIR.into())])
        );
        assert_eq!(
            at(&runtime, &["cni", "conf_dir"]).as_str(),
            Some("/srv/inst/cni/conf")
        );
        for (name, binary) in [
            ("runc", "/usr/bin/runc"),
            ("crun", "/usr/bin/crun"),
            ("runsc", "/opt/fsb/fast-sandbox-runsc"),
        ] {
            let r = ["containerd", "runtimes", name];
            assert_eq!(
                at(&runtime, &[&r[..], &["options", "BinaryName"]].concat()).as_str(),
                Some(binary)
            );
            assert_eq!(
                at(&runtime, &[&r[..], &["sandboxer"]].concat()).as_str(),
                Some("podsandbox")
            );
        }
        // Nothing in the version-2 places, which containerd 2 would migrate.
        assert!(get(&config, &["plugins", CRI, "sandbox_image"]).is_none());
        assert!(get(&config, &["plugins", CRI, "containerd"]).is_none());
        assert!(get(&runtime_table(&config), &["systemd_cgroup"]).is_none());
    }

    fn runtime_table(config: &Table) -> Table {
        get(config, &["plugins", "io.containerd.cri.v1.runtime"])
            .and_then(Value::as_table)
            .cloned()
            .expect("runtime table")
    }

    #[test]
    fn conflist_and_hosts() {
        let layout = Layout::new(Path::new("/srv/inst")).expect("layout");
        let network = settings().network.expect("network");
        let conflist: serde_json::Value =
            serde_json::from_str(&render_conflist(&layout, &network).expect("conflist"))
                .expect("json");
        let types: Vec<&str> = conflist["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .filter_map(|p| p["type"].as_str())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "loopback"]);
        assert_eq!(conflist["plugins"][0]["bridge"], "fsb0");
        assert_eq!(
            conflist["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.209.0.0/16"
        );
        assert_eq!(
            conflist["plugins"][0]["ipam"]["dataDir"],
            "/srv/inst/cni/ipam"
        );

        let hosts: Table = render_hosts_toml("127.0.0.1:5000")
            .expect("hosts")
            .parse()
            .expect("toml");
        assert_eq!(hosts["server"].as_str(), Some("http://127.0.0.1:5000"));
        assert!(render_hosts_toml("registry.example.com:5000").is_err());
    }

    #[test]
    fn subnets_and_names_are_checked() {
        assert_eq!(
            "10.209.0.0/16".parse::<Subnet>().expect("ok").to_string(),
            "10.209.0.0/16"
        );
        for bad in [
            "10.209.0.1/16",
            "8.8.0.0/16",
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/4",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
        assert!(check_bridge_name("fsb0").is_ok());
        assert!(check_bridge_name("a-very-long-bridge-name").is_err());
        assert!(Layout::new(Path::new("relative")).is_err());
        assert!(Layout::new(&Path::new("/").join("x".repeat(100))).is_err());
    }
}
