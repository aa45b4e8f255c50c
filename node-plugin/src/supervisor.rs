//! `fast-sandbox-node supervise -- serve ...`: the container's first
//! process, which keeps the CRI server running without kubelet.
//!
//! Once kubelet's runtime endpoint is the shim, kubelet cannot restart the
//! node plugin's container: restarting it is a CRI call to the process that
//! just died (docs/deploy.md, "The bootstrap loop"). The supervisor runs
//! the serving process as its child and:
//!
//! - restarts it as soon as it exits or is killed (OOM kill, panic, kill -9),
//!   without waiting on anything; only repeated fast crashes (runs shorter
//!   than [`Backoff::min_uptime`]) back off, doubling from
//!   [`Backoff::first_delay`] up to [`Backoff::max_delay`];
//! - forwards SIGTERM and SIGINT to it, and once it has stopped exits with
//!   its status: a graceful stop of the container is the server's;
//! - is the child subreaper of everything the server starts, and reaps
//!   whatever is orphaned under it (with `hostPID: true` the container has
//!   no PID 1 of its own that would);
//! - logs every start and restart with the previous run's status and length.
//!
//! The child gets SIGTERM if the supervisor itself dies, so a killed
//! supervisor never leaves a second server behind.

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use nix::{
    sys::{
        signal::{kill, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};
use tokio::signal::unix::{signal, Signal as SignalStream, SignalKind};

use crate::config::HumanDuration;

/// `fast-sandbox-node supervise`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SuperviseArgs {
    /// A run shorter than this that ends is a fast crash; the first one is
    /// restarted at once, the ones right after it back off.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub min_uptime: HumanDuration,
    /// Delay before the restart after the second fast crash in a row;
    /// doubles with each further one.
    #[arg(long, default_value = "100ms", value_name = "DURATION")]
    pub backoff_first: HumanDuration,
    /// Longest delay between two restarts.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub backoff_max: HumanDuration,
    /// Supervise PROGRAM instead of this binary (ARGS then go to PROGRAM).
    #[arg(long, value_name = "PROGRAM")]
    pub program: Option<PathBuf>,
    /// The supervised process's arguments, after `--`: `serve --config=...`.
    #[arg(last = true, required = true, value_name = "ARGS")]
    pub args: Vec<OsString>,
}

/// Why supervision could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("args: `supervise` cannot supervise itself")]
    Nested,
    #[error("args: nothing to run (give the command after `--`, e.g. `-- serve --config=FILE`)")]
    NoArgs,
    #[error("finding this program's own path")]
    OwnPath(#[source] std::io::Error),
    #[error("installing the {0} handler")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("starting {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Spawn {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl SuperviseArgs {
    /// The program and its arguments: this binary unless `--program`.
    pub fn spawn(&self) -> Result<Spawn, SupervisorError> {
        let first = self.args.first().ok_or(SupervisorError::NoArgs)?;
        let program = match &self.program {
            Some(p) => p.clone(),
            None if first == "supervise" => return Err(SupervisorError::Nested),
            None => std::env::current_exe().map_err(SupervisorError::OwnPath)?,
        };
        Ok(Spawn {
            program,
            args: self.args.clone(),
        })
    }

    pub fn backoff(&self) -> Backoff {
        Backoff {
            min_uptime: self.min_uptime.0,
            first_delay: self.backoff_first.0,
            max_delay: self.backoff_max.0,
        }
    }
}

/// When a restart waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// A run at least this long resets the count of fast crashes.
    pub min_uptime: Duration,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

/// The delays of successive restarts.
#[derive(Debug)]
pub struct Restarts {
    policy: Backoff,
    fast_in_a_row: u32,
}

impl Restarts {
    pub fn new(policy: Backoff) -> Self {
        Self {
            policy,
            fast_in_a_row: 0,
        }
    }

    /// How long to wait before restarting a process that ran for `ran`.
    pub fn after_exit(&mut self, ran: Duration) -> Duration {
        if ran >= self.policy.min_uptime {
            self.fast_in_a_row = 0;
            return Duration::ZERO;
        }
        self.fast_in_a_row = self.fast_in_a_row.saturating_add(1);
        match self.fast_in_a_row {
            0 | 1 => Duration::ZERO,
            n => {
                let doublings = (n - 2).min(20);
                self.policy
                    .first_delay
                    .saturating_mul(1 << doublings)
                    .min(self.policy.max_delay)
            }
        }
    }
}

/// Runs `spawn` until a stop signal, restarting it whenever it ends.
/// Returns the exit code for the supervisor: the stopped child's (128 +
/// signal when it was killed), 0 when stopped between two runs.
pub async fn run(spawn: &Spawn, policy: Backoff) -> Result<i32, SupervisorError> {
    let mut signals = Signals::install()?;
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become the child subreaper; orphans of the server go to init");
    }
    let mut restarts = Restarts::new(policy);
    for run in 0u64.. {
        let started = Instant::now();
        let pid = start(spawn)?;
        tracing::info!(pid = pid.as_raw(), run, program = %spawn.program.display(), "started the serving process");
        let status = match signals.until_exit(pid).await {
            Ended::Stopped(status) => {
                tracing::info!(status = ?status, "the serving process stopped; exiting");
                return Ok(exit_code(status));
            }
            Ended::Exited(status) => status,
        };
        let ran = started.elapsed();
        let delay = restarts.after_exit(ran);
        tracing::warn!(status = ?status, ran = ?ran, restart = run + 1, delay = ?delay,
            "the serving process ended; restarting it");
        if !delay.is_zero() && signals.stop_during(delay).await {
            tracing::info!("stop requested while waiting to restart; exiting");
            return Ok(0);
        }
    }
    unreachable!("a u64 run counter does not run out")
}

fn start(spawn: &Spawn) -> Result<Pid, SupervisorError> {
    let mut command = std::process::Command::new(&spawn.program);
    command.args(&spawn.args);
    // SAFETY: the closure runs in the forked child before exec and only
    // makes one prctl(2) syscall, which is async-signal-safe; it touches
    // no memory shared with the parent.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
        });
    }
    let child = command.spawn().map_err(|source| SupervisorError::Spawn {
        program: spawn.program.display().to_string(),
        source,
    })?;
    // Reaped through waitpid below, never through `child`.
    Ok(Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX)))
}

/// How a run ended.
enum Ended {
    /// On its own or killed: restart it.
    Exited(WaitStatus),
    /// After a stop signal was forwarded: exit.
    Stopped(WaitStatus),
}

struct Signals {
    term: SignalStream,
    int: SignalStream,
    child: SignalStream,
}

impl Signals {
    fn install() -> Result<Self, SupervisorError> {
        let install =
            |kind: SignalKind, name| signal(kind).map_err(|e| SupervisorError::Signal(name, e));
        Ok(Self {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            child: install(SignalKind::child(), "SIGCHLD")?,
        })
    }

    /// Waits for `pid` to end, forwarding stop signals to it.
    async fn until_exit(&mut self, pid: Pid) -> Ended {
        let mut stopping = false;
        loop {
            let forward = tokio::select! {
                _ = self.child.recv() => {
                    match (reap(Some(pid)), stopping) {
                        (Some(status), true) => return Ended::Stopped(status),
                        (Some(status), false) => return Ended::Exited(status),
                        (None, _) => continue,
                    }
                }
                _ = self.term.recv() => Signal::SIGTERM,
                _ = self.int.recv() => Signal::SIGINT,
            };
            tracing::info!(signal = %forward, pid = pid.as_raw(), "forwarding the stop signal to the serving process");
            stopping = true;
            if let Err(e) = kill(pid, forward) {
                // Already gone: its SIGCHLD follows.
                tracing::debug!(error = %e, "forwarding the stop signal");
            }
        }
    }

    /// Waits `delay`, reaping orphans; true when a stop signal came first.
    async fn stop_during(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return false,
                _ = self.term.recv() => return true,
                _ = self.int.recv() => return true,
                _ = self.child.recv() => { reap(None); }
            }
        }
    }
}

/// Most processes reaped on one SIGCHLD (signals coalesce; the next one
/// picks up the rest).
const MAX_REAPED_AT_ONCE: usize = 4096;

/// Reaps every ended child; returns `serving`'s status if it was one.
fn reap(serving: Option<Pid>) -> Option<WaitStatus> {
    let mut found = None;
    for _ in 0..MAX_REAPED_AT_ONCE {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(status) if status.pid().is_some() && status.pid() == serving => found = Some(status),
            Ok(status) => tracing::debug!(status = ?status, "reaped an orphaned process"),
        }
    }
    found
}

/// The shell's convention: the exit code, or 128 + the killing signal.
fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, signal, _) => 128 + signal as i32,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Backoff = Backoff {
        min_uptime: Duration::from_secs(1),
        first_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(10),
    };

    #[test]
    fn the_first_fast_crash_restarts_at_once_and_repeats_back_off() {
        let mut r = Restarts::new(POLICY);
        let fast = Duration::from_millis(10);
        let delays: Vec<u64> = (0..10)
            .map(|_| r.after_exit(fast).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [0, 100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
        );
        // A run past min_uptime is a fresh start: immediate again.
        assert_eq!(r.after_exit(Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(r.after_exit(fast), Duration::ZERO);
        assert_eq!(r.after_exit(fast), Duration::from_millis(100));
    }

    #[test]
    fn crashes_after_running_a_while_never_wait() {
        let mut r = Restarts::new(POLICY);
        for _ in 0..1000 {
            assert_eq!(r.after_exit(Duration::from_secs(5)), Duration::ZERO);
        }
        // Huge counts neither overflow nor exceed the bound.
        for _ in 0..100 {
            r.after_exit(Duration::ZERO);
        }
        assert_eq!(r.after_exit(Duration::ZERO), POLICY.max_delay);
    }

    #[test]
    fn arguments_name_what_is_wrong() {
        let args = |program: Option<&str>, args: &[&str]| SuperviseArgs {
            min_uptime: HumanDuration(Duration::from_secs(1)),
            backoff_first: HumanDuration(Duration::from_millis(100)),
            backoff_max: HumanDuration(Duration::from_secs(10)),
            program: program.map(PathBuf::from),
            args: args.iter().map(OsString::from).collect(),
        };
        assert!(matches!(
            args(None, &["supervise", "--", "serve"]).spawn(),
            Err(SupervisorError::Nested)
        ));
        let err = args(None, &[]).spawn().expect_err("no args");
        assert!(err.to_string().starts_with("args: "), "{err}");
        let own = args(None, &["serve", "--config=x"]).spawn().expect("spawn");
        assert_eq!(own.program, std::env::current_exe().expect("own path"));
        assert_eq!(own.args, [OsString::from("serve"), "--config=x".into()]);
        let other = args(Some("/bin/sh"), &["-c", "true"])
            .spawn()
            .expect("spawn");
        assert_eq!(other.program, PathBuf::from("/bin/sh"));
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        let pid = Pid::from_raw(1);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 0)), 0);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), 3);
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            137
        );
    }
}
