//! The NodeAgent link's certificates: a CA, a server certificate per node
//! (its node name as DNS name, server authentication only) and the
//! controller's client certificate (client authentication only). The
//! extended key usages keep the roles apart: a node's certificate cannot
//! call another node's agent, and the controller's cannot serve as a node.
//!
//! `fast-sandbox-controller certs` writes them as `tls.crt`, `tls.key` and
//! `ca.crt` in a directory (docs/deploy.md, "Agent credentials").

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// The DNS name in the controller's client certificate.
pub const CONTROLLER_NAME: &str = "fast-sandbox-controller";

/// Default validity of an issued certificate.
pub const DEFAULT_DAYS: u32 = 90;
/// Validity of a generated CA.
const CA_DAYS: u32 = 3650;

/// Why a certificate cannot be made or stored.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("days: {0} is not between 1 and 3650")]
    Days(u32),
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// The CA that issues the link's certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn generate(what: &str) -> impl FnOnce(rcgen::Error) -> CertError + '_ {
    move |source| CertError::Generate {
        what: what.to_owned(),
        source,
    }
}

fn validity(params: &mut CertificateParams, days: u32) -> Result<(), CertError> {
    if !(1..=CA_DAYS).contains(&days) {
        return Err(CertError::Days(days));
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(i64::from(days));
    Ok(())
}

impl Ca {
    /// A new CA with a fresh key.
    pub fn generate() -> Result<Ca, CertError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "fast-sandbox agent CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, CA_DAYS)?;
        let key = KeyPair::generate().map_err(generate("the CA key"))?;
        let cert = params.self_signed(&key).map_err(generate("the CA"))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA in `cert_pem` with its key `key_pem`.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(generate("the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(generate("the CA"))?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// The CA kept in `dir` as `ca.crt` and `ca.key`; generated and
    /// written there (the key 0600) when `ca.crt` is missing.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CertError> {
        let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CertError::Io {
                path: path.to_owned(),
                source,
            })
        };
        if cert.exists() {
            return Ca::from_pem(&read(&cert)?, &read(&key)?);
        }
        let ca = Ca::generate()?;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CertError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        write_mode(&key, &ca.key_pem(), 0o600).map_err(io(&key))?;
        write_mode(&cert, &ca.cert_pem, 0o644).map_err(io(&cert))?;
        Ok(ca)
    }

    /// The CA certificate, PEM (`ca.crt` of both ends).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A node agent's server certificate for `node` (its Kubernetes name).
    pub fn issue_node(&self, node: &str, days: u32) -> Result<Issued, CertError> {
        self.issue_server(node, days)
    }

    /// A server certificate for `dns_name` (a node, or the extender's
    /// Service name).
    pub fn issue_server(&self, dns_name: &str, days: u32) -> Result<Issued, CertError> {
        self.issue(dns_name, ExtendedKeyUsagePurpose::ServerAuth, days)
    }

    /// The controller's client certificate.
    pub fn issue_controller(&self, days: u32) -> Result<Issued, CertError> {
        self.issue(CONTROLLER_NAME, ExtendedKeyUsagePurpose::ClientAuth, days)
    }

    fn issue(
        &self,
        name: &str,
        usage: ExtendedKeyUsagePurpose,
        days: u32,
    ) -> Result<Issued, CertError> {
        let what = format!("a certificate for {name:?}");
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(generate(&what))?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, name.to_owned());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        validity(&mut params, days)?;
        let key = KeyPair::generate().map_err(generate(&what))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate(&what))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `issued` and this CA as `tls.crt`, `tls.key` (mode 0600) and
    /// `ca.crt` in `dir` (created if missing). Each file is written whole
    /// and renamed into place, so a reader never sees half a file.
    pub fn write_dir(&self, issued: &Issued, dir: &Path) -> Result<(), CertError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CertError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let files = [
            ("ca.crt", self.cert_pem.as_str(), 0o644),
            ("tls.key", issued.key_pem.as_str(), 0o600),
            ("tls.crt", issued.cert_pem.as_str(), 0o644),
        ];
        for (name, content, mode) in files {
            let path = dir.join(name);
            let tmp = dir.join(format!(".{name}.tmp"));
            write_mode(&tmp, content, mode).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
        }
        Ok(())
    }
}

/// Whose certificate `fast-sandbox-controller certs` issues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A node agent's, for this node name.
    Node(String),
    /// A server's for this DNS name (the extender's Service).
    Server(String),
    /// The controller's.
    Controller,
}

/// `fast-sandbox-controller certs`: issues `subject`'s certificate from
/// the CA in `ca_dir` (created there when missing) into `out`.
pub fn issue_into(
    ca_dir: &Path,
    subject: &Subject,
    days: u32,
    out: &Path,
) -> Result<(), CertError> {
    let ca = Ca::load_or_create(ca_dir)?;
    let issued = match subject {
        Subject::Node(node) => ca.issue_node(node, days)?,
        Subject::Server(name) => ca.issue_server(name, days)?,
        Subject::Controller => ca.issue_controller(days)?,
    };
    ca.write_dir(&issued, out)
}

fn write_mode(path: &Path, content: &str, mode: u32) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    file.write_all(content.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_ca_is_reused_and_bad_days_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let first = Ca::load_or_create(dir.path()).expect("created");
        let again = Ca::load_or_create(dir.path()).expect("loaded");
        assert_eq!(first.cert_pem(), again.cert_pem());
        let out = dir.path().join("node");
        issue_into(dir.path(), &Subject::Node("n1".into()), 30, &out).expect("issued");
        let ca = std::fs::read_to_string(out.join("ca.crt")).expect("ca.crt");
        assert_eq!(ca, first.cert_pem());
        let err = first.issue_controller(0).expect_err("0 days").to_string();
        assert!(err.starts_with("days:"), "{err}");
    }
}
