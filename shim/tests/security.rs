//! Handler isolation through the served shim: a request for one warm
//! handler never receives a slot created with another upstream handler,
//! whatever slots are free and whatever the pod's labels say. In process,
//! against the stateful fake upstream and the recording fake slot source
//! (which, like the node plugin's pools, hands out only slots of exactly
//! the claim's key). The key's upstream handler itself is checked for
//! arbitrary requests by the `claim` fuzz target (fuzz/).

mod support;

use fast_sandbox_proto::cri;
use fast_sandbox_shim::slots::{MissReason, PoolKey, RUNTIME_HANDLER_LABEL};
use support::slots::{kubelet_pod, runc_key, SlotsRig};

fn key(upstream: &str) -> PoolKey {
    PoolKey {
        upstream_handler: upstream.into(),
        ..runc_key()
    }
}

async fn run(rig: &SlotsRig, handler: &str, config: cri::PodSandboxConfig) -> String {
    rig.shim
        .runtime()
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: handler.into(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id
}

#[tokio::test]
async fn a_warm_handler_never_gets_a_slot_of_another_runtime() {
    let rig = SlotsRig::start().await;
    // Free slots of two other runtimes (crun, and gVisor's runsc, which no
    // handler of this shim maps to), none of runc.
    let crun = rig.fill(&key("crun"), 2).await;
    let runsc = rig.fill(&key("runsc"), 2).await;
    let foreign: Vec<&String> = crun.iter().chain(&runsc).collect();

    // Plain fast-runc pods, and ones whose labels name another handler.
    let mut spoofing = kubelet_pod("spoof");
    spoofing
        .labels
        .insert(RUNTIME_HANDLER_LABEL.into(), "fast-crun".into());
    let mut ids = Vec::new();
    for pod in [kubelet_pod("a"), spoofing, kubelet_pod("b")] {
        ids.push(run(&rig, "fast-runc", pod).await);
    }
    for id in &ids {
        assert!(
            !foreign.contains(&id),
            "fast-runc got slot {id} of another runtime"
        );
    }
    // Every one started cold on runc, and no other runtime's slot moved.
    let runs = rig.pods.store().runs.clone();
    let cold: Vec<&str> = runs[foreign.len()..]
        .iter()
        .map(|r| r.runtime_handler.as_str())
        .collect();
    assert_eq!(cold, ["runc"; 3]);
    assert_eq!(rig.slots.misses(), [MissReason::NoPool; 3]);
    for claim in &rig.slots.record().claims {
        assert_eq!(claim.key, key("runc"), "asked only for runc slots");
    }
    for id in &foreign {
        assert!(rig.slots.claimed(id).is_none(), "{id} stays free");
    }

    // Positive control: fast-crun takes a crun slot, never a runsc one.
    let hit = run(&rig, "fast-crun", kubelet_pod("c")).await;
    assert!(crun.contains(&hit), "{hit} is a crun slot");
    for id in &runsc {
        assert!(rig.slots.claimed(id).is_none(), "{id} stays free");
    }
    rig.stop().await;
}
