//! Warm slot pools: pre-created sandboxes handed to pods by the shim.
//!
//! Lifecycle of a slot (DESIGN.md, "The slot lifecycle"):
//! 1. **Pre-create**: the refill task calls upstream `RunPodSandbox` with a
//!    placeholder config whose shape is exactly the pool's [`PoolKey`] and
//!    whose labels carry the node's secret slot token. containerd does all
//!    the real work (netns, CNI IP, shim, pause).
//! 2. **Claim**: [`PoolManager::claim`] takes a free slot of the same key,
//!    writes the claim record durably, applies the fix-ups and returns.
//! 3. **Use**: the shim reports the slot with the pod's identity
//!    ([`SlotSource::view`]).
//! 4. **Release**: kubelet stops and removes it like any sandbox; a slot is
//!    single-use. The refill task replaces it in the background, one
//!    creation at a time, so refill never starves cold work.
//!
//! Locking: one `std` mutex over the in-memory table, never held across an
//! await; `view` (called for every sandbox of every list answer) only takes
//! it briefly.

pub mod gvisor;
pub mod misses;
pub mod records;
pub mod setns;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use fast_sandbox_proto::cri::{
    runtime_service_client::RuntimeServiceClient, ListPodSandboxRequest, PodSandboxConfig,
    PodSandboxFilter, PodSandboxState, PodSandboxStatusRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StopPodSandboxRequest,
};
use fast_sandbox_shim::slots::{
    Claim, ClaimFailed, ClaimedPod, ClaimedSlot, MissReason, NoSlot, NotReady, PodIps, PodUsage,
    PoolKey, SlotSource, SlotView, SLOT_TOKEN_LABEL,
};
use tokio::sync::Notify;
use tonic::transport::Channel;

use self::records::{ClaimRecord, RecordStore};
use crate::{
    config::NetworkMode,
    fault,
    metrics::{Metrics, Miss, PoolLabel, PoolOutcome},
    network::{pod_ips, Attachment, Cni, CniSettings, RealExec},
    usage::UsageTracker,
};

/// One configured pool.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Name used in labels, metrics and records (e.g. `fast-runc`).
    pub name: String,
    /// The handler kubelet asks for.
    pub exposed_handler: String,
    pub key: PoolKey,
    /// Free slots to keep.
    pub size: usize,
    /// How a claimed slot's network identity is handled.
    pub network: NetworkMode,
}

/// What is known about a running slot, for fix-ups.
#[derive(Debug, Clone)]
pub struct SlotFacts {
    pub sandbox_id: String,
    /// PID of the pause (or sentry) process on the host.
    pub pause_pid: i32,
    /// The placeholder's cgroup parent, where runc put the pause.
    pub placeholder_cgroup_parent: String,
    /// containerd's handler the slot was created with: picks the fix-up
    /// mechanism ([`gvisor::ByRuntime`]).
    pub upstream_handler: String,
}

/// A fix-up that failed; the slot is destroyed and the pod starts cold.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FixupFailed(pub String);

/// How a claimed slot is made to look like the pod's own sandbox: one
/// mechanism per upstream runtime type (setns for runc/crun; gVisor and
/// Kata need others), behind this trait so the pool can be tested with a
/// fake.
#[tonic::async_trait]
pub trait Fixup: fmt::Debug + Send + Sync + 'static {
    /// Makes the slot look like a cold sandbox of `real` from inside: runs
    /// before the claim is answered.
    async fn apply(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<(), FixupFailed>;
    /// Whether claims of `slot` have a [`Fixup::settle`] step. No I/O: asked
    /// on every claim.
    fn settles(&self, _slot: &SlotFacts) -> bool {
        false
    }
    /// The part of the identity nothing in the pod can observe before its
    /// first container exists (a gVisor sentry's UTS hostname, set by a
    /// command inside the sandbox): runs at once after the claim is
    /// answered, and the pod's `CreateContainer` waits for it
    /// ([`SlotSource::ready_for_containers`]). Retried once on failure; run
    /// again for every claimed slot found at start-up, so it must be
    /// idempotent. Only called when [`Fixup::settles`].
    async fn settle(&self, _slot: &SlotFacts, _real: &PodSandboxConfig) -> Result<(), FixupFailed> {
        Ok(())
    }
    /// Checks a new, unclaimed slot whose claims will settle (runs the
    /// settle mechanism with the placeholder's own identity), so a
    /// mechanism that cannot work there fails the slot's creation — the
    /// pod then starts cold — rather than its claim's first container.
    async fn prepare(
        &self,
        _slot: &SlotFacts,
        _placeholder: &PodSandboxConfig,
    ) -> Result<(), FixupFailed> {
        Ok(())
    }
    /// The rest, which nothing in the pod waits for (the pause's cgroup):
    /// runs right after the claim is answered, and again for every claimed
    /// slot found at start-up, so it must be idempotent.
    async fn complete(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<(), FixupFailed>;
    /// Cleans up what `apply` created outside containerd's knowledge, once
    /// upstream has removed the sandbox.
    async fn after_remove(&self, slot: &SlotFacts, real: &PodSandboxConfig);
    /// The slot's sandbox is gone upstream (claimed or not): remove what the
    /// pool created for it (its placeholder cgroup parent).
    async fn discard(&self, slot: &SlotFacts);
}

/// Settings of the manager itself.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Where claim records and the token live.
    pub state_dir: std::path::PathBuf,
    /// cgroup parent under which placeholders are created; each slot gets
    /// its own child (`<root>/<slot uid>`), so upstream stats of an
    /// unclaimed slot are that slot's alone.
    pub placeholder_cgroup_root: String,
    /// Namespace of placeholder pods (never a real namespace's name).
    pub placeholder_namespace: String,
    /// Deadline for one upstream call made by the pool.
    pub upstream_timeout: Duration,
    /// Pause between two slot creations, so refill never monopolises
    /// containerd while cold pods start.
    pub refill_interval: Duration,
    /// After a claim, how long the pool waits before refilling, so the
    /// refill does not compete with the pod that just started (its
    /// `CreateContainer`/`StartContainer` follow within milliseconds).
    pub refill_delay: Duration,
    /// How often free slots are checked for health.
    pub health_interval: Duration,
    /// containerd's CNI configuration: read at start when a pool has
    /// `network = "rebind"`.
    pub cni: CniSettings,
}

#[derive(Debug)]
enum Status {
    Free,
    Claiming,
    Claimed(Arc<ClaimedPod>),
}

#[derive(Debug)]
struct Slot {
    pool: usize,
    facts: SlotFacts,
    status: Status,
    /// The deferred part of a claim's fix-up, while it may still run.
    completion: Option<Completion>,
    /// Where the claim's [`Fixup::settle`] stands; `None`: nothing to wait
    /// for (an unclaimed slot, or a mechanism without that step).
    identity: Option<tokio::sync::watch::Receiver<Identity>>,
}

/// The state of a claimed slot's [`Fixup::settle`] step.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    Pending,
    Settled,
    /// Failed twice: no container may be created in the sandbox.
    Failed(String),
}

/// A scheduled [`Fixup::complete`]: cancellable while it waits.
#[derive(Debug)]
struct Completion {
    cancel: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Table {
    slots: HashMap<String, Slot>,
    /// Free slot ids per pool index, oldest first.
    free: Vec<VecDeque<String>>,
    /// Desired free slots per pool index.
    desired: Vec<usize>,
    /// Per pool index: no refill before this instant (set by claims).
    hold_until: Vec<Option<Instant>>,
}

/// Counters for metrics and the CLI.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PoolStats {
    pub name: String,
    pub exposed_handler: String,
    pub upstream_handler: String,
    pub desired: usize,
    pub free: usize,
    pub claimed: usize,
    /// Cold starts of this pool's exposed handler, by reason (`no_pool`,
    /// `pool_empty`, `host_network`, ...): per handler, so pools sharing a
    /// handler show the same counts.
    pub misses: std::collections::BTreeMap<String, u64>,
}

/// One claimed slot, for the CLI.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClaimInfo {
    pub sandbox_id: String,
    pub pool: String,
    pub exposed_handler: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub claimed_at_ns: i64,
}

/// The warm pools of one node.
#[derive(Debug)]
pub struct PoolManager {
    specs: Vec<PoolSpec>,
    cfg: ManagerConfig,
    upstream: RuntimeServiceClient<Channel>,
    token: String,
    records: RecordStore,
    fixup: Arc<dyn Fixup>,
    /// containerd's network, when a pool rebinds claimed slots to it.
    cni: Option<Cni>,
    /// Previous CPU samples of claimed pods, for `usage_nano_cores`.
    usage: UsageTracker,
    metrics: Arc<Metrics>,
    /// Misses by handler and reason, and the shape differences logged.
    misses: misses::MissBook,
    table: Mutex<Table>,
    refill: Notify,
    /// Bumped on every change of the pools' counters (claim, release,
    /// refill, trim, size change): the node agent's status watch.
    changes: tokio::sync::watch::Sender<u64>,
}

/// The per-slot placeholder cgroup parents (`<root>/<slot uid>`, 32 hex
/// digits) that exist in any mounted hierarchy.
fn placeholder_dirs(root: &str) -> HashSet<String> {
    let rel = root.trim_start_matches('/');
    let cgroupfs = Path::new("/sys/fs/cgroup");
    let mut bases = vec![cgroupfs.join(rel)];
    if let Ok(hierarchies) = std::fs::read_dir(cgroupfs) {
        bases.extend(hierarchies.flatten().map(|h| h.path().join(rel)));
    }
    bases
        .iter()
        .filter_map(|b| std::fs::read_dir(b).ok())
        .flat_map(|d| d.flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect()
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .is_err()
    {
        // Uniqueness is all that is needed here, not secrecy.
        let n = now_ns().to_le_bytes();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = n[i % n.len()] ^ u8::try_from(i & 0xff).unwrap_or(0);
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl PoolManager {
    /// Opens the record store, reconciles with upstream (claimed slots keep
    /// their identity, orphaned placeholders are removed) and returns the
    /// manager; call [`PoolManager::run`] to keep the pools full.
    pub async fn start(
        specs: Vec<PoolSpec>,
        cfg: ManagerConfig,
        upstream: Channel,
        fixup: Arc<dyn Fixup>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let records = RecordStore::open(&cfg.state_dir)?;
        let token = records.token()?;
        let cni = if specs.iter().any(|s| s.network == NetworkMode::Rebind) {
            let cni = Cni::new(cfg.cni.clone(), Arc::new(RealExec)).map_err(|e| {
                anyhow::anyhow!("network = \"rebind\" needs containerd's CNI configuration: {e}")
            })?;
            tracing::info!(
                network = cni.network().name(),
                "rebinding claimed slots to the pod's identity"
            );
            Some(cni)
        } else {
            None
        };
        let table = Table {
            slots: HashMap::new(),
            free: vec![VecDeque::new(); specs.len()],
            desired: specs.iter().map(|s| s.size).collect(),
            hold_until: vec![None; specs.len()],
        };
        let mgr = Arc::new(Self {
            specs,
            cfg,
            upstream: RuntimeServiceClient::new(upstream),
            token,
            records,
            fixup,
            cni,
            usage: UsageTracker::default(),
            metrics,
            misses: misses::MissBook::default(),
            table: Mutex::new(table),
            refill: Notify::new(),
            changes: tokio::sync::watch::channel(0).0,
        });
        mgr.recover().await?;
        Ok(mgr)
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table half-updated
        // in a way that matters more than losing the node plugin would.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.cfg.upstream_timeout);
        r
    }

    /// The configured pools, in config order (as [`PoolManager::stats`]).
    pub fn specs(&self) -> &[PoolSpec] {
        &self.specs
    }

    /// A counter that moves on every change of [`PoolManager::stats`].
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Current pool counters.
    pub fn stats(&self) -> Vec<PoolStats> {
        let t = self.table();
        self.specs
            .iter()
            .enumerate()
            .map(|(i, s)| PoolStats {
                name: s.name.clone(),
                exposed_handler: s.exposed_handler.clone(),
                upstream_handler: s.key.upstream_handler.clone(),
                desired: t.desired[i],
                free: t.free[i].len(),
                claimed: t
                    .slots
                    .values()
                    .filter(|sl| sl.pool == i && matches!(sl.status, Status::Claimed(_)))
                    .count(),
                misses: self.misses.of(&s.exposed_handler),
            })
            .collect()
    }

    /// The claimed slots and the pods that own them.
    pub fn claims(&self) -> Vec<ClaimInfo> {
        let t = self.table();
        let mut out: Vec<ClaimInfo> = t
            .slots
            .iter()
            .filter_map(|(id, slot)| match &slot.status {
                Status::Claimed(pod) => {
                    let meta = pod.config.metadata.clone().unwrap_or_default();
                    Some(ClaimInfo {
                        sandbox_id: id.clone(),
                        pool: self.specs[slot.pool].name.clone(),
                        exposed_handler: pod.exposed_handler.clone(),
                        pod_namespace: meta.namespace,
                        pod_name: meta.name,
                        pod_uid: meta.uid,
                        claimed_at_ns: pod.claimed_at_ns,
                    })
                }
                Status::Free | Status::Claiming => None,
            })
            .collect();
        out.sort_by_key(|c| c.claimed_at_ns);
        out
    }

    /// Changes how many free slots pool `name` keeps; excess free slots are
    /// removed by the refill task.
    pub fn set_size(&self, name: &str, size: usize) -> bool {
        let Some(i) = self.specs.iter().position(|s| s.name == name) else {
            return false;
        };
        self.table().desired[i] = size;
        self.changed();
        self.refill.notify_one();
        true
    }

    /// Reconciles the in-memory table with the records and upstream.
    async fn recover(&self) -> anyhow::Result<()> {
        let (records, bad) = self.records.load()?;
        // A record file names its sandbox even when its content is lost: a
        // pod claimed that sandbox, so it is never taken for a free slot or
        // an orphan (which would destroy it, and the pod's containers, with
        // no word to kubelet).
        let mut unreadable: HashMap<String, std::path::PathBuf> = HashMap::new();
        for b in &bad {
            tracing::error!(path = %b.path.display(), error = %b.error,
                "claim record unreadable; the pod that claimed its sandbox cannot be known");
            if let Some(id) = b.path.file_stem().and_then(|s| s.to_str()) {
                if records::is_sandbox_id(id) {
                    unreadable.insert(id.to_owned(), b.path.clone());
                }
            }
        }
        let listed = self.list_ours().await?.into_inner().items;
        let mut by_id: HashMap<String, ClaimRecord> = records
            .into_iter()
            .map(|r| (r.sandbox_id.clone(), r))
            .collect();
        let mut orphans = Vec::new();
        let mut completions = Vec::new();
        let mut unapplied = Vec::new();
        {
            let mut t = self.table();
            for sb in &listed {
                match by_id.remove(&sb.id) {
                    Some(rec) => {
                        let pool = self
                            .specs
                            .iter()
                            .position(|s| s.name == rec.pool)
                            .unwrap_or(0);
                        let ready = sb.state == PodSandboxState::SandboxReady as i32;
                        if ready && !rec.identity_applied {
                            unapplied.push(rec.clone());
                        }
                        let pod = Arc::new(ClaimedPod {
                            config: rec.config,
                            exposed_handler: rec.exposed_handler,
                            claimed_at_ns: rec.claimed_at_ns,
                            network: rec.network,
                        });
                        let facts = SlotFacts {
                            sandbox_id: sb.id.clone(),
                            pause_pid: rec.pause_pid,
                            placeholder_cgroup_parent: rec.placeholder_cgroup_parent,
                            upstream_handler: self.specs[pool].key.upstream_handler.clone(),
                        };
                        t.slots.insert(
                            sb.id.clone(),
                            Slot {
                                pool,
                                facts: facts.clone(),
                                status: Status::Claimed(Arc::clone(&pod)),
                                completion: None,
                                identity: None,
                            },
                        );
                        // The deferred part may not have run before the crash.
                        if ready {
                            completions.push((facts, pod));
                        }
                    }
                    None => match unreadable.remove(&sb.id) {
                        Some(path) => {
                            tracing::error!(sandbox = %sb.id, path = %path.display(),
                                "claimed sandbox without a readable record: reported under its placeholder identity, as a pod kubelet does not know, so kubelet stops and removes it and recreates its pod's sandbox; never served again");
                            let pool = sb
                                .labels
                                .get(fast_sandbox_shim::slots::POOL_LABEL)
                                .map_or(0, |p| self.pool_index(p));
                            // No labels: the placeholder's would show the token.
                            let pod = Arc::new(ClaimedPod {
                                config: PodSandboxConfig {
                                    metadata: sb.metadata.clone(),
                                    ..Default::default()
                                },
                                exposed_handler: self.specs[pool].exposed_handler.clone(),
                                claimed_at_ns: sb.created_at,
                                network: None,
                            });
                            t.slots.insert(
                                sb.id.clone(),
                                Slot {
                                    pool,
                                    facts: self.orphan_facts(sb),
                                    status: Status::Claimed(pod),
                                    completion: None,
                                    identity: None,
                                },
                            );
                        }
                        None => orphans.push(self.orphan_facts(sb)),
                    },
                }
            }
        }
        // Unreadable records whose sandbox is gone: nothing left to keep.
        for (id, path) in unreadable {
            tracing::error!(sandbox = %id, path = %path.display(),
                "removing an unreadable claim record: its sandbox no longer exists upstream");
            self.records.remove(&id)?;
        }
        // Records whose sandbox is gone upstream: the pod was removed while
        // we were down.
        for (id, rec) in by_id {
            tracing::info!(sandbox = %id, "claimed sandbox no longer exists upstream; forgetting its record");
            let facts = SlotFacts {
                sandbox_id: id.clone(),
                pause_pid: rec.pause_pid,
                placeholder_cgroup_parent: rec.placeholder_cgroup_parent,
                upstream_handler: self.upstream_of(&rec.pool),
            };
            self.fixup.after_remove(&facts, &rec.config).await;
            self.fixup.discard(&facts).await;
            self.records.remove(&id)?;
        }
        for facts in orphans {
            tracing::info!(sandbox = %facts.sandbox_id, "removing unclaimed slot left by a previous run");
            self.destroy_slot(&facts).await;
        }
        // A slot creation killed mid-way leaves the cgroup parent runc made
        // for it (containerd cleans up the sandbox, not that directory).
        let known: HashSet<String> = listed
            .iter()
            .filter_map(|sb| sb.metadata.as_ref().map(|m| m.uid.clone()))
            .collect();
        for uid in placeholder_dirs(&self.cfg.placeholder_cgroup_root) {
            if !known.contains(&uid) {
                tracing::info!(uid = %uid, "removing a placeholder cgroup left by an unfinished slot creation");
                self.fixup
                    .discard(&SlotFacts {
                        sandbox_id: String::new(),
                        pause_pid: 0,
                        placeholder_cgroup_parent: format!(
                            "{}/{uid}",
                            self.cfg.placeholder_cgroup_root
                        ),
                        upstream_handler: String::new(),
                    })
                    .await;
            }
        }
        // Claims the previous run died in the middle of: kubelet was never
        // answered, but its next sync finds the sandbox by the pod's uid and
        // uses it, so the claim is finished here, or rolled back.
        let mut rolled_back = HashSet::new();
        for mut rec in unapplied {
            let facts = SlotFacts {
                sandbox_id: rec.sandbox_id.clone(),
                pause_pid: rec.pause_pid,
                placeholder_cgroup_parent: rec.placeholder_cgroup_parent.clone(),
                upstream_handler: self.upstream_of(&rec.pool),
            };
            let pool = self.pool_index(&rec.pool);
            match self.identify(pool, &facts, &rec.config).await {
                Ok(network) => {
                    tracing::info!(sandbox = %rec.sandbox_id, "finished a claim interrupted by a restart");
                    rec.identity_applied = true;
                    rec.network.clone_from(&network);
                    self.records.put(&rec)?;
                    if let Some(slot) = self.table().slots.get_mut(&rec.sandbox_id) {
                        if let Status::Claimed(pod) = &slot.status {
                            let mut pod = ClaimedPod::clone(pod);
                            pod.network = network;
                            slot.status = Status::Claimed(Arc::new(pod));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(sandbox = %rec.sandbox_id, error = %e,
                        "rolling back a claim interrupted by a restart: its fix-up failed");
                    self.abandon(&facts).await;
                    rolled_back.insert(rec.sandbox_id);
                }
            }
        }
        for (facts, pod) in completions {
            if !rolled_back.contains(&facts.sandbox_id) {
                self.spawn_complete(facts, pod);
            }
        }
        Ok(())
    }

    /// Stops and removes a slot's sandbox upstream and discards what the
    /// pool made for it, logging failures.
    async fn destroy_slot(&self, facts: &SlotFacts) {
        self.destroy(&facts.sandbox_id).await;
        self.fixup.discard(facts).await;
    }

    /// Stops and removes a sandbox upstream, logging failures.
    async fn destroy(&self, id: &str) {
        let mut up = self.upstream.clone();
        if let Err(e) = up
            .stop_pod_sandbox(self.request(StopPodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }))
            .await
        {
            tracing::warn!(sandbox = %id, error = %e, "stopping slot failed");
        }
        if let Err(e) = up
            .remove_pod_sandbox(self.request(RemovePodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }))
            .await
        {
            tracing::warn!(sandbox = %id, error = %e, "removing slot failed");
        }
    }

    /// The placeholder config of a new slot of pool `i`.
    fn placeholder(&self, i: usize, uid: &str) -> PodSandboxConfig {
        let spec = &self.specs[i];
        let name = format!("slot-{}-{}", spec.name, uid.get(..12).unwrap_or(uid));
        fast_sandbox_shim::slots::placeholder_config(
            &spec.key,
            &fast_sandbox_shim::slots::Placeholder {
                name: &name,
                namespace: &self.cfg.placeholder_namespace,
                uid,
                pool: &spec.name,
                token: &self.token,
                cgroup_parent: &format!("{}/{uid}", self.cfg.placeholder_cgroup_root),
            },
        )
    }

    /// Creates one slot for pool `i` and adds it to the free list.
    async fn create_slot(&self, i: usize) -> anyhow::Result<String> {
        let uid = random_hex(16);
        let config = self.placeholder(i, &uid);
        let cgroup_parent = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default();
        let mut up = self.upstream.clone();
        let id = up
            .run_pod_sandbox(self.request(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: self.specs[i].key.upstream_handler.clone(),
            }))
            .await?
            .into_inner()
            .pod_sandbox_id;
        let mut facts = SlotFacts {
            sandbox_id: id.clone(),
            pause_pid: 0,
            placeholder_cgroup_parent: cgroup_parent,
            upstream_handler: self.specs[i].key.upstream_handler.clone(),
        };
        let ready = match crate::fault::pass(crate::fault::REFILL_CREATED).await {
            Ok(()) => self.pause_pid(&id).await,
            Err(e) => Err(e.into()),
        };
        let ready = match ready {
            Ok(pid) => {
                facts.pause_pid = pid;
                if self.fixup.settles(&facts) {
                    self.fixup
                        .prepare(&facts, &config)
                        .await
                        .map_err(|e| anyhow::anyhow!("slot {id} cannot be fixed up: {e}"))
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(e),
        };
        match ready {
            Ok(()) => {
                let mut t = self.table();
                t.slots.insert(
                    id.clone(),
                    Slot {
                        pool: i,
                        facts,
                        status: Status::Free,
                        completion: None,
                        identity: None,
                    },
                );
                t.free[i].push_back(id.clone());
                self.changed();
                Ok(id)
            }
            Err(e) => {
                self.destroy_slot(&facts).await;
                Err(e)
            }
        }
    }

    /// The pause PID from containerd's verbose status.
    async fn pause_pid(&self, id: &str) -> anyhow::Result<i32> {
        let resp = self
            .upstream
            .clone()
            .pod_sandbox_status(self.request(PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: true,
            }))
            .await?
            .into_inner();
        let ready = resp
            .status
            .as_ref()
            .is_some_and(|s| s.state == PodSandboxState::SandboxReady as i32);
        anyhow::ensure!(ready, "slot {id} is not ready after creation");
        let info = resp.info.get("info").map(String::as_str).unwrap_or("{}");
        let v: serde_json::Value = serde_json::from_str(info)?;
        let pid = v
            .get("pid")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0);
        anyhow::ensure!(pid > 0, "containerd reported no pid for slot {id}");
        Ok(i32::try_from(pid)?)
    }

    /// Keeps the pools at their desired size until `shutdown` resolves:
    /// creates missing slots one at a time, removes excess free ones, and
    /// checks free slots' health periodically.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut last_health = Instant::now();
        let mut failures = 0u32;
        loop {
            let work = self.next_work();
            match work {
                Some(Work::Create(i)) => {
                    let started = Instant::now();
                    let result = self.create_slot(i).await;
                    let outcome = if result.is_ok() { "ok" } else { "failed" };
                    self.metrics
                        .creations
                        .get_or_create(&PoolOutcome {
                            pool: self.specs[i].name.clone(),
                            outcome,
                        })
                        .inc();
                    match result {
                        Ok(id) => {
                            failures = 0;
                            tracing::debug!(pool = %self.specs[i].name, sandbox = %id,
                                elapsed_ms = started.elapsed().as_millis(), "slot created");
                        }
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            tracing::warn!(pool = %self.specs[i].name, error = %e, "creating a slot failed");
                        }
                    }
                    // Back off exponentially on failures (up to ~30 s).
                    let pause = self.cfg.refill_interval
                        + Duration::from_millis(100).saturating_mul(1 << failures.min(8));
                    let pause = if failures == 0 {
                        self.cfg.refill_interval
                    } else {
                        pause
                    };
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = &mut shutdown => return,
                    }
                }
                Some(Work::Trim(facts)) => self.destroy_slot(&facts).await,
                Some(Work::WaitUntil(until)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(until.into()) => {}
                        () = &mut shutdown => return,
                    }
                }
                None => {
                    if last_health.elapsed() >= self.cfg.health_interval {
                        self.check_health().await;
                        last_health = Instant::now();
                        continue;
                    }
                    tokio::select! {
                        () = self.refill.notified() => {}
                        () = tokio::time::sleep(self.cfg.health_interval) => {}
                        () = &mut shutdown => return,
                    }
                }
            }
        }
    }

    fn next_work(&self) -> Option<Work> {
        let mut t = self.table();
        let now = Instant::now();
        let mut wait: Option<Instant> = None;
        for i in 0..self.specs.len() {
            if t.free[i].len() < t.desired[i] {
                match t.hold_until[i] {
                    Some(until) if until > now => {
                        wait = Some(wait.map_or(until, |w| w.min(until)));
                        continue;
                    }
                    _ => return Some(Work::Create(i)),
                }
            }
            if t.free[i].len() > t.desired[i] {
                let id = t.free[i].pop_front()?;
                if let Some(slot) = t.slots.remove(&id) {
                    self.changed();
                    return Some(Work::Trim(slot.facts));
                }
                continue;
            }
        }
        wait.map(Work::WaitUntil)
    }

    /// Every sandbox upstream that carries this node's slot token.
    async fn list_ours(
        &self,
    ) -> Result<tonic::Response<fast_sandbox_proto::cri::ListPodSandboxResponse>, tonic::Status>
    {
        self.upstream
            .clone()
            .list_pod_sandbox(self.request(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: HashMap::from([(
                        SLOT_TOKEN_LABEL.to_owned(),
                        self.token.clone(),
                    )]),
                    ..Default::default()
                }),
            }))
            .await
    }

    /// What is known of a placeholder found upstream without a table entry.
    fn orphan_facts(&self, sb: &fast_sandbox_proto::cri::PodSandbox) -> SlotFacts {
        SlotFacts {
            sandbox_id: sb.id.clone(),
            pause_pid: 0,
            // Placeholders are created under `<root>/<their uid>`.
            placeholder_cgroup_parent: format!(
                "{}/{}",
                self.cfg.placeholder_cgroup_root,
                sb.metadata
                    .as_ref()
                    .map(|m| m.uid.as_str())
                    .unwrap_or_default()
            ),
            upstream_handler: sb.runtime_handler.clone(),
        }
    }

    /// The upstream handler of the pool named `pool` (a claim record's).
    fn upstream_of(&self, pool: &str) -> String {
        self.specs[self.pool_index(pool)]
            .key
            .upstream_handler
            .clone()
    }

    /// Removes placeholders with this node's token that the table does not
    /// know: a slot whose creation was still in flight upstream when a
    /// previous run died appears only after that run's recovery listed
    /// upstream. Runs in the refill loop, so no creation of this run is in
    /// flight.
    async fn sweep_orphans(&self) {
        let listed = self.list_ours().await;
        let Ok(listed) = listed else { return };
        let orphans: Vec<SlotFacts> = {
            let t = self.table();
            listed
                .into_inner()
                .items
                .into_iter()
                .filter(|sb| !t.slots.contains_key(&sb.id))
                .map(|sb| self.orphan_facts(&sb))
                .collect()
        };
        for facts in orphans {
            tracing::warn!(sandbox = %facts.sandbox_id, "removing an orphaned slot (created by a run that died)");
            self.destroy_slot(&facts).await;
        }
    }

    /// Removes free slots whose sandbox is no longer ready, and orphans.
    async fn check_health(&self) {
        self.sweep_orphans().await;
        let free: Vec<String> = {
            let t = self.table();
            t.free.iter().flatten().cloned().collect()
        };
        for id in free {
            let status = self
                .upstream
                .clone()
                .pod_sandbox_status(self.request(PodSandboxStatusRequest {
                    pod_sandbox_id: id.clone(),
                    verbose: false,
                }))
                .await;
            let healthy = match &status {
                Ok(r) => r
                    .get_ref()
                    .status
                    .as_ref()
                    .is_some_and(|s| s.state == PodSandboxState::SandboxReady as i32),
                // Upstream unreachable: says nothing about the slot.
                Err(s) if s.code() == tonic::Code::Unavailable => true,
                Err(_) => false,
            };
            if !healthy {
                let removed = {
                    let mut t = self.table();
                    let was_free =
                        matches!(t.slots.get(&id).map(|s| &s.status), Some(Status::Free));
                    if was_free {
                        for q in &mut t.free {
                            q.retain(|x| x != &id);
                        }
                        t.slots.remove(&id).map(|s| s.facts)
                    } else {
                        None
                    }
                };
                if let Some(facts) = removed {
                    self.changed();
                    tracing::warn!(sandbox = %id, "free slot failed its health check; replacing it");
                    self.destroy_slot(&facts).await;
                    self.refill.notify_one();
                }
            }
        }
    }

    /// Takes a free slot of `key`, marking it as being claimed.
    fn take_free(&self, key: &PoolKey, exposed: &str) -> Result<(usize, SlotFacts), NoSlot> {
        let mut t = self.table();
        let mut any_pool = false;
        for (i, spec) in self.specs.iter().enumerate() {
            if spec.key != *key || spec.exposed_handler != exposed {
                continue;
            }
            any_pool = true;
            while let Some(id) = t.free[i].pop_front() {
                if let Some(slot) = t.slots.get_mut(&id) {
                    slot.status = Status::Claiming;
                    let facts = slot.facts.clone();
                    t.hold_until[i] = Some(Instant::now() + self.cfg.refill_delay);
                    self.changed();
                    return Ok((i, facts));
                }
            }
        }
        Err(if any_pool {
            NoSlot::PoolEmpty
        } else {
            NoSlot::NoPool
        })
    }

    /// Undoes a claim that could not finish: the slot is destroyed.
    async fn abandon(&self, facts: &SlotFacts) {
        self.table().slots.remove(&facts.sandbox_id);
        self.changed();
        if let Err(e) = self.records.remove(&facts.sandbox_id) {
            tracing::error!(sandbox = %facts.sandbox_id, error = %e, "removing the claim record failed");
        }
        self.destroy_slot(facts).await;
        self.refill.notify_one();
    }
}

/// [`Fixup::settle`], once more if it fails.
async fn settle_retrying(
    fixup: &dyn Fixup,
    facts: &SlotFacts,
    real: &PodSandboxConfig,
) -> Result<(), FixupFailed> {
    match fixup.settle(facts, real).await {
        Ok(()) => Ok(()),
        Err(first) => {
            tracing::warn!(sandbox = %facts.sandbox_id, error = %first,
                "setting up the claimed sandbox's identity failed; retrying once");
            fixup.settle(facts, real).await
        }
    }
}

enum Work {
    Create(usize),
    Trim(SlotFacts),
    /// Nothing to do before this instant (a refill is held after a claim).
    WaitUntil(Instant),
}

#[tonic::async_trait]
impl SlotSource for PoolManager {
    async fn claim(&self, claim: &Claim) -> Result<Result<ClaimedSlot, NoSlot>, ClaimFailed> {
        let started = Instant::now();
        // A miss is counted once, by the shim's `missed` (it knows the
        // reason, eligibility misses included).
        let (i, facts) = match self.take_free(&claim.key, &claim.exposed_handler) {
            Ok(found) => found,
            Err(no) => return Ok(Err(no)),
        };
        let result = self.claim_slot(claim, i, &facts).await;
        let pool = self.specs[i].name.clone();
        let outcome = if result.is_ok() { "hit" } else { "failed" };
        self.metrics
            .claims
            .get_or_create(&PoolOutcome {
                pool: pool.clone(),
                outcome,
            })
            .inc();
        if result.is_ok() {
            self.metrics
                .claim_duration
                .get_or_create(&PoolLabel { pool })
                .observe(started.elapsed().as_secs_f64());
        }
        result.map(Ok)
    }

    fn view(&self, sandbox_id: &str, upstream_labels: &HashMap<String, String>) -> SlotView {
        self.view_of(sandbox_id, upstream_labels)
    }

    async fn removed(&self, sandbox_id: &str) {
        self.forget(sandbox_id).await;
    }

    /// Waits until claimed slot `sandbox_id` may get containers: its
    /// [`Fixup::settle`] step has succeeded. A map lookup for anything
    /// else. Bounded by the pool's upstream call timeout (the step itself
    /// is bounded by the fix-up's deadline per attempt).
    async fn ready_for_containers(&self, sandbox_id: &str) -> Result<(), NotReady> {
        let identity = self
            .table()
            .slots
            .get(sandbox_id)
            .and_then(|slot| slot.identity.clone());
        let Some(mut identity) = identity else {
            return Ok(());
        };
        let bound = self.cfg.upstream_timeout;
        let waited = tokio::time::timeout(
            bound,
            identity.wait_for(|state| *state != Identity::Pending),
        )
        .await;
        let failed = |reason: String| NotReady::Failed {
            sandbox_id: sandbox_id.to_owned(),
            reason,
        };
        match waited {
            Ok(Ok(state)) => match &*state {
                Identity::Settled => Ok(()),
                Identity::Failed(reason) => Err(failed(reason.clone())),
                Identity::Pending => Err(failed("still pending".to_owned())),
            },
            Ok(Err(_)) => Err(failed("abandoned: the sandbox is being removed".to_owned())),
            Err(_) => Err(NotReady::Pending {
                sandbox_id: sandbox_id.to_owned(),
                waited: bound,
            }),
        }
    }

    fn pod_usage(&self, sandbox_id: &str, pod: &ClaimedPod) -> Option<PodUsage> {
        let parent = pod.config.linux.as_ref()?.cgroup_parent.as_str();
        let leaf = crate::fixup::CgroupLeaf::for_pod(parent).ok()?;
        let sample = crate::usage::read(Path::new("/sys/fs/cgroup"), &leaf)?;
        let (cpu, memory) = self.usage.usage(sandbox_id, &sample, now_ns());
        Some(PodUsage { cpu, memory })
    }

    /// A rebound pod leaves the network under the identity it joined with
    /// (containerd's own DEL that follows uses the placeholder's arguments).
    async fn stopping(&self, sandbox_id: &str) {
        let Some(cni) = &self.cni else {
            return;
        };
        let found = {
            let t = self.table();
            t.slots.get(sandbox_id).and_then(|slot| match &slot.status {
                Status::Claimed(pod) if pod.network.is_some() => {
                    Some((slot.facts.pause_pid, Arc::clone(pod)))
                }
                _ => None,
            })
        };
        let Some((pid, pod)) = found else {
            return;
        };
        if let Err(e) = cni
            .del(&Attachment::of(sandbox_id, pid, &pod.config), None)
            .await
        {
            // containerd's DEL at the stop releases the address anyway
            // (host-local keys it by container id); a policy CNI may keep
            // the pod's endpoint until its own garbage collection.
            tracing::warn!(sandbox = %sandbox_id, error = %e, "CNI DEL with the pod's identity failed");
        }
    }

    fn missed(&self, handler: &str, key: Option<&PoolKey>, reason: MissReason) {
        // Handlers that are not ours are not misses of this node's pools.
        if reason == MissReason::NotFastHandler {
            return;
        }
        self.metrics
            .misses
            .get_or_create(&Miss {
                handler: handler.to_owned(),
                reason: reason.as_str(),
            })
            .inc();
        self.misses.count(handler, reason);
        if let (MissReason::NoPool, Some(asked)) = (reason, key) {
            let served: Vec<&PoolKey> = self
                .specs
                .iter()
                .filter(|s| s.exposed_handler == handler)
                .map(|s| &s.key)
                .collect();
            for message in self.misses.first_explanations(handler, asked, &served) {
                tracing::warn!(
                    handler,
                    pool_key = %asked,
                    "{message}: these pods start cold (logged once per handler and field)"
                );
            }
        }
    }
}

impl PoolManager {
    /// The claim proper, once a free slot was taken.
    async fn claim_slot(
        &self,
        claim: &Claim,
        i: usize,
        facts: &SlotFacts,
    ) -> Result<ClaimedSlot, ClaimFailed> {
        self.refill.notify_one();
        let failed = |reason: String| ClaimFailed {
            sandbox_id: facts.sandbox_id.clone(),
            reason,
        };
        let mut record = ClaimRecord {
            sandbox_id: facts.sandbox_id.clone(),
            pool: self.specs[i].name.clone(),
            exposed_handler: claim.exposed_handler.clone(),
            claimed_at_ns: now_ns(),
            pause_pid: facts.pause_pid,
            placeholder_cgroup_parent: facts.placeholder_cgroup_parent.clone(),
            config: claim.config.clone(),
            identity_applied: false,
            network: None,
        };
        // Durable before anything else: after this, a crash leaves a pod
        // that owns this slot, never a slot handed out twice.
        if let Err(e) = self.records.put(&record) {
            self.abandon(facts).await;
            return Err(failed(format!("recording the claim: {e}")));
        }
        if let Err(e) = fault::pass(fault::CLAIM_RECORDED).await {
            self.abandon(facts).await;
            return Err(failed(e.to_string()));
        }
        match self.identify(i, facts, &claim.config).await {
            Ok(network) => record.network = network,
            Err(e) => {
                self.abandon(facts).await;
                return Err(failed(e));
            }
        }
        // A crash before this rewrite makes recovery apply the fix-up again
        // (it is idempotent); after it, recovery leaves the pod's files
        // alone.
        record.identity_applied = true;
        if let Err(e) = self.records.put(&record) {
            tracing::warn!(sandbox = %facts.sandbox_id, error = %e,
                "marking the fix-up applied failed; a restart would apply it again");
        }
        if let Err(e) = fault::pass(fault::CLAIM_APPLIED).await {
            self.abandon(facts).await;
            return Err(failed(e.to_string()));
        }
        let pod = Arc::new(ClaimedPod {
            config: record.config,
            exposed_handler: record.exposed_handler,
            claimed_at_ns: record.claimed_at_ns,
            network: record.network,
        });
        // The barrier first: the slot is claimed (visible, and its id soon
        // kubelet's) only with its pending identity step registered.
        self.spawn_complete(facts.clone(), Arc::clone(&pod));
        if let Some(slot) = self.table().slots.get_mut(&facts.sandbox_id) {
            slot.status = Status::Claimed(pod);
        }
        self.changed();
        Ok(ClaimedSlot {
            sandbox_id: facts.sandbox_id.clone(),
        })
    }

    /// Gives a taken slot the pod's identity: the fix-up's synchronous part,
    /// then, for a `rebind` pool, the pod's own CNI attachment (the pod's
    /// IPs are returned). Idempotent, so recovery can run it again.
    async fn identify(
        &self,
        i: usize,
        facts: &SlotFacts,
        real: &PodSandboxConfig,
    ) -> Result<Option<PodIps>, String> {
        self.fixup
            .apply(facts, real)
            .await
            .map_err(|e| format!("fix-up: {e}"))?;
        if self.specs[i].network != NetworkMode::Rebind {
            return Ok(None);
        }
        let cni = self
            .cni
            .as_ref()
            .ok_or("network rebind: no CNI configuration loaded")?;
        // The placeholder's identity, as containerd attached it.
        let uid = facts
            .placeholder_cgroup_parent
            .rsplit('/')
            .next()
            .unwrap_or_default();
        let placeholder = self.placeholder(i, uid);
        let id = &facts.sandbox_id;
        cni.del(&Attachment::of(id, facts.pause_pid, &placeholder), None)
            .await
            .map_err(|e| format!("network rebind, releasing the placeholder's attachment: {e}"))?;
        let result = cni
            .add(&Attachment::of(id, facts.pause_pid, real))
            .await
            .map_err(|e| format!("network rebind, attaching the pod: {e}"))?;
        let ips = pod_ips(&result).map_err(|e| format!("network rebind: {e}"))?;
        tracing::debug!(sandbox = %id, ip = %ips.ip, "network rebound to the pod");
        Ok(Some(ips))
    }

    /// The index of pool `name`; a record of a pool no longer configured
    /// is kept under the first one.
    fn pool_index(&self, name: &str) -> usize {
        self.specs.iter().position(|s| s.name == name).unwrap_or(0)
    }

    /// Schedules the fix-up's deferred parts. First, at once, the
    /// identity step nothing in the pod can observe before its first
    /// container ([`Fixup::settle`], retried once), which the pod's
    /// `CreateContainer` waits for ([`SlotSource::ready_for_containers`]).
    /// Then, `refill_delay` after the claim, [`Fixup::complete`], so the
    /// pod's own `CreateContainer`/`StartContainer` have the node to
    /// themselves (the cgroup move stalls thread creation system-wide for
    /// an RCU grace period). Cancelled if the pod is removed first.
    fn spawn_complete(&self, facts: SlotFacts, pod: Arc<ClaimedPod>) {
        let fixup = Arc::clone(&self.fixup);
        let cancel = Arc::new(Notify::new());
        let until = tokio::time::Instant::now() + self.cfg.refill_delay;
        let id = facts.sandbox_id.clone();
        let cancelled = Arc::clone(&cancel);
        let (settled, identity) = if self.fixup.settles(&facts) {
            let (tx, rx) = tokio::sync::watch::channel(Identity::Pending);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let task = tokio::spawn(async move {
            if let Some(settled) = settled {
                let outcome = tokio::select! {
                    outcome = settle_retrying(&*fixup, &facts, &pod.config) => outcome,
                    // Dropping the step kills its command; waiters see the
                    // sender gone.
                    () = cancelled.notified() => return,
                };
                settled.send_replace(match outcome {
                    Ok(()) => Identity::Settled,
                    Err(e) => {
                        tracing::error!(sandbox = %facts.sandbox_id, error = %e,
                            "setting up the claimed sandbox's identity failed twice: CreateContainer in it will fail; remove the pod's sandbox to get a new one");
                        Identity::Failed(e.0)
                    }
                });
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                () = cancelled.notified() => return,
            }
            if let Err(e) = fixup.complete(&facts, &pod.config).await {
                tracing::error!(sandbox = %facts.sandbox_id, error = %e,
                    "completing the fix-up failed; the pod runs, but its pause stays in the placeholder cgroup");
            }
        });
        if let Some(slot) = self.table().slots.get_mut(&id) {
            slot.completion = Some(Completion { cancel, task });
            slot.identity = identity;
        }
    }

    fn view_of(&self, sandbox_id: &str, upstream_labels: &HashMap<String, String>) -> SlotView {
        if let Some(slot) = self.table().slots.get(sandbox_id) {
            return match &slot.status {
                Status::Claimed(pod) => SlotView::Claimed(Arc::clone(pod)),
                Status::Free | Status::Claiming => SlotView::Unclaimed,
            };
        }
        // Not in the table: a slot still being created, or one a previous
        // run left behind. Only the secret token makes it ours.
        if upstream_labels
            .get(SLOT_TOKEN_LABEL)
            .is_some_and(|t| *t == self.token)
        {
            SlotView::Unclaimed
        } else {
            SlotView::NotASlot
        }
    }

    async fn forget(&self, sandbox_id: &str) {
        let slot = self.table().slots.remove(sandbox_id);
        let Some(mut slot) = slot else { return };
        self.changed();
        self.usage.forget(sandbox_id);
        if let Some(c) = slot.completion.take() {
            // Never clean up while a cgroup move may still create the leaf.
            c.cancel.notify_one();
            let _ = c.task.await;
        }
        if let Status::Claimed(pod) = &slot.status {
            if let Err(e) = self.records.remove(sandbox_id) {
                tracing::error!(sandbox = %sandbox_id, error = %e, "removing the claim record failed");
            }
            self.fixup.after_remove(&slot.facts, &pod.config).await;
        }
        self.fixup.discard(&slot.facts).await;
    }
}
