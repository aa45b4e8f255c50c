//! Replaying CRI traffic recorded from a real kubelet (`fast-sandbox-node
//! serve --cri-capture FILE`, see `tests/recordings/README.md`) through a
//! shim with warm pools, against the development node's containerd.
//!
//! Each recorded request is sent as the protobuf bytes kubelet sent
//! (`request_pb`), byte for byte, except for the sandbox and container ids
//! the recording's runtime chose: those are replaced by the ids this run's
//! runtime answered (same length, so the rest of the message is unchanged).
//! Calls that would leave the machine or delete shared images (`PullImage`,
//! `RemoveImage`) and streaming calls are not replayed.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _};
use fast_sandbox_node::{
    config::{FileConfig, PoolSection, Settings},
    fixup::{ByRuntime, RealGuestOps, RealOps},
    metrics::{Metrics, PoolOutcome},
    network::CniSettings,
    pool::{ManagerConfig, PoolManager, PoolSpec},
};
use fast_sandbox_proto::cri::{
    ContainerConfig, CreateContainerRequest, CreateContainerResponse, NamespaceMode,
    PodSandboxConfig, RunPodSandboxRequest, RunPodSandboxResponse,
};
use fast_sandbox_shim::{
    slots::{HandlerMap, Shape, SlotSource, POOL_LABEL, SLOT_NAMESPACE},
    Shim, Upstream, UpstreamConfig,
};
use prost::Message as _;
use serde::Deserialize;

use crate::{wait_for, Cri, DevNode, InProcessShim};

/// One line of a capture file.
#[derive(Debug, Clone, Deserialize)]
pub struct Call {
    pub seq: u64,
    /// gRPC path, e.g. `/runtime.v1.RuntimeService/RunPodSandbox`.
    pub method: String,
    /// Base64 of the request message as kubelet sent it.
    pub request_pb: Option<String>,
    /// Base64 of the answer (`null` on error and for streams).
    pub response_pb: Option<String>,
    /// gRPC status code (0 = OK).
    pub code: i32,
    #[serde(default)]
    pub message: String,
}

impl Call {
    pub fn name(&self) -> &str {
        self.method.rsplit('/').next().unwrap_or(&self.method)
    }

    pub fn request(&self) -> anyhow::Result<Vec<u8>> {
        base64_decode(self.request_pb.as_deref().unwrap_or_default())
            .with_context(|| format!("seq {}: request_pb is not base64", self.seq))
    }

    pub fn response(&self) -> anyhow::Result<Option<Vec<u8>>> {
        self.response_pb
            .as_deref()
            .map(base64_decode)
            .transpose()
            .with_context(|| format!("seq {}: response_pb is not base64", self.seq))
    }
}

/// A capture file: every CRI call of one recording, in order.
#[derive(Debug, Clone)]
pub struct Transcript {
    pub path: PathBuf,
    pub calls: Vec<Call>,
}

impl Transcript {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut calls = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let call: Call = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a capture record", path.display(), i + 1))?;
            calls.push(call);
        }
        calls.sort_by_key(|c| c.seq);
        Ok(Self {
            path: path.to_owned(),
            calls,
        })
    }

    /// Every `*.jsonl` under `dir`, recursively, sorted by path.
    pub fn find(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for entry in
                std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))?
            {
                let p = entry?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|e| e == "jsonl") {
                    out.push(p);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Standard base64 (with or without padding).
pub fn base64_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    }
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let v = val(c).with_context(|| format!("invalid base64 character {:?}", c as char))?;
            acc |= v << (18 - 6 * i);
        }
        let n = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => bail!("truncated base64"),
        };
        out.extend_from_slice(&acc.to_be_bytes()[1..=n]);
    }
    Ok(out)
}

/// A pool config this project ships, by where it is written.
#[derive(Debug, Clone)]
pub struct ShippedConfig {
    /// Where it comes from, e.g. `deploy/node-plugin/configmap.yaml`.
    pub source: String,
    /// The node plugin's TOML.
    pub toml: String,
}

/// The repository's root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Every pool config the project ships: the DaemonSet's ConfigMap, the
/// `toml` blocks with a `[[pool]]` in the README and docs/warm-slots.md, and
/// the pool the quickstart's benchmark writes (`hack/bench/src/warm.rs`).
/// A source that is missing or in which nothing is found is an error, so a
/// moved config is never silently left out.
pub fn shipped_configs() -> anyhow::Result<Vec<ShippedConfig>> {
    let root = repo_root();
    let read = |rel: &str| {
        std::fs::read_to_string(root.join(rel)).with_context(|| format!("reading {rel}"))
    };
    let mut out = Vec::new();

    let rel = "deploy/node-plugin/configmap.yaml";
    out.push(ShippedConfig {
        source: rel.into(),
        toml: yaml_block(&read(rel)?, "node.toml")
            .with_context(|| format!("{rel}: no node.toml"))?,
    });

    for rel in ["README.md", "docs/warm-slots.md"] {
        let blocks = markdown_toml_blocks(&read(rel)?);
        let with_pools: Vec<_> = blocks
            .into_iter()
            .filter(|(_, b)| b.contains("[[pool]]"))
            .collect();
        anyhow::ensure!(
            !with_pools.is_empty(),
            "{rel}: no ```toml block with a [[pool]]"
        );
        for (line, toml) in with_pools {
            out.push(ShippedConfig {
                source: format!("{rel}:{line}"),
                toml,
            });
        }
    }

    let rel = "hack/bench/src/warm.rs";
    let pool = bench_pool_template(&read(rel)?)
        .with_context(|| format!("{rel}: no [[pool]] format string found"))?;
    let mut toml = String::new();
    for handler in ["runc", "crun"] {
        // hack/quickstart.sh: `fast-sandbox-bench warm --handlers runc,crun`.
        toml.push_str(&pool.replace("{handler}", handler).replace("{size}", "2"));
    }
    out.push(ShippedConfig {
        source: format!("hack/quickstart.sh ({rel})"),
        toml,
    });
    Ok(out)
}

/// The text of a YAML block scalar `key: |` (dedented), as in a ConfigMap.
fn yaml_block(yaml: &str, key: &str) -> Option<String> {
    let mut lines = yaml.lines();
    let header = format!("{key}: |");
    lines.by_ref().find(|l| l.trim() == header)?;
    let mut indent = None;
    let mut out = String::new();
    for line in lines {
        if line.trim().is_empty() {
            out.push('\n');
            continue;
        }
        let n = line.len() - line.trim_start().len();
        let want = *indent.get_or_insert(n);
        if n < want {
            break;
        }
        out.push_str(&line[want..]);
        out.push('\n');
    }
    Some(out)
}

/// Every ```` ```toml ```` block of a Markdown text, with its line number.
fn markdown_toml_blocks(md: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in md.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match current.take() {
            None if fence && line.trim_start().trim_start_matches('`').trim() == "toml" => {
                current = Some((i + 1, String::new()));
            }
            None => {}
            Some(block) if fence => out.push(block),
            Some((at, mut text)) => {
                text.push_str(line);
                text.push('\n');
                current = Some((at, text));
            }
        }
    }
    out
}

/// The `format!` template of the `[[pool]]` the benchmark writes, with
/// `{handler}` and `{size}` left in and Rust's escapes undone.
fn bench_pool_template(source: &str) -> Option<String> {
    let at = source.find("\"[[pool]]")?;
    let rest = &source[at + 1..];
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => break,
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                't' => out.push('\t'),
                '\n' => {
                    // Line continuation: skip the next line's indentation.
                    let skipped: String = chars.clone().take_while(|c| c.is_whitespace()).collect();
                    for _ in 0..skipped.chars().count() {
                        chars.next();
                    }
                }
                other => {
                    out.push('\\');
                    out.push(other);
                }
            },
            c => out.push(c),
        }
    }
    Some(out.replace("{{", "{").replace("}}", "}"))
}

/// A node plugin (warm pools + shim), in-process, running one shipped
/// config's `[[pool]]`s against the development node. Only what is
/// node-specific is changed: where state and placeholder cgroups live,
/// containerd's root and CNI directory, the pools' names (prefixed, so
/// leftovers of a failed run are found and other tests' pools are never
/// touched) and, for runsc pools without a `guest_exec`, the runsc state
/// root of the development node.
pub struct ReplayNode {
    pub manager: Arc<PoolManager>,
    pub metrics: Arc<Metrics>,
    pub shim: InProcessShim,
    pub specs: Vec<PoolSpec>,
    pub cgroup_root: String,
    endpoint: String,
    stop: tokio::sync::watch::Sender<bool>,
    _state: tempfile::TempDir,
}

impl std::fmt::Debug for ReplayNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayNode")
            .field("specs", &self.specs)
            .field("shim", &self.shim)
            .finish_non_exhaustive()
    }
}

/// Prefix of every replay pool's name.
pub const POOL_PREFIX: &str = "rp-";

impl ReplayNode {
    /// The config's pools, as the node plugin would load them, renamed
    /// `rp-<name>`.
    pub fn pools(node: &DevNode, config: &ShippedConfig) -> anyhow::Result<Vec<PoolSection>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("node.toml");
        std::fs::write(&path, &config.toml)?;
        let file: FileConfig = fast_sandbox_node::config::load(&path)
            .with_context(|| format!("{}: the node plugin refuses the config", config.source))?;
        let runsc_root = node
            .containerd_root
            .parent()
            .unwrap_or(&node.containerd_root)
            .join("runtime/runsc/k8s.io");
        let mut pools = file.pools;
        for p in &mut pools {
            let name = p.name.clone().unwrap_or_else(|| {
                if p.handler.is_empty() {
                    "default".into()
                } else {
                    p.handler.clone()
                }
            });
            p.name = Some(format!("{POOL_PREFIX}{name}"));
            let runsc = p.upstream.starts_with("runsc") || p.upstream.starts_with("gvisor");
            if runsc && p.guest_exec.is_none() {
                let runsc = DevNode::runsc().display().to_string();
                p.guest_exec = Some(
                    [
                        runsc.as_str(),
                        "--root",
                        &runsc_root.display().to_string(),
                        "exec",
                        "--cap",
                        "CAP_SYS_ADMIN",
                        "{sandbox_id}",
                        "/pause",
                        "--set-hostname",
                        "{hostname}",
                    ]
                    .map(String::from)
                    .to_vec(),
                );
            }
        }
        Ok(pools)
    }

    pub async fn start(node: &DevNode, config: &ShippedConfig) -> anyhow::Result<Self> {
        let pools = Self::pools(node, config)?;
        let specs = fast_sandbox_node::config::pool_specs(&pools)
            .with_context(|| format!("{}: invalid [[pool]]", config.source))?;
        let mechanisms = fast_sandbox_node::config::fixup_mechanisms(&pools)
            .with_context(|| format!("{}: invalid [[pool]] fix-up", config.source))?;
        for spec in &specs {
            remove_pool_leftovers(node, &spec.name).await?;
        }
        let dir = tempfile::tempdir()?;
        let file: FileConfig = {
            let path = dir.path().join("node.toml");
            std::fs::write(&path, &config.toml)?;
            fast_sandbox_node::config::load(&path)?
        };
        let settings = Settings::resolve(file, Default::default());
        let cgroup_root = "/fast-sandbox-test/replay".to_owned();
        let cfg = ManagerConfig {
            state_dir: dir.path().join("state"),
            record_copies: Some(fast_sandbox_node::pool::records::sandboxes_dir(
                &node.containerd_root,
            )),
            placeholder_cgroup_root: cgroup_root.clone(),
            placeholder_namespace: SLOT_NAMESPACE.to_owned(),
            upstream_timeout: Duration::from_secs(60),
            refill_interval: settings.slots.refill_interval,
            refill_delay: settings.slots.refill_delay,
            health_interval: settings.slots.health_interval,
            cni: CniSettings {
                conf_dir: node.cni_conf_dir(),
                bin_dirs: vec!["/usr/lib/cni".into()],
                timeout: Duration::from_secs(10),
                recheck: Duration::from_secs(1),
            },
        };
        let fixup = Arc::new(ByRuntime::real(
            Arc::new(RealOps::new()),
            Arc::new(RealGuestOps),
            node.containerd_root.clone(),
            &mechanisms,
            Duration::from_secs(5),
        ));
        let metrics = Arc::new(Metrics::default());
        let channel = fast_sandbox_shim::cri_channel(&node.containerd_endpoint)?;
        let manager =
            PoolManager::start(specs.clone(), cfg, channel, fixup, Arc::clone(&metrics)).await?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(Arc::clone(&manager).run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        let upstream =
            Upstream::connect_lazy(&UpstreamConfig::new(node.containerd_endpoint.clone()))?;
        let handlers = HandlerMap::new(
            specs
                .iter()
                .map(|s| (s.exposed_handler.clone(), s.key.upstream_handler.clone())),
        );
        let shim = InProcessShim::serve(Shim::with_slots(
            upstream,
            handlers,
            Arc::clone(&manager) as Arc<dyn SlotSource>,
        ))
        .await?;
        Ok(Self {
            manager,
            metrics,
            shim,
            specs,
            cgroup_root,
            endpoint: node.containerd_endpoint.clone(),
            stop,
            _state: dir,
        })
    }

    pub fn free(&self, pool: &str) -> usize {
        self.manager
            .stats()
            .iter()
            .find(|p| p.name == pool)
            .map_or(0, |p| p.free)
    }

    /// Claims served from pool `pool` so far.
    pub fn hits(&self, pool: &str) -> u64 {
        self.metrics
            .claims
            .get_or_create(&PoolOutcome {
                pool: pool.to_owned(),
                outcome: "hit",
            })
            .get()
    }

    /// Warm hits over every pool of exposed handler `handler`.
    pub fn handler_hits(&self, handler: &str) -> u64 {
        self.specs
            .iter()
            .filter(|s| s.exposed_handler == handler)
            .map(|s| self.hits(&s.name))
            .sum()
    }

    /// Waits until every pool with a size has at least one free slot.
    pub async fn wait_one_free(&self, pool: &str) -> anyhow::Result<()> {
        wait_for(
            &format!("a free slot in pool {pool}"),
            Duration::from_secs(90),
            || async { (self.free(pool) > 0).then_some(()) },
        )
        .await
    }

    /// Stops the pools and removes their slots and placeholder cgroups.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.shim.stop().await?;
        let mut cri = Cri::connect(&self.endpoint)?;
        for spec in &self.specs {
            for sb in cri.list_by_label(POOL_LABEL, &spec.name).await? {
                cri.remove_sandbox(&sb.id).await?;
                if let Some(uid) = sb.metadata.map(|m| m.uid) {
                    crate::pod::remove_cgroup_dirs(&format!("{}/{uid}", self.cgroup_root));
                }
            }
        }
        crate::pod::remove_cgroup_dirs(&self.cgroup_root);
        Ok(())
    }
}

/// Removes a replay pool's slots (and the sandboxes claimed from it) left
/// by an earlier run that failed before [`ReplayNode::stop`].
async fn remove_pool_leftovers(node: &DevNode, pool: &str) -> anyhow::Result<()> {
    let mut cri = node.cri()?;
    for sb in cri.list_by_label(POOL_LABEL, pool).await? {
        cri.remove_sandbox(&sb.id).await?;
    }
    Ok(())
}

/// Namespace of every recorded pod (tests/recordings/README.md): what a
/// failed run leaves behind is found by it.
pub const RECORDED_NAMESPACE: &str = "fsb-rec";

/// Removes, straight on containerd, every sandbox of the recorded pods'
/// namespace (cold starts of an earlier, failed run).
pub async fn remove_recorded_pods(node: &DevNode) -> anyhow::Result<usize> {
    let mut cri = node.cri()?;
    let items = cri
        .list_by_label("io.kubernetes.pod.namespace", RECORDED_NAMESPACE)
        .await?;
    for sb in &items {
        cri.remove_sandbox(&sb.id).await?;
    }
    Ok(items.len())
}

/// What the replay expects of one recorded pod's `RunPodSandbox`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// A pool of the pod's handler has slots, and the pod is eligible.
    Warm { pool: String },
    /// The handler is known but the pod cannot be served warm (or its
    /// pools have size 0).
    Cold { why: String },
    /// The config does not expose the pod's handler: a node with this
    /// config would have no such RuntimeClass; the pod is not replayed.
    Skip { why: String },
}

/// One recorded pod and what happened to it in the replay.
#[derive(Debug, Clone)]
pub struct PodOutcome {
    pub pod: String,
    pub handler: String,
    pub expect: Expect,
    /// `Some(true)` warm, `Some(false)` cold, `None` not replayed or failed.
    pub warm: Option<bool>,
    pub error: Option<String>,
}

/// Pods that can never be served from a slot, by the design (DESIGN.md,
/// "Pods that cannot be made identical"): judged here from the request
/// itself, not by the shim's own eligibility code.
pub fn must_be_cold(config: &PodSandboxConfig) -> Option<String> {
    let node = NamespaceMode::Node as i32;
    let security = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());
    if let Some(ns) = security.and_then(|s| s.namespace_options.as_ref()) {
        if ns.network == node {
            return Some("host network".into());
        }
        if ns.pid == node {
            return Some("host PID".into());
        }
        if ns.ipc == node {
            return Some("host IPC".into());
        }
    }
    if config.port_mappings.iter().any(|p| p.host_port > 0) {
        return Some("host port".into());
    }
    if security.is_some_and(|s| s.privileged) {
        return Some("privileged".into());
    }
    None
}

fn pod_name(config: &PodSandboxConfig) -> String {
    config
        .metadata
        .as_ref()
        .map(|m| format!("{}/{}", m.namespace, m.name))
        .unwrap_or_else(|| "<no metadata>".into())
}

/// Methods never replayed: they would reach a registry or delete images
/// the development node shares with every other test.
const NEVER: &[&str] = &["PullImage", "RemoveImage"];

/// Calls that must succeed in the replay wherever they succeeded for the
/// recorded kubelet.
const LIFECYCLE: &[&str] = &[
    "RunPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "StopPodSandbox",
    "RemovePodSandbox",
    "ExecSync",
    "Exec",
];

/// The result of replaying one transcript against one config.
#[derive(Debug, Default)]
pub struct Report {
    pub pods: Vec<PodOutcome>,
    /// Calls replayed, by method.
    pub replayed: BTreeMap<String, usize>,
    /// Calls not replayed, by reason.
    pub skipped: BTreeMap<String, usize>,
    /// Lifecycle calls that failed where they had worked for kubelet, and
    /// ExecSync answers that differ from the recorded ones.
    pub failures: Vec<String>,
    /// Other calls whose status differed (timing: reads and probes that
    /// raced a container's stop when recorded).
    pub code_differences: BTreeMap<String, usize>,
}

impl Report {
    /// Problems that fail the test: lifecycle failures, and pods whose
    /// warm/cold outcome is not the expected one.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.failures.clone();
        for p in &self.pods {
            match (&p.expect, p.warm) {
                (Expect::Warm { .. }, Some(true))
                | (Expect::Cold { .. }, Some(false))
                | (Expect::Skip { .. }, None) => {}
                (Expect::Warm { pool }, Some(false)) => out.push(format!(
                    "pod {} ({}) should be warm from pool {pool} but started cold{}",
                    p.pod,
                    p.handler,
                    p.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )),
                (Expect::Cold { why }, Some(true)) => out.push(format!(
                    "pod {} ({}) must start cold ({why}) but got a warm slot",
                    p.pod, p.handler
                )),
                (expect, got) => out.push(format!(
                    "pod {} ({}): expected {expect:?}, got {got:?}{}",
                    p.pod,
                    p.handler,
                    p.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )),
            }
        }
        out
    }
}

/// Host paths kubelet prepares before it calls the runtime (pod log
/// directory, `/etc/hosts`, termination-log files): created for the replay
/// where missing, removed afterwards.
#[derive(Debug, Default)]
struct HostPaths {
    created: Vec<PathBuf>,
}

impl HostPaths {
    /// Creates `path` (a directory, or an empty file when `file`) with its
    /// missing parents, remembering the topmost directory it created.
    fn ensure(&mut self, path: &Path, file: bool) -> anyhow::Result<()> {
        if path.exists() || path.as_os_str().is_empty() || !path.is_absolute() {
            return Ok(());
        }
        let mut top = path.to_owned();
        while let Some(parent) = top.parent() {
            if parent.exists() {
                break;
            }
            top = parent.to_owned();
        }
        if file {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, b"")?;
        } else {
            std::fs::create_dir_all(path)?;
        }
        self.created.push(top);
        Ok(())
    }

    fn sandbox(&mut self, config: &PodSandboxConfig) -> anyhow::Result<()> {
        self.ensure(Path::new(&config.log_directory), false)
    }

    fn container(&mut self, config: &ContainerConfig) -> anyhow::Result<()> {
        for m in &config.mounts {
            // Kubelet's file mounts: /etc/hosts, termination-log; every
            // other mount it makes is a directory (volumes).
            let file = m.container_path == "/etc/hosts"
                || m.container_path.ends_with("termination-log")
                || m.container_path == "/etc/resolv.conf"
                || m.container_path == "/etc/hostname";
            self.ensure(Path::new(&m.host_path), file)?;
        }
        Ok(())
    }

    fn remove(&mut self) {
        for p in self.created.drain(..).rev() {
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

impl Drop for HostPaths {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Replaces every occurrence of a recorded id by this run's id. Ids are
/// containerd's 64-hex-digit ids on both sides, so lengths (and with them
/// the protobuf framing) never change.
fn substitute(bytes: &mut [u8], ids: &HashMap<Vec<u8>, Vec<u8>>) {
    for (old, new) in ids {
        debug_assert_eq!(old.len(), new.len());
        if old.is_empty() || bytes.len() < old.len() {
            continue;
        }
        let mut i = 0;
        while i + old.len() <= bytes.len() {
            if bytes[i..i + old.len()] == old[..] {
                bytes[i..i + old.len()].copy_from_slice(new);
                i += old.len();
            } else {
                i += 1;
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// One gRPC answer as gRPC-Go (kubelet's client) reads it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// gRPC status code; 13 (`Internal`) when the status came in response
    /// headers that did not end the stream and no trailers followed, which
    /// gRPC-Go reports as "server closed the stream without sending
    /// trailers".
    pub code: i32,
    pub message: String,
    /// The answer's message bytes (gRPC framing removed).
    pub message_bytes: Vec<u8>,
}

/// A plain HTTP/2 connection to a CRI socket: every answer is judged as
/// gRPC-Go judges it. A status in the response headers counts only when
/// those headers end the stream ("trailers-only", as containerd answers
/// every error); tonic's client is more lenient and would hide a relay that
/// breaks this for kubelet.
#[derive(Debug, Clone)]
pub struct H2Client {
    send: h2::client::SendRequest<prost::bytes::Bytes>,
}

impl H2Client {
    pub async fn connect(socket: &Path) -> anyhow::Result<Self> {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let (send, connection) = h2::client::handshake(stream).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self { send })
    }

    /// Sends `payload` as the request message of gRPC method `path`.
    pub async fn unary(&self, path: &str, payload: &[u8]) -> anyhow::Result<Answer> {
        use tonic::codegen::http;
        let mut send = self.send.clone().ready().await?;
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (response, mut body_tx) = send.send_request(request, false)?;
        let mut framed = Vec::with_capacity(payload.len() + 5);
        framed.push(0);
        framed.extend_from_slice(&u32::try_from(payload.len())?.to_be_bytes());
        framed.extend_from_slice(payload);
        body_tx.send_data(framed.into(), true)?;
        let (parts, mut body) = response.await?.into_parts();
        let trailers_only = body.is_end_stream();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = if trailers_only {
            None
        } else {
            body.trailers().await?
        };
        let status_of = |map: &http::HeaderMap| {
            map.get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(|code| {
                    let message = map
                        .get("grpc-message")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    (code, message)
                })
        };
        let (code, message) = if trailers_only {
            status_of(&parts.headers)
                .unwrap_or((2, "trailers-only answer without grpc-status".into()))
        } else if let Some((code, message)) = trailers.as_ref().and_then(status_of) {
            (code, message)
        } else {
            let in_headers = status_of(&parts.headers)
                .map(|(c, m)| {
                    format!(" (status {c} {m:?} sent in headers that did not end the stream)")
                })
                .unwrap_or_default();
            (
                13,
                format!("server closed the stream without sending trailers{in_headers}"),
            )
        };
        let message_bytes = if data.len() >= 5 {
            let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            data.get(5..5 + len).unwrap_or_default().to_vec()
        } else {
            Vec::new()
        };
        Ok(Answer {
            code,
            message,
            message_bytes,
        })
    }
}

/// Replays `transcript` through `node`'s shim: every unary call in order,
/// with ids mapped, and each recorded pod judged warm or cold against what
/// `node`'s pools should give it.
pub async fn replay(node: &ReplayNode, transcript: &Transcript) -> anyhow::Result<Report> {
    let client = H2Client::connect(node.shim.socket()).await?;
    let mut report = Report::default();
    let mut ids: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    // Recorded ids of pods (and their containers) not replayed.
    let mut skipped_ids: HashSet<Vec<u8>> = HashSet::new();
    let mut paths = HostPaths::default();
    let mut cgroup_parents: Vec<String> = Vec::new();
    fn skip(report: &mut Report, why: &str) {
        *report.skipped.entry(why.to_owned()).or_default() += 1;
    }

    for call in &transcript.calls {
        let name = call.name().to_owned();
        if NEVER.contains(&name.as_str()) {
            skip(&mut report, &format!("{name} (never replayed)"));
            continue;
        }
        if call.request_pb.is_none() || (call.code == 0 && call.response_pb.is_none()) {
            skip(&mut report, &format!("{name} (stream or undecodable)"));
            continue;
        }
        let mut request = call.request()?;
        if skipped_ids.iter().any(|id| contains(&request, id)) {
            if name == "CreateContainer" {
                if let Some(resp) = call.response()? {
                    let id = CreateContainerResponse::decode(resp.as_slice())?.container_id;
                    skipped_ids.insert(id.into_bytes());
                }
            }
            skip(&mut report, &format!("{name} (pod not replayed)"));
            continue;
        }
        substitute(&mut request, &ids);

        // What this pod should get, before the call.
        let mut pod_expect = None;
        let mut before_hits = 0;
        match name.as_str() {
            "RunPodSandbox" => {
                let req = RunPodSandboxRequest::decode(request.as_slice())
                    .with_context(|| format!("seq {}: RunPodSandboxRequest", call.seq))?;
                let config = req.config.clone().unwrap_or_default();
                let handler = req.runtime_handler.clone();
                let pools: Vec<&PoolSpec> = node
                    .specs
                    .iter()
                    .filter(|s| s.exposed_handler == handler)
                    .collect();
                let expect = if !handler.is_empty() && pools.is_empty() {
                    Expect::Skip {
                        why: format!("no pool exposes handler {handler:?}"),
                    }
                } else if let Some(why) = must_be_cold(&config) {
                    Expect::Cold { why }
                } else if let Some(pool) = pools.iter().find(|s| s.size > 0) {
                    Expect::Warm {
                        pool: pool.name.clone(),
                    }
                } else if pools.is_empty() {
                    Expect::Cold {
                        why: "default handler, no pool".into(),
                    }
                } else {
                    Expect::Cold {
                        why: "its pools have size 0".into(),
                    }
                };
                if let Expect::Skip { .. } = expect {
                    if let Some(resp) = call.response()? {
                        let id = RunPodSandboxResponse::decode(resp.as_slice())?.pod_sandbox_id;
                        skipped_ids.insert(id.into_bytes());
                    }
                    report.pods.push(PodOutcome {
                        pod: pod_name(&config),
                        handler,
                        expect,
                        warm: None,
                        error: None,
                    });
                    skip(&mut report, "RunPodSandbox (pod not replayed)");
                    continue;
                }
                if let Expect::Warm { pool } = &expect {
                    node.wait_one_free(pool).await?;
                }
                paths.sandbox(&config)?;
                if let Some(parent) = config.linux.as_ref().map(|l| l.cgroup_parent.clone()) {
                    cgroup_parents.push(parent);
                }
                before_hits = node.handler_hits(&handler);
                pod_expect = Some((pod_name(&config), handler, expect, config));
            }
            "CreateContainer" => {
                let req = CreateContainerRequest::decode(request.as_slice())
                    .with_context(|| format!("seq {}: CreateContainerRequest", call.seq))?;
                if let Some(c) = &req.config {
                    paths.container(c)?;
                }
            }
            _ => {}
        }

        let answer = tokio::time::timeout(
            Duration::from_secs(120),
            client.unary(&call.method, &request),
        )
        .await
        .with_context(|| format!("seq {} {name}: no answer in 120 s", call.seq))?
        .with_context(|| format!("seq {} {name}", call.seq))?;
        *report.replayed.entry(name.clone()).or_default() += 1;
        let code = answer.code;
        if code == 13
            && answer
                .message
                .starts_with("server closed the stream without sending trailers")
        {
            report.failures.push(format!(
                "seq {} {name}: kubelet's gRPC-Go would read this answer as Internal: {} \
                 (recorded: code {} {:?})",
                call.seq, answer.message, call.code, call.message
            ));
        }
        let result: Result<Vec<u8>, String> = if code == 0 {
            Ok(answer.message_bytes.clone())
        } else {
            Err(answer.message.clone())
        };
        if code != call.code {
            let what = format!(
                "seq {} {name}: recorded code {} ({:?}), replay {} ({})",
                call.seq,
                call.code,
                call.message,
                code,
                result.as_ref().err().map(String::as_str).unwrap_or("OK")
            );
            // A lifecycle call that worked for kubelet must work in the
            // replay. The reverse is timing: kubelet's probes race the
            // container's stop (an ExecSync that found the task gone), and
            // the replay sends each call after the previous one answered.
            if LIFECYCLE.contains(&name.as_str()) && call.code == 0 {
                report.failures.push(what);
            } else {
                *report.code_differences.entry(name.clone()).or_default() += 1;
            }
        }

        // Learn the ids this run's runtime chose.
        if let (Ok(answer), Some(recorded)) = (&result, call.response()?) {
            let pair = match name.as_str() {
                "RunPodSandbox" => Some((
                    RunPodSandboxResponse::decode(recorded.as_slice())?.pod_sandbox_id,
                    RunPodSandboxResponse::decode(answer.as_slice())?.pod_sandbox_id,
                )),
                "CreateContainer" => Some((
                    CreateContainerResponse::decode(recorded.as_slice())?.container_id,
                    CreateContainerResponse::decode(answer.as_slice())?.container_id,
                )),
                _ => None,
            };
            if let Some((old, new)) = pair {
                anyhow::ensure!(
                    old.len() == new.len(),
                    "seq {} {name}: recorded id {old:?} and new id {new:?} differ in length",
                    call.seq
                );
                ids.insert(old.into_bytes(), new.into_bytes());
            }
            if name == "ExecSync" && recorded != *answer {
                report.failures.push(format!(
                    "seq {} ExecSync: answer differs from the recording: recorded {:?}, replay {:?}",
                    call.seq,
                    fast_sandbox_proto::cri::ExecSyncResponse::decode(recorded.as_slice()).ok(),
                    fast_sandbox_proto::cri::ExecSyncResponse::decode(answer.as_slice()).ok(),
                ));
            }
        }

        if let Some((pod, handler, expect, config)) = pod_expect {
            let warm = result
                .is_ok()
                .then(|| node.handler_hits(&handler) > before_hits);
            let error = match (&result, &expect, warm) {
                (Err(s), _, _) => Some(format!("RunPodSandbox failed: {s}")),
                (Ok(_), Expect::Warm { .. }, Some(false)) => {
                    Some(explain_miss(node, &handler, &config))
                }
                _ => None,
            };
            report.pods.push(PodOutcome {
                pod,
                handler,
                expect,
                warm,
                error,
            });
        }
    }
    paths.remove();
    for parent in cgroup_parents.iter().filter(|p| !p.is_empty()) {
        crate::pod::remove_cgroup_dirs(parent);
    }
    Ok(report)
}

/// Why a pod of `handler` found no slot: the shape kubelet asked for
/// against the shapes the handler's pools serve.
fn explain_miss(node: &ReplayNode, handler: &str, config: &PodSandboxConfig) -> String {
    let asked = Shape::of(config)
        .map(|s| format!("{s:?}"))
        .unwrap_or_else(|e| format!("ineligible: {e:?}"));
    let served: Vec<String> = node
        .specs
        .iter()
        .filter(|s| s.exposed_handler == handler)
        .map(|s| format!("{} serves {:?} (size {})", s.name, s.key.shape, s.size))
        .collect();
    format!(
        "kubelet asked shape {asked}; {}",
        if served.is_empty() {
            "no pool".to_owned()
        } else {
            served.join(", ")
        }
    )
}
