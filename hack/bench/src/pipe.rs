//! The floor of any proxy: a process that copies bytes between the client
//! and containerd and reads none of them. `proxy` measures it beside the
//! shim, so the shim's cost is split into what one more process hop costs on
//! this machine (wakeups, context switches, two more socket copies) and what
//! the shim adds on top (HTTP/2 on both sides, routing, validation).

use std::{path::PathBuf, process::Stdio};

use anyhow::Context as _;
use tokio::net::{UnixListener, UnixStream};

use crate::common::NodeProcess;

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// Socket to listen on.
    #[arg(long)]
    listen: PathBuf,
    /// containerd's socket (a path, or `unix://` + path).
    #[arg(long)]
    upstream: String,
}

/// Runs the pipe until killed: one upstream connection per client
/// connection, bytes copied both ways, on the bench's current-thread
/// runtime: as lean as a user-space relay gets with tokio.
pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let listener = UnixListener::bind(&opts.listen)
        .with_context(|| format!("binding {}", opts.listen.display()))?;
    let upstream = PathBuf::from(opts.upstream.trim_start_matches("unix://"));
    loop {
        let (mut client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            match UnixStream::connect(&upstream).await {
                Ok(mut server) => {
                    // The connection ends when either side hangs up.
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
                Err(err) => eprintln!("pipe: connecting to {}: {err}", upstream.display()),
            }
        });
    }
}

/// A pipe process beside the bench, forwarding to `upstream`; callers wait
/// for it with [`crate::common::wait_ready`].
pub fn spawn(upstream: &str) -> anyhow::Result<NodeProcess> {
    let dir = tempfile::Builder::new()
        .prefix("fs-bench-pipe-")
        .tempdir()?;
    let socket = dir.path().join("pipe.sock");
    let child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("pipe")
        .arg("--listen")
        .arg(&socket)
        .arg("--upstream")
        .arg(upstream)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the pipe process")?;
    Ok(NodeProcess::serving(child, socket, dir))
}
