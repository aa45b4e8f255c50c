//! The node agent's TLS listener: every accepted connection is handshaken
//! with the configuration current at that moment ([`Reloading`]), so a
//! rotated certificate, key or CA is served from the next connection on,
//! without a restart. A client without a certificate from the CA for
//! client authentication fails the handshake and never reaches a handler.

use std::sync::Arc;
use std::time::Duration;

use fast_sandbox_proto::tls::Reloading;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::{wrappers::ReceiverStream, Stream};

/// The reloading server configuration the agent serves with.
pub type ServerTls = Arc<Reloading<Arc<ServerConfig>>>;

/// Longest a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 64;
/// Pause after an accept error (out of file descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The connections of `listener` that completed a TLS handshake, for
/// `serve_with_incoming`. Ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(accept_loop(listener, tls, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    tls: ServerTls,
    tx: mpsc::Sender<std::io::Result<TlsStream<TcpStream>>>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tx.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "node agent: accepting a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (config, error) = tls.current();
        if let Some(error) = error {
            tracing::error!(
                error = format!("{error:#}"),
                "node agent: the changed TLS credential is unusable; serving the previous one"
            );
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send(Ok(stream)).await;
                }
                Ok(Err(error)) => {
                    tracing::warn!(%peer, %error, "node agent: TLS handshake refused");
                }
                Err(_) => tracing::warn!(%peer, "node agent: TLS handshake timed out"),
            }
            drop(permit);
        });
    }
}
