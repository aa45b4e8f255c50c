//! The extender over HTTPS, as kube-scheduler's extender `tlsConfig`
//! expects: the certificate and key of a mounted Secret (`tls.crt`,
//! `tls.key`), re-read when they change; with a `ca.crt` there too, a
//! client certificate chained to it is required (the scheduler's
//! `tlsConfig.certFile`). A plain-HTTP client fails the handshake.

use std::net::SocketAddr;
use std::sync::Arc;

use fast_sandbox_proto::tls::{accept, ServerTls};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use super::{router, Extender};

/// The accepted, handshaken connections, as axum takes them.
struct TlsListener {
    connections: mpsc::Receiver<TlsStream<TcpStream>>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.connections.recv().await {
                Some(stream) => match stream.get_ref().0.peer_addr() {
                    Ok(peer) => return (stream, peer),
                    // Gone already: next.
                    Err(_) => continue,
                },
                // The accept loop ended (it only does when this listener
                // is dropped): nothing more will come.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves the extender over HTTPS on `listener` until the task is dropped.
pub async fn serve_tls(
    listener: TcpListener,
    extender: Arc<Extender>,
    tls: ServerTls,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let listener = TlsListener {
        connections: accept(listener, tls, "scheduler extender"),
        local,
    };
    axum::serve(listener, router(extender)).await
}
