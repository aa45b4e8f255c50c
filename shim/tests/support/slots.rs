//! A recording fake [`SlotSource`] and a rig: the stateful fake upstream
//! ([`Pods`]), a shim with slots in front of it, and helpers to make
//! placeholders the way the pool does.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use fast_sandbox_proto::cri::{
    self, image_service_server::ImageServiceServer, runtime_service_client::RuntimeServiceClient,
    runtime_service_server::RuntimeServiceServer,
};
use fast_sandbox_shim::{
    cri_channel,
    slots::{
        Claim, ClaimFailed, ClaimedPod, ClaimedSlot, HandlerMap, MissReason, NoSlot, NotReady,
        Placeholder, PodIps, PoolKey, SeccompShape, Shape, SlotSource, SlotView, SLOT_NAMESPACE,
    },
    Shim, UpstreamConfig, MAX_MESSAGE_SIZE,
};
use tokio::{
    net::UnixListener,
    sync::{oneshot, watch, Notify},
};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Server};

use super::{pods::Pods, upstream_config, Served, ShimUnderTest};

/// The node's slot token in these tests.
pub const TOKEN: &str = "node-secret-token";
/// First claim time handed out; each claim adds one.
pub const FIRST_CLAIM_NS: i64 = 1_800_000_000_000_000_000;

#[derive(Debug)]
enum SlotState {
    Free,
    /// A failed claim destroyed it (a real source removes it upstream).
    Dead,
    Claimed(Arc<ClaimedPod>),
}

#[derive(Debug)]
struct FakeSlot {
    key: PoolKey,
    state: SlotState,
}

/// What the fake source holds and saw.
#[derive(Debug, Default)]
pub struct Record {
    slots: HashMap<String, FakeSlot>,
    pools: HashSet<PoolKey>,
    pub claims: Vec<Claim>,
    pub removed: Vec<String>,
    pub misses: Vec<(String, Option<PoolKey>, MissReason)>,
    /// Ids `ready_for_containers` was asked about, in order.
    pub readiness_asked: Vec<String>,
    /// Sandboxes whose containers wait: see [`FakeSlots::hold`].
    held: HashMap<String, watch::Receiver<Option<Result<(), NotReady>>>>,
}

/// Ends the wait of a sandbox held by [`FakeSlots::hold`].
pub type Release = watch::Sender<Option<Result<(), NotReady>>>;

/// A slot source that knows its slots by id (never by labels), like the
/// node plugin's pools.
#[derive(Debug, Default)]
pub struct FakeSlots {
    record: Mutex<Record>,
    /// Makes the next claims fail after taking a slot.
    pub fail_claims: AtomicBool,
    clock: AtomicI64,
    /// Notified each time `ready_for_containers` starts waiting on a held
    /// sandbox.
    pub waiting: Notify,
}

impl FakeSlots {
    pub fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().expect("lock")
    }

    pub fn add_pool(&self, key: &PoolKey) {
        self.record().pools.insert(key.clone());
    }

    pub fn add_slot(&self, id: &str, key: &PoolKey) {
        let mut record = self.record();
        record.pools.insert(key.clone());
        record.slots.insert(
            id.to_owned(),
            FakeSlot {
                key: key.clone(),
                state: SlotState::Free,
            },
        );
    }

    /// Marks slot `id` claimed on `fast-runc` by `config`, as a claim
    /// would; `network`: the pod's own IPs, when its network was rebound.
    pub fn mark_claimed(
        &self,
        id: &str,
        config: cri::PodSandboxConfig,
        network: Option<PodIps>,
    ) -> Arc<ClaimedPod> {
        let pod = Arc::new(ClaimedPod {
            config,
            exposed_handler: "fast-runc".into(),
            claimed_at_ns: FIRST_CLAIM_NS + self.clock.fetch_add(1, Ordering::SeqCst),
            network,
        });
        let mut record = self.record();
        let slot = record.slots.get_mut(id).expect("a slot");
        slot.state = SlotState::Claimed(Arc::clone(&pod));
        pod
    }

    pub fn claimed(&self, id: &str) -> Option<Arc<ClaimedPod>> {
        match self.record().slots.get(id).map(|s| &s.state) {
            Some(SlotState::Claimed(pod)) => Some(Arc::clone(pod)),
            _ => None,
        }
    }

    /// Makes `ready_for_containers(id)` wait until the returned sender
    /// sends its answer (as a pending identity step of a gVisor slot).
    pub fn hold(&self, id: &str) -> Release {
        let (tx, rx) = watch::channel(None);
        self.record().held.insert(id.to_owned(), rx);
        tx
    }

    pub fn misses(&self) -> Vec<MissReason> {
        self.record().misses.iter().map(|(_, _, r)| *r).collect()
    }
}

#[tonic::async_trait]
impl SlotSource for FakeSlots {
    async fn claim(&self, claim: &Claim) -> Result<Result<ClaimedSlot, NoSlot>, ClaimFailed> {
        let mut record = self.record();
        record.claims.push(claim.clone());
        let free = record
            .slots
            .iter_mut()
            .find(|(_, s)| s.key == claim.key && matches!(s.state, SlotState::Free));
        let Some((id, slot)) = free else {
            return Ok(Err(if record.pools.contains(&claim.key) {
                NoSlot::PoolEmpty
            } else {
                NoSlot::NoPool
            }));
        };
        let sandbox_id = id.clone();
        if self.fail_claims.load(Ordering::SeqCst) {
            slot.state = SlotState::Dead;
            return Err(ClaimFailed {
                sandbox_id,
                reason: "fix-up failed: sethostname: EPERM".into(),
            });
        }
        slot.state = SlotState::Claimed(Arc::new(ClaimedPod {
            config: claim.config.clone(),
            exposed_handler: claim.exposed_handler.clone(),
            claimed_at_ns: FIRST_CLAIM_NS + self.clock.fetch_add(1, Ordering::SeqCst),
            network: None,
        }));
        Ok(Ok(ClaimedSlot { sandbox_id }))
    }

    fn view(&self, sandbox_id: &str, _: &HashMap<String, String>) -> SlotView {
        match self.record().slots.get(sandbox_id).map(|s| &s.state) {
            None => SlotView::NotASlot,
            Some(SlotState::Free | SlotState::Dead) => SlotView::Unclaimed,
            Some(SlotState::Claimed(pod)) => SlotView::Claimed(Arc::clone(pod)),
        }
    }

    async fn ready_for_containers(&self, sandbox_id: &str) -> Result<(), NotReady> {
        let held = {
            let mut record = self.record();
            record.readiness_asked.push(sandbox_id.to_owned());
            record.held.get(sandbox_id).cloned()
        };
        let Some(mut held) = held else {
            return Ok(());
        };
        self.waiting.notify_one();
        let answer = held
            .wait_for(Option::is_some)
            .await
            .expect("the test keeps the release");
        answer.clone().expect("an answer")
    }

    async fn removed(&self, sandbox_id: &str) {
        let mut record = self.record();
        record.removed.push(sandbox_id.to_owned());
        record.slots.remove(sandbox_id);
    }

    fn missed(&self, exposed_handler: &str, key: Option<&PoolKey>, reason: MissReason) {
        self.record()
            .misses
            .push((exposed_handler.to_owned(), key.cloned(), reason));
    }
}

/// The exposed handlers of these tests.
pub fn handlers() -> HandlerMap {
    HandlerMap::new([("fast-runc", "runc"), ("fast-crun", "crun")])
}

/// The key of an ordinary kubelet pod on `fast-runc`.
pub fn runc_key() -> PoolKey {
    PoolKey {
        upstream_handler: "runc".into(),
        shape: Shape {
            seccomp: SeccompShape::RuntimeDefault,
            ..Default::default()
        },
    }
}

/// The sandbox config kubelet sends for pod `name` (a trimmed but faithful
/// copy of kubelet 1.2x's: labels, annotations, cgroup, seccomp).
pub fn kubelet_pod(name: &str) -> cri::PodSandboxConfig {
    let uid = format!("uid-{name}");
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.clone(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: format!("/var/log/pods/default_{name}_{uid}"),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        port_mappings: vec![cri::PortMapping {
            container_port: 8080,
            ..Default::default()
        }],
        labels: HashMap::from([
            ("io.kubernetes.pod.name".into(), name.into()),
            ("io.kubernetes.pod.namespace".into(), "default".into()),
            ("io.kubernetes.pod.uid".into(), uid.clone()),
            ("app".into(), name.into()),
        ]),
        annotations: HashMap::from([
            ("kubernetes.io/config.source".into(), "api".into()),
            (
                "kubernetes.io/config.seen".into(),
                "2026-11-28T18:00:00Z".into(),
            ),
        ]),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("/kubepods/besteffort/pod{uid}"),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                seccomp: Some(cri::SecurityProfile::default()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        windows: None,
    }
}

/// A `CreateContainerRequest` for container `app` (busybox) in sandbox
/// `sandbox_id` of pod `pod`.
pub fn create_request(sandbox_id: &str, pod: &str) -> cri::CreateContainerRequest {
    cri::CreateContainerRequest {
        pod_sandbox_id: sandbox_id.to_owned(),
        config: Some(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: "busybox".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        sandbox_config: Some(kubelet_pod(pod)),
    }
}

pub fn run_request(handler: &str, config: cri::PodSandboxConfig) -> cri::RunPodSandboxRequest {
    cri::RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: handler.into(),
    }
}

/// Serves `pods` as upstream CRI on `path`.
pub fn start_pods(path: &std::path::Path, pods: Pods) -> Served {
    let _ = std::fs::remove_file(path);
    let incoming = UnixListenerStream::new(UnixListener::bind(path).expect("bind fake upstream"));
    let (stop, stopped) = oneshot::channel::<()>();
    let join = tokio::spawn(async move {
        Server::builder()
            .add_service(
                RuntimeServiceServer::new(pods.clone()).max_decoding_message_size(MAX_MESSAGE_SIZE),
            )
            .add_service(ImageServiceServer::new(pods))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .expect("fake upstream serves");
    });
    Served::new(stop, join)
}

/// The stateful fake upstream, a fake slot source, and a shim with slots in
/// front of them (plus, for comparisons, a plain forwarding shim).
#[derive(Debug)]
pub struct SlotsRig {
    pub dir: tempfile::TempDir,
    pub pods: Pods,
    pub slots: Arc<FakeSlots>,
    pub upstream: Served,
    pub shim: ShimUnderTest,
    pub plain: ShimUnderTest,
}

impl SlotsRig {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream_path = dir.path().join("upstream.sock");
        let pods = Pods::default();
        let upstream = start_pods(&upstream_path, pods.clone());
        let cfg = upstream_config(&upstream_path);
        let slots = Arc::new(FakeSlots::default());
        let (shim, plain) = start_shims(dir.path(), &cfg, slots.clone()).await;
        SlotsRig {
            dir,
            pods,
            slots,
            upstream,
            shim,
            plain,
        }
    }

    /// A client talking to the fake upstream directly (as the pool does).
    pub fn direct(&self) -> RuntimeServiceClient<Channel> {
        let endpoint = self.dir.path().join("upstream.sock").display().to_string();
        RuntimeServiceClient::new(cri_channel(&endpoint).expect("endpoint"))
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
    }

    /// Pre-creates `n` placeholders of `key` upstream, as the pool does, and
    /// registers them with the slot source.
    pub async fn fill(&self, key: &PoolKey, n: usize) -> Vec<String> {
        let mut direct = self.direct();
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let i = self.pods.store().sandboxes.len();
            let name = format!("slot-{}-{i:04}", key.upstream_handler);
            let uid = format!("slot-uid-{i:04}");
            let cgroup = format!("/fast-sandbox/{name}");
            let identity = Placeholder {
                name: &name,
                namespace: SLOT_NAMESPACE,
                uid: &uid,
                pool: "runc-default",
                token: TOKEN,
                cgroup_parent: &cgroup,
            };
            let id = direct
                .run_pod_sandbox(key.placeholder_request(&identity))
                .await
                .expect("placeholder created")
                .into_inner()
                .pod_sandbox_id;
            self.slots.add_slot(&id, key);
            ids.push(id);
        }
        ids
    }

    pub async fn stop(self) {
        stop_shims(self.shim, self.plain).await;
        self.upstream.stop().await;
    }
}

/// Serves, in `dir`, a shim with slots from `source` (socket `shim.sock`)
/// and a plain forwarding shim (`plain.sock`), both on the upstream of
/// `cfg`.
pub async fn start_shims(
    dir: &Path,
    cfg: &UpstreamConfig,
    source: Arc<dyn SlotSource>,
) -> (ShimUnderTest, ShimUnderTest) {
    let shim = ShimUnderTest::start_shim(cfg, dir.join("shim.sock"), |upstream| {
        Shim::with_slots(upstream, handlers(), source)
    })
    .await;
    let plain = ShimUnderTest::start(cfg, dir.join("plain.sock")).await;
    (shim, plain)
}

/// Stops the shims of [`start_shims`].
pub async fn stop_shims(shim: ShimUnderTest, plain: ShimUnderTest) {
    for shim in [shim, plain] {
        tokio::time::timeout(Duration::from_secs(5), shim.stop())
            .await
            .expect("shim stops")
            .expect("shim served");
    }
}
