//! Proxy overhead of the shim: the same CRI calls straight to containerd and
//! through a real `fast-sandbox-node` process, interleaved call by call.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use fast_sandbox_proto::cri::{
    ListContainersRequest, PodSandboxStatusRequest, RunPodSandboxRequest, StopContainerRequest,
    VersionRequest,
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
    let sid = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
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

struct Row {
    what: &'static str,
    direct: Samples,
    shim: Samples,
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<22} {:>6} {:>10} {:>10} {:>10} {:>10} {:>11} {:>8}",
        "call", "n", "direct p50", "direct p99", "shim p50", "shim p99", "added p50", "ratio"
    );
    for r in rows {
        let (d, s) = (r.direct.summary(), r.shim.summary());
        println!(
            "{:<22} {:>6} {:>10} {:>10} {:>10} {:>10} {:>11} {:>7.3}x",
            r.what,
            d.n,
            Pretty(d.p50).to_string(),
            Pretty(d.p99).to_string(),
            Pretty(s.p50).to_string(),
            Pretty(s.p99).to_string(),
            Pretty(s.p50.saturating_sub(d.p50)).to_string(),
            ratio(s.p50, d.p50),
        );
    }
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let binary = common::node_binary(opts.node_binary.as_deref())?;
    let node = NodeProcess::spawn(&binary, &opts.upstream, "").await?;
    let mut direct = common::client(&opts.upstream)?;
    let mut shim = common::client(&node.endpoint())?;
    common::wait_ready(&mut shim, Duration::from_secs(10)).await?;

    // A pod for the status calls, created straight on containerd.
    let probe_config = common::sandbox_config("proxy-probe");
    let probe = direct
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(probe_config.clone()),
            runtime_handler: opts.handler.clone(),
        })
        .await
        .context("RunPodSandbox for the probe pod")?
        .into_inner()
        .pod_sandbox_id;
    let result = measure(&opts, &mut direct, &mut shim, &probe).await;
    let removed = common::remove_pod(&mut direct, &probe, &probe_config).await;
    node.stop().await?;
    let rows = result?;
    removed?;
    print_table(&rows);
    Ok(())
}

async fn measure(
    opts: &Opts,
    direct: &mut Runtime,
    shim: &mut Runtime,
    probe: &str,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = vec![
        Row {
            what: "Version",
            direct: Samples::default(),
            shim: Samples::default(),
        },
        Row {
            what: "PodSandboxStatus",
            direct: Samples::default(),
            shim: Samples::default(),
        },
        Row {
            what: "ListContainers",
            direct: Samples::default(),
            shim: Samples::default(),
        },
    ];
    let warmup = opts.calls / 10;
    eprintln!(
        "unary calls: {} of each kind per side (+{warmup} warm-up)",
        opts.calls
    );
    for i in 0..opts.calls + warmup {
        for (side, rt) in [(0, &mut *direct), (1, &mut *shim)] {
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
                    if side == 0 {
                        row.direct.push(d)
                    } else {
                        row.shim.push(d)
                    }
                }
            }
        }
    }
    let mut pods = Row {
        what: "pod lifecycle",
        direct: Samples::default(),
        shim: Samples::default(),
    };
    eprintln!("pod lifecycles: {} per side on {}", opts.pods, opts.handler);
    for i in 0..opts.pods {
        let d = pod_lifecycle(
            direct,
            &format!("proxy-direct-{i}"),
            &opts.handler,
            &opts.image,
        )
        .await?;
        pods.direct.push(d);
        let s = pod_lifecycle(shim, &format!("proxy-shim-{i}"), &opts.handler, &opts.image).await?;
        pods.shim.push(s);
        eprint!("\r  {}/{}", i + 1, opts.pods);
    }
    eprintln!();
    rows.push(pods);
    Ok(rows)
}
