//! A slow cgroup read never stalls the CRI: the shim with a real
//! `PoolManager`, in process, on the node plugin's runtime (a multi-thread
//! runtime with one worker, as `main.rs` builds it), over a fake CRI
//! upstream. A `PodSandboxStats` of a claimed slot reads the pod's cgroup
//! through a reader that blocks until the test lets it go; meanwhile
//! `Version` calls through the shim answer at once. No root, no containerd.

use std::{
    collections::HashSet,
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use fast_sandbox_cgroup::{CgroupError, MoveScope};
use fast_sandbox_node::{
    fixup::CgroupLeaf,
    usage::{Cgroups, Sample},
};
use fast_sandbox_proto::cri;
use fast_sandbox_shim::slots::{HandlerMap, SlotSource};
use fast_sandbox_tests::{
    fake_cri::{runc_key, PoolRig},
    InProcessShim,
};
use tokio::sync::Notify;

/// The pod's cgroup parent in the claim below.
const POD_PARENT: &str = "/kubepods/besteffort/pod1234";

/// A cgroup reader whose reads of the pod's cgroup wait until released;
/// the claimed slot's placeholder (also read for a claimed pod's stats)
/// holds nothing.
#[derive(Debug)]
struct HeldReader {
    /// Notified when a read starts.
    entered: Arc<Notify>,
    /// A read returns when this gets a message (or its sender is gone).
    release: Mutex<mpsc::Receiver<()>>,
}

impl Cgroups for HeldReader {
    fn pod_sample(&self, leaf: &CgroupLeaf) -> Option<Sample> {
        if !leaf.as_str().starts_with(POD_PARENT) {
            return None;
        }
        self.entered.notify_one();
        let _ = self.release.lock().expect("lock").recv();
        Some(Sample {
            cpu_ns: 7_000,
            usage: 16 << 20,
            ..Sample::default()
        })
    }

    fn placeholder_dirs(&self, _root: &str) -> HashSet<String> {
        HashSet::new()
    }

    // The pool only reads; the fix-up (a fake here) does the rest.
    fn move_pid(
        &self,
        _: i32,
        _: &CgroupLeaf,
        _: &CgroupLeaf,
        _: MoveScope,
    ) -> Result<(), CgroupError> {
        Ok(())
    }

    fn procs(&self, _: &CgroupLeaf) -> Result<Vec<i32>, CgroupError> {
        Ok(Vec::new())
    }

    fn join(&self, _: u32, _: &CgroupLeaf) -> Result<Vec<CgroupError>, CgroupError> {
        Ok(Vec::new())
    }

    fn remove(&self, _: &CgroupLeaf) -> Result<Vec<CgroupError>, CgroupError> {
        Ok(Vec::new())
    }
}

#[test]
fn a_held_cgroup_read_leaves_version_answering() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(held_read());
}

async fn held_read() {
    let entered = Arc::new(Notify::new());
    let (release, held) = mpsc::channel();
    let reader = HeldReader {
        entered: Arc::clone(&entered),
        release: Mutex::new(held),
    };
    let rig = PoolRig::builder()
        .pool("stats", "fast-runc", runc_key(), 1)
        .cgroups(Arc::new(reader))
        .unix_socket()
        .start()
        .await;
    rig.wait_free(1).await;
    let id = rig
        .claim_for(cri::PodSandboxConfig {
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: POD_PARENT.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    let upstream = fast_sandbox_shim::Upstream::connect_lazy(
        &fast_sandbox_shim::UpstreamConfig::new(rig.endpoint.clone().expect("a unix socket")),
    )
    .expect("upstream");
    let shim = InProcessShim::serve(fast_sandbox_shim::Shim::with_slots(
        upstream,
        HandlerMap::new([("fast-runc", "runc")]),
        Arc::clone(&rig.manager) as Arc<dyn SlotSource>,
    ))
    .await
    .expect("shim");
    let cri = shim.cri().expect("client");

    let stats = tokio::spawn({
        let mut cri = cri.clone();
        let id = id.clone();
        async move {
            cri.runtime
                .pod_sandbox_stats(cri::PodSandboxStatsRequest { pod_sandbox_id: id })
                .await
        }
    });
    tokio::time::timeout(Duration::from_secs(10), entered.notified())
        .await
        .expect("the stats call reads the pod's cgroup");

    // The read is held: every call below is answered while it waits. The
    // calls come from another thread with its own runtime, so a stalled
    // node-plugin runtime fails the test instead of hanging it.
    let endpoint = shim.endpoint();
    let took = std::thread::spawn(move || version_calls(&endpoint, 5))
        .join()
        .expect("probe thread");
    assert!(!stats.is_finished(), "the cgroup read is still held");
    release.send(()).expect("reader waiting");
    let mut took = took.expect("Version answers while the cgroup read is held");
    took.sort();
    assert!(
        took[took.len() / 2] < Duration::from_millis(5),
        "Version took {took:?} while a cgroup read was held"
    );

    let answer = stats
        .await
        .expect("stats task")
        .expect("PodSandboxStats")
        .into_inner();
    let memory = answer
        .stats
        .and_then(|s| s.linux)
        .and_then(|l| l.memory)
        .and_then(|m| m.usage_bytes)
        .map(|v| v.value);
    assert_eq!(memory, Some(16 << 20), "the pod's cgroup, as read");
    shim.stop().await.expect("clean stop");
}

/// `n` `Version` calls to `endpoint`, one at a time, from a runtime of
/// their own; how long each took, or the first that did not answer
/// within a second.
fn version_calls(endpoint: &str, n: usize) -> Result<Vec<Duration>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let mut cri = fast_sandbox_tests::Cri::connect(endpoint).map_err(|e| e.to_string())?;
        let mut took = Vec::new();
        for _ in 0..n {
            let started = Instant::now();
            tokio::time::timeout(
                Duration::from_secs(1),
                cri.runtime.version(cri::VersionRequest::default()),
            )
            .await
            .map_err(|_| format!("no answer within 1 s after {took:?}"))?
            .map_err(|e| e.to_string())?;
            took.push(started.elapsed());
        }
        Ok(took)
    })
}
