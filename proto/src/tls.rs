//! Mutual TLS on the NodeAgent link, as both ends build it: the node
//! plugin serves with its node's certificate and accepts only client
//! certificates for client authentication issued by the CA; the controller
//! trusts only that CA and presents its client certificate. Part of the
//! API's contract, like [`crate::token`], so one implementation serves both.
//!
//! Credentials are PEM files (a mounted Secret or a host directory).
//! [`Reloading`] re-reads them when any of them changes (modification time,
//! size or inode, so a Secret volume's symlink swap counts), so a rotated
//! certificate or CA is used from the next handshake on, without a restart.

mod accept;
pub use accept::{accept, ServerTls};

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN of gRPC: HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

/// One end's credential files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This end's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates (PEM) the other end's certificate must chain to.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// `tls.crt`, `tls.key` and `ca.crt` in `dir` (a `kubernetes.io/tls`
    /// Secret with the CA added, as mounted).
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        }
    }

    fn paths(&self) -> [&Path; 3] {
        [&self.cert, &self.key, &self.ca]
    }
}

/// Why credentials cannot be used; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a PEM private key ({source})")]
    Key {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: not PEM certificates ({source})")]
    Certificates {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: not a usable CA certificate ({source})")]
    Ca {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{cert} with {key}: {source}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("building the certificate verifier from {path}: {reason}")]
    Verifier { path: PathBuf, reason: String },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Certificates {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|source| TlsError::Key {
        path: path.to_owned(),
        source,
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|source| TlsError::Ca {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pair_error(files: &TlsFiles) -> impl FnOnce(rustls::Error) -> TlsError + '_ {
    |source| TlsError::Pair {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    }
}

fn verifier_error(
    files: &TlsFiles,
) -> impl FnOnce(rustls::server::VerifierBuilderError) -> TlsError + '_ {
    |e| TlsError::Verifier {
        path: files.ca.clone(),
        reason: e.to_string(),
    }
}

/// A server with `files`' certificate, requiring client certificates that
/// chain to `files.ca` when `client_auth`, speaking `alpn`.
fn server(files: &TlsFiles, client_auth: bool, alpn: &[u8]) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(pair_error(files))?;
    let builder = if client_auth {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
            .build()
            .map_err(verifier_error(files))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(certificates(&files.cert)?, private_key(&files.key)?)
        .map_err(pair_error(files))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// The node agent's server side: its certificate, and a client
/// certificate required, chained to `files.ca` and valid for client
/// authentication (node certificates are issued for server authentication
/// only, so one node cannot call another).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    server(files, true, ALPN_H2)
}

/// An HTTPS server (the scheduler extender): its certificate, and, when
/// `files.ca` exists, a client certificate required that chains to it
/// (kube-scheduler's extender `tlsConfig.certFile`); HTTP/1.1.
pub fn https_server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    server(files, files.ca.exists(), b"http/1.1")
}

/// The controller's client side: servers must chain to `files.ca` (and
/// name the host dialled, which the caller passes at connect), and this
/// end presents its own certificate.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(&files.ca)?, provider())
        .build()
        .map_err(verifier_error(files))?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(pair_error(files))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(certificates(&files.cert)?, private_key(&files.key)?)
        .map_err(pair_error(files))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// What identifies a file's content without reading it.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// A configuration built from [`TlsFiles`], rebuilt when any file changes.
pub struct Reloading<T> {
    files: TlsFiles,
    build: fn(&TlsFiles) -> Result<T, TlsError>,
    state: Mutex<(Vec<Stamp>, T)>,
}

impl<T> fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl<T: Clone> Reloading<T> {
    /// Builds the first configuration: an error here is the caller's to
    /// report (nothing to fall back to).
    pub fn new(
        files: TlsFiles,
        build: fn(&TlsFiles) -> Result<T, TlsError>,
    ) -> Result<Reloading<T>, TlsError> {
        let stamps = files.paths().map(stamp).to_vec();
        let config = build(&files)?;
        Ok(Reloading {
            files,
            build,
            state: Mutex::new((stamps, config)),
        })
    }

    /// The files it reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration for the next handshake: rebuilt first when a file
    /// changed. When the changed files cannot be used (a rotation caught
    /// half-written), the previous configuration is kept and the error
    /// returned once with it; the next change is tried again.
    pub fn current(&self) -> (T, Option<TlsError>) {
        let stamps = self.files.paths().map(stamp).to_vec();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.0 == stamps {
            return (state.1.clone(), None);
        }
        state.0 = stamps;
        match (self.build)(&self.files) {
            Ok(config) => {
                state.1 = config;
                (state.1.clone(), None)
            }
            Err(error) => (state.1.clone(), Some(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TlsFiles::in_dir(dir.path());
        let err = server_config(&files).expect_err("no files").to_string();
        assert!(err.contains("ca.crt"), "{err}");
        std::fs::write(&files.ca, "not pem").expect("write");
        let err = client_config(&files).expect_err("no cert").to_string();
        assert!(err.contains("ca.crt") && err.contains("no PEM"), "{err}");
    }
}
