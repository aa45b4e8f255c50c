//! The real privileged operations. Needs root (`CAP_SYS_ADMIN` for `setns`
//! and `sethostname`), the host's `/proc`, `/sys/fs/cgroup` and cgroup
//! namespace, and the host UTS namespace (the node hostname is this
//! process's, as containerd's `os.Hostname()` is containerd's).

use std::{
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Mutex, PoisonError},
};

use fast_sandbox_cgroup::{Cgroups, HostCgroups, MoveScope};
use nix::sched::CloneFlags;
use rustix::fs::{Mode, OFlags};

use super::{
    kernel::{Namespace, Sysctl},
    ops::NodeOps,
    plan::{proc_sys_path, CgroupLeaf},
    FixupError,
};

/// Where containerd reads the node's resolver configuration.
const NODE_RESOLV_CONF: &str = "/etc/resolv.conf";

/// [`NodeOps`] on this machine.
#[derive(Debug, Clone)]
pub struct RealOps {
    node_resolv_conf: PathBuf,
    worker: NsWorker,
    cgroups: HostCgroups,
}

impl Default for RealOps {
    fn default() -> Self {
        Self::new()
    }
}

impl RealOps {
    pub fn new() -> Self {
        Self {
            node_resolv_conf: NODE_RESOLV_CONF.into(),
            worker: NsWorker::default(),
            cgroups: HostCgroups::default(),
        }
    }

    /// Reads the node's `resolv.conf` from `path` instead of
    /// `/etc/resolv.conf` (a DaemonSet sees its own `/etc`, so it mounts the
    /// host's somewhere else).
    pub fn with_node_resolv_conf(path: impl Into<PathBuf>) -> Self {
        Self {
            node_resolv_conf: path.into(),
            ..Self::new()
        }
    }
}

impl Namespace {
    fn clone_flag(self) -> CloneFlags {
        match self {
            Self::Uts => CloneFlags::CLONE_NEWUTS,
            Self::Net => CloneFlags::CLONE_NEWNET,
            Self::Ipc => CloneFlags::CLONE_NEWIPC,
        }
    }
}

/// A job for the namespace worker.
type Job = Box<dyn FnOnce() + Send>;

/// A long-lived thread that enters a pod's namespace for one job at a time
/// and returns to its own afterwards.
///
/// Why not a fresh thread per job: creating a thread (`clone`) takes the
/// kernel's cgroup thread-group lock for reading, and every cgroup attach on
/// the node (runc starting any container, a slot's cgroup move) takes it
/// for writing across an RCU grace period. A claim that spawned a thread
/// waited up to ~10 ms behind unrelated container starts; a thread that
/// already exists does not.
///
/// `setns` changes only the calling thread, and only this thread ever
/// enters a pod's namespace (never a tokio worker or blocking-pool thread).
/// If it cannot return to its own namespace it exits, and the next job
/// starts a new worker.
#[derive(Debug, Clone, Default)]
struct NsWorker {
    tx: Arc<Mutex<Option<mpsc::Sender<Job>>>>,
}

/// The worker's own namespaces, opened when it starts.
struct HomeNamespaces {
    uts: File,
    net: File,
    ipc: File,
}

impl HomeNamespaces {
    fn open() -> std::io::Result<Self> {
        let open = |ns: &str| File::open(format!("/proc/thread-self/ns/{ns}"));
        Ok(Self {
            uts: open("uts")?,
            net: open("net")?,
            ipc: open("ipc")?,
        })
    }

    fn get(&self, ns: Namespace) -> &File {
        match ns {
            Namespace::Uts => &self.uts,
            Namespace::Net => &self.net,
            Namespace::Ipc => &self.ipc,
        }
    }
}

thread_local! {
    /// Set on the worker thread: its home namespaces, and whether it is
    /// still in them.
    static HOME: std::cell::RefCell<Option<(HomeNamespaces, bool)>> =
        const { std::cell::RefCell::new(None) };
}

impl NsWorker {
    /// The worker's queue, starting the thread if there is none.
    fn sender(&self) -> std::io::Result<mpsc::Sender<Job>> {
        let mut guard = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = guard.as_ref() {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<std::io::Result<()>>(1);
        std::thread::Builder::new()
            .name("fixup-ns".into())
            .spawn(move || {
                match HomeNamespaces::open() {
                    Ok(home) => {
                        HOME.with(|h| *h.borrow_mut() = Some((home, true)));
                        let _ = ready_tx.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                for job in rx {
                    job();
                    // A job that could not return home poisoned this thread.
                    if !HOME.with(|h| h.borrow().as_ref().is_some_and(|(_, at_home)| *at_home)) {
                        tracing::error!(
                            "fix-up worker could not return to its namespaces; replacing it"
                        );
                        return;
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("fix-up worker exited at start"))??;
        *guard = Some(tx.clone());
        Ok(tx)
    }

    /// Forgets a dead worker so the next job starts a new one.
    fn reset(&self) {
        *self.tx.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Runs `f` on the worker inside namespace `ns` of `pid`, and waits.
    fn run<T: Send + 'static>(
        &self,
        pid: i32,
        ns: Namespace,
        f: impl FnOnce() -> Result<T, FixupError> + Send + 'static,
    ) -> Result<T, FixupError> {
        // Opened here, so a failure names the pid before the worker is involved.
        let path = format!("/proc/{pid}/ns/{}", ns.proc_name());
        let ns_file =
            File::open(&path).map_err(|source| FixupError::OpenNamespace { pid, ns, source })?;
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let result = enter_run_return(pid, ns, &ns_file, f);
            let _ = done_tx.send(result);
        });
        let spawn_err = |source| FixupError::SpawnNamespaceThread { pid, ns, source };
        if let Err(mpsc::SendError(job)) = self.sender().map_err(spawn_err)?.send(job) {
            // The worker died since the last job: start a new one, once.
            self.reset();
            self.sender()
                .map_err(spawn_err)?
                .send(job)
                .map_err(|_| FixupError::NamespaceThreadPanicked { pid, ns })?;
        }
        done_rx.recv().map_err(|_| {
            self.reset();
            FixupError::NamespaceThreadPanicked { pid, ns }
        })?
    }
}

/// On the worker: enter `ns` of `pid`, run `f`, return home.
fn enter_run_return<T>(
    pid: i32,
    ns: Namespace,
    target: &File,
    f: impl FnOnce() -> Result<T, FixupError>,
) -> Result<T, FixupError> {
    nix::sched::setns(target, ns.clone_flag()).map_err(|e| FixupError::EnterNamespace {
        pid,
        ns,
        source: e.into(),
    })?;
    let result = f();
    let back = HOME.with(|h| {
        let mut h = h.borrow_mut();
        let Some((home, at_home)) = h.as_mut() else {
            return false;
        };
        *at_home = nix::sched::setns(home.get(ns), ns.clone_flag()).is_ok();
        *at_home
    });
    if !back {
        return Err(FixupError::NamespaceThreadPanicked { pid, ns });
    }
    result
}

fn is_single_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

impl NodeOps for RealOps {
    fn node_hostname(&self) -> Result<String, FixupError> {
        let name = nix::unistd::gethostname()
            .map_err(|e| FixupError::NodeHostname { source: e.into() })?;
        name.into_string()
            .map_err(|raw| FixupError::NodeHostnameNotUtf8 {
                hostname: raw.to_string_lossy().into_owned(),
            })
    }

    fn node_resolv_conf(&self) -> Result<Vec<u8>, FixupError> {
        fs::read(&self.node_resolv_conf).map_err(|source| FixupError::NodeResolvConf {
            path: self.node_resolv_conf.clone(),
            source,
        })
    }

    fn write_file_in_place(
        &self,
        dir: &Path,
        name: &str,
        contents: &[u8],
    ) -> Result<(), FixupError> {
        if !is_single_component(name) {
            return Err(FixupError::InvalidFileName {
                name: name.to_owned(),
            });
        }
        let path = dir.join(name);
        let dir_fd = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FixupError::OpenSandboxDir {
            path: dir.to_owned(),
            source: e.into(),
        })?;
        // No O_CREAT: containerd wrote the file at RunPodSandbox, and a
        // missing one means this is not the sandbox we think. O_NONBLOCK so a
        // FIFO planted there cannot block us; it is then refused below.
        let fd = rustix::fs::openat(
            &dir_fd,
            name,
            OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FixupError::OpenSandboxFile {
            path: path.clone(),
            source: e.into(),
        })?;
        let mut file = File::from(fd);
        let is_file = file
            .metadata()
            .map_err(|source| FixupError::OpenSandboxFile {
                path: path.clone(),
                source,
            })?
            .is_file();
        if !is_file {
            return Err(FixupError::NotARegularFile { path });
        }
        // What containerd's os.WriteFile does to an existing file (O_TRUNC,
        // write), and like it without fsync: readers (bind mounts, the next
        // CreateContainer) see the page cache, and the files are worthless
        // after a node crash anyway (the pause is gone with it). fsync cost
        // 0.15-0.6 ms per file here.
        file.set_len(0)
            .and_then(|()| file.write_all(contents))
            .map_err(|source| FixupError::WriteSandboxFile { path, source })
    }

    fn set_hostname_in_uts_ns(&self, pid: i32, hostname: &str) -> Result<(), FixupError> {
        let hostname = hostname.to_owned();
        self.worker.run(pid, Namespace::Uts, move || {
            nix::unistd::sethostname(&hostname).map_err(|e| FixupError::SetHostname {
                pid,
                hostname: hostname.clone(),
                source: e.into(),
            })
        })
    }

    fn write_sysctls_in_ns(
        &self,
        pid: i32,
        ns: Namespace,
        sysctls: &[Sysctl],
    ) -> Result<(), FixupError> {
        let sysctls = sysctls.to_vec();
        self.worker.run(pid, ns, move || {
            for s in &sysctls {
                // /proc/sys/net and the IPC/UTS tables resolve against the
                // namespaces of the task doing the lookup: this thread.
                let path = proc_sys_path(&s.name);
                fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(s.value.as_bytes()))
                    .map_err(|source| FixupError::WriteSysctl {
                        pid,
                        ns,
                        name: s.name.clone(),
                        path,
                        source,
                    })?;
            }
            Ok(())
        })
    }

    fn move_to_cgroup(
        &self,
        pid: i32,
        from: &CgroupLeaf,
        to: &CgroupLeaf,
    ) -> Result<(), FixupError> {
        Ok(self.cgroups.move_pid(pid, from, to, MoveScope::Every)?)
    }

    fn remove_cgroup(&self, leaf: &CgroupLeaf) -> Result<(), FixupError> {
        match self.cgroups.remove(leaf)?.into_iter().next() {
            Some(first) => Err(first.into()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_must_be_one_component() {
        for bad in ["", ".", "..", "a/b", "/etc", "x\0"] {
            let err = RealOps::new()
                .write_file_in_place(Path::new("/nonexistent"), bad, b"")
                .unwrap_err();
            assert!(
                matches!(err, FixupError::InvalidFileName { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn rewrites_in_place_keeping_the_inode() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        fs::write(&path, "nameserver 10.209.0.10\nsearch a b c d e f\n").unwrap();
        let before = fs::metadata(&path).unwrap();
        RealOps::new()
            .write_file_in_place(dir.path(), "resolv.conf", b"nameserver 1.1.1.1\n")
            .unwrap();
        let after = fs::metadata(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "nameserver 1.1.1.1\n");
        assert_eq!((before.dev(), before.ino()), (after.dev(), after.ino()));
        assert_eq!(after.mode() & 0o7777, before.mode() & 0o7777);
    }

    #[test]
    fn refuses_symlinks_missing_files_and_non_files() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("hostname")).unwrap();
        let ops = RealOps::new();
        let err = ops
            .write_file_in_place(dir.path(), "hostname", b"x\n")
            .unwrap_err();
        assert!(matches!(err, FixupError::OpenSandboxFile { .. }), "{err}");
        assert_eq!(fs::read(outside.path()).unwrap(), b"");

        let err = ops
            .write_file_in_place(dir.path(), "resolv.conf", b"x")
            .unwrap_err();
        assert!(matches!(err, FixupError::OpenSandboxFile { .. }), "{err}");
        assert!(!dir.path().join("resolv.conf").exists());

        fs::create_dir(dir.path().join("sub")).unwrap();
        let err = ops
            .write_file_in_place(dir.path(), "sub", b"x")
            .unwrap_err();
        assert!(matches!(err, FixupError::OpenSandboxFile { .. }), "{err}");

        // The sandbox directory itself must not be a symlink either.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        fs::write(dir.path().join("hosts"), "").unwrap();
        let err = ops.write_file_in_place(&link, "hosts", b"x").unwrap_err();
        assert!(matches!(err, FixupError::OpenSandboxDir { .. }), "{err}");
    }

    #[test]
    fn node_reads() {
        let f = tempfile::NamedTempFile::new().unwrap();
        fs::write(f.path(), b"nameserver 9.9.9.9\n").unwrap();
        let ops = RealOps::with_node_resolv_conf(f.path());
        assert_eq!(ops.node_resolv_conf().unwrap(), b"nameserver 9.9.9.9\n");
        assert!(!ops.node_hostname().unwrap().is_empty());
        let err = RealOps::with_node_resolv_conf("/nonexistent/resolv.conf")
            .node_resolv_conf()
            .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/resolv.conf"),
            "{err}"
        );
    }

    #[test]
    fn namespace_errors_name_the_pid() {
        // A pid that cannot exist (above pid_max's hard limit).
        let err = RealOps::new()
            .set_hostname_in_uts_ns(i32::MAX, "x")
            .unwrap_err();
        assert!(
            matches!(
                err,
                FixupError::OpenNamespace {
                    pid: i32::MAX,
                    ns: Namespace::Uts,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&i32::MAX.to_string()), "{err}");
    }
}
