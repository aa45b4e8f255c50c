//! Proxy overhead of the shim: the same CRI calls straight to containerd and
//! through a real `fast-sandbox-node` process, interleaved call by call.
//!
//! The node process has no pools, and the lifecycle pods ask a handler it
//! does not expose, so no pod is warm: the lifecycle row (RunPodSandbox →
//! CreateContainer → StartContainer → StopContainer → Stop/RemovePodSandbox)
//! is the shim's pure forwarding overhead, as a ratio at p50 and p99.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use fast_sandbox_proto::cri::{
    ListContainersRequest, PodSandboxStatusRequest, StopContainerRequest, VersionRequest,
};

use crate::{
    common::{self, NodeProcess, Runtime},
    stats::{ratio, Pretty, Samples},
};

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// containerd's CRI endpoint.
    #[arg(long, env = "FAST_SANDBOX_CONTAINERD_ENDPOINT")]
    upstream: String,
    /// Image for the lifecycle pods (already present; never pulled).
    #[arg(long, env = "FAST_SANDBOX_TEST_IMAGE")]
    image: String,
    /// The `fast-sandbox-node` binary; defaults to the one beside this binary.
    #[arg(long)]
    node_binary: Option<PathBuf>,
    /// Calls of each unary kind on each side.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Full pod lifecycles on each side.
    #[arg(long, default_value_t = 20)]
    pods: usize,
    /// Runtime handler for the lifecycle pods.
    #[arg(long, default_value = "runc")]
    handler: String,
}

/// One full pod: sandbox, container started and stopped, sandbox removed.
async fn pod_lifecycle(
    rt: &mut Runtime,
    name: &str,
    handler: &str,
    image: &str,
) -> anyhow::Result<Duration> {
    let config = common::sandbox_config(name);
    let start = Instant::now();
    let sid = common::run_pod(rt, &config, handler).await?;
    let result = async {
        let cid = common::start_container(rt, &sid, &config, image).await?;
        rt.stop_container(StopContainerRequest {
            container_id: cid,
            timeout: 0,
        })
        .await
        .context("StopContainer")?;
        anyhow::Ok(())
    }
    .await;
    // Always tear the sandbox down, also when a step failed.
    let removed = common::remove_pod(rt, &sid, &config).await;
    let elapsed = start.elapsed();
    result?;
    removed?;
    Ok(elapsed)
}

#[derive(Default)]
struct Row {
    what: &'static str,
    direct: Samples,
    /// Through a byte pipe process: one more hop, nothing read.
    pipe: Samples,
    shim: Samples,
}

impl Row {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            ..Self::default()
        }
    }

    fn side(&mut self, side: Side) -> &mut Samples {
        match side {
            Side::Direct => &mut self.direct,
            Side::Pipe => &mut self.pipe,
            Side::Shim => &mut self.shim,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Direct,
    Pipe,
    Shim,
}

/// `added` is the shim's p50 over direct; `hop` the pipe's p50 over direct
/// (what any proxy process costs here); `over hop` the shim's p50 over the
/// pipe's (what the shim's own work costs). `ratio` is shim over direct at
/// p50 and at p99.
fn print_table(rows: &[Row]) {
    println!(
        "{:<16} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>7} {:>9}",
        "call",
        "n",
        "direct p50",
        "direct p99",
        "pipe p50",
        "shim p50",
        "shim p99",
        "added",
        "hop",
        "over hop",
        "ratio",
        "ratio p99"
    );
    for r in rows {
        let (d, p, s) = (r.direct.summary(), r.pipe.summary(), r.shim.summary());
        let diff = |a: Duration, b: Duration| {
            if a >= b {
                Pretty(a - b).to_string()
            } else {
                format!("-{}", Pretty(b - a))
            }
        };
        println!(
            "{:<16} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>6.3}x {:>8.3}x",
            r.what,
            d.n,
            Pretty(d.p50).to_string(),
            Pretty(d.p99).to_string(),
            Pretty(p.p50).to_string(),
            Pretty(s.p50).to_string(),
            Pretty(s.p99).to_string(),
            diff(s.p50, d.p50),
            diff(p.p50, d.p50),
            diff(s.p50, p.p50),
            ratio(s.p50, d.p50),
            ratio(s.p99, d.p99),
        );
    }
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let binary = common::node_binary(opts.node_binary.as_deref())?;
    let node = NodeProcess::spawn(&binary, &opts.upstream, "").await?;
    let pipe = crate::pipe::spawn(&opts.upstream)?;
    let mut direct = common::client(&opts.upstream)?;
    let mut piped = common::client(&pipe.endpoint())?;
    let mut shim = common::client(&node.endpoint())?;
    common::wait_ready(&mut shim, Duration::from_secs(10)).await?;
    common::wait_ready(&mut piped, Duration::from_secs(10)).await?;

    // A pod for the status calls, created straight on containerd.
    let probe_config = common::sandbox_config("proxy-probe");
    let probe = common::run_pod(&mut direct, &probe_config, &opts.handler).await?;
    let pid = node.pid().context("the node process has no pid")?;
    let result = measure(&opts, [&mut direct, &mut piped, &mut shim], &probe, pid).await;
    let removed = common::remove_pod(&mut direct, &probe, &probe_config).await;
    node.stop().await?;
    pipe.stop().await?;
    let (rows, cpu) = result?;
    removed?;
    print_table(&rows);
    println!(
        "shim process CPU (user + system) per forwarded unary call: {}",
        Pretty(cpu)
    );
    Ok(())
}

/// User + system CPU time process `pid` has used so far (clock ticks).
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = procfs::process::Process::new(i32::try_from(pid)?)?.stat()?;
    let ticks = stat.utime + stat.stime;
    let per_second = procfs::ticks_per_second();
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

async fn measure(
    opts: &Opts,
    [direct, piped, shim]: [&mut Runtime; 3],
    probe: &str,
    node_pid: u32,
) -> anyhow::Result<(Vec<Row>, Duration)> {
    let mut rows = vec![
        Row::new("Version"),
        Row::new("PodSandboxStatus"),
        Row::new("ListContainers"),
    ];
    let warmup = opts.calls / 10;
    eprintln!(
        "unary calls: {} of each kind per side (+{warmup} warm-up), sides interleaved call by call",
        opts.calls
    );
    let cpu_before = cpu_time(node_pid)?;
    for i in 0..opts.calls + warmup {
        for (side, rt) in [
            (Side::Direct, &mut *direct),
            (Side::Pipe, &mut *piped),
            (Side::Shim, &mut *shim),
        ] {
            let t = Instant::now();
            rt.version(VersionRequest::default()).await?;
            let v = t.elapsed();
            let t = Instant::now();
            rt.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: probe.into(),
                verbose: false,
            })
            .await?;
            let s = t.elapsed();
            let t = Instant::now();
            rt.list_containers(ListContainersRequest::default()).await?;
            let l = t.elapsed();
            if i >= warmup {
                for (row, d) in rows.iter_mut().zip([v, s, l]) {
                    row.side(side).push(d);
                }
            }
        }
    }
    let shim_calls = u32::try_from((opts.calls + warmup) * 3).unwrap_or(u32::MAX);
    let cpu_per_call = cpu_time(node_pid)?.saturating_sub(cpu_before) / shim_calls.max(1);
    let mut pods = Row::new("pod lifecycle");
    eprintln!("pod lifecycles: {} per side on {}", opts.pods, opts.handler);
    for i in 0..opts.pods {
        for (side, rt) in [
            (Side::Direct, &mut *direct),
            (Side::Pipe, &mut *piped),
            (Side::Shim, &mut *shim),
        ] {
            let name = format!("proxy-{side:?}-{i}").to_lowercase();
            let d = pod_lifecycle(rt, &name, &opts.handler, &opts.image).await?;
            pods.side(side).push(d);
        }
        eprint!("\r  {}/{}", i + 1, opts.pods);
    }
    eprintln!();
    rows.push(pods);
    Ok((rows, cpu_per_call))
}
