//! Restart of `fast-sandbox-node` with a full warm pool (issue 11): how
//! soon CRI answers again after the process is started (time to the first
//! `Version` answer, measured from the spawn), how long until the pool is
//! full again, and how many of the free slots of the previous run were
//! adopted (kept, not destroyed and rebuilt), after a kill -9 and after a
//! graceful stop. Ends with `fast-sandbox-node uninstall`, which must
//! leave no slot of the pool.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use fast_sandbox_proto::cri::{
    ListPodSandboxRequest, PodSandboxFilter, RemovePodSandboxRequest, StopPodSandboxRequest,
    VersionRequest,
};

use crate::{common, stats::Pretty, warm};

const POOL: &str = "bench-restart";
const PLACEHOLDER_ROOT: &str = "/fast-sandbox-bench-restart";

#[derive(Debug, clap::Args)]
pub struct Opts {
    #[command(flatten)]
    node: common::NodeArgs,
    /// Free slots in the pool.
    #[arg(long, default_value_t = 50)]
    slots: usize,
    /// Upstream runtime handler of the pool.
    #[arg(long, default_value = "runc")]
    handler: String,
    /// How long a pool may take to fill.
    #[arg(long, default_value = "600", value_parser = secs)]
    fill_timeout: Duration,
}

fn secs(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s:?}: {e}"))
}

/// One run of the node plugin on the bench's state directory.
struct Run {
    child: tokio::process::Child,
    spawned: Instant,
}

struct Bench<'a> {
    opts: &'a Opts,
    binary: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    admin: std::net::SocketAddr,
}

impl Bench<'_> {
    fn spawn(&self) -> anyhow::Result<Run> {
        let spawned = Instant::now();
        let child = common::spawn_serve(&self.binary, &self.config)?;
        Ok(Run { child, spawned })
    }

    /// Waits until the pool has all its free slots.
    async fn wait_full(&self) -> anyhow::Result<()> {
        warm::wait_free(
            self.admin,
            POOL,
            self.opts.slots as u64,
            self.opts.fill_timeout,
        )
        .await
    }

    /// Time from the spawn to the first `Version` answer (a new connection
    /// per attempt, so no client backoff adds to it), bounded.
    async fn first_answer(&self, run: &Run) -> anyhow::Result<Duration> {
        let endpoint = format!("unix://{}", self.socket.display());
        for _ in 0..20_000 {
            if let Ok(mut rt) = common::client(&endpoint) {
                if rt.version(VersionRequest::default()).await.is_ok() {
                    return Ok(run.spawned.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        anyhow::bail!("CRI not served within 20000 attempts")
    }

    async fn slots(&self) -> anyhow::Result<HashSet<String>> {
        let mut direct = common::client(&self.opts.node.upstream)?;
        let listed = direct
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: [("fast-sandbox.io/pool".to_owned(), POOL.to_owned())].into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .items;
        Ok(listed.into_iter().map(|sb| sb.id).collect())
    }

    /// Restarts after `how` and prints what it measured.
    async fn round(&self, run: Run, kill: bool) -> anyhow::Result<Run> {
        let before = self.slots().await?;
        stop(run, kill).await?;
        let run = self.spawn()?;
        let served = self.first_answer(&run).await?;
        self.wait_full().await?;
        let full = run.spawned.elapsed();
        let after = self.slots().await?;
        let kept = before.intersection(&after).count();
        println!(
            "after {:<13} CRI served {:>9}  pool full {:>9}  adopted {kept}/{} ({:.0} %)",
            if kill { "kill -9:" } else { "graceful stop:" },
            Pretty(served).to_string(),
            Pretty(full).to_string(),
            before.len(),
            100.0 * kept as f64 / before.len().max(1) as f64,
        );
        Ok(run)
    }
}

async fn stop(mut run: Run, kill: bool) -> anyhow::Result<()> {
    if kill {
        run.child.kill().await?;
        return Ok(());
    }
    if let Some(pid) = run.child.id() {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    }
    tokio::time::timeout(Duration::from_secs(30), run.child.wait())
        .await
        .context("graceful stop took over 30 s")??;
    Ok(())
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("fs-bench-restart-")
        .tempdir()?;
    let admin = warm::free_port()?;
    let bench = Bench {
        opts: &opts,
        binary: common::node_binary(opts.node.node_binary.as_deref())?,
        config: dir.path().join("node.toml"),
        socket: dir.path().join("cri.sock"),
        admin,
    };
    write_config(&bench, dir.path())?;
    let result = measure(&bench).await;
    let uninstalled = uninstall(&bench).await;
    let left = bench.slots().await?;
    if uninstalled.is_err() || !left.is_empty() {
        // An older binary without `uninstall`, or a failed one: remove the
        // pool straight on containerd so the node is left clean anyway.
        let mut direct = common::client(&opts.node.upstream)?;
        for id in &left {
            let _ = direct
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await;
            direct
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await?;
        }
        common::remove_cgroup_tree(PLACEHOLDER_ROOT);
    }
    result?;
    uninstalled?;
    anyhow::ensure!(left.is_empty(), "uninstall left {} slot(s)", left.len());
    println!("uninstall removed every slot of the pool");
    Ok(())
}

fn write_config(bench: &Bench<'_>, dir: &Path) -> anyhow::Result<()> {
    let o = bench.opts;
    let text = format!(
        "[upstream]\nendpoint = {up:?}\n[socket]\npath = {sock:?}\n[admin]\naddress = \"{admin}\"\n\
         [slots]\nstate_dir = {state:?}\ncontainerd_root = {root:?}\ncni_conf_dir = {cni:?}\n\
         placeholder_cgroup_root = {PLACEHOLDER_ROOT:?}\nrefill_interval = \"0ms\"\n\
         [[pool]]\nname = {POOL:?}\nhandler = \"fast-{h}\"\nupstream = \"{h}\"\nsize = {n}\n\
         shape = {{ seccomp = \"runtime-default\" }}\n",
        up = o.node.upstream,
        sock = bench.socket.display().to_string(),
        admin = bench.admin,
        state = dir.join("state").display().to_string(),
        root = o.node.containerd_root.display().to_string(),
        cni = o.node.cni_conf_dir().display().to_string(),
        h = o.handler,
        n = o.slots,
    );
    std::fs::write(&bench.config, text)?;
    Ok(())
}

async fn measure(bench: &Bench<'_>) -> anyhow::Result<()> {
    let run = bench.spawn()?;
    let served = bench.first_answer(&run).await?;
    eprintln!(
        "first start: CRI served {}; filling {} slots",
        Pretty(served),
        bench.opts.slots
    );
    bench.wait_full().await?;
    let run = bench.round(run, true).await?;
    let run = bench.round(run, false).await?;
    stop(run, false).await
}

async fn uninstall(bench: &Bench<'_>) -> anyhow::Result<()> {
    let out = tokio::process::Command::new(&bench.binary)
        .arg("uninstall")
        .arg("--config")
        .arg(&bench.config)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "uninstall failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
