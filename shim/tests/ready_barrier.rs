//! The shim holds `CreateContainer` in a claimed sandbox until the slot
//! source says the sandbox may get containers (a gVisor slot's hostname is
//! set after the claim is answered), and refuses it when that step failed,
//! without forwarding. In process, with the stateful fake upstream and the
//! recording fake slot source. No root, no containerd.

mod support;

use std::time::Duration;

use fast_sandbox_proto::cri;
use fast_sandbox_shim::slots::NotReady;
use support::slots::{kubelet_pod, run_request, runc_key, SlotsRig};
use tonic::Code;

/// Bound of every wait in these tests (none is expected to take long).
const WAIT: Duration = Duration::from_secs(10);

fn create_request(sandbox_id: &str) -> cri::CreateContainerRequest {
    support::slots::create_request(sandbox_id, "web-0")
}

/// Claims a slot of a rig with one free slot; returns its id.
async fn claimed(rig: &SlotsRig) -> String {
    rig.fill(&runc_key(), 1).await;
    rig.shim
        .runtime()
        .run_pod_sandbox(run_request("fast-runc", kubelet_pod("web-0")))
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id
}

fn containers_in(rig: &SlotsRig, sandbox_id: &str) -> usize {
    rig.pods
        .store()
        .containers
        .iter()
        .filter(|c| c.sandbox_id == sandbox_id)
        .count()
}

#[tokio::test]
async fn create_container_waits_for_the_pending_identity_step() {
    let rig = SlotsRig::start().await;
    let id = claimed(&rig).await;
    assert!(rig.slots.claimed(&id).is_some(), "served from the slot");
    let release = rig.slots.hold(&id);

    let mut shim = rig.shim.runtime();
    let request = create_request(&id);
    let create = tokio::spawn(async move { shim.create_container(request).await });
    tokio::time::timeout(WAIT, rig.slots.waiting.notified())
        .await
        .expect("CreateContainer reaches the barrier");
    assert_eq!(
        containers_in(&rig, &id),
        0,
        "nothing is forwarded while the identity step runs"
    );
    assert!(!create.is_finished());

    release.send_replace(Some(Ok(())));
    let created = tokio::time::timeout(WAIT, create)
        .await
        .expect("CreateContainer ends once the step is done")
        .expect("task")
        .expect("CreateContainer succeeds");
    assert!(!created.into_inner().container_id.is_empty());
    assert_eq!(containers_in(&rig, &id), 1);
    assert_eq!(rig.slots.record().readiness_asked, vec![id]);
    rig.stop().await;
}

#[tokio::test]
async fn a_failed_identity_step_fails_create_container_without_forwarding() {
    let rig = SlotsRig::start().await;
    let id = claimed(&rig).await;
    let release = rig.slots.hold(&id);
    release.send_replace(Some(Err(NotReady::Failed {
        sandbox_id: id.clone(),
        reason: "runsc exec: exit status 1".into(),
    })));
    let err = rig
        .shim
        .runtime()
        .create_container(create_request(&id))
        .await
        .expect_err("no container in a half-fixed sandbox");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains(&id), "names the sandbox: {err:?}");
    assert!(err.message().contains("runsc exec"), "says why: {err:?}");
    assert_eq!(containers_in(&rig, &id), 0, "not forwarded");

    // A step still running past the source's bound: transient, retryable.
    release.send_replace(Some(Err(NotReady::Pending {
        sandbox_id: id.clone(),
        waited: Duration::from_secs(2),
    })));
    let err = rig
        .shim
        .runtime()
        .create_container(create_request(&id))
        .await
        .expect_err("still pending");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&id), "{err:?}");
    assert_eq!(containers_in(&rig, &id), 0, "not forwarded");
    rig.stop().await;
}

#[tokio::test]
async fn a_prefix_id_waits_on_the_full_ids_barrier() {
    let rig = SlotsRig::start().await;
    let id = claimed(&rig).await;
    let release = rig.slots.hold(&id);
    release.send_replace(Some(Err(NotReady::Failed {
        sandbox_id: id.clone(),
        reason: "fake".into(),
    })));
    let err = rig
        .shim
        .runtime()
        .create_container(create_request(&id[..12]))
        .await
        .expect_err("the prefix names the same half-fixed sandbox");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert_eq!(containers_in(&rig, &id), 0);
    assert_eq!(rig.slots.record().readiness_asked, vec![id]);
    rig.stop().await;
}

#[tokio::test]
async fn sandboxes_without_a_pending_step_do_not_wait() {
    let rig = SlotsRig::start().await;
    // A claimed slot with nothing pending (runc), and a cold sandbox.
    let warm = claimed(&rig).await;
    let cold = rig
        .shim
        .runtime()
        .run_pod_sandbox(run_request("runc", kubelet_pod("cold-0")))
        .await
        .expect("cold RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    for id in [&warm, &cold] {
        tokio::time::timeout(
            WAIT,
            rig.shim.runtime().create_container(create_request(id)),
        )
        .await
        .expect("not held")
        .expect("CreateContainer");
        assert_eq!(containers_in(&rig, id), 1);
    }
    rig.stop().await;
}
