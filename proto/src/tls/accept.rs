//! A TLS listener: every accepted connection is handshaken with the
//! configuration current at that moment ([`Reloading`]), so a rotated
//! certificate, key or CA is served from the next connection on, without a
//! restart. Handshakes run concurrently (a slow client holds up no other),
//! each with a deadline; a client that fails one (no certificate from the
//! CA, plain HTTP) never reaches a handler.

use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use super::Reloading;

/// A reloading server configuration.
pub type ServerTls = Arc<Reloading<Arc<ServerConfig>>>;

/// Longest a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 64;
/// Pause after an accept error (out of file descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The connections of `listener` that completed a TLS handshake, until
/// the receiver is dropped. `what` names the server in logs.
pub fn accept(
    listener: TcpListener,
    tls: ServerTls,
    what: &'static str,
) -> mpsc::Receiver<TlsStream<TcpStream>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(accept_loop(listener, tls, tx, what));
    rx
}

async fn accept_loop(
    listener: TcpListener,
    tls: ServerTls,
    tx: mpsc::Sender<TlsStream<TcpStream>>,
    what: &'static str,
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
                tracing::warn!(server = what, %error, "accepting a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (config, error) = tls.current();
        if let Some(error) = error {
            tracing::error!(
                server = what,
                error = format!("{error:#}"),
                "the changed TLS credential is unusable; serving the previous one"
            );
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send(stream).await;
                }
                Ok(Err(error)) => {
                    tracing::warn!(server = what, %peer, %error, "TLS handshake refused");
                }
                Err(_) => tracing::warn!(server = what, %peer, "TLS handshake timed out"),
            }
            drop(permit);
        });
    }
}
