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

/// `containerd config default` with this instance's paths and the tweaks
/// these machines need.
pub fn render_config(base: &str, layout: &Layout, settings: &Settings) -> Result<String> {
    let mut config: Table = base.parse().context("parse the base containerd config")?;
    let version = config.get("version").and_then(Value::as_integer);
    ensure!(
        version == Some(2),
        "base config has version {version:?}; containerd 1.6 config version 2 expected"
    );

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

    let cri =
        |rest: &[&'static str]| -> Vec<&'static str> { [&["plugins", CRI][..], rest].concat() };
    set(
        &mut config,
        &cri(&["sandbox_image"]),
        s(&settings.sandbox_image),
    )?;
    // Without it, sandbox start fails on oom_score_adj permission errors.
    set(
        &mut config,
        &cri(&["restrict_oom_score_adj"]),
        Value::Boolean(true),
    )?;
    // Pod network namespaces under the instance's state dir, not /run/netns.
    set(
        &mut config,
        &cri(&["netns_mounts_under_state_dir"]),
        Value::Boolean(true),
    )?;
    set(
        &mut config,
        &cri(&["stream_server_address"]),
        s("127.0.0.1"),
    )?;
    set(&mut config, &cri(&["stream_server_port"]), s("0"))?;
    set(
        &mut config,
        &cri(&["systemd_cgroup"]),
        Value::Boolean(false),
    )?;
    set(&mut config, &cri(&["cni", "bin_dir"]), s(CNI_BIN_DIR))?;
    set(
        &mut config,
        &cri(&["cni", "conf_dir"]),
        s(&layout.cni_conf_dir().display().to_string()),
    )?;
    set(
        &mut config,
        &cri(&["cni", "max_conf_num"]),
        Value::Integer(1),
    )?;
    set(
        &mut config,
        &cri(&["registry", "config_path"]),
        s(&layout.certs_dir().display().to_string()),
    )?;
    set(
        &mut config,
        &cri(&["containerd", "default_runtime_name"]),
        s("runc"),
    )?;

    let runtimes = cri(&["containerd", "runtimes"]);
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
