//! The controller's side of the NodeAgent link's mutual TLS: every
//! connection to a node agent is made with the client configuration
//! current at that moment ([`Reloading`]: a rotated client certificate or
//! CA is used from the next connection on, without a restart), and the
//! agent's certificate must chain to the CA *and name the node dialled*:
//! the address comes from the Node object, which its kubelet writes, so
//! the name is what proves the agent is that node's. An agent that fails
//! this gets no request, and so no bearer token, at all.

use std::sync::Arc;

use fast_sandbox_proto::tls::Reloading;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The reloading client configuration the directory dials with.
pub type ClientTls = Arc<Reloading<Arc<ClientConfig>>>;

/// Why a TLS connection to a node agent failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0:?} is not a DNS name a certificate can carry")]
    NodeName(String),
    #[error("the agent URI {0} has no host and port")]
    Uri(Uri),
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake as node {node:?}: {source}")]
    Handshake {
        node: String,
        source: std::io::Error,
    },
}

/// A lazy channel to `endpoint` whose connections are TLS, the server's
/// certificate required to name `node`.
pub fn channel(endpoint: Endpoint, tls: ClientTls, node: &str) -> Result<Channel, DialError> {
    let name =
        ServerName::try_from(node.to_owned()).map_err(|_| DialError::NodeName(node.to_owned()))?;
    let node = node.to_owned();
    let connector = tower::service_fn(move |uri: Uri| {
        let (tls, name, node) = (tls.clone(), name.clone(), node.clone());
        async move { dial(uri, &tls, name, node).await.map(TokioIo::new) }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

async fn dial(
    uri: Uri,
    tls: &ClientTls,
    name: ServerName<'static>,
    node: String,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, DialError> {
    let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else {
        return Err(DialError::Uri(uri));
    };
    // An IPv6 literal comes bracketed.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(DialError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let (config, error) = tls.current();
    if let Some(error) = error {
        tracing::error!(
            error = format!("{error:#}"),
            "the changed agent TLS credential is unusable; dialling with the previous one"
        );
    }
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|source| DialError::Handshake { node, source })
}
