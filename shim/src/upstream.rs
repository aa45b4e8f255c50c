//! The forwarding client: one lazily connected channel to the upstream CRI
//! endpoint (containerd), shared by every call.
//!
//! What crosses the hop, deliberately:
//! - request: the message and the caller's custom metadata (tracing context
//!   included). Transport headers that describe *this* hop are dropped
//!   ([`HOP_HEADERS`]); `grpc-timeout` is replaced by the deadline the shim
//!   enforces, so upstream stops working when we stop waiting.
//! - response: the message and upstream's metadata (headers and, for unary
//!   calls, trailers, which reach the caller as headers), minus [`HOP_HEADERS`].
//! - errors: upstream's status is returned as is (code, message, details and
//!   custom metadata). Only failures of the hop itself (upstream unreachable,
//!   deadline) are the shim's own [`ShimError`]s.

use std::{
    future::Future,
    io,
    panic::AssertUnwindSafe,
    path::PathBuf,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use fast_sandbox_proto::cri::runtime_service_client::RuntimeServiceClient;
use futures::FutureExt;
use hyper_util::rt::TokioIo;
use tokio::{net::UnixStream, time::Instant};
use tonic::{
    body::Body,
    codegen::http::{self, HeaderName},
    metadata::MetadataMap,
    transport::{Channel, Endpoint, Uri},
    Extensions, Request, Response, Status,
};
use tower::Service;

use crate::{
    codec::RawCodec,
    deadline::{Budget, CallerDeadline, Deadline, Timeouts, GRPC_TIMEOUT},
    error::ShimError,
    h2channel::H2Channel,
    methods::Method,
    request::CriRequest,
};

/// Largest message the shim decodes, in either direction.
///
/// kubelet's CRI client accepts at most 16 MiB and containerd's defaults are
/// 16 MiB each way. The shim allows more on both sides, so it never rejects a
/// message that would pass without it: an oversized message is refused by the
/// same party (and with the same error) as without the shim.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// containerd's default CRI endpoint.
pub const DEFAULT_UPSTREAM_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";

/// HTTP/2 keepalive towards upstream. containerd's gRPC server keeps Go's
/// default enforcement policy (pings no more often than every 5 minutes, and
/// none without an open stream), and answers a faster pinger with GOAWAY
/// `too_many_pings`. So: ping only while calls are open, every 5 minutes. A
/// dead upstream on a unix socket shows up as EOF long before that; this only
/// catches a wedged one under a long-lived stream.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5 * 60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Headers that belong to one HTTP/2 + gRPC hop and must not be copied to the
/// next: framing, compression negotiation, the peer's identity, deadlines and
/// status (both re-derived per hop).
const HOP_HEADERS: [HeaderName; 11] = [
    HeaderName::from_static("te"),
    HeaderName::from_static("content-type"),
    HeaderName::from_static("content-length"),
    HeaderName::from_static("user-agent"),
    HeaderName::from_static("grpc-timeout"),
    HeaderName::from_static("grpc-encoding"),
    HeaderName::from_static("grpc-accept-encoding"),
    HeaderName::from_static("grpc-message-type"),
    HeaderName::from_static("grpc-status"),
    HeaderName::from_static("grpc-message"),
    HeaderName::from_static("grpc-status-details-bin"),
];

/// Where and how to reach the upstream CRI endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// A unix socket path, or a `unix://` URL as kubelet takes it.
    pub endpoint: String,
    /// Default deadline for a unary call when the caller sets none (kubelet's
    /// `--runtime-request-timeout` is 2 minutes).
    pub call_timeout: Duration,
    /// Default deadline for `PullImage` (kubelet sets none for pulls).
    pub pull_image_timeout: Duration,
    /// Limit for (re)establishing the connection.
    pub connect_timeout: Duration,
}

impl UpstreamConfig {
    pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(2 * 60);
    pub const DEFAULT_PULL_IMAGE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Defaults for everything but the endpoint.
    pub fn new(endpoint: impl Into<String>) -> Self {
        UpstreamConfig {
            endpoint: endpoint.into(),
            call_timeout: Self::DEFAULT_CALL_TIMEOUT,
            pull_image_timeout: Self::DEFAULT_PULL_IMAGE_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig::new(DEFAULT_UPSTREAM_ENDPOINT)
    }
}

/// The socket path named by a CRI endpoint string.
fn socket_path(endpoint: &str) -> Result<PathBuf, ShimError> {
    let invalid = |reason| ShimError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let path = match endpoint.split_once("://") {
        Some(("unix", path)) => path,
        Some(_) => return Err(invalid("only unix sockets are supported")),
        None => endpoint,
    };
    if path.is_empty() {
        return Err(invalid("empty socket path"));
    }
    Ok(PathBuf::from(path))
}

/// A lazily connected channel to a CRI endpoint: nothing is dialled until the
/// first call, and a broken connection is re-dialled on the next call.
/// Must be called inside a Tokio runtime.
pub fn cri_channel(endpoint: &str) -> Result<Channel, ShimError> {
    lazy_channel(endpoint, UpstreamConfig::DEFAULT_CONNECT_TIMEOUT)
}

fn lazy_channel(endpoint: &str, connect_timeout: Duration) -> Result<Channel, ShimError> {
    let path: Arc<PathBuf> = Arc::new(socket_path(endpoint)?);
    let connector = tower::service_fn(move |_: Uri| {
        let path = Arc::clone(&path);
        async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(&*path).await?)) }
    });
    // The URI only supplies `:authority`; the connector ignores it. gRPC-Go
    // uses "localhost" for unix sockets too.
    Ok(Endpoint::from_static("http://localhost")
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(false)
        .connect_with_connector_lazy(connector))
}

type RuntimeClient = RuntimeServiceClient<UpstreamChannel>;

/// A cloneable handle on the upstream CRI endpoint. Clones share one
/// connection.
#[derive(Debug, Clone)]
pub struct Upstream {
    runtime: RuntimeClient,
    channel: UpstreamChannel,
    timeouts: Timeouts,
}

/// A request whose message the shim holds as bytes, with the deadline
/// budget read from it.
#[derive(Debug, Clone)]
pub(crate) struct RawRequest {
    pub(crate) bytes: Bytes,
    pub(crate) budget: Budget,
}

impl CriRequest for RawRequest {
    fn budget(&self) -> Budget {
        self.budget
    }
}

/// Request headers that describe the caller's hop and are not relayed:
/// the deadline is re-derived, the length may differ, the authority is the
/// shim's own.
const RELAY_DROPPED: [HeaderName; 3] = [
    HeaderName::from_static("grpc-timeout"),
    HeaderName::from_static("content-length"),
    HeaderName::from_static("host"),
];

impl Upstream {
    /// Prepares the client without connecting: the first call dials, and a
    /// lost connection is re-dialled by the next call, so the shim can start
    /// before containerd and survives its restarts. Must be called inside a
    /// Tokio runtime.
    pub fn connect_lazy(cfg: &UpstreamConfig) -> Result<Upstream, ShimError> {
        let channel = UpstreamChannel {
            channel: H2Channel::new(socket_path(&cfg.endpoint)?, cfg.connect_timeout),
            link: Arc::new(Link {
                endpoint: cfg.endpoint.as_str().into(),
                reachable: AtomicBool::new(true),
            }),
        };
        Ok(Upstream {
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE),
            channel,
            timeouts: Timeouts {
                call: cfg.call_timeout,
                pull_image: cfg.pull_image_timeout,
            },
        })
    }

    pub(crate) fn runtime(&self) -> RuntimeClient {
        self.runtime.clone()
    }

    /// Forwards one call: `call` receives the outgoing request and performs
    /// the RPC (on a client from [`Upstream::runtime`], or raw).
    /// For a server-streaming call the deadline covers getting the response
    /// headers; the stream itself is bounded by the caller (and by upstream,
    /// which receives the caller's deadline).
    pub(crate) async fn forward<Req, Resp, Fut>(
        &self,
        method: &'static str,
        request: Request<Req>,
        call: impl FnOnce(Request<Req>) -> Fut,
    ) -> Result<Response<Resp>, Status>
    where
        Req: CriRequest,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let now = Instant::now();
        let deadline = Deadline::choose(
            caller_deadline(&request, now),
            request.get_ref().budget(),
            &self.timeouts,
            now,
        );
        let (mut metadata, _, message) = request.into_parts();
        strip_hop_headers(&mut metadata);
        let mut request = Request::from_parts(metadata, Extensions::new(), message);
        if let Some(deadline) = deadline {
            let Some(remaining) = deadline.remaining(now) else {
                return Err(deadline_exceeded(method, deadline));
            };
            request.set_timeout(remaining);
        }
        // tonic's client panics on some malformed replies (e.g. status details
        // that are not base64); that is upstream's fault, not a shim bug.
        let call = AssertUnwindSafe(call(request)).catch_unwind();
        let outcome = match deadline {
            None => call.await,
            Some(deadline) => match tokio::time::timeout_at(deadline.at, call).await {
                Ok(outcome) => outcome,
                Err(_) => return Err(deadline_exceeded(method, deadline)),
            },
        };
        let reply = outcome.map_err(|panic| malformed_reply(method, &*panic))?;
        match reply {
            Ok(response) => {
                let (mut metadata, message, _) = response.into_parts();
                strip_hop_headers(&mut metadata);
                Ok(Response::from_parts(metadata, message, Extensions::new()))
            }
            Err(status) if is_deadline_marker(&status) => Err(match deadline {
                Some(deadline) => deadline_exceeded(method, deadline),
                None => pass_status(status),
            }),
            Err(status) => Err(pass_status(status)),
        }
    }
}

impl Upstream {
    /// Forwards one unary call whose message the shim holds as bytes, with
    /// the deadline and error handling of [`Upstream::forward`]; the answer
    /// is upstream's message bytes.
    pub(crate) async fn unary_raw(
        &self,
        method: &'static Method,
        request: Request<RawRequest>,
    ) -> Result<Response<Bytes>, Status> {
        let channel = self.channel.clone();
        self.forward(method.name, request, |request| async move {
            let (mut grpc, request, path) = raw_call(channel, method, request).await?;
            grpc.unary(request, path, RawCodec).await
        })
        .await
    }

    /// Opens one server-streaming call whose messages the shim handles as
    /// bytes; the deadline covers getting the answer's headers.
    pub(crate) async fn streaming_raw(
        &self,
        method: &'static Method,
        request: Request<RawRequest>,
    ) -> Result<Response<tonic::Streaming<Bytes>>, Status> {
        let channel = self.channel.clone();
        self.forward(method.name, request, |request| async move {
            let (mut grpc, request, path) = raw_call(channel, method, request).await?;
            grpc.server_streaming(request, path, RawCodec).await
        })
        .await
    }

    /// Relays one call as it came: the caller's headers (minus
    /// [`RELAY_DROPPED`]) and body bytes go upstream, upstream's answer
    /// (headers, body, trailers) comes back unchanged. The deadline is the
    /// caller's or the default for `budget`; it bounds getting the answer's
    /// headers and is sent upstream as its `grpc-timeout`. The shim's own
    /// failures (upstream unreachable, deadline) are gRPC statuses.
    pub(crate) async fn relay(
        &self,
        name: &str,
        mut parts: http::request::Parts,
        body: Bytes,
        budget: Budget,
    ) -> http::Response<Body> {
        let now = Instant::now();
        let caller = parts
            .extensions
            .get::<CallerDeadline>()
            .copied()
            .or_else(|| CallerDeadline::from_header(parts.headers.get(GRPC_TIMEOUT), now));
        let deadline = Deadline::choose(caller, budget, &self.timeouts, now);
        for header in &RELAY_DROPPED {
            parts.headers.remove(header);
        }
        if let Some(deadline) = deadline {
            let Some(remaining) = deadline.remaining(now) else {
                return deadline_exceeded(name, deadline).into_http();
            };
            parts
                .headers
                .insert(GRPC_TIMEOUT, crate::deadline::encode_timeout(remaining));
        }
        let request = http::Request::from_parts(parts, Body::new(http_body_util::Full::new(body)));
        let mut channel = self.channel.clone();
        let call = channel.call(request);
        let answer = match deadline {
            None => call.await,
            Some(deadline) => match tokio::time::timeout_at(deadline.at, call).await {
                Ok(answer) => answer,
                Err(_) => return deadline_exceeded(name, deadline).into_http(),
            },
        };
        match answer {
            Ok(response) => response,
            Err(err) => match err.downcast::<Status>() {
                Ok(status) => status.into_http(),
                Err(err) if err.is::<DeadlinePassed>() => match deadline {
                    Some(deadline) => deadline_exceeded(name, deadline).into_http(),
                    None => Status::unavailable(err.to_string()).into_http(),
                },
                Err(err) => Status::unavailable(err.to_string()).into_http(),
            },
        }
    }
}

/// A ready raw-bytes client on `channel`, the message and the path of one
/// call of `method`.
async fn raw_call(
    channel: UpstreamChannel,
    method: &'static Method,
    request: Request<RawRequest>,
) -> Result<
    (
        tonic::client::Grpc<UpstreamChannel>,
        Request<Bytes>,
        http::uri::PathAndQuery,
    ),
    Status,
> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE);
    grpc.ready().await.map_err(Status::from_error)?;
    let path = http::uri::PathAndQuery::from_static(method.path);
    Ok((grpc, request.map(|raw| raw.bytes), path))
}

/// The channel enforces the `grpc-timeout` we send upstream with its own
/// timer (tonic clients do). When that timer fires in the same tick as ours,
/// it wins the race; this marker lets [`Upstream::forward`] report it as the
/// shim's deadline rather than as an upstream failure.
#[derive(Debug, thiserror::Error)]
#[error("the call's deadline passed before upstream answered")]
struct DeadlinePassed;

fn is_deadline_marker(status: &Status) -> bool {
    std::error::Error::source(status).is_some_and(|s| s.is::<DeadlinePassed>())
}

fn is_local_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(err) = cause {
        if err.is::<tonic::TimeoutExpired>() {
            return true;
        }
        cause = err.source();
    }
    false
}

/// The caller's deadline, as recorded on arrival by the server layer; parsed
/// here if the service runs without that layer.
fn caller_deadline<T>(request: &Request<T>, now: Instant) -> Option<CallerDeadline> {
    request
        .extensions()
        .get::<CallerDeadline>()
        .copied()
        .or_else(|| {
            let header = request.metadata().as_ref().get(GRPC_TIMEOUT);
            CallerDeadline::from_header(header, now)
        })
}

fn malformed_reply(method: &'static str, panic: &(dyn std::any::Any + Send)) -> Status {
    let reason = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the gRPC client panicked".to_owned());
    tracing::error!(method, %reason, "malformed reply from upstream CRI endpoint");
    ShimError::MalformedReply { method, reason }.into()
}

fn deadline_exceeded(method: &str, deadline: Deadline) -> Status {
    tracing::warn!(
        method,
        timeout = ?deadline.total,
        deadline = %deadline.source,
        "upstream CRI call timed out"
    );
    ShimError::DeadlineExceeded {
        method: method.to_owned(),
        timeout: deadline.total,
        source_of_deadline: deadline.source,
    }
    .into()
}

/// Upstream's status with only hop headers removed from its metadata.
pub(crate) fn pass_status(mut status: Status) -> Status {
    strip_hop_headers(status.metadata_mut());
    status
}

fn strip_hop_headers(metadata: &mut MetadataMap) {
    if metadata.is_empty() {
        return;
    }
    let mut headers = std::mem::take(metadata).into_headers();
    for name in &HOP_HEADERS {
        headers.remove(name);
    }
    *metadata = MetadataMap::from_headers(headers);
}

/// State shared by all clones of the upstream channel.
#[derive(Debug)]
struct Link {
    endpoint: Arc<str>,
    /// Last observed reachability, to log transitions once instead of every
    /// failed call.
    reachable: AtomicBool,
}

impl Link {
    fn succeeded(&self) {
        if !self.reachable.load(Ordering::Relaxed) && !self.reachable.swap(true, Ordering::Relaxed)
        {
            tracing::info!(endpoint = %self.endpoint, "upstream CRI endpoint is reachable again");
        }
    }

    /// Turns a transport failure into the status the caller sees. It is boxed
    /// as the channel's error; tonic's client returns a boxed `Status` as is.
    fn unavailable(&self, err: &(dyn std::error::Error + 'static)) -> tonic::codegen::StdError {
        let mut reason = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        if self.reachable.swap(false, Ordering::Relaxed) {
            tracing::warn!(endpoint = %self.endpoint, %reason, "upstream CRI endpoint is unavailable");
        }
        let status: Status = ShimError::UpstreamUnavailable {
            endpoint: Arc::clone(&self.endpoint),
            reason,
        }
        .into();
        Box::new(status)
    }
}

/// The tonic channel, with transport failures reported as `Unavailable`
/// naming the upstream endpoint.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamChannel {
    channel: H2Channel,
    link: Arc<Link>,
}

impl Service<http::Request<Body>> for UpstreamChannel {
    type Response = http::Response<Body>;
    type Error = tonic::codegen::StdError;
    type Future = UpstreamFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.channel
            .poll_ready(cx)
            .map_err(|e| self.link.unavailable(&*e))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        UpstreamFuture {
            inner: self.channel.call(request),
            link: Arc::clone(&self.link),
        }
    }
}

pub(crate) struct UpstreamFuture {
    inner: <H2Channel as Service<http::Request<Body>>>::Future,
    link: Arc<Link>,
}

impl std::fmt::Debug for UpstreamFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamFuture")
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

impl Future for UpstreamFuture {
    type Output = Result<http::Response<Body>, tonic::codegen::StdError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = ready!(Pin::new(&mut self.inner).poll(cx));
        Poll::Ready(match result {
            Ok(response) => {
                self.link.succeeded();
                Ok(response)
            }
            Err(err) if is_local_timeout(&*err) => Err(Box::new(DeadlinePassed)),
            Err(err) => Err(self.link.unavailable(&*err)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            socket_path("unix:///run/containerd/containerd.sock").expect("url"),
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert_eq!(
            socket_path("/run/containerd/containerd.sock").expect("path"),
            PathBuf::from("/run/containerd/containerd.sock")
        );
        for bad in ["", "unix://", "tcp://127.0.0.1:1234", "http://localhost"] {
            let err = socket_path(bad).expect_err(bad);
            assert!(
                matches!(err, ShimError::InvalidEndpoint { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn local_timeout_is_found_in_the_error_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Wrapper(#[source] tonic::TimeoutExpired);

        assert!(is_local_timeout(&Wrapper(tonic::TimeoutExpired(()))));
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(!is_local_timeout(&refused));
    }

    #[tokio::test]
    async fn channel_timer_winning_the_race_is_still_deadline_exceeded() {
        let upstream =
            Upstream::connect_lazy(&UpstreamConfig::new("/nonexistent/cri.sock")).expect("config");
        let err = upstream
            .forward(
                "Version",
                Request::new(fast_sandbox_proto::cri::VersionRequest::default()),
                |_| async {
                    // What tonic's client makes of our channel's marker error.
                    Err::<Response<()>, _>(Status::from_error(Box::new(DeadlinePassed)))
                },
            )
            .await
            .expect_err("deadline");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        assert!(err.message().contains("Version"));
    }

    #[test]
    fn hop_headers_are_dropped_custom_metadata_kept() {
        let mut md = MetadataMap::new();
        md.insert("grpc-timeout", "5S".parse().expect("value"));
        md.insert("user-agent", "grpc-go/1.60".parse().expect("value"));
        md.insert("content-type", "application/grpc".parse().expect("value"));
        md.insert("grpc-status", "0".parse().expect("value"));
        md.insert("x-request-id", "abc".parse().expect("value"));
        md.insert_bin(
            "trace-bin",
            tonic::metadata::MetadataValue::from_bytes(b"\x01\x02"),
        );
        strip_hop_headers(&mut md);
        assert_eq!(md.len(), 2, "{md:?}");
        assert_eq!(md.get("x-request-id").expect("kept"), "abc");
        assert!(md.get_bin("trace-bin").is_some());
    }
}
