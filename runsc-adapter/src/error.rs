//! The adapter's errors, and the translation of runsc's error wording into
//! the wording containerd's runc shim understands.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{0}")]
    Usage(String),
    #[error("{context}: flag provided but not defined: {flag}")]
    UnknownFlag { context: String, flag: String },
    #[error("{context}: flag needs an argument: {flag}")]
    MissingValue { context: String, flag: String },
    #[error("{context}: {flag} is not supported by the runsc adapter")]
    UnsupportedFlag { context: String, flag: String },
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("runsc {command} failed ({status}): {stderr}")]
    Runsc {
        command: String,
        status: String,
        stderr: String,
    },
    /// runsc said the container or its sandbox no longer runs; the text is
    /// what containerd's shim accepts as "already finished".
    #[error("container not running")]
    NotRunning,
    /// runsc does not know the container; the text is what the shim accepts
    /// as "already deleted".
    #[error("container does not exist")]
    DoesNotExist,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bundle config {path}: {source}")]
    Spec {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("bundle config {path}: {why}")]
    BadSpec { path: PathBuf, why: String },
    /// After joining a pod's network namespace to hide a file from runsc,
    /// the adapter could not return to its own: nothing may run from here.
    #[error("cannot return to the adapter's network namespace: {0}")]
    NetnsReturn(std::io::Error),
    #[error("container {id}: no waiter process (state {path}): {why}")]
    NoWaiter {
        id: String,
        path: PathBuf,
        why: String,
    },
}

impl AdapterError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// runc's exit status for this error: 1 for failures, like runc; 2 for
    /// command-line mistakes.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_)
            | Self::UnknownFlag { .. }
            | Self::MissingValue { .. }
            | Self::UnsupportedFlag { .. } => 2,
            _ => 1,
        }
    }
}

/// How runsc's stderr for a failed `kill` or `delete` reads to the shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunscFailure {
    /// The container or the whole sandbox has stopped.
    NotRunning,
    /// runsc has no such container.
    DoesNotExist,
    /// Anything else: report runsc's own words.
    Other,
}

/// Classifies runsc's error output. runsc 2022-12 says, among others,
/// "sandbox is not running", "container is not running", "cannot signal
/// container ... in state stopped", "process ... not found", "no such
/// process", and for unknown ids "loading container: file does not exist"
/// or "container ... not found".
pub fn classify_runsc_error(stderr: &str) -> RunscFailure {
    let s = stderr.to_ascii_lowercase();
    let loading = s.contains("loading container") || s.contains("loading sandbox");
    if loading && (s.contains("does not exist") || s.contains("not found")) {
        return RunscFailure::DoesNotExist;
    }
    const NOT_RUNNING: &[&str] = &[
        "is not running",
        "not running",
        "in state stopped",
        "in state created",
        "no such process",
        "process already finished",
        "sandbox is stopped",
        "connection refused",
        "esrch",
    ];
    if NOT_RUNNING.iter().any(|n| s.contains(n)) {
        return RunscFailure::NotRunning;
    }
    if s.contains("does not exist") || s.contains("no such container") {
        return RunscFailure::DoesNotExist;
    }
    RunscFailure::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runsc_wordings_map_to_what_the_shim_accepts() {
        for (stderr, want) in [
            (
                "signaling container \"x\": sandbox is not running",
                RunscFailure::NotRunning,
            ),
            (
                "cannot signal container \"x\": container is not running",
                RunscFailure::NotRunning,
            ),
            (
                "signaling container: connecting to control server at PID 7: connection refused",
                RunscFailure::NotRunning,
            ),
            (
                "loading container \"x\": file does not exist",
                RunscFailure::DoesNotExist,
            ),
            (
                "loading container: container with id \"x\" not found",
                RunscFailure::DoesNotExist,
            ),
            ("unknown signal \"FOO\"", RunscFailure::Other),
        ] {
            assert_eq!(classify_runsc_error(stderr), want, "{stderr}");
        }
    }

    /// The shim (containerd 1.6 `pkg/process/utils.go` checkKillError and
    /// `init.go` delete) matches these exact substrings.
    #[test]
    fn mapped_errors_use_the_shims_words() {
        assert!(AdapterError::NotRunning
            .to_string()
            .contains("container not running"));
        assert!(AdapterError::DoesNotExist
            .to_string()
            .contains("does not exist"));
    }
}
