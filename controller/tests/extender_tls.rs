//! The scheduler extender over HTTPS (`controller/src/extender/tls.rs`),
//! on 127.0.0.1 with a certificate from a test CA: a plain-HTTP client
//! gets no answer, an HTTPS one that trusts the CA does, and `run` without
//! a certificate or `--extender-insecure` does not start.

use std::sync::Arc;
use std::time::Duration;

use fast_sandbox_controller::certs::{Ca, DEFAULT_DAYS};
use fast_sandbox_controller::extender::{self, Extender, ExtenderConfig};
use fast_sandbox_controller::links::ExtenderTlsArgs;
use fast_sandbox_controller::scoring::Snapshot;
use fast_sandbox_proto::tls::{https_server_config, Reloading, TlsFiles};
use rustls_pki_types::pem::PemObject as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

const NAME: &str = "fast-sandbox-controller.fast-sandbox-system.svc";
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Sends `HEALTHZ` and reads until the server closes (at most 5 s).
async fn exchange(mut io: impl AsyncRead + AsyncWrite + Unpin) -> Vec<u8> {
    let mut answer = Vec::new();
    let talk = async {
        io.write_all(HEALTHZ).await?;
        io.read_to_end(&mut answer).await
    };
    // Errors (a reset, a TLS alert) are answers too: what was read counts.
    let _ = tokio::time::timeout(Duration::from_secs(5), talk).await;
    answer
}

#[tokio::test]
async fn the_extender_refuses_plain_http_and_answers_https() {
    let ca = Ca::generate().expect("CA");
    let dir = tempfile::tempdir().expect("tmp");
    let issued = ca.issue_server(NAME, DEFAULT_DAYS).expect("issued");
    ca.write_dir(&issued, dir.path()).expect("write");
    // Without ca.crt: server authentication only, as shipped.
    std::fs::remove_file(dir.path().join("ca.crt")).expect("rm ca.crt");
    let tls = Reloading::new(TlsFiles::in_dir(dir.path()), https_server_config).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("addr");
    let extender = Arc::new(Extender::new(
        ExtenderConfig::default(),
        Snapshot::default(),
    ));
    let server = tokio::spawn(extender::serve_tls(listener, extender, Arc::new(tls)));

    let plain = exchange(TcpStream::connect(address).await.expect("connect")).await;
    assert!(
        !plain.starts_with(b"HTTP/"),
        "plain HTTP was answered: {:?}",
        String::from_utf8_lossy(&plain)
    );

    let mut roots = rustls::RootCertStore::empty();
    let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes());
    roots.add(ca_der.expect("CA PEM")).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(address).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(NAME).expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .expect("handshake");
    let answer = String::from_utf8_lossy(&exchange(tls).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
    server.abort();
}

#[test]
fn without_a_certificate_the_extender_needs_the_insecure_flag() {
    let empty = tempfile::tempdir().expect("tmp");
    let args = ExtenderTlsArgs {
        extender_tls_dir: empty.path().to_owned(),
        extender_insecure: false,
    };
    let error = format!("{:#}", args.tls().expect_err("no certificate"));
    assert!(error.contains("--extender-tls-dir"), "{error}");
    assert!(error.contains("--extender-insecure"), "{error}");
    let insecure = ExtenderTlsArgs {
        extender_insecure: true,
        ..args
    };
    assert!(insecure.tls().expect("insecure").is_none());
}
