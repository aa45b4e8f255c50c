//! `fast-sandbox-runsc`: gVisor's `runsc` behind containerd 1.6's runc v2
//! shim (`runtime_type = "io.containerd.runc.v2"`, `options.BinaryName` =
//! this binary). See `adapter.rs` for what differs from plain runsc.
//!
//! Settings (environment, inherited from containerd through the shim):
//! - `FAST_SANDBOX_RUNSC`: the runsc binary (default: a `runsc` beside this
//!   binary, else `/usr/bin/runsc`; shipping the two together pins the
//!   gVisor release without a system package);
//! - `FAST_SANDBOX_RUNSC_FLAGS`: global runsc flags added to every call,
//!   space-separated (default `--network=sandbox --platform=systrap`:
//!   gVisor's own network stack and its current platform; anything else
//!   only by setting this, see docs/runtimes.md for what each costs);
//! - `FAST_SANDBOX_RUNSC_LOG`: the adapter's log file (default
//!   `<runsc root>.adapter/adapter.log`).

mod adapter;
mod cgroup;
mod cli;
mod error;
mod hostname;
mod log;
mod netns;
mod state;
mod waiter;

use std::{path::PathBuf, process::ExitCode};

pub const DEFAULT_RUNSC: &str = "/usr/bin/runsc";
pub const DEFAULT_FLAGS: &str = "--network=sandbox --platform=systrap";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(waiter::WAITER_ARG) {
        let Some(w) = waiter::WaiterArgs::from_args(&args[1..]) else {
            eprintln!("fast-sandbox-runsc: bad waiter arguments {args:?}");
            return ExitCode::from(waiter::UNKNOWN_STATUS);
        };
        let log_file = log_file(w.fifo.parent().and_then(|d| d.parent()));
        let logger = log::Logger::new(log_file, None, format!("waiter {}", w.id));
        return ExitCode::from(waiter::run(&w, &logger));
    }
    let settings = adapter::Settings {
        runsc: std::env::var_os("FAST_SANDBOX_RUNSC").map_or_else(default_runsc, PathBuf::from),
        flags: std::env::var("FAST_SANDBOX_RUNSC_FLAGS")
            .unwrap_or_else(|_| DEFAULT_FLAGS.to_owned())
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    };
    let invocation = match cli::parse(&args) {
        Ok(inv) => inv,
        Err(e) => {
            eprintln!("fast-sandbox-runsc: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let adapter_root = state::adapter_root(invocation.globals.root.as_deref());
    let logger = log::Logger::new(
        log_file(Some(&adapter_root)),
        invocation.globals.log.as_ref().map(PathBuf::from),
        format!(
            "{} {}",
            invocation.command.name(),
            invocation.command.id().unwrap_or("-")
        ),
    );
    match adapter::run(&settings, &adapter_root, invocation, &logger) {
        Ok(code) => ExitCode::from(code),
        // Expected answers for stopped or deleted containers: the shim
        // reads them from stderr; they are not failures worth a log error.
        Err(e @ (error::AdapterError::NotRunning | error::AdapterError::DoesNotExist)) => {
            eprintln!("{e}");
            ExitCode::from(e.exit_code())
        }
        Err(e) => {
            logger.error(&e.to_string());
            ExitCode::from(e.exit_code())
        }
    }
}

/// A `runsc` in this binary's directory, else [`DEFAULT_RUNSC`].
fn default_runsc() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("runsc")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNSC))
}

/// `$FAST_SANDBOX_RUNSC_LOG`, else `adapter.log` in the adapter's root
/// (when that directory exists or can be made).
fn log_file(adapter_root: Option<&std::path::Path>) -> Option<PathBuf> {
    if let Some(f) = std::env::var_os("FAST_SANDBOX_RUNSC_LOG") {
        return Some(f.into());
    }
    let root = adapter_root?;
    std::fs::create_dir_all(root).ok()?;
    Some(root.join("adapter.log"))
}
