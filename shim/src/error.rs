//! The shim's own errors, and the one place they become gRPC statuses.
//!
//! Errors that upstream returns are *not* represented here: they are passed to
//! the caller unchanged (see `upstream.rs`). Only failures the shim itself
//! produces (cannot reach upstream, ran out of time, cannot bind its socket)
//! live in [`ShimError`].

use std::{io, path::PathBuf, sync::Arc, time::Duration};

use tonic::{Code, Status};

/// Which deadline ended an upstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadlineSource {
    /// The caller's own deadline (`grpc-timeout`).
    Caller,
    /// The shim's configured default for this kind of call.
    ShimDefault,
}

impl std::fmt::Display for DeadlineSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeadlineSource::Caller => "the caller's deadline",
            DeadlineSource::ShimDefault => "the shim's default timeout",
        })
    }
}

/// Errors produced by the shim itself.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The upstream endpoint string is not a unix socket path or `unix://` URL.
    #[error("invalid upstream CRI endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        endpoint: String,
        reason: &'static str,
    },

    /// The upstream CRI endpoint could not be reached (not running, restarting,
    /// connection lost before it answered).
    #[error("upstream CRI endpoint {endpoint} is unavailable: {reason}")]
    UpstreamUnavailable { endpoint: Arc<str>, reason: String },

    /// The upstream call did not complete before its deadline.
    #[error(
        "upstream CRI call {method} did not complete within {timeout:?} ({source_of_deadline})"
    )]
    DeadlineExceeded {
        /// A method name, or the gRPC path of a method the shim does not know.
        method: String,
        timeout: Duration,
        source_of_deadline: DeadlineSource,
    },

    /// Upstream's reply could not be processed at all (the gRPC client gave
    /// up on it). Decoding errors of well-framed replies are upstream's own
    /// statuses and are passed through instead.
    #[error("upstream CRI call {method} returned a malformed reply: {reason}")]
    MalformedReply {
        method: &'static str,
        reason: String,
    },

    /// Something other than a socket exists where the shim's socket belongs.
    #[error("refusing to replace {path}: it exists and is not a unix socket")]
    NotASocket { path: PathBuf },

    /// A live server already answers on the shim's socket path.
    #[error("socket {path} is in use by another running server")]
    SocketInUse { path: PathBuf },

    #[error("cannot inspect socket path {path}")]
    InspectSocket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot create socket directory {path}")]
    CreateSocketDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot remove stale socket {path}")]
    RemoveStaleSocket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot bind unix socket {path}")]
    BindSocket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot set owner or mode of socket {path}")]
    SocketPermissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The configured socket group name does not exist.
    #[error("socket group {name:?} does not exist")]
    UnknownGroup { name: String },

    #[error("cannot look up socket group {name:?}")]
    LookupGroup {
        name: String,
        #[source]
        source: nix::Error,
    },

    /// `PodSandboxStatus` of a sandbox the shim hides (an unclaimed slot):
    /// exactly containerd 1.6's answer for an unknown id.
    #[error("an error occurred when try to find sandbox: not found")]
    HiddenSandboxStatus,

    /// `PodSandboxStats` of a sandbox the shim hides: exactly containerd
    /// 1.6's answer for an unknown id, which names the id as requested.
    #[error("an error occurred when trying to find sandbox {requested_id}: not found")]
    HiddenSandboxStats { requested_id: String },

    /// `StopPodSandbox` of a sandbox the shim hides: containerd 1.6's answer
    /// for an unknown id (Go `%q` of the id as requested).
    #[error("an error occurred when try to find sandbox {}: not found", go_quote(.requested_id))]
    HiddenSandboxStop { requested_id: String },

    /// `CreateContainer` in a sandbox the shim hides: containerd 1.6's
    /// answer for an unknown sandbox id.
    #[error("failed to find sandbox id {}: not found", go_quote(.requested_id))]
    HiddenSandboxCreateContainer { requested_id: String },

    /// `PortForward` into a sandbox the shim hides: containerd 1.6's answer
    /// for an unknown sandbox id.
    #[error("failed to find sandbox {}: not found", go_quote(.requested_id))]
    HiddenSandboxPortForward { requested_id: String },
}

impl From<ShimError> for Status {
    fn from(err: ShimError) -> Self {
        let code = match &err {
            ShimError::UpstreamUnavailable { .. } => Code::Unavailable,
            ShimError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            ShimError::HiddenSandboxStatus
            | ShimError::HiddenSandboxStats { .. }
            | ShimError::HiddenSandboxStop { .. }
            | ShimError::HiddenSandboxCreateContainer { .. }
            | ShimError::HiddenSandboxPortForward { .. } => Code::NotFound,
            ShimError::InvalidEndpoint { .. } | ShimError::UnknownGroup { .. } => {
                Code::InvalidArgument
            }
            ShimError::MalformedReply { .. }
            | ShimError::NotASocket { .. }
            | ShimError::SocketInUse { .. }
            | ShimError::InspectSocket { .. }
            | ShimError::CreateSocketDir { .. }
            | ShimError::RemoveStaleSocket { .. }
            | ShimError::BindSocket { .. }
            | ShimError::SocketPermissions { .. }
            | ShimError::LookupGroup { .. } => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

/// Go's `strconv.Quote` (what `%q` prints for a string): containerd names
/// the requested id that way in its not-found errors.
fn go_quote(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_sandbox_answers_are_containerds() {
        // Captured from containerd 1.6.20 for an unknown id.
        let id = "ffffffffffff";
        let cases = [
            (
                ShimError::HiddenSandboxStop {
                    requested_id: id.into(),
                },
                "an error occurred when try to find sandbox \"ffffffffffff\": not found",
            ),
            (
                ShimError::HiddenSandboxCreateContainer {
                    requested_id: id.into(),
                },
                "failed to find sandbox id \"ffffffffffff\": not found",
            ),
            (
                ShimError::HiddenSandboxPortForward {
                    requested_id: id.into(),
                },
                "failed to find sandbox \"ffffffffffff\": not found",
            ),
        ];
        for (err, message) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), Code::NotFound);
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn go_quote_escapes_like_go() {
        assert_eq!(go_quote("abc"), "\"abc\"");
        assert_eq!(go_quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(go_quote("\n\t\u{1}\u{7f}"), "\"\\n\\t\\x01\\x7f\"");
        assert_eq!(go_quote("é\u{85}"), "\"é\\u0085\"");
    }

    #[test]
    fn wire_codes() {
        let unavailable = ShimError::UpstreamUnavailable {
            endpoint: "unix:///run/containerd/containerd.sock".into(),
            reason: "connection refused".into(),
        };
        let status = Status::from(unavailable);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status
            .message()
            .contains("unix:///run/containerd/containerd.sock"));

        let deadline = ShimError::DeadlineExceeded {
            method: "Version".to_owned(),
            timeout: Duration::from_secs(2),
            source_of_deadline: DeadlineSource::Caller,
        };
        let status = Status::from(deadline);
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(status.message().contains("Version"));
    }
}
