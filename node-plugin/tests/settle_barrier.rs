//! A claimed slot whose identity step is deferred past the claim's answer
//! (`Fixup::settle`: a gVisor slot's hostname, set inside the sandbox):
//! the claim answers without waiting for it, `ready_for_containers` waits
//! for it, a failure is retried once and then refuses containers, and
//! slots without that step (runc) never wait. A real `PoolManager` in
//! front of the in-memory fake CRI (`fast_sandbox_tests::fake_cri`), with
//! a gated fake fix-up. No root, no containerd.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use fast_sandbox_node::fixup::{Fixup, FixupFailed, GuestError, GuestStep, SlotFacts};
use fast_sandbox_proto::cri;
use fast_sandbox_shim::slots::{NotReady, PoolKey, Shape, SlotSource};
use fast_sandbox_tests::fake_cri::PoolRig;
use tokio::sync::{watch, Notify};

/// Bound of every wait in these tests (none is expected to take long).
const WAIT: Duration = Duration::from_secs(10);

/// What a failed `runsc exec` in the sandbox reports.
fn guest_failed(step: GuestStep, status: &str, stderr: &str) -> FixupFailed {
    FixupFailed::Guest {
        step,
        source: GuestError::Failed {
            program: "/usr/bin/runsc".to_owned(),
            status: status.to_owned(),
            stderr: stderr.to_owned(),
        },
    }
}

/// A fix-up whose `settle` (for `runsc` slots only, as the real dispatch)
/// waits until the test opens its gate, and fails as many times as told.
#[derive(Debug)]
struct Gated {
    calls: Mutex<Vec<String>>,
    /// Notified when a `settle` starts.
    entered: Notify,
    gate: watch::Sender<bool>,
    /// `settle` fails this many more times.
    failures: AtomicUsize,
    fail_prepare: AtomicBool,
    /// Notified when a `prepare` ends.
    prepared: Notify,
}

impl Gated {
    fn new(open: bool, failures: usize) -> Arc<Self> {
        Arc::new(Self {
            calls: Mutex::new(Vec::new()),
            entered: Notify::new(),
            gate: watch::Sender::new(open),
            failures: AtomicUsize::new(failures),
            fail_prepare: AtomicBool::new(false),
            prepared: Notify::new(),
        })
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("lock").clone()
    }

    fn count(&self, call: &str) -> usize {
        self.calls().iter().filter(|c| c.as_str() == call).count()
    }

    fn record(&self, call: &str) {
        self.calls.lock().expect("lock").push(call.to_owned());
    }
}

#[tonic::async_trait]
impl Fixup for Gated {
    async fn apply(&self, _: &SlotFacts, _: &cri::PodSandboxConfig) -> Result<(), FixupFailed> {
        self.record("apply");
        Ok(())
    }
    fn settles(&self, slot: &SlotFacts) -> bool {
        slot.upstream_handler == "runsc"
    }
    async fn settle(&self, _: &SlotFacts, _: &cri::PodSandboxConfig) -> Result<(), FixupFailed> {
        self.record("settle");
        self.entered.notify_one();
        let mut gate = self.gate.subscribe();
        gate.wait_for(|open| *open)
            .await
            .expect("the test keeps the gate");
        let failed = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failed {
            return Err(guest_failed(GuestStep::Hostname, "exit status 1", ""));
        }
        Ok(())
    }
    async fn prepare(&self, _: &SlotFacts, _: &cri::PodSandboxConfig) -> Result<(), FixupFailed> {
        self.record("prepare");
        self.prepared.notify_one();
        if self.fail_prepare.load(Ordering::SeqCst) {
            return Err(guest_failed(
                GuestStep::Hostname,
                "exit status: 2",
                "pause has no --set-hostname",
            ));
        }
        Ok(())
    }
    async fn complete(&self, _: &SlotFacts, _: &cri::PodSandboxConfig) -> Result<(), FixupFailed> {
        self.record("complete");
        Ok(())
    }
    async fn after_remove(&self, _: &SlotFacts, _: &cri::PodSandboxConfig) {}
    async fn discard(&self, _: &SlotFacts) {}
}

fn key(upstream: &str) -> PoolKey {
    PoolKey {
        upstream_handler: upstream.into(),
        shape: Shape::default(),
    }
}

/// A [`PoolRig`] of one pool `fast-<upstream>` with a [`Gated`] fix-up.
struct Rig(PoolRig);

impl std::ops::Deref for Rig {
    type Target = PoolRig;
    fn deref(&self) -> &PoolRig {
        &self.0
    }
}

impl Rig {
    /// A pool of `size` slots of `upstream` with `fixup`.
    async fn start(upstream: &str, size: usize, fixup: Arc<Gated>) -> Self {
        let name = format!("fast-{upstream}");
        Self(
            PoolRig::builder()
                .pool(&name, &name, key(upstream), size)
                .fixup(fixup)
                .start()
                .await,
        )
    }

    async fn claim(&self) -> String {
        self.0
            .claim_for(cri::PodSandboxConfig {
                hostname: "web-0".into(),
                ..Default::default()
            })
            .await
    }
}

/// Polls `fut` once: it must be waiting.
async fn assert_pending<F: std::future::Future>(fut: std::pin::Pin<&mut F>) {
    tokio::select! {
        biased;
        _ = fut => panic!("finished, but must wait"),
        () = std::future::ready(()) => {}
    }
}

#[tokio::test]
async fn the_claim_answers_before_the_settle_and_containers_wait_for_it() {
    let fixup = Gated::new(false, 0);
    let rig = Rig::start("runsc", 1, Arc::clone(&fixup)).await;
    rig.wait_free(1).await;
    assert_eq!(fixup.calls(), vec!["prepare"], "each new slot is checked");

    // The gate is closed: the claim must not wait for the settle.
    let id = tokio::time::timeout(WAIT, rig.claim())
        .await
        .expect("the claim does not wait for the settle");
    tokio::time::timeout(WAIT, fixup.entered.notified())
        .await
        .expect("the settle starts at once, not after refill_delay");

    let mut ready = std::pin::pin!(rig.manager.ready_for_containers(&id));
    // The settle cannot finish while the gate is closed, so neither can
    // the wait.
    assert_pending(ready.as_mut()).await;

    fixup.gate.send_replace(true);
    tokio::time::timeout(WAIT, ready)
        .await
        .expect("the wait ends with the settle")
        .expect("ready for containers");
    assert_eq!(fixup.count("settle"), 1);
    assert_eq!(
        fixup.count("complete"),
        0,
        "the cgroup move waits for refill_delay"
    );
    // Settled once, every later call answers at once.
    tokio::time::timeout(WAIT, rig.manager.ready_for_containers(&id))
        .await
        .expect("at once")
        .expect("ready");
}

#[tokio::test]
async fn a_settle_failing_twice_refuses_containers() {
    let fixup = Gated::new(true, 2);
    let rig = Rig::start("runsc", 1, Arc::clone(&fixup)).await;
    rig.wait_free(1).await;
    let id = rig.claim().await;
    let err = tokio::time::timeout(WAIT, rig.manager.ready_for_containers(&id))
        .await
        .expect("bounded")
        .expect_err("no container in a half-fixed sandbox");
    match &err {
        NotReady::Failed { sandbox_id, reason } => {
            assert_eq!(sandbox_id, &id);
            assert!(reason.contains("exit status 1"), "{err}");
        }
        NotReady::Pending { .. } => panic!("failed, not pending: {err}"),
    }
    assert_eq!(fixup.count("settle"), 2, "retried once");
    assert_eq!(
        rig.manager.claims().len(),
        1,
        "the pod keeps its sandbox (kubelet decides)"
    );
}

#[tokio::test]
async fn a_settle_failing_once_is_retried() {
    let fixup = Gated::new(true, 1);
    let rig = Rig::start("runsc", 1, Arc::clone(&fixup)).await;
    rig.wait_free(1).await;
    let id = rig.claim().await;
    tokio::time::timeout(WAIT, rig.manager.ready_for_containers(&id))
        .await
        .expect("bounded")
        .expect("the retry succeeded");
    assert_eq!(fixup.count("settle"), 2);
}

#[tokio::test]
async fn runc_slots_never_wait() {
    // The gate stays closed: a settle would never finish.
    let fixup = Gated::new(false, 0);
    let rig = Rig::start("runc", 1, Arc::clone(&fixup)).await;
    rig.wait_free(1).await;
    let id = rig.claim().await;
    tokio::time::timeout(WAIT, rig.manager.ready_for_containers(&id))
        .await
        .expect("no wait")
        .expect("ready");
    assert_eq!(fixup.calls(), vec!["apply"], "no prepare, no settle");
}

#[tokio::test]
async fn removing_the_pod_abandons_a_pending_settle() {
    let fixup = Gated::new(false, 0);
    let rig = Rig::start("runsc", 1, Arc::clone(&fixup)).await;
    rig.wait_free(1).await;
    let id = rig.claim().await;
    tokio::time::timeout(WAIT, fixup.entered.notified())
        .await
        .expect("settle started");
    let mut ready = std::pin::pin!(rig.manager.ready_for_containers(&id));
    assert_pending(ready.as_mut()).await;
    tokio::time::timeout(WAIT, rig.manager.removed(&id))
        .await
        .expect("removal does not wait for the gate");
    let err = tokio::time::timeout(WAIT, ready)
        .await
        .expect("the wait ends")
        .expect_err("abandoned");
    assert!(err.to_string().contains(&id), "{err}");
    assert!(rig.manager.claims().is_empty());
}

#[tokio::test]
async fn a_slot_that_cannot_settle_is_never_offered() {
    let fixup = Gated::new(true, 0);
    fixup.fail_prepare.store(true, Ordering::SeqCst);
    let rig = Rig::start("runsc", 1, Arc::clone(&fixup)).await;
    // Each failed creation is destroyed upstream and retried (with
    // back-off): wait for the second attempt.
    tokio::time::timeout(WAIT, async {
        while fixup.count("prepare") < 2 {
            fixup.prepared.notified().await;
        }
    })
    .await
    .expect("creation retried");
    assert_eq!(rig.manager.stats()[0].free, 0, "no slot offered");
    let ready = rig
        .cri
        .state()
        .sandboxes
        .iter()
        .filter(|s| s.state == cri::PodSandboxState::SandboxReady as i32)
        .count();
    assert!(
        ready <= 1,
        "failed slots are removed upstream ({ready} left)"
    );
}
