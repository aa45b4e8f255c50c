//! The runc commands containerd's shim runs, carried out with runsc.
//!
//! Three things differ from running runsc directly as the shim's binary:
//! - `create` puts in the shim's `--pid-file` the PID of a waiter (this
//!   binary re-executed) instead of the sandbox's, so each container's exit
//!   reaches the shim's reaper with the container's own status;
//! - `start` hands `runsc start` the container's stdio (which the waiter kept
//!   since `create`), not the shim's output pipe, which runsc would pass on
//!   to the sandbox and the shim would wait on forever;
//! - `kill`/`delete` failures for stopped or unknown containers are reported
//!   in the words the shim accepts as "already finished"/"does not exist".

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    os::unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command as Process, Stdio},
};

use nix::{sys::signal::Signal, unistd::Pid};
use serde::Deserialize;

use crate::{
    cgroup,
    cli::{Command, Invocation},
    error::{classify_runsc_error, AdapterError, RunscFailure},
    hostname,
    log::Logger,
    netns::{self, NetnsOps, Plan},
    state::{self, ContainerDir, ContainerState},
    waiter::{self, WaiterArgs},
};

#[derive(Debug, Clone)]
pub struct Settings {
    pub runsc: PathBuf,
    /// Global flags for every runsc call, before the translated ones.
    pub flags: Vec<String>,
}

struct Ctx<'a> {
    settings: &'a Settings,
    runsc_flags: Vec<String>,
    adapter_root: &'a Path,
    log: &'a Logger,
}

impl Ctx<'_> {
    fn runsc(&self, command: &str, args: &[String]) -> Process {
        let mut p = Process::new(&self.settings.runsc);
        p.args(&self.runsc_flags).arg(command).args(args);
        p
    }

    fn spawn_err(&self, e: std::io::Error) -> AdapterError {
        AdapterError::Spawn {
            binary: self.settings.runsc.clone(),
            source: e,
        }
    }

    /// Replaces this process with runsc (stdio, exit status and signals
    /// are runsc's own). Returns only on failure.
    fn exec(&self, command: &str, args: &[String]) -> AdapterError {
        self.log.info(&format!("exec runsc {command} {args:?}"));
        self.spawn_err(self.runsc(command, args).exec())
    }
}

/// Carries out one invocation; returns the exit status.
pub fn run(
    settings: &Settings,
    adapter_root: &Path,
    inv: Invocation,
    log: &Logger,
) -> Result<u8, AdapterError> {
    let mut runsc_flags = settings.flags.clone();
    runsc_flags.extend(inv.globals.runsc_flags.iter().cloned());
    let ctx = Ctx {
        settings,
        runsc_flags,
        adapter_root,
        log,
    };
    match inv.command {
        Command::Create {
            id,
            bundle,
            pid_file,
            console_socket,
        } => create(
            &ctx,
            &id,
            &bundle,
            pid_file.as_deref(),
            console_socket.as_deref(),
        ),
        Command::Start { id } => start(&ctx, &id),
        Command::Kill { id, args } => kill(&ctx, &id, &args),
        Command::Delete { id, args } => delete(&ctx, &id, &args),
        Command::Exec { id, args } => {
            join_container_cgroup(&ctx, &id);
            Err(ctx.exec("exec", &args))
        }
        Command::Passthrough { name, args } => Err(ctx.exec(&name, &args)),
    }
}

/// What the adapter reads from the bundle's `config.json`.
#[derive(Debug, Default, Deserialize)]
struct Spec {
    #[serde(default)]
    process: Option<SpecProcess>,
    #[serde(default)]
    linux: Option<SpecLinux>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct SpecProcess {
    #[serde(default)]
    terminal: bool,
}

#[derive(Debug, Default, Deserialize)]
struct SpecLinux {
    #[serde(default, rename = "cgroupsPath")]
    cgroups_path: Option<String>,
}

fn read_spec(bundle: &Path) -> Result<Spec, AdapterError> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| AdapterError::io("read", &path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| AdapterError::Spec { path, source: e })
}

fn run_status(ctx: &Ctx<'_>, name: &str, mut p: Process) -> Result<(), AdapterError> {
    let status = p.status().map_err(|e| ctx.spawn_err(e))?;
    if status.success() {
        Ok(())
    } else {
        Err(AdapterError::Runsc {
            command: name.to_owned(),
            status: status.to_string(),
            stderr: "see the runtime log".into(),
        })
    }
}

fn create(
    ctx: &Ctx<'_>,
    id: &str,
    bundle: &str,
    pid_file: Option<&str>,
    console_socket: Option<&str>,
) -> Result<u8, AdapterError> {
    let bundle_path = Path::new(bundle);
    let spec = read_spec(bundle_path)?;
    let terminal = spec.process.as_ref().is_some_and(|p| p.terminal);
    let cgroups_path = spec
        .linux
        .and_then(|l| l.cgroups_path)
        .filter(|p| cgroup::cgroupfs_path(p).is_some());
    // For a pod's first container runsc starts the sandbox process, whose
    // network namespace `start` copies (see netns.rs): remember its PID.
    let first = netns::creates_sandbox(&spec.annotations);

    let dir = ContainerDir::new(ctx.adapter_root, id)?;
    dir.remove()?;
    std::fs::create_dir_all(&dir.dir).map_err(|e| AdapterError::io("create", &dir.dir, e))?;
    nix::unistd::mkfifo(&dir.fifo(), nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| AdapterError::io("mkfifo", dir.fifo(), e.into()))?;

    let mut args = vec![format!("--bundle={bundle}")];
    if first {
        args.push(format!("--pid-file={}", dir.sandbox_pid_file().display()));
    }
    if let Some(s) = console_socket {
        args.push(format!("--console-socket={s}"));
    }
    args.push(id.to_owned());
    ctx.log.info(&format!("runsc create {args:?}"));
    // runsc gets the container's stdio: for the first container it becomes
    // the sandbox's, except a channel pause's stdin and stdout.
    let mut process = ctx.runsc("create", &args);
    if first {
        hostname_channel(ctx, bundle_path, &dir, &mut process);
    }
    let t0 = std::time::Instant::now();
    if let Err(e) = run_status(ctx, "create", process) {
        let _ = dir.remove();
        return Err(e);
    }
    ctx.log.info(&format!(
        "runsc create took {} ms",
        t0.elapsed().as_millis()
    ));

    let recorded = Recorded {
        cgroups_path,
        terminal,
        sandbox_pid: if first { dir.sandbox_pid() } else { None },
    };
    match spawn_waiter(ctx, id, &dir, recorded, pid_file) {
        Ok(()) => Ok(0),
        Err(e) => {
            // Leave nothing half-made behind: the shim will not delete a
            // container whose create failed.
            let _ = ctx
                .runsc("delete", &["--force".into(), id.to_owned()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = dir.remove();
            Err(e)
        }
    }
}

/// Gives the sandbox container's pause the hostname channel when its image
/// asks for it. A channel that cannot be made is logged and left out: the
/// node plugin then sets the hostname with its exec.
fn hostname_channel(ctx: &Ctx<'_>, bundle: &Path, dir: &ContainerDir, process: &mut Process) {
    match hostname::prepare(bundle, dir) {
        Ok(Some(channel)) => {
            ctx.log.info("hostname channel for the pause");
            process.stdin(channel.requests).stdout(channel.replies);
        }
        Ok(None) => {}
        Err(e) => {
            ctx.log.warn(&format!("no hostname channel: {e}"));
            for name in [hostname::REQUESTS, hostname::REPLIES] {
                let _ = std::fs::remove_file(dir.dir.join(name));
            }
        }
    }
}

/// What `create` learnt that later commands need.
struct Recorded {
    cgroups_path: Option<String>,
    terminal: bool,
    sandbox_pid: Option<u32>,
}

fn spawn_waiter(
    ctx: &Ctx<'_>,
    id: &str,
    dir: &ContainerDir,
    recorded: Recorded,
    pid_file: Option<&str>,
) -> Result<(), AdapterError> {
    let Recorded {
        cgroups_path,
        terminal,
        sandbox_pid,
    } = recorded;
    // Join first so the waiter (and its `runsc wait`) is born in the
    // container's cgroup: that is what the shim will read stats from.
    if let Some(path) = &cgroups_path {
        join_cgroup(ctx, path);
    }
    let exe =
        std::env::current_exe().map_err(|e| AdapterError::io("resolve", "/proc/self/exe", e))?;
    let wargs = WaiterArgs {
        fifo: dir.fifo(),
        id: id.to_owned(),
        runsc: ctx.settings.runsc.clone(),
        runsc_flags: ctx.runsc_flags.clone(),
    };
    let mut p = Process::new(&exe);
    p.arg(waiter::WAITER_ARG).args(wargs.to_args());
    if terminal {
        // With a terminal the shim reads create's output through a pipe
        // until EOF, and runsc has already sent the console to the shim:
        // the waiter must hold neither.
        p.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    // Otherwise the waiter inherits the container's stdio, for `start`.
    let child = p.spawn().map_err(|e| AdapterError::Spawn {
        binary: exe.clone(),
        source: e,
    })?;
    // The waiter outlives this process: the shim, a child subreaper, adopts
    // and reaps it. Dropping `Child` neither kills nor waits for it.
    let pid = child.id();
    let start_time = state::start_time(pid).ok_or_else(|| AdapterError::NoWaiter {
        id: id.to_owned(),
        path: dir.dir.clone(),
        why: format!("waiter {pid} exited at once"),
    })?;
    dir.save(&ContainerState {
        waiter_pid: pid,
        waiter_start_time: start_time,
        cgroups_path,
        terminal,
        sandbox_pid,
    })?;
    if let Some(pid_file) = pid_file {
        state::write_atomic(Path::new(pid_file), pid.to_string().as_bytes())?;
    }
    ctx.log.info(&format!("created; waiter pid {pid}"));
    Ok(())
}

fn join_cgroup(ctx: &Ctx<'_>, path: &str) {
    match cgroup::join_all(std::process::id(), path) {
        Ok(failed) => {
            for (dir, why) in failed {
                ctx.log
                    .warn(&format!("cannot join cgroup {}: {why}", dir.display()));
            }
        }
        Err(e) => ctx.log.warn(&format!("cannot join cgroup {path}: {e}")),
    }
}

/// Moves this process into the container's cgroup (for `exec`, whose
/// long-lived `runsc exec` child then counts against the container).
fn join_container_cgroup(ctx: &Ctx<'_>, id: &str) {
    let Ok(dir) = ContainerDir::new(ctx.adapter_root, id) else {
        return;
    };
    match dir.load() {
        Ok(st) => {
            if let Some(path) = st.cgroups_path {
                join_cgroup(ctx, &path);
            }
        }
        Err(e) => ctx.log.warn(&format!("no adapter state: {e}")),
    }
}

fn load_live_waiter(
    ctx: &Ctx<'_>,
    id: &str,
) -> Result<(ContainerDir, ContainerState), AdapterError> {
    let dir = ContainerDir::new(ctx.adapter_root, id)?;
    let st = dir.load()?;
    if !st.waiter_alive() {
        return Err(AdapterError::NoWaiter {
            id: id.to_owned(),
            path: dir.dir.clone(),
            why: format!("waiter {} is gone", st.waiter_pid),
        });
    }
    Ok((dir, st))
}

/// Opens the waiter's fd `fd` anew through /proc: the same pipe, file or
/// terminal the shim gave `create`; /dev/null when that cannot be reopened
/// (a socket), which the log says.
fn waiter_fd(ctx: &Ctx<'_>, pid: u32, fd: u32, write: bool) -> Result<File, AdapterError> {
    let path = format!("/proc/{pid}/fd/{fd}");
    let opened = OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(&path);
    opened.or_else(|e| {
        ctx.log
            .warn(&format!("cannot reopen {path} ({e}); using /dev/null"));
        OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| AdapterError::io("open", "/dev/null", e))
    })
}

/// Before `runsc start` of a pod's first container with gVisor's network
/// stack: keeps runsc's misfiring root-netns check from refusing a pod
/// namespace (netns.rs). A sandbox in a host namespace is left to runsc.
fn prepare_network(
    ctx: &Ctx<'_>,
    ops: &dyn NetnsOps,
    st: &ContainerState,
) -> Result<(), AdapterError> {
    match netns::plan(ops, &ctx.runsc_flags, st.sandbox_pid) {
        Plan::Nothing => Ok(()),
        Plan::LeaveToRunsc { why } => {
            ctx.log
                .warn(&format!("not hiding {} from runsc: {why}", netns::NET_CORE));
            Ok(())
        }
        Plan::Hide { sandbox_pid } => match ops.hide_net_core(sandbox_pid) {
            Ok(()) => {
                ctx.log.info(&format!(
                    "hid {} of sandbox {sandbox_pid}'s network namespace from runsc start",
                    netns::NET_CORE
                ));
                Ok(())
            }
            Err(e @ AdapterError::NetnsReturn(_)) => Err(e),
            // runsc's own check decides (right on kernels where it works).
            Err(e) => {
                ctx.log.warn(&format!(
                    "cannot hide {} from runsc start: {e}",
                    netns::NET_CORE
                ));
                Ok(())
            }
        },
    }
}

fn start(ctx: &Ctx<'_>, id: &str) -> Result<u8, AdapterError> {
    let (dir, st) = load_live_waiter(ctx, id)?;
    prepare_network(ctx, &netns::HostNetns, &st)?;
    let mut p = ctx.runsc("start", &[id.to_owned()]);
    if st.terminal {
        p.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    } else {
        // runsc gives a subcontainer its own stdio: hand it the container's.
        p.stdin(waiter_fd(ctx, st.waiter_pid, 0, false)?)
            .stdout(waiter_fd(ctx, st.waiter_pid, 1, true)?)
            .stderr(waiter_fd(ctx, st.waiter_pid, 2, true)?);
    }
    // As a child subreaper, this process adopts what `runsc start` leaves
    // running (a subcontainer's gofer), to charge it to the container.
    let subreaper = nix::sys::prctl::set_child_subreaper(true);
    let t0 = std::time::Instant::now();
    let started = run_status(ctx, "start", p);
    let runsc_ms = t0.elapsed().as_millis();
    if subreaper.is_ok() {
        adopt_children(ctx, &st);
    }
    ctx.log.info(&format!("runsc start took {runsc_ms} ms"));
    started?;
    // Release the waiter: it drops its copy of the stdio and waits.
    let fifo = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(dir.fifo());
    match fifo.and_then(|mut f| std::io::Write::write_all(&mut f, waiter::START_TOKEN)) {
        Ok(()) => {
            ctx.log.info("started");
            Ok(0)
        }
        Err(e) => Err(AdapterError::NoWaiter {
            id: id.to_owned(),
            path: dir.fifo(),
            why: format!("cannot release the waiter: {e}"),
        }),
    }
}

/// Moves the processes this (subreaper) process adopted into the
/// container's cgroup. runsc 2022-12 starts a subcontainer's gofer in the
/// sandbox's cgroup; in the container's it is what the container's stats
/// (which the shim reads from the waiter's cgroup) show besides the waiter.
/// When this process exits they pass on to the shim, the next subreaper.
fn adopt_children(ctx: &Ctx<'_>, st: &ContainerState) {
    let Some(path) = &st.cgroups_path else { return };
    let me = std::process::id();
    for pid in children_of(me) {
        match cgroup::join_all(pid, path) {
            Ok(failed) if failed.is_empty() => {
                ctx.log
                    .info(&format!("moved {pid} into the container's cgroup"));
            }
            Ok(failed) => ctx
                .log
                .warn(&format!("moving {pid} into {path}: failed in {failed:?}")),
            Err(e) => ctx.log.warn(&format!("moving {pid} into {path}: {e}")),
        }
    }
}

/// Live children of `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    let mut f = rest.split_whitespace();
                    let state = f.next()?;
                    let ppid: u32 = f.next()?.parse().ok()?;
                    Some(ppid == parent && state != "Z")
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Runs runsc, capturing stderr to classify a failure.
fn run_captured(
    ctx: &Ctx<'_>,
    name: &str,
    args: &[String],
) -> Result<(), (RunscFailure, AdapterError)> {
    let out = ctx
        .runsc(name, args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| (RunscFailure::Other, ctx.spawn_err(e)))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    Err((
        classify_runsc_error(&stderr),
        AdapterError::Runsc {
            command: name.to_owned(),
            status: out.status.to_string(),
            stderr,
        },
    ))
}

/// Kills a waiter still waiting for `start`, so the shim sees the
/// never-started container exit (as runc's killed `runc init` would).
fn kill_unstarted_waiter(ctx: &Ctx<'_>, id: &str) {
    let Ok(dir) = ContainerDir::new(ctx.adapter_root, id) else {
        return;
    };
    let Ok(st) = dir.load() else { return };
    if st.waiter_alive() && dir.fifo().exists() {
        ctx.log
            .info(&format!("killing unstarted waiter {}", st.waiter_pid));
        let _ = dir.remove();
        signal_waiter(&st, Signal::SIGKILL);
    }
}

/// Signals the waiter; after SIGKILL, waits (up to a second) until it has
/// died, so its cgroup is empty when the caller removes it.
fn signal_waiter(st: &ContainerState, sig: Signal) {
    if let Ok(pid) = i32::try_from(st.waiter_pid) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
    }
    if sig == Signal::SIGKILL {
        for _ in 0..100 {
            if !st.waiter_alive() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

fn kill(ctx: &Ctx<'_>, id: &str, args: &[String]) -> Result<u8, AdapterError> {
    match run_captured(ctx, "kill", args) {
        Ok(()) => Ok(0),
        Err((RunscFailure::NotRunning, e)) => {
            ctx.log.info(&format!("{e}: reported as not running"));
            kill_unstarted_waiter(ctx, id);
            Err(AdapterError::NotRunning)
        }
        Err((RunscFailure::DoesNotExist, e)) => {
            ctx.log.info(&format!("{e}: reported as not existing"));
            kill_unstarted_waiter(ctx, id);
            Err(AdapterError::DoesNotExist)
        }
        Err((RunscFailure::Other, e)) => Err(e),
    }
}

fn delete(ctx: &Ctx<'_>, id: &str, args: &[String]) -> Result<u8, AdapterError> {
    let result = run_captured(ctx, "delete", args);
    // Whatever runsc said, a waiter left behind (never started, or a forced
    // delete) must go with the container.
    if let Ok(dir) = ContainerDir::new(ctx.adapter_root, id) {
        if let Ok(st) = dir.load() {
            if st.waiter_alive() {
                ctx.log.info(&format!("killing waiter {}", st.waiter_pid));
                let _ = std::fs::remove_file(dir.fifo());
                signal_waiter(&st, Signal::SIGKILL);
            }
            if let Some(path) = &st.cgroups_path {
                for (d, why) in cgroup::remove_all(path) {
                    ctx.log
                        .info(&format!("cgroup {} stays: {why}", d.display()));
                }
            }
        }
        if let Err(e) = dir.remove() {
            ctx.log.warn(&e.to_string());
        }
    }
    match result {
        Ok(()) => Ok(0),
        Err((RunscFailure::DoesNotExist, e)) => {
            ctx.log.info(&format!("{e}: reported as not existing"));
            Err(AdapterError::DoesNotExist)
        }
        Err((_, e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::NsId;

    /// The sandbox in a pod netns (not the adapter's, not the initial
    /// one); hiding fails with `fail`.
    struct FailingHide(fn() -> AdapterError);

    impl NetnsOps for FailingHide {
        fn netns(&self, pid: Option<u32>) -> Result<NsId, AdapterError> {
            Ok(NsId {
                dev: 1,
                ino: u64::from(pid.is_some()),
            })
        }
        fn is_initial_netns(&self, _pid: u32) -> Result<bool, AdapterError> {
            Ok(false)
        }
        fn hide_net_core(&self, _pid: u32) -> Result<(), AdapterError> {
            Err((self.0)())
        }
    }

    fn state() -> ContainerState {
        ContainerState {
            waiter_pid: 1,
            waiter_start_time: 1,
            cgroups_path: None,
            terminal: false,
            sandbox_pid: Some(42),
        }
    }

    #[test]
    fn a_failed_hide_leaves_the_verdict_to_runsc_unless_the_netns_is_wrong() {
        let settings = Settings {
            runsc: "/bin/false".into(),
            flags: vec!["--network=sandbox".into()],
        };
        let log_dir = tempfile::tempdir().unwrap();
        let log = Logger::new(Some(log_dir.path().join("a.log")), None, "t".into());
        let ctx = Ctx {
            settings: &settings,
            runsc_flags: settings.flags.clone(),
            adapter_root: log_dir.path(),
            log: &log,
        };
        let mount_failed = FailingHide(|| {
            AdapterError::io(
                "mount tmpfs on",
                netns::NET_CORE,
                std::io::ErrorKind::PermissionDenied.into(),
            )
        });
        assert!(prepare_network(&ctx, &mount_failed, &state()).is_ok());
        let logged = std::fs::read_to_string(log_dir.path().join("a.log")).unwrap();
        assert!(
            logged.contains("cannot hide /proc/sys/net/core"),
            "{logged}"
        );

        let stuck = FailingHide(|| AdapterError::NetnsReturn(std::io::ErrorKind::Other.into()));
        assert!(matches!(
            prepare_network(&ctx, &stuck, &state()),
            Err(AdapterError::NetnsReturn(_))
        ));
    }
}
