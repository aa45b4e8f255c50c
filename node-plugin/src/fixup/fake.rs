//! A [`NodeOps`] that only records what it was asked to do, for unit tests
//! of anything that drives fix-ups (no root, no containerd).

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use fast_sandbox_cgroup::CgroupError;

use super::{
    kernel::{Namespace, Sysctl},
    ops::NodeOps,
    plan::CgroupLeaf,
    FixupError,
};

/// One call made to a [`RecordingOps`], with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    NodeHostname,
    NodeResolvConf,
    WriteFile {
        dir: PathBuf,
        name: String,
        contents: Vec<u8>,
    },
    SetHostname {
        pid: i32,
        hostname: String,
    },
    WriteSysctls {
        pid: i32,
        ns: Namespace,
        /// `(name, value)` in the order given.
        sysctls: Vec<(String, String)>,
    },
    MoveToCgroup {
        pid: i32,
        from: String,
        to: String,
    },
    RemoveCgroup {
        leaf: String,
    },
}

/// Records every call; optionally fails the Nth one (counting from 1, every
/// kind of call counts) with the error the real operation would return for
/// an I/O failure (`EIO`). The failing call is recorded too.
#[derive(Debug)]
pub struct RecordingOps {
    calls: Mutex<Vec<Call>>,
    fail_at: Option<usize>,
    node_hostname: String,
    node_resolv_conf: Vec<u8>,
}

impl Default for RecordingOps {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordingOps {
    /// The node it pretends to be on.
    pub const NODE_HOSTNAME: &'static str = "node-1";
    pub const NODE_RESOLV_CONF: &'static str = "nameserver 192.0.2.53\nsearch node.example\n";
    pub const NODE_RESOLV_CONF_PATH: &'static str = "/etc/resolv.conf";

    /// Succeeds at everything.
    pub fn new() -> Self {
        Self {
            calls: Mutex::new(Vec::new()),
            fail_at: None,
            node_hostname: Self::NODE_HOSTNAME.to_owned(),
            node_resolv_conf: Self::NODE_RESOLV_CONF.as_bytes().to_vec(),
        }
    }

    /// Fails the `n`th call (1-based) and succeeds at the others.
    pub fn failing_at(n: usize) -> Self {
        Self {
            fail_at: Some(n),
            ..Self::new()
        }
    }

    /// Everything called so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Call>> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `call`; true when this one must fail.
    fn record(&self, call: Call) -> bool {
        let mut calls = self.lock();
        calls.push(call);
        self.fail_at == Some(calls.len())
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(nix::libc::EIO)
}

impl NodeOps for RecordingOps {
    fn node_hostname(&self) -> Result<String, FixupError> {
        if self.record(Call::NodeHostname) {
            return Err(FixupError::NodeHostname { source: eio() });
        }
        Ok(self.node_hostname.clone())
    }

    fn node_resolv_conf(&self) -> Result<Vec<u8>, FixupError> {
        if self.record(Call::NodeResolvConf) {
            return Err(FixupError::NodeResolvConf {
                path: Self::NODE_RESOLV_CONF_PATH.into(),
                source: eio(),
            });
        }
        Ok(self.node_resolv_conf.clone())
    }

    fn write_file_in_place(
        &self,
        dir: &Path,
        name: &str,
        contents: &[u8],
    ) -> Result<(), FixupError> {
        let call = Call::WriteFile {
            dir: dir.to_owned(),
            name: name.to_owned(),
            contents: contents.to_vec(),
        };
        if self.record(call) {
            return Err(FixupError::WriteSandboxFile {
                path: dir.join(name),
                source: eio(),
            });
        }
        Ok(())
    }

    fn set_hostname_in_uts_ns(&self, pid: i32, hostname: &str) -> Result<(), FixupError> {
        let call = Call::SetHostname {
            pid,
            hostname: hostname.to_owned(),
        };
        if self.record(call) {
            return Err(FixupError::SetHostname {
                pid,
                hostname: hostname.to_owned(),
                source: eio(),
            });
        }
        Ok(())
    }

    fn write_sysctls_in_ns(
        &self,
        pid: i32,
        ns: Namespace,
        sysctls: &[Sysctl],
    ) -> Result<(), FixupError> {
        let call = Call::WriteSysctls {
            pid,
            ns,
            sysctls: sysctls
                .iter()
                .map(|s| (s.name.clone(), s.value.clone()))
                .collect(),
        };
        if self.record(call) {
            let name = sysctls.first().map(|s| s.name.clone()).unwrap_or_default();
            return Err(FixupError::WriteSysctl {
                pid,
                ns,
                path: super::plan::proc_sys_path(&name),
                name,
                source: eio(),
            });
        }
        Ok(())
    }

    fn move_to_cgroup(
        &self,
        pid: i32,
        from: &CgroupLeaf,
        to: &CgroupLeaf,
    ) -> Result<(), FixupError> {
        let call = Call::MoveToCgroup {
            pid,
            from: from.as_str().to_owned(),
            to: to.as_str().to_owned(),
        };
        if self.record(call) {
            return Err(CgroupError::Write {
                path: Path::new("/sys/fs/cgroup/cpu")
                    .join(to.relative())
                    .join("cgroup.procs"),
                value: pid.to_string(),
                source: eio(),
            }
            .into());
        }
        Ok(())
    }

    fn remove_cgroup(&self, leaf: &CgroupLeaf) -> Result<(), FixupError> {
        let call = Call::RemoveCgroup {
            leaf: leaf.as_str().to_owned(),
        };
        if self.record(call) {
            return Err(CgroupError::Remove {
                path: Path::new("/sys/fs/cgroup/cpu").join(leaf.relative()),
                source: eio(),
            }
            .into());
        }
        Ok(())
    }
}
