//! What the directory keeps: its configuration and token, the errors a
//! node's agent gives, and the per-node entries the report folding
//! (`report.rs`) and the status streams (`stream.rs`) share with the
//! directory itself.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fast_sandbox_proto::token::{
    parse_token, read_token_file, TokenFileError, TokenProblem, BEARER_PREFIX,
};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::Code;

use super::tls::ClientTls;
use crate::scoring::{NodeState, Snapshot};

/// Largest status message accepted (a node with many images).
pub(super) const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The bearer token every agent call carries, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentToken(pub(super) MetadataValue<Ascii>);

impl fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentToken(<redacted>)")
    }
}

/// Why a token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    File(#[from] TokenFileError),
    #[error("the agent token (given) {0}")]
    Given(TokenProblem),
}

impl AgentToken {
    /// A token from its text, without surrounding whitespace.
    pub fn new(token: &str) -> Result<AgentToken, TokenError> {
        parse_token(token.as_bytes())
            .map_err(TokenError::Given)
            .and_then(|t| Self::header(t).map_err(TokenError::Given))
    }

    /// The token in `path`, without surrounding whitespace (a Secret made
    /// with `echo` ends in a newline), as the node plugin reads it.
    pub fn from_file(path: &Path) -> Result<AgentToken, TokenError> {
        let token = read_token_file(path)?;
        Self::header(&token).map_err(|problem| {
            TokenError::File(TokenFileError::Invalid {
                path: path.to_owned(),
                problem,
            })
        })
    }

    fn header(token: &[u8]) -> Result<AgentToken, TokenProblem> {
        let mut value = BEARER_PREFIX.as_bytes().to_vec();
        value.extend_from_slice(token);
        MetadataValue::try_from(value)
            .map(AgentToken)
            .map_err(|_| TokenProblem::NotAHeaderValue)
    }
}

/// How the directory talks to node agents.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// A bearer token every call carries, if any.
    pub token: Option<AgentToken>,
    /// Mutual TLS; `None`: cleartext (development only).
    pub tls: Option<ClientTls>,
    /// Re-read after an `Unauthenticated` answer (a rotated Secret).
    pub token_file: Option<PathBuf>,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Deadline of a `SetPoolSize` call, and of a watch's first answer.
    pub call_timeout: Duration,
    /// First reconnect delay; doubled after each failure, up to
    /// `backoff_max`, each delay drawn from its upper half (jitter).
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// HTTP/2 ping interval on an idle stream; a ping unanswered for as
    /// long breaks the stream (a node that vanished without a FIN).
    pub keepalive: Duration,
    /// How often connected nodes' last-seen times are refreshed and
    /// expired assumptions dropped.
    pub refresh: Duration,
    /// An assumed placement no report confirms is dropped after this.
    pub assume_ttl: Duration,
}

impl AgentConfig {
    /// Production defaults with `token`.
    pub fn new(token: AgentToken) -> AgentConfig {
        AgentConfig::with_credentials(Some(token), None)
    }

    /// Production defaults over mutual TLS, with a bearer token or not.
    pub fn with_credentials(token: Option<AgentToken>, tls: Option<ClientTls>) -> AgentConfig {
        AgentConfig {
            token,
            tls,
            token_file: None,
            connect_timeout: Duration::from_secs(3),
            call_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            keepalive: Duration::from_secs(10),
            refresh: Duration::from_secs(10),
            assume_ttl: Duration::from_secs(10),
        }
    }
}

/// Why a node's agent gives no status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("agent address {address:?}: {reason}")]
    BadAddress { address: String, reason: String },
    #[error(
        "the node agent refused the token (Unauthenticated: {message}); the controller's \
         and the node plugin's fast-sandbox-agent-token differ"
    )]
    Unauthenticated { message: String },
    #[error("the node agent is unreachable: {reason}")]
    Unreachable { reason: String },
    #[error("the node agent did not answer within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("the node agent ended the status stream")]
    StreamEnded,
    #[error("the agent at this address reports node {reported:?}")]
    WrongNode { reported: String },
    #[error("the node agent answered {code:?}: {message}")]
    Rejected { code: Code, message: String },
}

impl AgentError {
    pub(super) fn from_status(status: &tonic::Status) -> AgentError {
        match status.code() {
            Code::Unauthenticated => AgentError::Unauthenticated {
                message: status.message().to_owned(),
            },
            Code::Unavailable | Code::Unknown | Code::Cancelled => AgentError::Unreachable {
                reason: with_sources(status),
            },
            code => AgentError::Rejected {
                code,
                message: status.message().to_owned(),
            },
        }
    }
}

/// `status`'s message and the errors under it (a failed TLS handshake is
/// only named there), `: `-separated.
fn with_sources(status: &tonic::Status) -> String {
    let mut reason = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    // Bounded: an error chain is short, but never trust its length.
    for _ in 0..8 {
        let Some(error) = source else { break };
        let text = error.to_string();
        if !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        source = error.source();
    }
    reason
}

/// What the directory knows about one node's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHealth {
    /// `host:port` of the agent.
    pub address: String,
    /// The status stream is up and has delivered a report.
    pub connected: bool,
    /// Reports received since the node was added.
    pub reports: u64,
    /// Streams that ended or failed since the last report (each one is
    /// retried after a backoff).
    pub failures: u64,
    /// Why the last stream ended (kept after a reconnect, for the record).
    pub last_error: Option<AgentError>,
}

/// A placement counted before a report shows it.
#[derive(Debug, Clone)]
pub(super) struct Assumed {
    pub(super) handler: String,
    pub(super) shape: String,
    pub(super) at: Instant,
}

pub(super) type PoolKey = (String, String);

/// One node as the directory tracks it.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) address: String,
    /// Tells this entry's stream task from one of a replaced entry.
    pub(super) epoch: u64,
    pub(super) channel: Channel,
    pub(super) task: AbortHandle,
    /// What the snapshot holds for the node.
    pub(super) state: NodeState,
    pub(super) connected: bool,
    pub(super) reports: u64,
    pub(super) failures: u64,
    pub(super) last_error: Option<AgentError>,
    /// The reporting process (claim counts restart with it).
    pub(super) boot_id: String,
    /// Claimed slots per pool in the last report.
    pub(super) claimed: HashMap<PoolKey, u32>,
    /// Health as last reported.
    pub(super) health: Option<fast_sandbox_proto::nodeagent::Health>,
    /// The last size pushed per pool, while reports agree with it.
    pub(super) pushed: HashMap<PoolKey, u32>,
    pub(super) assumed: Vec<Assumed>,
}

#[derive(Debug, Default)]
pub(super) struct Nodes {
    pub(super) map: BTreeMap<String, Entry>,
    pub(super) next_epoch: u64,
    /// A Node (re)list is under way: nodes joining or leaving re-index once
    /// at its end, not once each (65,000 re-indexes of up to 65,000 nodes
    /// at start-up otherwise).
    pub(super) relisting: bool,
    /// Membership changed while relisting.
    pub(super) dirty: bool,
}

pub(super) struct Inner {
    pub(super) config: AgentConfig,
    pub(super) token: RwLock<Option<AgentToken>>,
    pub(super) nodes: Mutex<Nodes>,
    pub(super) snapshot: RwLock<Arc<Snapshot>>,
    pub(super) changes: watch::Sender<u64>,
    pub(super) seeds: RandomState,
}

pub(super) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
