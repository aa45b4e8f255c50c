//! How `run` secures its two links, as flags: the NodeAgent link (mutual
//! TLS with the agent credential, [`crate::agent`]) and the scheduler
//! extender (HTTPS, [`crate::extender`]). Cleartext on either needs its
//! own explicit `--…-insecure` flag, for development only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use fast_sandbox_proto::tls::{client_config, https_server_config, Reloading, ServerTls, TlsFiles};

use crate::agent::{AgentConfig, AgentToken};
use crate::extender::Extender;

/// Where the Deployment mounts the controller's agent credential.
pub const DEFAULT_AGENT_TLS_DIR: &str = "/etc/fast-sandbox-agent-tls";
/// Where the Deployment mounts the extender's serving certificate.
pub const DEFAULT_EXTENDER_TLS_DIR: &str = "/etc/fast-sandbox-extender-tls";

/// The NodeAgent link's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentLinkArgs {
    /// The controller's agent credential: `tls.crt`/`tls.key` (client
    /// certificate) and `ca.crt` (the CA node certificates chain to);
    /// re-read when they change.
    #[arg(long, default_value = DEFAULT_AGENT_TLS_DIR)]
    pub agent_tls_dir: PathBuf,
    /// Dial node agents in cleartext with the bearer token only
    /// (development; the agents must be `insecure` too).
    #[arg(long)]
    pub agent_insecure: bool,
    /// A bearer token to send as well (required with --agent-insecure);
    /// re-read when an agent refuses it.
    #[arg(long)]
    pub agent_token_file: Option<PathBuf>,
}

impl AgentLinkArgs {
    /// The directory's credentials; errors name the flag.
    pub fn config(&self) -> anyhow::Result<AgentConfig> {
        let token = self
            .agent_token_file
            .as_deref()
            .map(AgentToken::from_file)
            .transpose()
            .context("--agent-token-file")?;
        let tls = if self.agent_insecure {
            anyhow::ensure!(
                token.is_some(),
                "--agent-token-file: required with --agent-insecure"
            );
            tracing::warn!("--agent-insecure: node agents are dialled in cleartext");
            None
        } else {
            let files = TlsFiles::in_dir(&self.agent_tls_dir);
            let tls = Reloading::new(files, client_config).with_context(|| {
                format!(
                    "--agent-tls-dir {}: the controller's agent credential \
                     (or --agent-insecure for development)",
                    self.agent_tls_dir.display()
                )
            })?;
            Some(Arc::new(tls))
        };
        let mut config = AgentConfig::with_credentials(token, tls);
        config.token_file = self.agent_token_file.clone();
        Ok(config)
    }
}

/// The extender's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ExtenderTlsArgs {
    /// The extender's serving certificate: `tls.crt` and `tls.key`, and
    /// optionally `ca.crt` to require client certificates from it;
    /// re-read when they change.
    #[arg(long, default_value = DEFAULT_EXTENDER_TLS_DIR)]
    pub extender_tls_dir: PathBuf,
    /// Serve the extender over plain HTTP (development only).
    #[arg(long)]
    pub extender_insecure: bool,
}

impl ExtenderTlsArgs {
    /// The extender's HTTPS configuration, `None` with
    /// `--extender-insecure`; a missing certificate is an error naming the
    /// flag.
    pub fn tls(&self) -> anyhow::Result<Option<ServerTls>> {
        if self.extender_insecure {
            tracing::warn!("--extender-insecure: the extender serves plain HTTP");
            return Ok(None);
        }
        let files = TlsFiles::in_dir(&self.extender_tls_dir);
        let tls = Reloading::new(files, https_server_config).with_context(|| {
            format!(
                "--extender-tls-dir {}: the extender's serving certificate \
                 (or --extender-insecure for development)",
                self.extender_tls_dir.display()
            )
        })?;
        Ok(Some(Arc::new(tls)))
    }

    /// Binds `listen` and serves the extender, over HTTPS unless
    /// `--extender-insecure`.
    pub async fn serve(&self, listen: SocketAddr, extender: Arc<Extender>) -> anyhow::Result<()> {
        let tls = self.tls()?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the extender on {listen}"))?;
        tracing::info!(
            addr = %listener.local_addr()?,
            https = tls.is_some(),
            "scheduler extender listening"
        );
        match tls {
            Some(tls) => crate::extender::serve_tls(listener, extender, tls).await,
            None => crate::extender::serve(listener, extender).await,
        }
        .with_context(|| format!("serving the extender on {listen}"))
    }
}
