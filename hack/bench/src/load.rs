//! Sustained mixed load, as a node with `--pods` pods puts it on its
//! runtime: kubelet's relist and status polling once per second plus pod
//! create/delete churn, straight to containerd and through a
//! `fast-sandbox-node` process with a warm pool, in the same run.
//!
//! - **Relist** (every `--period`, for both sides in turn, the order
//!   alternating each tick): what kubelet's PLEG does each second
//!   (`ListPodSandbox` and `ListContainers` unfiltered), then for each pod
//!   what `GetPodStatus` asks (`ListPodSandbox` and `ListContainers`
//!   filtered by the pod's `io.kubernetes.pod.uid` label, and
//!   `PodSandboxStatus`). The pods are made straight on containerd before
//!   the run, so both sides list the same sandboxes.
//! - **Churn** (concurrently, one pod every `--churn-interval`, rotating):
//!   a cold pod straight to containerd, a cold pod through the shim (the
//!   upstream handler, forwarded) and a warm pod through the shim (the
//!   `fast-` handler, once the pool has a free slot, so every warm sample
//!   is a claim: the hit counter is checked); each `RunPodSandbox`, then
//!   `StopPodSandbox` + `RemovePodSandbox`.
//!
//! Reported: p50/p99 per call type and side, and shim/direct as a ratio.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::{
    common::{self, NodeProcess, Runtime, BENCH_NAMESPACE},
    stats::{ratio, Pretty, Samples},
    warm,
};
use anyhow::Context as _;
use fast_sandbox_proto::cri::{
    ContainerFilter, ListContainersRequest, ListPodSandboxRequest, PodSandboxConfig,
    PodSandboxFilter, PodSandboxStatusRequest, RemovePodSandboxRequest, StopPodSandboxRequest,
};

/// The pool this bench creates (its own name and cgroup root, so slots of
/// other pools on the node are never touched).
const POOL: &str = "bench-load";
const PLACEHOLDER_ROOT: &str = "/fast-sandbox-bench-load";
const UID_LABEL: &str = "io.kubernetes.pod.uid";
/// Warm churn pods exist only through the shim: compared with cold ones
/// straight to containerd.
const WARM_ROW: &str = "RunPodSandbox warm";
const COLD_ROW: &str = "RunPodSandbox cold";

#[derive(Debug, clap::Args)]
pub struct Opts {
    #[command(flatten)]
    node: common::NodeArgs,
    /// Upstream handler; warm as `fast-<handler>`.
    #[arg(long, default_value = "runc")]
    handler: String,
    /// Pods on the node, relisted and polled every period.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// How long the measured load runs.
    #[arg(long, value_parser = humantime_secs, default_value = "30")]
    duration: Duration,
    /// Relist period (kubelet: 1 s).
    #[arg(long, value_parser = humantime_ms, default_value = "1000")]
    period: Duration,
    /// Pause between two churn pods (0 disables churn).
    #[arg(long, value_parser = humantime_ms, default_value = "300")]
    churn_interval: Duration,
    /// Free slots in the warm pool.
    #[arg(long, default_value_t = 4)]
    pool_size: usize,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    s.trim_end_matches('s')
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s:?}: seconds expected ({e})"))
}

fn humantime_ms(s: &str) -> Result<Duration, String> {
    s.trim_end_matches("ms")
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| format!("{s:?}: milliseconds expected ({e})"))
}

/// One measured call type, both sides.
#[derive(Default)]
struct Row {
    direct: Samples,
    shim: Samples,
}

type Table = std::collections::BTreeMap<&'static str, Row>;

fn record(table: &mut Table, what: &'static str, shim: bool, d: Duration) {
    let row = table.entry(what).or_default();
    if shim {
        row.shim.push(d);
    } else {
        row.direct.push(d);
    }
}

/// A bench pod carrying kubelet's uid label (what status polls filter on).
fn pod_config(name: &str) -> PodSandboxConfig {
    let mut config = common::sandbox_config(name);
    if let Some(uid) = config.metadata.as_ref().map(|m| m.uid.clone()) {
        config.labels.insert(UID_LABEL.into(), uid);
    }
    config
}

/// Times one awaited call and records it.
macro_rules! timed {
    ($table:expr, $what:expr, $shim:expr, $call:expr) => {{
        let t = Instant::now();
        let r = $call.await;
        record($table, $what, $shim, t.elapsed());
        r
    }};
}

/// One relist + status poll of every pod, on one side.
async fn relist(
    rt: &mut Runtime,
    shim: bool,
    uids: &[String],
    table: &mut Table,
) -> anyhow::Result<()> {
    timed!(
        table,
        "ListPodSandbox (relist)",
        shim,
        rt.list_pod_sandbox(ListPodSandboxRequest { filter: None })
    )?;
    timed!(
        table,
        "ListContainers (relist)",
        shim,
        rt.list_containers(ListContainersRequest { filter: None })
    )?;
    for uid in uids {
        let selector: HashMap<String, String> = [(UID_LABEL.to_owned(), uid.clone())].into();
        let items = timed!(
            table,
            "ListPodSandbox (pod)",
            shim,
            rt.list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: selector.clone(),
                    ..Default::default()
                }),
            })
        )?
        .into_inner()
        .items;
        for sb in items {
            timed!(
                table,
                "PodSandboxStatus",
                shim,
                rt.pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: sb.id,
                    verbose: false,
                })
            )?;
        }
        timed!(
            table,
            "ListContainers (pod)",
            shim,
            rt.list_containers(ListContainersRequest {
                filter: Some(ContainerFilter {
                    label_selector: selector,
                    ..Default::default()
                }),
            })
        )?;
    }
    Ok(())
}

/// One churn pod: run, stop, remove. Returns the `RunPodSandbox` time.
async fn churn_pod(rt: &mut Runtime, name: &str, handler: &str) -> anyhow::Result<Duration> {
    let config = pod_config(name);
    let t = Instant::now();
    let sid = common::run_pod(rt, &config, handler).await?;
    let run = t.elapsed();
    common::remove_pod(rt, &sid, &config).await?;
    Ok(run)
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let mut direct = common::client(&opts.node.upstream)?;
    let result = measure(&opts).await;
    // Whatever happened, leave no pod of this bench and no slot of its pool.
    let mut left = 0;
    for sb in direct
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items
    {
        let mine = sb
            .metadata
            .as_ref()
            .is_some_and(|m| m.namespace == BENCH_NAMESPACE && m.name.starts_with("load-"))
            || sb.labels.get("fast-sandbox.io/pool").map(String::as_str) == Some(POOL);
        if mine {
            let _ = direct
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: sb.id.clone(),
                })
                .await;
            direct
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: sb.id.clone(),
                })
                .await?;
            left += 1;
        }
    }
    common::remove_cgroup_tree(PLACEHOLDER_ROOT);
    if left > 0 {
        eprintln!("removed {left} sandbox(es): the pool's slots and any pod left behind");
    }
    result
}

async fn measure(opts: &Opts) -> anyhow::Result<()> {
    let admin = warm::free_port()?;
    let config = format!(
        "[admin]\naddress = \"{admin}\"\n[slots]\nstate_dir = \"{{dir}}/state\"\n\
         containerd_root = {:?}\ncni_conf_dir = {:?}\nplaceholder_cgroup_root = {PLACEHOLDER_ROOT:?}\n\
         refill_interval = \"0ms\"\n\
         [[pool]]\nname = {POOL:?}\nhandler = \"fast-{h}\"\nupstream = \"{h}\"\nsize = {}\n",
        opts.node.containerd_root.display().to_string(),
        opts.node.cni_conf_dir().display().to_string(),
        opts.pool_size,
        h = opts.handler,
    );
    let binary = common::node_binary(opts.node.node_binary.as_deref())?;
    let node = NodeProcess::spawn(&binary, &opts.node.upstream, &config).await?;
    let mut shim = common::client(&node.endpoint())?;
    common::wait_ready(&mut shim, Duration::from_secs(10)).await?;
    let mut direct = common::client(&opts.node.upstream)?;

    eprintln!("creating {} pods straight on containerd", opts.pods);
    let mut pods = Vec::with_capacity(opts.pods);
    for i in 0..opts.pods {
        let config = pod_config(&format!("load-pod-{i}"));
        let sid = common::run_pod(&mut direct, &config, &opts.handler).await?;
        pods.push((sid, config));
    }
    let result = async {
        warm::wait_free(admin, POOL, opts.pool_size as u64, Duration::from_secs(120)).await?;
        let hits_before = warm::hits(admin, POOL).await?;
        let outcome = load(opts, admin, &node.endpoint(), &pods).await?;
        let hits = warm::hits(admin, POOL).await? - hits_before;
        anyhow::Ok((outcome, hits))
    }
    .await;
    for (sid, config) in &pods {
        common::remove_pod(&mut direct, sid, config).await?;
    }
    node.stop().await?;
    let ((table, outcome), hits) = result?;
    anyhow::ensure!(
        hits == outcome.warm_requests as u64,
        "{hits} of {} warm churn pods were served from the pool",
        outcome.warm_requests
    );
    print_table(&table);
    println!("({WARM_ROW}: shim columns are warm claims, direct columns cold pods straight to containerd)");
    println!(
        "{} pods relisted every {:?} for {:?}: {} of {} ticks overran the period (longest \
         relist {}); churn: {} pods, {} warm hits of {} warm requests",
        opts.pods,
        opts.period,
        opts.duration,
        outcome.overruns,
        outcome.ticks,
        Pretty(outcome.longest),
        outcome.churned,
        hits,
        outcome.warm_requests,
    );
    Ok(())
}

struct Outcome {
    ticks: usize,
    overruns: usize,
    longest: Duration,
    churned: usize,
    warm_requests: usize,
}

async fn load(
    opts: &Opts,
    admin: std::net::SocketAddr,
    endpoint: &str,
    pods: &[(String, PodSandboxConfig)],
) -> anyhow::Result<(Table, Outcome)> {
    let uids: Vec<String> = pods
        .iter()
        .filter_map(|(_, c)| c.metadata.as_ref().map(|m| m.uid.clone()))
        .collect();
    let deadline = Instant::now() + opts.duration;

    let churn = {
        let endpoint = endpoint.to_owned();
        let (upstream, handler, interval) = (
            opts.node.upstream.clone(),
            opts.handler.clone(),
            opts.churn_interval,
        );
        tokio::spawn(async move {
            let (mut direct, mut shim) = (common::client(&upstream)?, common::client(&endpoint)?);
            let warm_handler = format!("fast-{handler}");
            let (mut n, mut warm_requests) = (0usize, 0usize);
            let mut table = Table::new();
            while !interval.is_zero() && Instant::now() < deadline {
                let name = format!("load-churn-{n}");
                match n % 3 {
                    0 => {
                        let d = churn_pod(&mut direct, &name, &handler).await?;
                        record(&mut table, COLD_ROW, false, d);
                    }
                    1 => {
                        let d = churn_pod(&mut shim, &name, &handler).await?;
                        record(&mut table, COLD_ROW, true, d);
                    }
                    _ => {
                        // A free slot first, so every sample is a warm claim
                        // (the hit counter is checked against the requests).
                        warm::wait_free(admin, POOL, 1, Duration::from_secs(30)).await?;
                        warm_requests += 1;
                        let d = churn_pod(&mut shim, &name, &warm_handler).await?;
                        record(&mut table, WARM_ROW, true, d);
                    }
                }
                n += 1;
                tokio::time::sleep(interval).await;
            }
            anyhow::Ok((table, n, warm_requests))
        })
    };

    let (mut direct, mut shim) = (
        common::client(&opts.node.upstream)?,
        common::client(endpoint)?,
    );
    let mut table = Table::new();
    let mut tick = tokio::time::interval(opts.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut ticks, mut overruns, mut longest) = (0usize, 0usize, Duration::ZERO);
    while Instant::now() < deadline {
        tick.tick().await;
        let started = Instant::now();
        let order = if ticks % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for is_shim in order {
            let rt = if is_shim { &mut shim } else { &mut direct };
            relist(rt, is_shim, &uids, &mut table).await?;
        }
        let took = started.elapsed();
        longest = longest.max(took);
        overruns += usize::from(took > opts.period);
        ticks += 1;
    }
    let (churn_table, churned, warm_requests) = churn.await.context("churn task")??;
    table.extend(churn_table);
    Ok((
        table,
        Outcome {
            ticks,
            overruns,
            longest,
            churned,
            warm_requests,
        },
    ))
}

fn print_table(table: &Table) {
    println!(
        "{:<24} {:>6} {:>10} {:>10} {:>6} {:>10} {:>10} {:>9} {:>9}",
        "call",
        "n",
        "direct p50",
        "direct p99",
        "n",
        "shim p50",
        "shim p99",
        "p50 ratio",
        "p99 ratio"
    );
    for (what, row) in table {
        let s = row.shim.summary();
        // A warm pod has no direct counterpart: compare with a cold one.
        let d = match table.get(COLD_ROW) {
            Some(cold) if *what == WARM_ROW => cold.direct.summary(),
            _ => row.direct.summary(),
        };
        let cell = |n: usize, x: Duration| {
            if n == 0 {
                "-".to_owned()
            } else {
                Pretty(x).to_string()
            }
        };
        println!(
            "{:<24} {:>6} {:>10} {:>10} {:>6} {:>10} {:>10} {:>8.2}x {:>8.2}x",
            what,
            d.n,
            cell(d.n, d.p50),
            cell(d.n, d.p99),
            s.n,
            cell(s.n, s.p50),
            cell(s.n, s.p99),
            ratio(s.p50, d.p50),
            ratio(s.p99, d.p99),
        );
    }
}
