//! What a claim must change, derived once from the real pod's
//! `PodSandboxConfig` and validated, so [`super::apply`] only executes.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use fast_sandbox_proto::cri::{NamespaceMode, PodSandboxConfig};

pub use fast_sandbox_cgroup::CgroupLeaf;

use super::{
    kernel::{Namespace, Sysctl},
    render_resolv_conf, FixupError,
};

/// containerd's CRI plugin directory under its `root`.
const CRI_PLUGIN_DIR: &str = "io.containerd.grpc.v1.cri";
/// The containerd namespace of the CRI plugin; names the default cgroup.
const CRI_NAMESPACE: &str = "k8s.io";
/// How errors name the pod's cgroup parent.
const REAL_PARENT_FIELD: &str = "PodSandboxConfig field linux.cgroup_parent";
/// Linux `HOST_NAME_MAX`.
const HOST_NAME_MAX: usize = 64;

/// IPC-namespaced sysctls runc accepts by exact name (runc 1.1.5
/// `libcontainer/configs/validate/validator.go`), besides `fs.mqueue.*`.
const IPC_SYSCTLS: [&str; 8] = [
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// A containerd sandbox id: 64 lowercase hex digits, so it is always a
/// single, harmless path component.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SandboxId(String);

impl SandboxId {
    pub fn parse(id: &str) -> Result<Self, FixupError> {
        let ok = id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if ok {
            Ok(Self(id.to_owned()))
        } else {
            Err(FixupError::InvalidSandboxId { id: id.to_owned() })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The cgroup of a sandbox's pause process, as a path relative to the root
/// of every hierarchy (`/kubepods/besteffort/pod<uid>/<id>`): the cgroup
/// layer's [`CgroupLeaf`], named the way containerd and runc name it.
pub trait ContainerdCgroup: Sized {
    /// Where containerd 1.6.20 + runc put the pause of sandbox `id` created
    /// with `cgroup_parent` (`getCgroupsPath` in
    /// `pkg/cri/server/helpers_linux.go`, then runc's cgroup managers):
    ///
    /// - empty: containerd's default `cgroupsPath`, `/k8s.io/<id>`;
    /// - last component ends in `.slice` (systemd style, kubelet's systemd
    ///   driver sends e.g. `kubepods-besteffort-pod<uid>.slice`): containerd
    ///   asks runc for `<slice>:cri-containerd:<id>`, which runc's systemd
    ///   manager places at `expand(<slice>)/cri-containerd-<id>.scope`, with
    ///   `kubepods-besteffort-pod<uid>.slice` expanded to
    ///   `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice`
    ///   (runc `ExpandSlice`);
    /// - otherwise (cgroupfs driver): `<parent>/<id>`, which must be
    ///   absolute (a relative one would be resolved against the shim's own
    ///   cgroup, which the node plugin cannot know).
    ///
    /// `field` names the input in errors.
    fn for_sandbox(
        cgroup_parent: &str,
        id: &SandboxId,
        field: &'static str,
    ) -> Result<Self, FixupError>;

    /// The pod-level cgroup named by a pod's `cgroup_parent` (what
    /// containerd reads a sandbox's stats from): a cgroupfs path as is, a
    /// systemd slice expanded like runc's `ExpandSlice`.
    fn for_pod(cgroup_parent: &str) -> Result<Self, FixupError>;
}

impl ContainerdCgroup for CgroupLeaf {
    fn for_sandbox(
        cgroup_parent: &str,
        id: &SandboxId,
        field: &'static str,
    ) -> Result<Self, FixupError> {
        let bad = |reason| FixupError::InvalidCgroupParent {
            field,
            parent: cgroup_parent.to_owned(),
            reason,
        };
        if cgroup_parent.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        let base = last_component(cgroup_parent);
        let path = if cgroup_parent.is_empty() {
            format!("/{CRI_NAMESPACE}/{id}")
        } else if base.ends_with(".slice") {
            let slice = expand_slice(base).ok_or_else(|| bad("not a valid systemd slice name"))?;
            format!("{}/cri-containerd-{id}.scope", slice.trim_end_matches('/'))
        } else if !cgroup_parent.starts_with('/') {
            return Err(bad("a cgroupfs parent must be an absolute path"));
        } else {
            format!("{cgroup_parent}/{id}")
        };
        CgroupLeaf::parse(&path, field).map_err(|e| bad(e.reason))
    }

    fn for_pod(cgroup_parent: &str) -> Result<Self, FixupError> {
        let bad = |reason| FixupError::InvalidCgroupParent {
            field: "linux.cgroup_parent",
            parent: cgroup_parent.to_owned(),
            reason,
        };
        let base = last_component(cgroup_parent);
        let path = if base.ends_with(".slice") && !cgroup_parent.contains('\0') {
            expand_slice(base).ok_or_else(|| bad("not a valid systemd slice name"))?
        } else {
            cgroup_parent.to_owned()
        };
        CgroupLeaf::parse(&path, "linux.cgroup_parent").map_err(|e| bad(e.reason))
    }
}

/// The last component of a cgroup path, which containerd looks at to tell
/// a systemd slice from a cgroupfs path.
fn last_component(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
}

/// runc's `ExpandSlice` (`libcontainer/cgroups/systemd/common.go`, 1.1.5):
/// `a-b-c.slice` → `/a.slice/a-b.slice/a-b-c.slice`, `-.slice` → `/`.
fn expand_slice(slice: &str) -> Option<String> {
    let name = slice.strip_suffix(".slice")?;
    if slice.contains('/') {
        return None;
    }
    if name == "-" {
        return Some("/".to_owned());
    }
    let mut path = String::new();
    let mut prefix = String::new();
    for component in name.split('-') {
        if component.is_empty() {
            return None;
        }
        path.push('/');
        path.push_str(&prefix);
        path.push_str(component);
        path.push_str(".slice");
        prefix.push_str(component);
        prefix.push('-');
    }
    Some(path)
}

/// Moving the pause from the cgroup its placeholder config gave it to the
/// one the real pod's config would have given it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMove {
    pub sandbox_id: SandboxId,
    pub from: CgroupLeaf,
    pub to: CgroupLeaf,
}

impl CgroupMove {
    /// For sandbox `id`, created with `placeholder_parent` and claimed by a
    /// pod whose `linux.cgroup_parent` is `real_parent`. Also what the pool
    /// manager rebuilds from its durable record to call
    /// [`super::cleanup_after_remove`].
    pub fn new(
        id: &SandboxId,
        placeholder_parent: &str,
        real_parent: &str,
    ) -> Result<Self, FixupError> {
        Ok(Self {
            sandbox_id: id.clone(),
            from: CgroupLeaf::for_sandbox(placeholder_parent, id, "placeholder cgroup parent")?,
            to: CgroupLeaf::for_sandbox(real_parent, id, REAL_PARENT_FIELD)?,
        })
    }

    /// True when the placeholder already used the pod's parent.
    pub fn is_noop(&self) -> bool {
        self.from == self.to
    }
}

/// Everything a claim changes on the node, validated.
#[derive(Debug, Clone)]
pub struct FixupPlan {
    sandbox_id: SandboxId,
    pause_pid: i32,
    sandbox_root_dir: PathBuf,
    hostname: String,
    resolv_conf: Option<String>,
    sysctls: BTreeMap<Namespace, Vec<Sysctl>>,
    cgroup: CgroupMove,
}

impl FixupPlan {
    /// Plans the fix-up of sandbox `sandbox_id` (pause process `pause_pid`,
    /// created with `placeholder_cgroup_parent` by a containerd whose `root`
    /// is `containerd_root`) for the pod described by `real`.
    ///
    /// The placeholder must have set no sysctls: a namespace the real pod
    /// leaves alone keeps whatever the placeholder wrote.
    pub fn from_config(
        sandbox_id: &str,
        pause_pid: i32,
        containerd_root: &Path,
        placeholder_cgroup_parent: &str,
        real: &PodSandboxConfig,
    ) -> Result<Self, FixupError> {
        let sandbox_id = SandboxId::parse(sandbox_id)?;
        if pause_pid <= 0 {
            return Err(FixupError::InvalidPid { pid: pause_pid });
        }
        if !containerd_root.is_absolute() {
            return Err(FixupError::RelativeContainerdRoot {
                path: containerd_root.to_owned(),
            });
        }
        let sandbox_root_dir = containerd_root
            .join(CRI_PLUGIN_DIR)
            .join("sandboxes")
            .join(sandbox_id.as_str());

        let PodFields {
            hostname,
            sysctls,
            real_parent,
        } = pod_fields(real)?;
        let resolv_conf = real.dns_config.as_ref().and_then(render_resolv_conf);
        let cgroup = CgroupMove::new(&sandbox_id, placeholder_cgroup_parent, real_parent)?;

        Ok(Self {
            sandbox_id,
            pause_pid,
            sandbox_root_dir,
            hostname,
            resolv_conf,
            sysctls,
            cgroup,
        })
    }

    pub fn sandbox_id(&self) -> &SandboxId {
        &self.sandbox_id
    }

    pub fn pause_pid(&self) -> i32 {
        self.pause_pid
    }

    /// `<containerd root>/io.containerd.grpc.v1.cri/sandboxes/<id>`.
    pub fn sandbox_root_dir(&self) -> &Path {
        &self.sandbox_root_dir
    }

    /// The pod's hostname; empty means the node's (as containerd does).
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The pod's `resolv.conf`; `None` means a copy of the node's.
    pub fn resolv_conf(&self) -> Option<&str> {
        self.resolv_conf.as_deref()
    }

    /// The pod's sysctls that live in namespace `ns`, sorted by name.
    pub fn sysctls_in(&self, ns: Namespace) -> &[Sysctl] {
        self.sysctls.get(&ns).map(Vec::as_slice).unwrap_or_default()
    }

    pub fn cgroup(&self) -> &CgroupMove {
        &self.cgroup
    }
}

/// Checks everything of `real` a fix-up plan depends on, without a slot:
/// whether any slot could be fixed up for this pod. The claim asks it
/// before it takes a slot, so a pod no slot can serve starts cold with the
/// pool untouched.
pub fn check_pod(real: &PodSandboxConfig) -> Result<(), FixupError> {
    let fields = pod_fields(real)?;
    // Any valid id: the parent's validity does not depend on it.
    let id = SandboxId("0".repeat(64));
    CgroupLeaf::for_sandbox(fields.real_parent, &id, REAL_PARENT_FIELD)?;
    Ok(())
}

/// The fields of the real pod's config a plan takes, validated.
struct PodFields<'a> {
    hostname: String,
    sysctls: BTreeMap<Namespace, Vec<Sysctl>>,
    real_parent: &'a str,
}

fn pod_fields(real: &PodSandboxConfig) -> Result<PodFields<'_>, FixupError> {
    check_pod_namespaces(real)?;
    let hostname = check_hostname(&real.hostname)?;
    let linux = real.linux.as_ref();
    let mut sysctls: BTreeMap<Namespace, Vec<Sysctl>> = BTreeMap::new();
    // Sorted by name, so the order of writes is stable.
    let requested: BTreeMap<&String, &String> = linux
        .map(|l| l.sysctls.iter().collect())
        .unwrap_or_default();
    for (name, value) in requested {
        let ns = classify_sysctl(name)?;
        if value.contains('\0') {
            return Err(FixupError::SysctlValueHasNul { name: name.clone() });
        }
        sysctls.entry(ns).or_default().push(Sysctl {
            name: name.clone(),
            value: value.clone(),
        });
    }
    Ok(PodFields {
        hostname,
        sysctls,
        real_parent: linux.map(|l| l.cgroup_parent.as_str()).unwrap_or_default(),
    })
}

fn check_pod_namespaces(real: &PodSandboxConfig) -> Result<(), FixupError> {
    let Some(ns) = real
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
    else {
        return Ok(());
    };
    let node = NamespaceMode::Node as i32;
    for (mode, field) in [
        (
            ns.network,
            "linux.security_context.namespace_options.network",
        ),
        (ns.pid, "linux.security_context.namespace_options.pid"),
        (ns.ipc, "linux.security_context.namespace_options.ipc"),
    ] {
        if mode == node {
            return Err(FixupError::HostNamespace { field });
        }
    }
    Ok(())
}

fn check_hostname(hostname: &str) -> Result<String, FixupError> {
    if hostname.len() > HOST_NAME_MAX {
        return Err(FixupError::HostnameTooLong {
            hostname: hostname.to_owned(),
            len: hostname.len(),
        });
    }
    if hostname.contains('\0') {
        return Err(FixupError::HostnameHasNul {
            hostname: hostname.to_owned(),
        });
    }
    Ok(hostname.to_owned())
}

/// The namespace a sysctl belongs to, by runc 1.1.5's rules (names with `/`
/// separators are classified after runc's dot/slash swap).
fn classify_sysctl(name: &str) -> Result<Namespace, FixupError> {
    // The file runc writes is `/proc/sys/` + name with every `.` as `/`.
    let valid_path = !name.contains('\0')
        && name
            .split(['.', '/'])
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !valid_path {
        return Err(FixupError::InvalidSysctlName {
            name: name.to_owned(),
        });
    }
    let dotted = dots_separated(name);
    if IPC_SYSCTLS.contains(&dotted.as_str()) || dotted.starts_with("fs.mqueue.") {
        Ok(Namespace::Ipc)
    } else if dotted.starts_with("net.") {
        Ok(Namespace::Net)
    } else if dotted == "kernel.domainname" {
        Ok(Namespace::Uts)
    } else if dotted == "kernel.hostname" {
        Err(FixupError::SysctlConflictsWithHostname {
            name: name.to_owned(),
        })
    } else {
        Err(FixupError::SysctlNotNamespaced {
            name: name.to_owned(),
        })
    }
}

/// runc's `convertSysctlVariableToDotsSeparator`: when the first separator
/// is `/`, swap `.` and `/`.
fn dots_separated(name: &str) -> String {
    match name.find(['.', '/']) {
        Some(i) if name.as_bytes()[i] == b'/' => name
            .chars()
            .map(|c| match c {
                '.' => '/',
                '/' => '.',
                c => c,
            })
            .collect(),
        _ => name.to_owned(),
    }
}

/// `/proc/sys/...` for a validated sysctl name, as runc's
/// `writeSystemProperty` computes it.
pub(super) fn proc_sys_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name.replace('.', "/"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use fast_sandbox_proto::cri::{
        DnsConfig, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceOption,
    };

    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn config(hostname: &str, parent: &str, sysctls: &[(&str, &str)]) -> PodSandboxConfig {
        PodSandboxConfig {
            hostname: hostname.into(),
            dns_config: Some(DnsConfig {
                servers: vec!["10.209.0.10".into()],
                searches: vec!["ns.svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: parent.into(),
                sysctls: sysctls
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect::<HashMap<_, _>>(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn plan(c: &PodSandboxConfig) -> Result<FixupPlan, FixupError> {
        FixupPlan::from_config(
            ID,
            42,
            Path::new("/var/lib/containerd"),
            "/fast-sandbox-slots",
            c,
        )
    }

    fn id() -> SandboxId {
        SandboxId::parse(ID).unwrap()
    }

    #[test]
    fn plan_from_a_kubelet_config() {
        let c = config(
            "web-0",
            "/kubepods/besteffort/pod1234",
            &[
                ("net.ipv4.ip_unprivileged_port_start", "0"),
                ("kernel.shm_rmid_forced", "1"),
                ("fs.mqueue.msg_max", "20"),
                ("kernel.domainname", "example"),
                ("net.core.somaxconn", "1024"),
            ],
        );
        let p = plan(&c).unwrap();
        assert_eq!(p.sandbox_id().as_str(), ID);
        assert_eq!(p.pause_pid(), 42);
        assert_eq!(
            p.sandbox_root_dir(),
            Path::new(&format!(
                "/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/{ID}"
            ))
        );
        assert_eq!(p.hostname(), "web-0");
        assert_eq!(
            p.resolv_conf(),
            Some("search ns.svc.cluster.local\nnameserver 10.209.0.10\noptions ndots:5\n")
        );
        let names = |ns| {
            p.sysctls_in(ns)
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(Namespace::Net),
            ["net.core.somaxconn", "net.ipv4.ip_unprivileged_port_start"]
        );
        assert_eq!(
            names(Namespace::Ipc),
            ["fs.mqueue.msg_max", "kernel.shm_rmid_forced"]
        );
        assert_eq!(names(Namespace::Uts), ["kernel.domainname"]);
        assert_eq!(
            p.cgroup().from.as_str(),
            format!("/fast-sandbox-slots/{ID}")
        );
        assert_eq!(
            p.cgroup().to.as_str(),
            format!("/kubepods/besteffort/pod1234/{ID}")
        );
    }

    #[test]
    fn no_dns_config_or_empty_one_means_node_resolv_conf() {
        let mut c = config("h", "/kubepods", &[]);
        c.dns_config = None;
        assert_eq!(plan(&c).unwrap().resolv_conf(), None);
        c.dns_config = Some(DnsConfig::default());
        assert_eq!(plan(&c).unwrap().resolv_conf(), None);
    }

    #[test]
    fn sandbox_id_must_be_64_lowercase_hex() {
        for bad in [
            "",
            "../../etc",
            &ID[1..],
            &format!("{ID}0"),
            &ID.to_uppercase(),
            &format!("{}/x", &ID[2..]),
        ] {
            let err = FixupPlan::from_config(
                bad,
                42,
                Path::new("/var/lib/containerd"),
                "/p",
                &config("h", "/kubepods", &[]),
            )
            .unwrap_err();
            assert!(
                matches!(err, FixupError::InvalidSandboxId { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn bad_pid_and_relative_root_are_refused() {
        let c = config("h", "/kubepods", &[]);
        let e = FixupPlan::from_config(ID, 0, Path::new("/r"), "/p", &c).unwrap_err();
        assert!(matches!(e, FixupError::InvalidPid { pid: 0 }), "{e}");
        let e = FixupPlan::from_config(ID, 1, Path::new("r"), "/p", &c).unwrap_err();
        assert!(
            matches!(e, FixupError::RelativeContainerdRoot { .. }),
            "{e}"
        );
    }

    #[test]
    fn non_namespaced_sysctls_are_refused_naming_the_field() {
        for name in [
            "kernel.pid_max",
            "vm.swappiness",
            "kernel.shmfoo",
            "fs.file-max",
            "kernel.msgmax2",
        ] {
            let err = plan(&config("h", "/kubepods", &[(name, "1")])).unwrap_err();
            assert!(
                matches!(err, FixupError::SysctlNotNamespaced { .. }),
                "{name}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&format!("linux.sysctls[{name:?}]")), "{msg}");
        }
        let err = plan(&config("h", "/kubepods", &[("kernel.hostname", "x")])).unwrap_err();
        assert!(
            matches!(err, FixupError::SysctlConflictsWithHostname { .. }),
            "{err}"
        );
    }

    #[test]
    fn sysctl_names_that_are_not_proc_sys_files_are_refused() {
        for name in [
            "net..ipv4",
            "net.",
            ".net.x",
            "net/../../etc/x",
            "net.a\0b",
            "net/ipv4/",
        ] {
            let err = plan(&config("h", "/kubepods", &[(name, "1")])).unwrap_err();
            assert!(
                matches!(err, FixupError::InvalidSysctlName { .. }),
                "{name:?}: {err}"
            );
            assert!(err.to_string().contains("linux.sysctls["), "{err}");
        }
        let err = plan(&config("h", "/kubepods", &[("net.x", "1\0")])).unwrap_err();
        assert!(matches!(err, FixupError::SysctlValueHasNul { .. }), "{err}");
    }

    #[test]
    fn slash_separated_sysctls_are_classified_like_runc() {
        assert_eq!(
            classify_sysctl("net/ipv4/ip_forward").unwrap(),
            Namespace::Net
        );
        assert_eq!(classify_sysctl("kernel/shmmax").unwrap(), Namespace::Ipc);
        assert_eq!(
            dots_separated("net/ipv4/conf/eth0.100/x"),
            "net.ipv4.conf.eth0/100.x"
        );
        assert_eq!(
            proc_sys_path("net.ipv4.ip_unprivileged_port_start"),
            Path::new("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        );
        assert_eq!(
            proc_sys_path("net/ipv4/ip_forward"),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
    }

    #[test]
    fn hostnames_the_kernel_refuses_are_refused_naming_the_field() {
        let long = "a".repeat(65);
        let err = plan(&config(&long, "/kubepods", &[])).unwrap_err();
        assert!(
            matches!(err, FixupError::HostnameTooLong { len: 65, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("field hostname"), "{err}");
        assert!(plan(&config(&"a".repeat(64), "/kubepods", &[])).is_ok());
        let err = plan(&config("a\0b", "/kubepods", &[])).unwrap_err();
        assert!(matches!(err, FixupError::HostnameHasNul { .. }), "{err}");
        // Empty: the node's hostname, resolved when applying.
        assert_eq!(plan(&config("", "/kubepods", &[])).unwrap().hostname(), "");
    }

    #[test]
    fn host_namespaces_are_refused_naming_the_field() {
        let mut c = config("h", "/kubepods", &[]);
        if let Some(l) = c.linux.as_mut() {
            l.security_context = Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    ipc: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let err = plan(&c).unwrap_err();
        assert!(
            err.to_string()
                .contains("linux.security_context.namespace_options.ipc"),
            "{err}"
        );
    }

    #[test]
    fn cgroupfs_parents() {
        let leaf = |p| CgroupLeaf::for_sandbox(p, &id(), "f").map(|l| l.as_str().to_owned());
        assert_eq!(
            leaf("/kubepods/burstable/podx").unwrap(),
            format!("/kubepods/burstable/podx/{ID}")
        );
        assert_eq!(leaf("//kubepods//x/").unwrap(), format!("/kubepods/x/{ID}"));
        assert_eq!(leaf("").unwrap(), format!("/k8s.io/{ID}"));
        assert_eq!(leaf("/").unwrap(), format!("/{ID}"));
        for bad in ["kubepods/x", "/kubepods/../../x", "/a/./b", "/a\0"] {
            let err = CgroupLeaf::for_sandbox(bad, &id(), "linux.cgroup_parent").unwrap_err();
            assert!(
                matches!(
                    err,
                    FixupError::InvalidCgroupParent {
                        field: "linux.cgroup_parent",
                        ..
                    }
                ),
                "{bad:?}: {err}"
            );
        }
        let l = CgroupLeaf::for_sandbox("/kubepods/x", &id(), "f").unwrap();
        assert_eq!(l.relative(), Path::new(&format!("kubepods/x/{ID}")));
    }

    #[test]
    fn systemd_parents_expand_like_runc() {
        let leaf = |p| CgroupLeaf::for_sandbox(p, &id(), "f").map(|l| l.as_str().to_owned());
        assert_eq!(
            leaf("kubepods-besteffort-pod12_34.slice").unwrap(),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12_34.slice/\
                 cri-containerd-{ID}.scope"
            )
        );
        // containerd only looks at the last component.
        assert_eq!(
            leaf("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podx.slice").unwrap(),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podx.slice/\
                 cri-containerd-{ID}.scope"
            )
        );
        assert_eq!(
            leaf("-.slice").unwrap(),
            format!("/cri-containerd-{ID}.scope")
        );
        assert_eq!(
            expand_slice("a-b-c.slice").unwrap(),
            "/a.slice/a-b.slice/a-b-c.slice"
        );
        for bad in ["a--b.slice", "-a.slice", "a-.slice", ".slice"] {
            let err = CgroupLeaf::for_sandbox(bad, &id(), "linux.cgroup_parent").unwrap_err();
            assert!(
                matches!(err, FixupError::InvalidCgroupParent { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn cgroup_move_names_the_bad_side() {
        let err = CgroupMove::new(&id(), "rel", "/kubepods").unwrap_err();
        assert!(
            err.to_string().starts_with("placeholder cgroup parent"),
            "{err}"
        );
        let err = CgroupMove::new(&id(), "/p", "rel").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("PodSandboxConfig field linux.cgroup_parent"),
            "{err}"
        );
        assert!(CgroupMove::new(&id(), "/p", "/p/").unwrap().is_noop());
    }
}
