//! Warm slot pools: pre-created sandboxes handed to pods by the shim.
//!
//! Lifecycle of a slot (docs/design.md, "The slot lifecycle"):
//! 1. **Pre-create** (`refill.rs`): the refill task calls upstream
//!    `RunPodSandbox` with a placeholder config whose shape is exactly the
//!    pool's `PoolKey` and whose labels carry the node's secret slot token.
//!    containerd does all the real work (netns, CNI IP, shim, pause).
//! 2. **Claim** (`claim.rs`): [`SlotSource::claim`] takes a free slot of the
//!    same key, writes the claim record (`records.rs`), applies the fix-ups
//!    and returns.
//! 3. **Use**: the shim reports the slot with the pod's identity
//!    ([`SlotSource::view`]).
//! 4. **Release**: kubelet stops and removes it like any sandbox; a slot is
//!    single-use. The refill task replaces it in the background, one
//!    creation at a time, so refill never starves cold work.
//!
//! At start, `recovery.rs` loads the claim records before CRI is served,
//! then reconciles them with upstream in the background, adopting the free
//! slots of the previous run (`adopt.rs`) before the refill starts.
//!
//! Locking: one `std` mutex over the in-memory table (`table.rs`), never
//! held across an await; `view` (called for every sandbox of every list
//! answer) only takes it briefly. File and cgroup I/O runs on blocking
//! threads with a deadline ([`crate::blocking`]).

mod adopt;
mod claim;
mod error;
pub mod misses;
mod network_mode;
pub mod records;
mod recovery;
mod refill;
mod spec;
mod table;
mod token_only;
mod uninstall;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use fast_sandbox_proto::cri::{runtime_service_client::RuntimeServiceClient, PodSandboxConfig};
use fast_sandbox_shim::slots::{
    Claim, ClaimFailed, ClaimedPod, ClaimedSlot, MissReason, NoSlot, NotReady, PodUsage, PoolKey,
    SlotSource, SlotView,
};
use tokio::sync::Notify;
use tonic::transport::Channel;

pub use self::{
    adopt::{key_digest, POOL_KEY_LABEL},
    error::PoolError,
    spec::{KeepRefused, ManagerConfig, NetworkMode, PoolSpec, MAX_POOL_SIZE},
    table::{ClaimInfo, PoolStats},
    token_only::TokenOnly,
};
use self::{
    records::RecordStore,
    table::{Status, Table},
};
use crate::{
    fixup::Fixup,
    metrics::{Metrics, Miss},
    network::{PluginExec, RealExec},
    usage::{Cgroups, HostCgroups, UsageTracker},
};

/// What the pool manager works through: upstream, the fix-up, metrics,
/// and the two node interfaces it reads or runs directly (CNI plugins for
/// `rebind` pools, cgroupfs for stats and start-up), so tests can put
/// fakes in their place.
#[derive(Debug, Clone)]
pub struct PoolParts {
    pub upstream: Channel,
    pub fixup: Arc<dyn Fixup>,
    pub metrics: Arc<Metrics>,
    pub cni_exec: Arc<dyn PluginExec>,
    pub cgroups: Arc<dyn Cgroups>,
}

impl PoolParts {
    /// The real CNI runner and cgroupfs.
    pub fn new(upstream: Channel, fixup: Arc<dyn Fixup>, metrics: Arc<Metrics>) -> Self {
        Self {
            upstream,
            fixup,
            metrics,
            cni_exec: Arc::new(RealExec),
            cgroups: Arc::new(HostCgroups::default()),
        }
    }

    /// Reads cgroups through `cgroups` instead.
    #[must_use]
    pub fn with_cgroups(mut self, cgroups: Arc<dyn Cgroups>) -> Self {
        self.cgroups = cgroups;
        self
    }

    /// Runs CNI plugins through `exec` instead.
    #[must_use]
    pub fn with_cni_exec(mut self, exec: Arc<dyn PluginExec>) -> Self {
        self.cni_exec = exec;
        self
    }
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
    /// Runs CNI plugins for `rebind` pools.
    cni_exec: Arc<dyn PluginExec>,
    /// Each pool's network mode and containerd's network, decided once its
    /// CNI configuration exists (`network_mode.rs`).
    network: tokio::sync::OnceCell<network_mode::NetworkDecision>,
    cgroups: Arc<dyn Cgroups>,
    /// Previous CPU samples of claimed pods, for `usage_nano_cores`.
    usage: UsageTracker,
    metrics: Arc<Metrics>,
    /// Misses by handler and reason, and the shape differences logged.
    misses: misses::MissBook,
    table: Mutex<Table>,
    refill: Notify,
    /// What start-up left for the background recovery.
    pending: Mutex<recovery::Pending>,
    /// Set once the background recovery has reconciled with upstream.
    recovered: tokio::sync::watch::Sender<bool>,
    /// Bumped on every change of the pools' counters (claim, release,
    /// refill, trim, size change): the node agent's status watch.
    changes: tokio::sync::watch::Sender<u64>,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl PoolManager {
    /// [`PoolManager::start_with`] the real CNI runner and cgroupfs.
    pub async fn start(
        specs: Vec<PoolSpec>,
        cfg: ManagerConfig,
        upstream: Channel,
        fixup: Arc<dyn Fixup>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, PoolError> {
        Self::start_with(specs, cfg, PoolParts::new(upstream, fixup, metrics)).await
    }

    /// Opens the record store and loads the claims (claimed slots keep
    /// their identity from here on), without any upstream call; call
    /// [`PoolManager::decide_at_start`] to check the pools' network modes
    /// now, and
    /// [`PoolManager::run`] to reconcile with upstream (adopting the
    /// previous run's free slots) and keep the pools full.
    pub async fn start_with(
        specs: Vec<PoolSpec>,
        cfg: ManagerConfig,
        parts: PoolParts,
    ) -> Result<Arc<Self>, PoolError> {
        let (records, token, (good, bad)) = {
            let state_dir = cfg.state_dir.clone();
            let copies = cfg.record_copies.clone();
            crate::blocking::asyncify(cfg.upstream_timeout, move || {
                let mut records = RecordStore::open(&state_dir)?;
                if let Some(dir) = copies {
                    records = records.with_copies(dir);
                }
                let token = records.token()?;
                let loaded = records.load()?;
                Ok::<_, PoolError>((records, token, loaded))
            })
            .await
            .map_err(PoolError::RecordsBlocked)??
        };
        let mgr = Arc::new(Self {
            table: Mutex::new(Table::new(specs.iter().map(|s| s.size))),
            specs,
            cfg,
            upstream: RuntimeServiceClient::new(parts.upstream),
            token,
            records,
            fixup: parts.fixup,
            cni_exec: parts.cni_exec,
            network: tokio::sync::OnceCell::new(),
            cgroups: parts.cgroups,
            usage: UsageTracker::default(),
            metrics: parts.metrics,
            misses: misses::MissBook::default(),
            refill: Notify::new(),
            pending: Mutex::default(),
            recovered: tokio::sync::watch::channel(false).0,
            changes: tokio::sync::watch::channel(0).0,
        });
        mgr.load_claims(good, &bad);
        Ok(mgr)
    }

    /// Resolves once the background recovery has reconciled with upstream
    /// (start-up reconciliation, adoption of the previous run's slots).
    pub async fn recovered(&self) {
        let mut rx = self.recovered.subscribe();
        let _ = rx.wait_for(|r| *r).await;
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
                claimed: t.claimed(i),
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

    /// The index of pool `name`; a record of a pool no longer configured
    /// is kept under the first one.
    fn pool_index(&self, name: &str) -> usize {
        self.specs.iter().position(|s| s.name == name).unwrap_or(0)
    }

    /// The upstream handler of the pool named `pool` (a claim record's).
    fn upstream_of(&self, pool: &str) -> String {
        // No pools at all: `uninstall` with a config without pools.
        self.specs
            .get(self.pool_index(pool))
            .map(|s| s.key.upstream_handler.clone())
            .unwrap_or_default()
    }

    /// The placeholder config of a new slot of pool `i`.
    fn placeholder(&self, i: usize, uid: &str) -> PodSandboxConfig {
        let spec = &self.specs[i];
        let name = format!("slot-{}-{}", spec.name, uid.get(..12).unwrap_or(uid));
        let mut config = fast_sandbox_shim::slots::placeholder_config(
            &spec.key,
            &fast_sandbox_shim::slots::Placeholder {
                name: &name,
                namespace: &self.cfg.placeholder_namespace,
                uid,
                pool: &spec.name,
                token: &self.token,
                cgroup_parent: &format!("{}/{uid}", self.cfg.placeholder_cgroup_root),
            },
        );
        // What adoption after a restart checks the slot's shape by.
        config
            .labels
            .insert(POOL_KEY_LABEL.to_owned(), key_digest(&spec.key));
        config
    }
}

#[tonic::async_trait]
impl SlotSource for PoolManager {
    async fn claim(&self, claim: &Claim) -> Result<Result<ClaimedSlot, NoSlot>, ClaimFailed> {
        self.claim_measured(claim).await
    }

    fn view(&self, sandbox_id: &str, upstream_labels: &HashMap<String, String>) -> SlotView {
        self.view_of(sandbox_id, upstream_labels)
    }

    async fn removed(&self, sandbox_id: &str) {
        self.forget(sandbox_id).await;
    }

    /// Waits until claimed slot `sandbox_id` may get containers: its
    /// `Fixup::settle` step has succeeded. A map lookup for anything
    /// else. Bounded by the pool's upstream call timeout (the step itself
    /// is bounded by the fix-up's deadline per attempt).
    async fn ready_for_containers(&self, sandbox_id: &str) -> Result<(), NotReady> {
        self.wait_settled(sandbox_id).await
    }

    fn pod_usage(&self, sandbox_id: &str, pod: &ClaimedPod) -> Option<PodUsage> {
        self.usage_of(sandbox_id, pod)
    }

    /// A rebound pod leaves the network under the identity it joined with
    /// (containerd's own DEL that follows uses the placeholder's arguments).
    async fn stopping(&self, sandbox_id: &str) {
        self.leave_network(sandbox_id).await;
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
