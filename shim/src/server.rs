//! The CRI server: every call on the shim's socket, routed by gRPC path.
//!
//! - A call the shim does not change is relayed as bytes (`relay`): its
//!   message is decoded once to refuse malformed input and to name the pod
//!   in the call's span, never re-encoded; upstream's answer (headers, body,
//!   trailers) comes back untouched. A method the compiled schema does not
//!   know is relayed the same way, unread.
//! - With slots, the calls listed in [`Intercepted`] are handled in
//!   handlers.rs: the claim point, calls that name a sandbox by id (an
//!   unclaimed slot is refused as containerd refuses an unknown id), and the
//!   answers rewritten for slots. Their messages are edited with
//!   preserve.rs, so every field the shim does not own survives, known to
//!   the compiled schema or not.
//!
//! HTTP/2 is served by hyper on connections that first pass through
//! authority.rs (any `:authority` is accepted, as containerd accepts it).

use std::{
    convert::Infallible,
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;
use tonic::{body::Body, codegen::http, Status};
use tracing::Instrument;

use crate::{
    authority::Normalized,
    capture,
    codec::decode_status,
    deadline::{Budget, CallerDeadline, GRPC_TIMEOUT},
    error::ShimError,
    methods::{self, Handling, Intercepted, Method},
    socket::{self, SocketConfig},
    state::elapsed_us,
    upstream::MAX_MESSAGE_SIZE,
};

pub use crate::state::Shim;

/// Server-side HTTP/2 keepalive towards kubelet: reaps connections of a
/// wedged client holding long-lived streams. kubelet's gRPC-Go client does not
/// police pings, so this may be more frequent than the upstream side.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2 * 60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// After shutdown is requested, how long in-flight calls may finish before
/// [`serve`] returns anyway (an image pull can take far longer).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves CRI on `socket` until `shutdown` completes, then stops accepting,
/// ends event streams, lets in-flight calls finish (bounded) and removes the
/// socket file.
pub async fn serve(
    shim: Shim,
    socket: &SocketConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ShimError> {
    let (listener, _socket_guard) = socket::bind(socket).await?;
    tracing::info!(path = %socket.path.display(), "serving CRI");
    let shim = Arc::new(shim);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        // containerd's answers carry no `date`: relayed ones stay as they are.
        .auto_date_header(false);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shim = Arc::clone(&shim);
                    let service = hyper::service::service_fn(move |request| {
                        let shim = Arc::clone(&shim);
                        async move { Ok::<_, Infallible>(shim.route(request).await) }
                    });
                    let connection = http2.serve_connection(TokioIo::new(Normalized::new(stream)), service);
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(err) = connection.await {
                            connection_ended(&err);
                        }
                    });
                }
                Err(err) => tracing::warn!(error = %err, "accepting a CRI connection failed"),
            },
            () = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down the CRI server");
    drop(listener);
    shim.stopping.send_replace(true);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?DRAIN_TIMEOUT, "CRI calls still in flight at shutdown; abandoning them");
    }
    Ok(())
}

/// A client connection that ended in error: a protocol error is logged at
/// WARN (once: the connection is over), a peer that went away at DEBUG.
fn connection_ended(err: &hyper::Error) {
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    let peer_gone = {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
        let mut gone = false;
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                gone |= matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::UnexpectedEof
                );
            }
            cause = e.source();
        }
        gone
    };
    if peer_gone || err.is_closed() || err.is_canceled() || err.is_incomplete_message() {
        tracing::debug!(error = %chain, "CRI client connection closed");
    } else {
        tracing::warn!(error = %chain, "CRI client connection refused at the HTTP/2 level");
    }
}

/// A request body, whole, bounded like a message (plus its gRPC prefix).
async fn read_body(body: Incoming) -> Result<Bytes, Status> {
    let limited = http_body_util::Limited::new(body, MAX_MESSAGE_SIZE + 5);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(Status::out_of_range(
            format!("Error, decoded message length too large: found more than {MAX_MESSAGE_SIZE} bytes (the limit)"),
        )),
        Err(err) => Err(Status::cancelled(format!("reading the request failed: {err}"))),
    }
}

/// The gRPC status of an answer: from its trailers, or its headers for a
/// trailers-only answer. Neither says: `Unknown` (2), as gRPC clients read
/// it; for a stream just opened, its trailers are still to come (OK so far).
fn answer_status(
    headers: &http::HeaderMap,
    trailers: Option<&http::HeaderMap>,
    open_stream: bool,
) -> (i32, String) {
    let field = |name: &str| {
        trailers
            .and_then(|t| t.get(name))
            .or_else(|| headers.get(name))
            .and_then(|v| v.to_str().ok())
    };
    let code = field("grpc-status")
        .and_then(|c| c.parse().ok())
        .unwrap_or(if open_stream { 0 } else { 2 });
    let message = field("grpc-message").map(percent_decode);
    (code, message.unwrap_or_default())
}

/// `grpc-message` is percent-encoded.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => match std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => out.push(b'%'),
            },
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Shim {
    /// Every call starts here.
    async fn route(self: Arc<Self>, mut request: http::Request<Incoming>) -> http::Response<Body> {
        let arrived = Instant::now();
        if let Some(deadline) =
            CallerDeadline::from_header(request.headers().get(GRPC_TIMEOUT), arrived)
        {
            request.extensions_mut().insert(deadline);
        }
        if let Some(authority) = request.uri().authority() {
            let authority = crate::handlers::Authority(authority.to_string());
            request.extensions_mut().insert(authority);
        }
        match methods::lookup(request.uri().path()) {
            Some(method) => match (method.handling, &self.slots) {
                // Event streams are always the shim's: they end at shutdown.
                (Handling::Intercept(which @ Intercepted::GetContainerEvents), _)
                | (Handling::Intercept(which), Some(_)) => {
                    self.intercept(method, which, request).await
                }
                _ => {
                    let span = methods::span(method.level, method.name);
                    self.relay(Some(method), request).instrument(span).await
                }
            },
            None => {
                let path = request.uri().path().to_owned();
                let span = methods::span(tracing::Level::INFO, &path);
                self.relay(None, request).instrument(span).await
            }
        }
    }

    /// A call the shim does not change: validated, relayed as bytes, and its
    /// outcome logged (and captured). Unary answers are read whole first
    /// (they are one message), streams pass as they come.
    async fn relay(
        &self,
        method: Option<&'static Method>,
        request: http::Request<Incoming>,
    ) -> http::Response<Body> {
        let started = Instant::now();
        let wall = SystemTime::now();
        let name = method.map_or(request.uri().path(), |m| m.name).to_owned();
        let path = request.uri().path().to_owned();
        let authority = request.uri().authority().map(ToString::to_string);
        let (parts, body) = request.into_parts();
        let body = match read_body(body).await {
            Ok(body) => body,
            Err(status) => return status.into_http(),
        };
        let seen = Seen {
            path: &path,
            method,
            authority: authority.as_deref(),
            wall,
            started,
            body: &body,
        };
        let message = methods::message_of(&body);
        let budget = match (method, &message) {
            (Some(method), Some(message)) => {
                match (method.inspect)(message, &tracing::Span::current()) {
                    Ok(budget) => budget,
                    Err(err) => {
                        tracing::debug!(error = %err, "refusing a malformed request");
                        let refused = decode_status(&err).into_http();
                        let head = refused.headers();
                        self.captured(&seen, None, head, None);
                        return refused;
                    }
                }
            }
            // Framing the shim cannot read (compression, several messages):
            // upstream answers it as it would without the shim.
            (Some(_), None) => Budget::Call,
            // Unknown: maybe a stream; only the caller's deadline applies.
            (None, _) => Budget::Unbounded,
        };
        let response = self
            .upstream
            .relay(&name, parts, body.clone(), budget)
            .await;
        let streaming = method.is_none_or(|m| m.streaming);
        if streaming && self.capture.is_none() {
            tracing::debug!(elapsed_us = elapsed_us(started), "stream relayed");
            return response;
        }
        let (head, answer) = response.into_parts();
        if streaming {
            self.captured(&seen, None, &head.headers, None);
            return http::Response::from_parts(head, answer);
        }
        let collected = match answer.collect().await {
            Ok(collected) => collected,
            Err(err) => {
                let status =
                    Status::unavailable(format!("reading upstream's answer failed: {err}"));
                return status.into_http();
            }
        };
        let trailers = collected.trailers().cloned();
        let data = collected.to_bytes();
        let (code, message_text) = answer_status(&head.headers, trailers.as_ref(), false);
        if code == 0 {
            tracing::event!(target: "fast_sandbox_shim::server", tracing::Level::DEBUG, elapsed_us = elapsed_us(started), "ok");
        } else {
            tracing::info!(elapsed_us = elapsed_us(started), code, message = %message_text, "failed");
        }
        if self.capture.is_some() {
            let answer = methods::message_of(&data);
            self.captured(&seen, answer.as_ref(), &head.headers, trailers.as_ref());
        }
        http::Response::from_parts(head, replayed_body(data, trailers))
    }
}

/// What the capture file needs of a relayed call.
#[derive(Debug)]
struct Seen<'a> {
    path: &'a str,
    method: Option<&'static Method>,
    authority: Option<&'a str>,
    wall: SystemTime,
    started: Instant,
    body: &'a Bytes,
}

/// A collected answer body sent on as it came. A trailers-only answer (an
/// error: status in the headers, no message) stays trailers-only: an empty
/// body, so the headers end the stream. An empty DATA frame after them
/// would make gRPC-Go clients (kubelet) read `Internal: server closed the
/// stream without sending trailers` instead of upstream's status.
fn replayed_body(data: Bytes, trailers: Option<http::HeaderMap>) -> Body {
    if data.is_empty() && trailers.is_none() {
        return Body::default();
    }
    let mut frames = Vec::with_capacity(2);
    if !data.is_empty() {
        frames.push(Ok::<_, Infallible>(http_body::Frame::data(data)));
    }
    if let Some(trailers) = trailers {
        frames.push(Ok(http_body::Frame::trailers(trailers)));
    }
    Body::new(http_body_util::StreamBody::new(futures::stream::iter(
        frames,
    )))
}

impl Shim {
    /// Writes a relayed call to the capture file, if one is configured.
    fn captured(
        &self,
        seen: &Seen<'_>,
        answer: Option<&Bytes>,
        headers: &http::HeaderMap,
        trailers: Option<&http::HeaderMap>,
    ) {
        let Some(capture) = &self.capture else {
            return;
        };
        let request = methods::message_of(seen.body).unwrap_or_default();
        let (code, message) =
            answer_status(headers, trailers, answer.is_none() && trailers.is_none());
        capture.record(&capture::Call {
            path: seen.path,
            method: seen.method,
            authority: seen.authority,
            started: seen.wall,
            elapsed: seen.started.elapsed(),
            request: &request,
            response: answer.filter(|_| code == 0),
            code,
            message: &message,
        });
    }

    /// A call the shim handles itself (handlers.rs), through tonic's gRPC
    /// framing with message bytes as they are.
    async fn intercept(
        self: Arc<Self>,
        method: &'static Method,
        which: Intercepted,
        request: http::Request<Incoming>,
    ) -> http::Response<Body> {
        let mut grpc = tonic::server::Grpc::new(crate::codec::RawCodec)
            .max_decoding_message_size(MAX_MESSAGE_SIZE);
        if which == Intercepted::GetContainerEvents {
            grpc.server_streaming(crate::handlers::events::Events(self), request)
                .await
        } else {
            grpc.unary(
                crate::handlers::Unary {
                    shim: self,
                    method,
                    which,
                },
                request,
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(percent_decode("not%20found%3A%20x"), "not found: x");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
