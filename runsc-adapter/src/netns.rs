//! gVisor's own network stack (`--network=sandbox`) on kernels where runsc's
//! root-netns check misfires.
//!
//! With `--network=sandbox`, `runsc start` of a pod's first container copies
//! the interfaces, addresses and routes of the sandbox process's network
//! namespace into the sentry's netstack and removes the addresses from the
//! host side (gVisor `runsc/sandbox/network.go`, `setupNetwork` →
//! `createInterfacesAndRoutesFromNS`, called from `Sandbox.StartRoot`).
//! Before that it refuses to work in the root network namespace, whose
//! addresses it would strip. runsc up to release-20240729.0 (Debian
//! bookworm-backports' 0.0~20240729.0) decides "root" by whether
//! `/proc/sys/net/core/rmem_default` exists after joining the namespace
//! (`isRootNS`). Linux commit 19249c0724f2 ("net: make
//! net.core.{r,w}mem_{default,max} namespaced") put that file in every
//! netns (this node's 6.18 kernel has it; `ip netns exec X ls
//! /proc/sys/net/core` shows it, and no `dev_weight`), so runsc fails with "cannot run with network enabled in root network
//! namespace" although the sandbox is in the pod's netns. gVisor fixed the
//! check two days after that release (commit 19f6b0c07, "Use
//! /proc/sys/net/core/dev_weight to determine if we are in the root netns",
//! first in release-20240807.0).
//!
//! The adapter does the check itself, on what runsc will copy (the
//! namespace of `/proc/<sandbox pid>/ns/net`): when it is not this
//! process's network namespace and has no `/proc/sys/net/core/dev_weight`
//! (gVisor's corrected check: only the initial namespace has that file),
//! `runsc start` runs in a private
//! mount namespace (host mounts propagate in, none out) where a read-only
//! empty tmpfs hides `/proc/sys/net/core` as seen from that pod namespace.
//! The mount must be made from inside the pod's netns: sysctl directories
//! under `/proc/sys/net` are looked up per network namespace, so a mount
//! made from the host's namespace does not cover the pod's. Nothing else
//! `runsc start` does reads `/proc/sys/net/core`. A sandbox in the host's
//! namespace is left to runsc, which then refuses it as it should.

use std::{fs::File, os::unix::fs::MetadataExt as _, path::PathBuf};

use nix::{
    mount::{mount, MsFlags},
    sched::{setns, unshare, CloneFlags},
};

use crate::error::AdapterError;

/// The directory runsc's check looks into.
pub const NET_CORE: &str = "/proc/sys/net/core";

/// A network namespace's identity (device and inode of its nsfs file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

/// The privileged operations, behind a trait so tests can fake them.
pub trait NetnsOps {
    /// The network namespace of process `pid` (`None`: this process).
    fn netns(&self, pid: Option<u32>) -> Result<NsId, AdapterError>;
    /// Whether the network namespace of `pid` is the initial one: whether
    /// `/proc/sys/net/core/dev_weight` exists in it (gVisor's check since
    /// release-20240807.0).
    fn is_initial_netns(&self, pid: u32) -> Result<bool, AdapterError>;
    /// Moves this process into a new mount namespace (slave to the host's)
    /// and hides [`NET_CORE`] there as seen from the network namespace of
    /// `pid`. This process ends in its own network namespace, or the error
    /// is [`AdapterError::NetnsReturn`].
    fn hide_net_core(&self, pid: u32) -> Result<(), AdapterError>;
}

/// What the adapter does before `runsc start` of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: runsc copies no network namespace at this start.
    Nothing,
    /// The sandbox is in a pod namespace: hide runsc's misleading file.
    Hide { sandbox_pid: u32 },
    /// The sandbox shares a host namespace: leave runsc's check to refuse.
    LeaveToRunsc { why: String },
}

/// The network mode the runsc flags select (`--network`/`-network`, as
/// `=value` or a separate value; the last one counts; runsc's default is
/// `sandbox`).
pub fn network_mode(flags: &[String]) -> &str {
    let mut mode = "sandbox";
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        let name = f.trim_start_matches('-');
        if f.starts_with('-') && name == "network" {
            if let Some(v) = it.next() {
                mode = v;
            }
        } else if let Some(v) = name.strip_prefix("network=").filter(|_| f.starts_with('-')) {
            mode = v;
        }
    }
    mode
}

/// Whether runsc makes a new sandbox for a container with these OCI
/// annotations (its first container), as runsc's `ShouldCreateSandbox`
/// decides: containerd's or CRI-O's container type is `sandbox`, or absent.
pub fn creates_sandbox(annotations: &std::collections::HashMap<String, String>) -> bool {
    const KEYS: [&str; 2] = [
        "io.kubernetes.cri.container-type",
        "io.kubernetes.cri-o.ContainerType",
    ];
    KEYS.iter()
        .find_map(|k| annotations.get(*k))
        .is_none_or(|t| t == "sandbox")
}

/// Decides what to do before `runsc start` of a container whose sandbox
/// process is `sandbox_pid` (recorded at `create` for a pod's first
/// container only) with these runsc flags.
pub fn plan(ops: &dyn NetnsOps, flags: &[String], sandbox_pid: Option<u32>) -> Plan {
    let Some(pid) = sandbox_pid else {
        return Plan::Nothing;
    };
    if network_mode(flags) != "sandbox" {
        return Plan::Nothing;
    }
    let leave = |why: String| Plan::LeaveToRunsc { why };
    match (ops.netns(Some(pid)), ops.netns(None)) {
        (Ok(target), Ok(own)) if target == own => {
            return leave(format!(
                "sandbox {pid} is in this process's network namespace"
            ))
        }
        (Ok(_), Ok(_)) => {}
        (Err(e), _) | (_, Err(e)) => return leave(e.to_string()),
    }
    match ops.is_initial_netns(pid) {
        Ok(false) => Plan::Hide { sandbox_pid: pid },
        Ok(true) => leave(format!("sandbox {pid} is in the initial network namespace")),
        Err(e) => leave(e.to_string()),
    }
}

/// The real operations, on this host.
pub struct HostNetns;

fn nsfs(pid: Option<u32>) -> PathBuf {
    match pid {
        Some(p) => PathBuf::from(format!("/proc/{p}/ns/net")),
        None => PathBuf::from("/proc/self/ns/net"),
    }
}

fn open(path: &std::path::Path) -> Result<File, AdapterError> {
    File::open(path).map_err(|e| AdapterError::io("open", path, e))
}

fn sys(what: &'static str, path: &str, e: nix::Error) -> AdapterError {
    AdapterError::io(what, path, std::io::Error::from(e))
}

impl NetnsOps for HostNetns {
    fn netns(&self, pid: Option<u32>) -> Result<NsId, AdapterError> {
        let path = nsfs(pid);
        let m = std::fs::metadata(&path).map_err(|e| AdapterError::io("stat", &path, e))?;
        Ok(NsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    fn is_initial_netns(&self, pid: u32) -> Result<bool, AdapterError> {
        let target = open(&nsfs(Some(pid)))?;
        // On a thread of its own: setns changes only the calling thread's
        // network namespace, and this one ends with the answer.
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&target, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    sys("join network namespace", &format!("/proc/{pid}/ns/net"), e)
                })?;
                let probe = format!("{NET_CORE}/dev_weight");
                match std::fs::metadata(&probe) {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(AdapterError::io("stat", probe, e)),
                }
            })
            .join()
            .unwrap_or_else(|_| Err(AdapterError::Usage("netns probe thread panicked".into())))
        })
    }

    fn hide_net_core(&self, pid: u32) -> Result<(), AdapterError> {
        // Opened first: after the unshare these paths still resolve (same
        // /proc), but failing before any change is simpler to reason about.
        let own = open(&nsfs(None))?;
        let target = open(&nsfs(Some(pid)))?;
        unshare(CloneFlags::CLONE_NEWNS).map_err(|e| sys("unshare mount namespace", "/", e))?;
        // Host mounts keep reaching this namespace; ours never leave it.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&str>,
        )
        .map_err(|e| sys("make slave", "/", e))?;
        setns(&target, CloneFlags::CLONE_NEWNET)
            .map_err(|e| sys("join network namespace", &format!("/proc/{pid}/ns/net"), e))?;
        let hidden = mount(
            Some("fast-sandbox-runsc"),
            NET_CORE,
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=4k,mode=0555"),
        )
        .map_err(|e| sys("mount tmpfs on", NET_CORE, e));
        // Back home before anything else runs: `runsc start` must start in
        // the adapter's (containerd's) network namespace, as without this.
        setns(&own, CloneFlags::CLONE_NEWNET).map_err(|e| AdapterError::NetnsReturn(e.into()))?;
        hidden
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::HashMap};

    use super::*;

    /// Namespaces by pid (`None`: the adapter; namespace 1 is the
    /// initial one), recording hide calls.
    struct Fake {
        ns: HashMap<Option<u32>, u64>,
        hidden: RefCell<Vec<u32>>,
    }

    impl Fake {
        fn new(own_ns: u64, sandbox_ns: u64) -> Self {
            Self {
                ns: HashMap::from([(None, own_ns), (Some(42), sandbox_ns)]),
                hidden: RefCell::new(Vec::new()),
            }
        }
    }

    impl NetnsOps for Fake {
        fn netns(&self, pid: Option<u32>) -> Result<NsId, AdapterError> {
            self.ns
                .get(&pid)
                .map(|&ino| NsId { dev: 4, ino })
                .ok_or_else(|| {
                    AdapterError::io("stat", nsfs(pid), std::io::ErrorKind::NotFound.into())
                })
        }

        fn is_initial_netns(&self, pid: u32) -> Result<bool, AdapterError> {
            Ok(self.netns(Some(pid))?.ino == 1)
        }

        fn hide_net_core(&self, pid: u32) -> Result<(), AdapterError> {
            self.hidden.borrow_mut().push(pid);
            Ok(())
        }
    }

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn network_mode_follows_runscs_flag_syntax() {
        assert_eq!(network_mode(&[]), "sandbox");
        assert_eq!(network_mode(&v(&["--platform=systrap"])), "sandbox");
        assert_eq!(network_mode(&v(&["--network=host"])), "host");
        assert_eq!(network_mode(&v(&["-network", "none"])), "none");
        assert_eq!(
            network_mode(&v(&["--network=host", "--network", "sandbox"])),
            "sandbox"
        );
        // A value that merely looks like the flag is not the flag.
        assert_eq!(network_mode(&v(&["--log", "network=host"])), "sandbox");
    }

    #[test]
    fn a_pod_netns_is_hidden_for_the_first_container_only() {
        let fake = Fake::new(1, 7);
        let flags = v(&["--network=sandbox", "--platform=systrap"]);
        assert_eq!(
            plan(&fake, &flags, Some(42)),
            Plan::Hide { sandbox_pid: 42 }
        );
        // A later container (no sandbox pid recorded) copies no network.
        assert_eq!(plan(&fake, &flags, None), Plan::Nothing);
        assert!(fake.hidden.borrow().is_empty(), "plan only decides");
    }

    #[test]
    fn host_networking_needs_nothing() {
        let fake = Fake::new(1, 7);
        for flags in [v(&["--network=host"]), v(&["--network=none"])] {
            assert_eq!(plan(&fake, &flags, Some(42)), Plan::Nothing);
        }
    }

    #[test]
    fn a_sandbox_in_the_hosts_netns_is_left_to_runscs_refusal() {
        let fake = Fake::new(1, 1);
        match plan(&fake, &[], Some(42)) {
            Plan::LeaveToRunsc { why } => assert!(why.contains("this process"), "{why}"),
            other => panic!("{other:?}"),
        }
        // The initial namespace, when the adapter runs in another one.
        let fake = Fake::new(9, 1);
        match plan(&fake, &[], Some(42)) {
            Plan::LeaveToRunsc { why } => assert!(why.contains("initial"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unreadable_sandbox_netns_is_left_to_runsc() {
        let fake = Fake::new(1, 7);
        match plan(&fake, &[], Some(43)) {
            Plan::LeaveToRunsc { why } => assert!(why.contains("/proc/43/ns/net"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// The real probe: this process's netns is the initial one on these
    /// machines, a fresh one made by `unshare --net` is not (it has
    /// `rmem_default` on this kernel, which is why runsc 20240729 erred).
    #[test]
    fn the_dev_weight_probe_tells_a_fresh_netns_from_the_initial_one() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: needs root (setns, another process's netns)");
            return;
        }
        let mut child = std::process::Command::new("unshare")
            .args(["--net", "sleep", "30"])
            .spawn()
            .expect("unshare --net");
        let own = HostNetns.netns(None).expect("own netns");
        let mut fresh = None;
        for _ in 0..200 {
            match HostNetns.netns(Some(child.id())) {
                Ok(ns) if ns != own => {
                    fresh = Some(ns);
                    break;
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        let result = HostNetns.is_initial_netns(child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(fresh.is_some(), "the child never entered a new netns");
        assert!(
            !result.expect("probe"),
            "a fresh netns is not the initial one"
        );
        let me = std::process::id();
        assert!(HostNetns.is_initial_netns(me).expect("probe"));
    }

    #[test]
    fn the_first_container_is_the_one_runsc_makes_a_sandbox_for() {
        let ann = |k: &str, v: &str| HashMap::from([(k.to_owned(), v.to_owned())]);
        assert!(creates_sandbox(&HashMap::new()));
        assert!(creates_sandbox(&ann(
            "io.kubernetes.cri.container-type",
            "sandbox"
        )));
        assert!(!creates_sandbox(&ann(
            "io.kubernetes.cri.container-type",
            "container"
        )));
        assert!(!creates_sandbox(&ann(
            "io.kubernetes.cri-o.ContainerType",
            "container"
        )));
    }
}
