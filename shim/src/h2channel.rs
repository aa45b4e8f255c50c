//! The shim's HTTP/2 transport to upstream: tonic's generated clients
//! encode and decode as usual, this carries the bytes.
//!
//! Why not tonic's `Channel`: hyper's HTTP/2 client opens the stream with
//! HEADERS and only then pipes the body, so every forwarded call reached
//! containerd as two writes (two wakeups of containerd, and the kernel time
//! they cost dominates the hop). Here the request body — one encoded CRI
//! message — is collected first and queued with the headers, so both leave
//! in one write. Responses stream through unchanged (`GetContainerEvents`).
//!
//! One connection, dialled on first use and re-dialled when it breaks.

use std::{
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt as _;
use tokio::{net::UnixStream, sync::Mutex};
use tonic::{body::Body, codegen::http};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Receive window per stream and per connection: a CRI answer of up to a
/// few MiB (a big `ListContainers`) flows without waiting for window updates.
const WINDOW: u32 = 4 * 1024 * 1024;

/// A cloneable HTTP/2 client over a unix socket.
#[derive(Debug, Clone)]
pub(crate) struct H2Channel {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    connect_timeout: Duration,
    sender: Mutex<Option<h2::client::SendRequest<Bytes>>>,
}

impl H2Channel {
    pub(crate) fn new(path: PathBuf, connect_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                path,
                connect_timeout,
                sender: Mutex::new(None),
            }),
        }
    }
}

impl Inner {
    /// A sender ready for a new stream, dialling when there is none or the
    /// connection broke.
    async fn ready_sender(&self) -> Result<h2::client::SendRequest<Bytes>, BoxError> {
        // Fast path: the lock is held only to clone the sender, never while
        // waiting for the connection to take a new stream.
        let cached = self.sender.lock().await.clone();
        if let Some(sender) = cached {
            if let Ok(ready) = sender.ready().await {
                return Ok(ready);
            }
        }
        let mut guard = self.sender.lock().await;
        // Another call may have re-dialled while this one waited.
        if let Some(sender) = guard.clone() {
            if let Ok(ready) = sender.ready().await {
                return Ok(ready);
            }
        }
        let io = tokio::time::timeout(self.connect_timeout, UnixStream::connect(&self.path))
            .await
            .map_err(|_| format!("connecting to {} timed out", self.path.display()))??;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(WINDOW)
            .initial_connection_window_size(WINDOW)
            .handshake::<_, Bytes>(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        *guard = Some(sender.clone());
        drop(guard);
        Ok(sender.ready().await?)
    }
}

impl tower::Service<http::Request<Body>> for H2Channel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            // The whole request message, so it leaves with the headers.
            let data = body.collect().await?.to_bytes();
            if parts.uri.scheme().is_none() {
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                parts.uri = http::Uri::builder()
                    .scheme("http")
                    .authority("localhost")
                    .path_and_query(path)
                    .build()?;
            }
            let mut sender = inner.ready_sender().await?;
            let end_of_stream = data.is_empty();
            let (response, mut stream) =
                sender.send_request(http::Request::from_parts(parts, ()), end_of_stream)?;
            if !end_of_stream {
                stream.send_data(data, true)?;
            }
            let (parts, recv) = response.await?.into_parts();
            Ok(http::Response::from_parts(
                parts,
                Body::new(RecvBody {
                    recv,
                    data_done: false,
                }),
            ))
        })
    }
}

/// An h2 receive stream as an `http_body::Body`: data frames, then trailers.
struct RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match self.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    // Consumed: let the peer send more.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => self.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match self.recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}
