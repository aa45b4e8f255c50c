//! The privileged operations of the `guest-exec` fix-up (gVisor, Kata):
//! runtimes whose pause is not a host process, so the hostname is set by a
//! command run *inside* the sandbox, and every host process of the sandbox
//! (sentry, gofer, the adapter's waiter; a VMM, virtiofsd) moves to the
//! pod's cgroup, not just one pause pid. Behind [`GuestOps`] so the
//! sequencing in `guest.rs` is tested with [`RecordingGuestOps`].

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use fast_sandbox_cgroup::{Cgroups as _, HostCgroups, MoveScope};

use super::{
    guest_channel::{self, ChannelError},
    plan::CgroupLeaf,
    FixupError,
};
use crate::{blocking::BlockingError, random::NoRandomness};

/// What can fail in a guest operation.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("starting {program:?}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program:?} exited with {status}: {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("{program:?} did not finish within {deadline:?}")]
    Timeout { program: String, deadline: Duration },
    /// A node operation (sandbox files, cgroupfs) failed.
    #[error(transparent)]
    Node(#[from] FixupError),
    #[error("the blocking task")]
    Blocking(#[from] BlockingError),
    #[error(transparent)]
    Random(#[from] NoRandomness),
    #[error(
        "processes still in cgroup {leaf} after {rounds} rounds of moves in {elapsed:?}: {}",
        ProcFacts::list(left)
    )]
    LeafNotEmpty {
        leaf: String,
        rounds: usize,
        elapsed: Duration,
        /// Each live process still listed, as read when the move gave up.
        left: Vec<ProcFacts>,
    },
}

/// What `/proc/<pid>/stat` says of a process listed in a leaf cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcFacts {
    pub pid: i32,
    /// The state letter (`R`, `S`, `D`, `Z`, ...).
    pub state: char,
    pub comm: String,
    pub ppid: i32,
    /// The kernel's `PF_EXITING`: the process is in its exit (freeing its
    /// memory can take hundreds of ms). The kernel skips it when its pid
    /// is written to another `cgroup.procs` (the write succeeds) and lists
    /// it in its old cgroup until the exit ends.
    pub exiting: bool,
}

/// `PF_EXITING` in `/proc/<pid>/stat`'s flags (include/linux/sched.h).
const PF_EXITING: u32 = 0x4;

impl ProcFacts {
    /// An exiting, zombie or dead process: it cannot be moved and is
    /// going away with its memory, so it is not left behind.
    pub fn is_leaving(&self) -> bool {
        self.exiting || matches!(self.state, 'Z' | 'X' | 'x')
    }

    /// `[facts, facts]`, for logs and errors.
    pub fn list(left: &[Self]) -> String {
        let each: Vec<String> = left.iter().map(Self::to_string).collect();
        format!("[{}]", each.join(", "))
    }
}

impl fmt::Display for ProcFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}) state {}{} parent {}",
            self.pid,
            self.comm,
            self.state,
            if self.exiting { " exiting" } else { "" },
            self.ppid
        )
    }
}

/// Privileged operations of the `guest-exec` fix-up.
#[tonic::async_trait]
pub trait GuestOps: Send + Sync + fmt::Debug {
    /// Runs `argv` (absolute program path first) to completion; `Ok` when
    /// it exits 0 within `deadline`. The child is killed on timeout.
    async fn run(&self, argv: &[String], deadline: Duration) -> Result<(), GuestError>;

    /// Sets `hostname` through the pause's hostname channel in `dir`
    /// (`guest_channel.rs`), answered within `deadline`.
    async fn channel_hostname(
        &self,
        dir: PathBuf,
        hostname: &str,
        deadline: Duration,
    ) -> Result<(), ChannelError>;

    /// The PIDs in the leaf cgroup `leaf`, in any mounted hierarchy.
    fn cgroup_procs(&self, leaf: &CgroupLeaf) -> Result<Vec<i32>, GuestError>;

    /// Moves `pid` from `from` to `to` in every hierarchy where it is in
    /// `from` (others are left alone). A process that exited meanwhile is
    /// not an error.
    fn move_process(&self, pid: i32, from: &CgroupLeaf, to: &CgroupLeaf) -> Result<(), GuestError>;

    /// `pid`'s state, name and parent; `None` once it is gone (reaped).
    fn process(&self, pid: i32) -> Option<ProcFacts>;
}

/// The real [`GuestOps`]: `tokio::process`, cgroupfs.
#[derive(Debug, Default)]
pub struct RealGuestOps;

#[tonic::async_trait]
impl GuestOps for RealGuestOps {
    async fn run(&self, argv: &[String], deadline: Duration) -> Result<(), GuestError> {
        let (program, args) = argv.split_first().ok_or_else(|| GuestError::Spawn {
            program: String::new(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| GuestError::Spawn {
                program: program.clone(),
                source,
            })?;
        let out = match tokio::time::timeout(deadline, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(source)) => {
                return Err(GuestError::Spawn {
                    program: program.clone(),
                    source,
                })
            }
            Err(_) => {
                return Err(GuestError::Timeout {
                    program: program.clone(),
                    deadline,
                })
            }
        };
        if out.status.success() {
            return Ok(());
        }
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        stderr.truncate(1024);
        Err(GuestError::Failed {
            program: program.clone(),
            status: out.status.to_string(),
            stderr,
        })
    }

    async fn channel_hostname(
        &self,
        dir: PathBuf,
        hostname: &str,
        deadline: Duration,
    ) -> Result<(), ChannelError> {
        guest_channel::set_hostname(dir, hostname, deadline).await
    }

    fn cgroup_procs(&self, leaf: &CgroupLeaf) -> Result<Vec<i32>, GuestError> {
        Ok(HostCgroups::default()
            .procs(leaf)
            .map_err(FixupError::from)?)
    }

    fn move_process(&self, pid: i32, from: &CgroupLeaf, to: &CgroupLeaf) -> Result<(), GuestError> {
        match HostCgroups::default().move_pid(pid, from, to, MoveScope::WhereIn) {
            Ok(()) => Ok(()),
            Err(_) if !Path::new(&format!("/proc/{pid}")).exists() => Ok(()),
            Err(e) => Err(FixupError::from(e).into()),
        }
    }

    fn process(&self, pid: i32) -> Option<ProcFacts> {
        let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
        Some(ProcFacts {
            pid,
            state: stat.state,
            comm: stat.comm,
            ppid: stat.ppid,
            exiting: stat.flags & PF_EXITING != 0,
        })
    }
}

/// One call made to a [`RecordingGuestOps`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestCall {
    Run(Vec<String>),
    Channel { dir: PathBuf, hostname: String },
    CgroupProcs(String),
    Move { pid: i32, from: String, to: String },
}

/// What a [`RecordingGuestOps`]'s hostname channel does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FakeChannel {
    /// No channel (an old pause or adapter).
    #[default]
    Absent,
    /// The pause sets the name.
    Answers,
    /// The pause answers an error.
    Refuses,
}

/// Records calls; `run` fails when told to; the channel does what
/// [`FakeChannel`] says; `cgroup_procs` answers from a
/// script of successive answers (then empty); `process` answers a
/// sleeping `fake` process unless [`RecordingGuestOps::with_state`] or
/// [`RecordingGuestOps::with_exiting`] say otherwise.
#[derive(Debug, Default)]
pub struct RecordingGuestOps {
    calls: Mutex<Vec<GuestCall>>,
    fail_run: bool,
    channel: FakeChannel,
    procs: Mutex<Vec<Vec<i32>>>,
    states: HashMap<i32, Option<char>>,
    exiting: HashSet<i32>,
}

impl RecordingGuestOps {
    /// A fake whose leaf holds `procs` (each inner list is what one listing
    /// returns, in order; then the leaf is empty).
    pub fn with_procs(procs: Vec<Vec<i32>>) -> Self {
        Self {
            procs: Mutex::new(procs),
            ..Self::default()
        }
    }

    /// A fake whose `run` fails.
    pub fn failing_run() -> Self {
        Self {
            fail_run: true,
            ..Self::default()
        }
    }

    /// This fake with its channel doing `channel`.
    pub fn with_channel(self, channel: FakeChannel) -> Self {
        Self { channel, ..self }
    }

    /// This fake with `pid` in `state` (`None`: gone).
    pub fn with_state(mut self, pid: i32, state: Option<char>) -> Self {
        self.states.insert(pid, state);
        self
    }

    /// This fake with `pid` in its exit (`PF_EXITING`).
    pub fn with_exiting(mut self, pid: i32) -> Self {
        self.exiting.insert(pid);
        self
    }

    pub fn calls(&self) -> Vec<GuestCall> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, call: GuestCall) {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(call);
    }
}

#[tonic::async_trait]
impl GuestOps for RecordingGuestOps {
    async fn run(&self, argv: &[String], _deadline: Duration) -> Result<(), GuestError> {
        self.record(GuestCall::Run(argv.to_vec()));
        if self.fail_run {
            return Err(GuestError::Failed {
                program: argv.first().cloned().unwrap_or_default(),
                status: "exit status: 1".to_owned(),
                stderr: "fake failure".to_owned(),
            });
        }
        Ok(())
    }

    async fn channel_hostname(
        &self,
        dir: PathBuf,
        hostname: &str,
        _deadline: Duration,
    ) -> Result<(), ChannelError> {
        self.record(GuestCall::Channel {
            dir: dir.clone(),
            hostname: hostname.to_owned(),
        });
        match self.channel {
            FakeChannel::Absent => Err(ChannelError::Absent(dir)),
            FakeChannel::Answers => Ok(()),
            FakeChannel::Refuses => Err(ChannelError::Refused("fake refusal".to_owned())),
        }
    }

    fn cgroup_procs(&self, leaf: &CgroupLeaf) -> Result<Vec<i32>, GuestError> {
        self.record(GuestCall::CgroupProcs(leaf.as_str().to_owned()));
        let mut procs = self.procs.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(if procs.is_empty() {
            Vec::new()
        } else {
            procs.remove(0)
        })
    }

    fn move_process(&self, pid: i32, from: &CgroupLeaf, to: &CgroupLeaf) -> Result<(), GuestError> {
        self.record(GuestCall::Move {
            pid,
            from: from.as_str().to_owned(),
            to: to.as_str().to_owned(),
        });
        Ok(())
    }

    fn process(&self, pid: i32) -> Option<ProcFacts> {
        let state = self.states.get(&pid).copied().unwrap_or(Some('S'))?;
        Some(ProcFacts {
            pid,
            state,
            comm: "fake".to_owned(),
            ppid: 1,
            exiting: self.exiting.contains(&pid),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    /// `process` on real `/proc` (no root needed): a live child, then the
    /// same child as a zombie, then gone once reaped.
    #[test]
    fn process_reads_state_name_and_parent_and_none_once_reaped() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let ops = RealGuestOps;
        let live = ops.process(pid).expect("live child");
        assert_eq!(live.comm, "sleep");
        assert_eq!(live.ppid, i32::try_from(std::process::id()).expect("pid"));
        assert!(!live.is_leaving(), "{live}");
        child.kill().expect("kill");
        // Await the exit without reaping: the child is then a zombie.
        let child_pid = nix::unistd::Pid::from_raw(pid);
        let flags = nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT;
        nix::sys::wait::waitid(nix::sys::wait::Id::Pid(child_pid), flags).expect("waitid");
        let zombie = ops.process(pid).expect("a zombie before the reap");
        assert_eq!(zombie.state, 'Z', "{zombie}");
        assert!(zombie.is_leaving(), "{zombie}");
        child.wait().expect("reap");
        assert_eq!(ops.process(pid), None);
    }
}
