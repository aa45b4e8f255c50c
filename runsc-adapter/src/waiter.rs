//! The waiter: the process whose PID the shim gets in a container's pid
//! file. It holds the container's stdio from `create` until `start` has
//! handed it to runsc, then runs `runsc wait <id>` and exits with the
//! container's status, so the shim's reaper sees the real exit code.

use std::{
    fs::{File, OpenOptions},
    io::Read as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde::Deserialize;

use crate::log::Logger;

/// Hidden first argument that makes the binary a waiter.
pub const WAITER_ARG: &str = "__fast-sandbox-runsc-waiter";

/// What `start` writes into the FIFO once `runsc start` succeeded.
pub const START_TOKEN: &[u8] = b"started\n";

/// Exit status when runsc cannot tell the container's status.
pub const UNKNOWN_STATUS: u8 = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaiterArgs {
    pub fifo: PathBuf,
    pub id: String,
    pub runsc: PathBuf,
    pub runsc_flags: Vec<String>,
}

impl WaiterArgs {
    /// The arguments after [`WAITER_ARG`].
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            self.fifo.display().to_string(),
            self.id.clone(),
            self.runsc.display().to_string(),
        ];
        v.extend(self.runsc_flags.iter().cloned());
        v
    }

    pub fn from_args(args: &[String]) -> Option<Self> {
        let [fifo, id, runsc, flags @ ..] = args else {
            return None;
        };
        Some(Self {
            fifo: fifo.into(),
            id: id.clone(),
            runsc: runsc.into(),
            runsc_flags: flags.to_vec(),
        })
    }
}

#[derive(Debug, Deserialize)]
struct WaitResult {
    #[serde(rename = "exitStatus")]
    exit_status: i64,
}

/// The exit status in `runsc wait`'s output (`{"id":…,"exitStatus":N}`,
/// where a signal `s` is already `128+s`), clamped to what exit(2) carries.
pub fn exit_status_from_wait_output(stdout: &str) -> Option<u8> {
    // runsc may log to stdout before the result; the result is the last line.
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))?;
    let r: WaitResult = serde_json::from_str(line).ok()?;
    Some(u8::try_from(r.exit_status.clamp(0, 255)).unwrap_or(UNKNOWN_STATUS))
}

/// Blocks until `start` writes [`START_TOKEN`] into the FIFO. A writer that
/// closes without it (a failed `start`) is ignored: the waiter keeps
/// waiting until it is started or killed by `delete`. Errors when the FIFO
/// is gone (the container was deleted).
fn wait_for_start(fifo: &Path) -> std::io::Result<()> {
    loop {
        // Blocks until a writer opens the FIFO.
        let mut f = File::open(fifo)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        if buf == START_TOKEN {
            return Ok(());
        }
    }
}

/// Points fds 0, 1 and 2 at /dev/null, dropping the container's stdio so
/// that only the sandbox holds it and its reader sees EOF when it ends.
fn release_stdio() -> std::io::Result<()> {
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..=2 {
        nix::unistd::dup2(null.as_raw_fd(), fd).map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Runs the waiter; returns its exit status.
pub fn run(args: &WaiterArgs, log: &Logger) -> u8 {
    if let Err(e) = wait_for_start(&args.fifo) {
        log.info(&format!(
            "not started ({}: {e}); exiting as killed",
            args.fifo.display()
        ));
        return 128 + 9;
    }
    let _ = std::fs::remove_file(&args.fifo);
    if let Err(e) = release_stdio() {
        log.warn(&format!("cannot release the container's stdio: {e}"));
    }
    let out = Command::new(&args.runsc)
        .args(&args.runsc_flags)
        .args(["wait", &args.id])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output();
    match out {
        Ok(out) => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            match exit_status_from_wait_output(&stdout) {
                Some(code) if out.status.success() => {
                    log.info(&format!("container exited with status {code}"));
                    code
                }
                _ => {
                    log.error(&format!(
                        "runsc wait failed ({}): {} {}",
                        out.status,
                        stdout.trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                    UNKNOWN_STATUS
                }
            }
        }
        Err(e) => {
            log.error(&format!("cannot run {}: {e}", args.runsc.display()));
            UNKNOWN_STATUS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_output() {
        assert_eq!(
            exit_status_from_wait_output("{\"id\":\"c1\",\"exitStatus\":3}\n"),
            Some(3)
        );
        assert_eq!(
            exit_status_from_wait_output("I1201 log line\n{\"id\":\"c\",\"exitStatus\":137}"),
            Some(137)
        );
        assert_eq!(
            exit_status_from_wait_output("{\"id\":\"c\",\"exitStatus\":-1}"),
            Some(0)
        );
        assert_eq!(exit_status_from_wait_output("nothing"), None);
    }

    #[test]
    fn args_round_trip() {
        let a = WaiterArgs {
            fifo: "/s/c1/start".into(),
            id: "c1".into(),
            runsc: "/usr/bin/runsc".into(),
            runsc_flags: vec!["--root=/r".into(), "--network=host".into()],
        };
        assert_eq!(WaiterArgs::from_args(&a.to_args()), Some(a));
        assert_eq!(WaiterArgs::from_args(&["x".into()]), None);
    }

    #[test]
    fn only_the_start_token_releases_the_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("start");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let f2 = fifo.clone();
        let waiter = std::thread::spawn(move || wait_for_start(&f2));
        // A failed start: a writer that closes without the token.
        drop(OpenOptions::new().write(true).open(&fifo).unwrap());
        std::fs::write(&fifo, START_TOKEN).unwrap();
        waiter.join().unwrap().unwrap();
        std::fs::remove_file(&fifo).unwrap();
        assert!(
            wait_for_start(&fifo).is_err(),
            "a deleted FIFO ends the wait"
        );
    }
}
