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
        method: &'static str,
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

    /// The gRPC server failed while serving.
    #[error("CRI server failed")]
    Serve(#[source] tonic::transport::Error),
}

impl From<ShimError> for Status {
    fn from(err: ShimError) -> Self {
        let code = match &err {
            ShimError::UpstreamUnavailable { .. } => Code::Unavailable,
            ShimError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            ShimError::HiddenSandboxStatus | ShimError::HiddenSandboxStats { .. } => Code::NotFound,
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
            | ShimError::LookupGroup { .. }
            | ShimError::Serve(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            method: "Version",
            timeout: Duration::from_secs(2),
            source_of_deadline: DeadlineSource::Caller,
        };
        let status = Status::from(deadline);
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(status.message().contains("Version"));
    }
}
