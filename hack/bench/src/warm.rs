//! Warm vs cold, through one `fast-sandbox-node` with warm pools:
//!
//! 1. Sequential: for each handler, cold and warm pods alternate (cold =
//!    the upstream handler name, forwarded untouched through the same shim;
//!    warm = the `fast-` handler). Each pod: `RunPodSandbox`, then
//!    `CreateContainer` + `StartContainer` (pod start = all three). Before a
//!    warm pod the bench waits for a free slot, so every warm sample is a
//!    hit; the hit counter is checked against the number of warm pods.
//! 2. Concurrent: `--concurrent` warm `RunPodSandbox` at once on a full pool.
//! 3. Idle slots (`--idle-slots N`): the node plugin's RSS with N idle
//!    slots, and the host memory one idle slot costs (MemAvailable before
//!    and after, divided by N).

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::{
    common::{self, NodeProcess, Runtime, BENCH_NAMESPACE},
    stats::{ratio, Pretty, Samples},
};

/// Namespace the node plugin gives placeholder pods (its default).
const SLOT_NAMESPACE: &str = "fast-sandbox-slots";

#[derive(Debug, clap::Args)]
pub struct Opts {
    #[command(flatten)]
    node: common::NodeArgs,
    /// The runsc the node's runsc handler runs (the dev node exports it;
    /// a runsc of another release cannot exec into its sandboxes).
    #[arg(long, env = "FAST_SANDBOX_RUNSC", default_value = "/usr/bin/runsc")]
    runsc: PathBuf,
    /// Image of the pods' container (already present; never pulled).
    #[arg(long, env = "FAST_SANDBOX_TEST_IMAGE")]
    image: String,
    /// Upstream handlers to compare, each warm as `fast-<handler>`.
    #[arg(long, value_delimiter = ',', default_value = "runc,crun")]
    handlers: Vec<String>,
    /// Cold and warm pods per handler.
    #[arg(long, default_value_t = 30)]
    pods: usize,
    /// Concurrent warm claims (0 skips the phase).
    #[arg(long, default_value_t = 20)]
    concurrent: usize,
    /// Runsc slots get their hostname from `runsc exec` only, never through
    /// the pause's hostname channel (`guest_channel = ""`): the figures
    /// before the channel, on the same node.
    #[arg(long)]
    no_hostname_channel: bool,
    /// Idle slots for the memory phase (0 skips it).
    #[arg(long, default_value_t = 50)]
    idle_slots: usize,
}

pub(crate) fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Starts the node plugin with one pool per handler of `size` slots.
async fn start_node(
    opts: &Opts,
    sizes: &[(String, usize)],
) -> anyhow::Result<(NodeProcess, SocketAddr)> {
    let admin = free_port()?;
    let config = node_config(
        admin,
        &opts.node.containerd_root,
        &opts.runsc,
        sizes,
        !opts.no_hostname_channel,
    );
    let binary = common::node_binary(opts.node.node_binary.as_deref())?;
    let node = NodeProcess::spawn(&binary, &opts.node.upstream, &config).await?;
    let mut rt = common::client(&node.endpoint())?;
    common::wait_ready(&mut rt, Duration::from_secs(10)).await?;
    Ok((node, admin))
}

/// The node plugin's config: one pool per handler of `size` slots, each of
/// the default shape (what kubelet sends, as [`common::sandbox_config`]).
fn node_config(
    admin: SocketAddr,
    containerd_root: &std::path::Path,
    runsc: &std::path::Path,
    sizes: &[(String, usize)],
    hostname_channel: bool,
) -> String {
    let mut config = format!(
        "[admin]\naddress = \"{admin}\"\n[slots]\nstate_dir = \"{{dir}}/state\"\ncontainerd_root = {:?}\ncni_conf_dir = {:?}\nrefill_interval = \"0ms\"\n",
        containerd_root.display().to_string(),
        common::dev_cni_conf_dir(containerd_root).display().to_string()
    );
    for (handler, size) in sizes {
        config.push_str(&format!(
            "[[pool]]\nhandler = \"fast-{handler}\"\nupstream = \"{handler}\"\nsize = {size}\n"
        ));
        if handler == "runsc" {
            // The dev node's runsc keeps its state under the handler's
            // `Root` (`<instance>/runtime/runsc`), not containerd's default.
            let root = containerd_root
                .parent()
                .unwrap_or(containerd_root)
                .join("runtime/runsc/k8s.io");
            config.push_str(&format!(
                "guest_exec = [{:?}, \"--root\", {:?}, \"exec\", \"--cap\", \"CAP_SYS_ADMIN\", \"{{sandbox_id}}\", \"/pause\", \"--set-hostname\", \"{{hostname}}\"]\n",
                runsc.display().to_string(),
                root.display().to_string()
            ));
            if !hostname_channel {
                config.push_str("guest_channel = \"\"\n");
            }
        }
    }
    config
}

/// Free slots per pool, from the admin endpoint.
async fn free_slots(admin: SocketAddr) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let body = common::http_get(admin, "/pools").await?;
    let v: Value = serde_json::from_str(&body)?;
    Ok(v.as_array()
        .context("/pools is not an array")?
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["free"].as_u64().unwrap_or(0),
                p["desired"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

/// Waits until pool `pool` has at least `n` free slots (bounded).
pub(crate) async fn wait_free(
    admin: SocketAddr,
    pool: &str,
    n: u64,
    deadline: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let pools = free_slots(admin).await?;
        if pools
            .iter()
            .any(|(name, free, _)| name == pool && *free >= n)
        {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!("pool {pool} did not reach {n} free slots in {deadline:?}: {pools:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Claims served so far by `pool`, from the metrics.
pub(crate) async fn hits(admin: SocketAddr, pool: &str) -> anyhow::Result<u64> {
    let text = common::http_get(admin, "/metrics").await?;
    let prefix = format!("fast_sandbox_claims_total{{pool=\"{pool}\",outcome=\"hit\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64))
}

/// Warm hits of pool `pool` and misses of handler `pool` by reason, from
/// the node plugin's metrics text (the bench's pools are named after their
/// handler).
fn claim_counts(metrics: &str, pool: &str) -> (u64, Vec<(String, u64)>) {
    let value = |v: &str| v.trim().parse::<f64>().map_or(0, |v| v as u64);
    let hit = format!("fast_sandbox_claims_total{{pool=\"{pool}\",outcome=\"hit\"}} ");
    let miss = format!("fast_sandbox_misses_total{{handler=\"{pool}\",reason=\"");
    let hits = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&hit))
        .map_or(0, value);
    let misses = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&miss))
        .filter_map(|rest| rest.split_once("\"} "))
        .map(|(reason, v)| (reason.to_owned(), value(v)))
        .collect();
    (hits, misses)
}

/// Prints, beside the table, the hits and misses the node plugin counted
/// (its `/metrics`): what an operator would see for these pods.
async fn print_claim_counts(admin: SocketAddr, handlers: &[String]) -> anyhow::Result<()> {
    let text = common::http_get(admin, "/metrics").await?;
    println!("node plugin metrics (http://{admin}/metrics):");
    println!(
        "{:<12} {:>6} {:>7}  misses by reason",
        "handler", "hits", "misses"
    );
    for h in handlers {
        let pool = format!("fast-{h}");
        let (hits, misses) = claim_counts(&text, &pool);
        let total: u64 = misses.iter().map(|(_, n)| n).sum();
        let reasons: Vec<String> = misses.iter().map(|(r, n)| format!("{r}={n}")).collect();
        println!(
            "{pool:<12} {hits:>6} {total:>7}  {}",
            if reasons.is_empty() {
                "-".to_owned()
            } else {
                reasons.join(", ")
            }
        );
    }
    Ok(())
}

#[derive(Default)]
struct Side {
    run: Samples,
    /// `CreateContainer` alone: a warm gVisor pod's includes the wait on
    /// the hostname barrier (docs/runtimes.md).
    create: Samples,
    start: Samples,
}

/// What one pod took.
struct PodTimes {
    run: Duration,
    create: Duration,
    start: Duration,
}

impl Side {
    fn push(&mut self, t: PodTimes) {
        self.run.push(t.run);
        self.create.push(t.create);
        self.start.push(t.start);
    }
}

/// One pod: returns what its calls took and removes it again.
async fn one_pod(
    rt: &mut Runtime,
    name: &str,
    handler: &str,
    image: &str,
) -> anyhow::Result<PodTimes> {
    let config = common::sandbox_config(name);
    let t = Instant::now();
    let sid = common::run_pod(rt, &config, handler).await?;
    let run = t.elapsed();
    let started = create_and_start(rt, &sid, &config, image).await;
    let start = t.elapsed();
    let removed = common::remove_pod(rt, &sid, &config).await;
    let create = started?;
    removed?;
    Ok(PodTimes { run, create, start })
}

/// `CreateContainer` then `StartContainer`; returns how long the first took.
async fn create_and_start(
    rt: &mut Runtime,
    sid: &str,
    config: &fast_sandbox_proto::cri::PodSandboxConfig,
    image: &str,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let cid = common::create_container(rt, sid, config, image).await?;
    let create = t.elapsed();
    rt.start_container(fast_sandbox_proto::cri::StartContainerRequest { container_id: cid })
        .await
        .context("StartContainer")?;
    Ok(create)
}

fn print_sequential(rows: &[(String, Side, Side)]) {
    println!(
        "{:<8} {:>4} | {:>21} {:>21} {:>8} | {:>21} {:>21} {:>7}",
        "handler",
        "n",
        "RunPodSandbox cold",
        "warm (p50 / p99)",
        "warm/cold",
        "pod start cold",
        "warm (p50 / p99)",
        "ratio"
    );
    for (h, cold, warm) in rows {
        let pair = |s: &Samples| format!("{} / {}", Pretty(s.p50()), Pretty(s.p99()));
        println!(
            "{:<8} {:>4} | {:>21} {:>21} {:>7.3}x | {:>21} {:>21} {:>6.3}x",
            h,
            cold.run.len(),
            pair(&cold.run),
            pair(&warm.run),
            ratio(warm.run.p50(), cold.run.p50()),
            pair(&cold.start),
            pair(&warm.start),
            ratio(warm.start.p50(), cold.start.p50()),
        );
    }
    // A warm pod's first CreateContainer waits on the fix-up barrier (the
    // gVisor hostname step); beyond a cold one's it is about that wait.
    println!(
        "{:<8} {:>4} | {:>21} {:>21} {:>21}",
        "handler", "n", "CreateContainer cold", "warm (p50 / p99)", "barrier ≈ warm−cold p50"
    );
    for (h, cold, warm) in rows {
        let pair = |s: &Samples| format!("{} / {}", Pretty(s.p50()), Pretty(s.p99()));
        println!(
            "{:<8} {:>4} | {:>21} {:>21} {:>21}",
            h,
            cold.create.len(),
            pair(&cold.create),
            pair(&warm.create),
            Pretty(warm.create.p50().saturating_sub(cold.create.p50())),
        );
    }
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let mut direct = common::client(&opts.node.upstream)?;
    let result = measure(&opts).await;
    // Whatever happened, leave no bench pod and no slot behind.
    let pods = common::remove_namespace(&mut direct, BENCH_NAMESPACE).await?;
    let slots = common::remove_namespace(&mut direct, SLOT_NAMESPACE).await?;
    if pods + slots > 0 {
        eprintln!("cleaned up {pods} bench pod(s) and {slots} slot(s)");
    }
    result
}

async fn measure(opts: &Opts) -> anyhow::Result<()> {
    let pool_size = opts.concurrent.max(2);
    let sizes: Vec<(String, usize)> = opts
        .handlers
        .iter()
        .map(|h| (h.clone(), pool_size))
        .collect();
    let (node, admin) = start_node(opts, &sizes).await?;
    let mut rt = common::client(&node.endpoint())?;
    for (h, size) in &sizes {
        eprintln!("filling pool fast-{h} ({size} slots)");
        wait_free(
            admin,
            &format!("fast-{h}"),
            *size as u64,
            Duration::from_secs(120),
        )
        .await?;
    }

    let mut rows = Vec::new();
    for h in &opts.handlers {
        let pool = format!("fast-{h}");
        let hits_before = hits(admin, &pool).await?;
        let (mut cold, mut warm) = (Side::default(), Side::default());
        eprintln!(
            "{h}: {} cold and {} warm pods, alternating",
            opts.pods, opts.pods
        );
        for i in 0..opts.pods {
            cold.push(one_pod(&mut rt, &format!("cold-{h}-{i}"), h, &opts.image).await?);
            wait_free(admin, &pool, 1, Duration::from_secs(60)).await?;
            warm.push(one_pod(&mut rt, &format!("warm-{h}-{i}"), &pool, &opts.image).await?);
        }
        let served = hits(admin, &pool).await? - hits_before;
        anyhow::ensure!(
            served == opts.pods as u64,
            "{pool}: {served} of {} warm pods were served from the pool",
            opts.pods
        );
        rows.push((h.clone(), cold, warm));
    }
    print_sequential(&rows);
    print_claim_counts(admin, &opts.handlers).await?;

    if opts.concurrent > 0 {
        let h = &opts.handlers[0];
        let pool = format!("fast-{h}");
        wait_free(
            admin,
            &pool,
            opts.concurrent as u64,
            Duration::from_secs(120),
        )
        .await?;
        let hits_before = hits(admin, &pool).await?;
        let endpoint = node.endpoint();
        let calls = (0..opts.concurrent).map(|i| {
            let endpoint = endpoint.clone();
            let pool = pool.clone();
            async move {
                let mut rt = common::client(&endpoint)?;
                let config = common::sandbox_config(&format!("burst-{i}"));
                let t = Instant::now();
                let sid = common::run_pod(&mut rt, &config, &pool).await?;
                anyhow::Ok((t.elapsed(), sid, config))
            }
        });
        let results = futures::future::join_all(calls).await;
        let mut lat = Samples::default();
        let mut ids = std::collections::HashSet::new();
        for r in results {
            let (d, sid, config) = r?;
            lat.push(d);
            ids.insert(sid.clone());
            common::remove_pod(&mut rt, &sid, &config).await?;
        }
        let served = hits(admin, &pool).await? - hits_before;
        anyhow::ensure!(
            ids.len() == opts.concurrent,
            "concurrent claims returned a sandbox twice"
        );
        println!(
            "{} concurrent warm RunPodSandbox on {pool}: p50 {} p99 {} ({served} served warm)",
            opts.concurrent,
            Pretty(lat.p50()),
            Pretty(lat.p99())
        );
    }
    node.stop().await?;

    if opts.idle_slots > 0 {
        let mut direct = common::client(&opts.node.upstream)?;
        common::remove_namespace(&mut direct, SLOT_NAMESPACE).await?;
        let h = &opts.handlers[0];
        let before = common::mem_available()?;
        let (node, admin) = start_node(opts, &[(h.clone(), opts.idle_slots)]).await?;
        eprintln!("filling {} idle slots on {h}", opts.idle_slots);
        wait_free(
            admin,
            &format!("fast-{h}"),
            opts.idle_slots as u64,
            Duration::from_secs(300),
        )
        .await?;
        // Let the machine settle, then read both figures together.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = common::mem_available()?;
        let rss = common::rss_bytes(node.pid().context("node plugin exited")?)?;
        let per_slot = before.saturating_sub(after) / opts.idle_slots as u64;
        println!(
            "{} idle {h} slots: node plugin RSS {:.1} MiB; host memory per idle slot {:.2} MiB (MemAvailable drop / slots)",
            opts.idle_slots,
            rss as f64 / 1048576.0,
            per_slot as f64 / 1048576.0
        );
        node.stop().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fast_sandbox_proto::cri::RunPodSandboxRequest;

    #[test]
    fn hits_and_misses_are_read_from_the_metrics_text() {
        let text = "# TYPE fast_sandbox_claims counter\n\
            fast_sandbox_claims_total{pool=\"fast-runc\",outcome=\"hit\"} 30\n\
            fast_sandbox_claims_total{pool=\"fast-crun\",outcome=\"hit\"} 2\n\
            fast_sandbox_misses_total{handler=\"fast-runc\",reason=\"no_pool\"} 3\n\
            fast_sandbox_misses_total{handler=\"fast-runc\",reason=\"pool_empty\"} 1\n";
        let (hits, misses) = claim_counts(text, "fast-runc");
        assert_eq!(hits, 30);
        assert_eq!(
            misses,
            vec![("no_pool".to_owned(), 3), ("pool_empty".to_owned(), 1)]
        );
        assert_eq!(claim_counts(text, "fast-crun"), (2, Vec::new()));
        assert_eq!(claim_counts(text, "fast-x"), (0, Vec::new()));
    }
    use fast_sandbox_shim::slots::{Claim, HandlerMap};

    /// The quickstart's pods are kubelet-shaped and its pools serve them:
    /// every warm-side pod of the benchmark is a claim of a configured pool.
    #[test]
    fn bench_pods_match_the_bench_pools() {
        let sizes = vec![
            ("runc".to_owned(), 4),
            ("crun".to_owned(), 2),
            ("runsc".to_owned(), 2),
        ];
        let text = node_config(
            "127.0.0.1:9464".parse().expect("addr"),
            std::path::Path::new("/var/lib/containerd"),
            std::path::Path::new("/usr/bin/runsc"),
            &sizes,
            false,
        );
        let file: fast_sandbox_node::config::FileConfig =
            toml::from_str(&text).expect("the bench's config parses");
        let specs = fast_sandbox_node::config::pool_specs(&file.pools).expect("valid pools");
        let handlers = HandlerMap::new(
            specs
                .iter()
                .map(|s| (s.exposed_handler.clone(), s.key.upstream_handler.clone())),
        );
        for (handler, _) in &sizes {
            let claim = Claim::from_request(
                &RunPodSandboxRequest {
                    config: Some(common::sandbox_config("bench-pod")),
                    runtime_handler: format!("fast-{handler}"),
                },
                &handlers,
            )
            .expect("a bench pod is eligible");
            assert!(
                specs.iter().any(|s| s.key == claim.key),
                "fast-{handler}: the bench pod asks {}, no pool serves it",
                claim.key
            );
        }
    }
}
