//! Issue 12 item 4: a pod a pool cannot serve is decided before any slot is
//! touched. It starts cold with its own miss reason, not as a failed claim,
//! and the pool keeps every free slot (none is claimed, stopped or
//! removed upstream). The real pool manager over a fake upstream, with the
//! real `guest-exec` fix-up over recording fakes: no root, no containerd.

use std::{sync::Arc, time::Duration};

use fast_sandbox_node::fixup::{
    ByRuntime, ExecTemplate, Fixup, GuestExecFixup, GuestExecSettings, GuestOps, NodeOps,
    RecordingGuestOps, RecordingOps, SysctlPolicy,
};
use fast_sandbox_proto::cri::{LinuxPodSandboxConfig, PodSandboxConfig};
use fast_sandbox_shim::slots::{Claim, MissReason, NoSlot, PoolKey, Shape, SlotSource};
use fast_sandbox_tests::fake_cri::{NoFixup, PoolRig};

fn key(upstream: &str) -> PoolKey {
    PoolKey {
        upstream_handler: upstream.into(),
        shape: Shape::default(),
    }
}

fn pod(hostname: &str, sysctls: &[(&str, &str)]) -> PodSandboxConfig {
    PodSandboxConfig {
        hostname: hostname.into(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: "/kubepods/besteffort/pod1".into(),
            sysctls: sysctls
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `runsc` slots get `guest-exec` (sysctls ignored, as runsc does cold),
/// `kata` slots `guest-exec` refusing sysctls, the rest nothing.
fn fixup(node: &Arc<RecordingOps>, guest: &Arc<RecordingGuestOps>) -> Arc<dyn Fixup> {
    let make = |sysctls| -> Arc<dyn Fixup> {
        Arc::new(GuestExecFixup::new(
            Arc::clone(node) as Arc<dyn NodeOps>,
            Arc::clone(guest) as Arc<dyn GuestOps>,
            "/var/lib/containerd".into(),
            GuestExecSettings {
                command: ExecTemplate::runsc("/usr/bin/runsc", "/run/containerd/runc/k8s.io"),
                sysctls,
                channel: None,
            },
            Duration::from_secs(5),
        ))
    };
    Arc::new(
        ByRuntime::new(Arc::new(NoFixup))
            .with("runsc", make(SysctlPolicy::Ignore))
            .with("kata", make(SysctlPolicy::Refuse)),
    )
}

#[tokio::test]
async fn a_pod_the_pool_cannot_serve_goes_cold_and_every_slot_stays_free() {
    let node = Arc::new(RecordingOps::new());
    let guest = Arc::new(RecordingGuestOps::default());
    let rig = PoolRig::builder()
        .pool("fast-gvisor", "fast-gvisor", key("runsc"), 2)
        .pool("fast-kata", "fast-kata", key("kata"), 1)
        .pool("fast-runc", "fast-runc", key("runc"), 1)
        .fixup(fixup(&node, &guest))
        .start()
        .await;
    let manager = &rig.manager;
    let mut changes = manager.subscribe();
    let full = || manager.stats().iter().all(|s| s.free == s.desired);
    tokio::time::timeout(Duration::from_secs(10), async {
        while !full() {
            changes.changed().await.expect("manager alive");
        }
    })
    .await
    .expect("the pools fill");
    let upstream_ids = || -> Vec<String> {
        let state = rig.cri.state();
        state.sandboxes.iter().map(|s| s.id.clone()).collect()
    };
    let before = upstream_ids();
    let guest_calls = guest.calls().len();
    let node_calls = node.calls().len();

    let mut relative = pod("web-0", &[]);
    relative.linux.as_mut().expect("linux").cgroup_parent = "kubepods/pod1".into();
    let cases = [
        ("fast-gvisor", "runsc", pod("", &[]), MissReason::NoHostname),
        (
            "fast-kata",
            "kata",
            pod("web-0", &[("net.core.somaxconn", "1024")]),
            MissReason::SysctlsAtStartOnly,
        ),
        ("fast-runc", "runc", relative, MissReason::UnsupportedConfig),
    ];
    for (exposed, upstream, config, want) in cases {
        let claim = Claim {
            exposed_handler: exposed.into(),
            key: key(upstream),
            config,
        };
        let answer = manager.claim(&claim).await.expect("not a failed claim");
        assert_eq!(answer.err(), Some(NoSlot::CannotServe(want)), "{exposed}");
    }

    let stats = manager.stats();
    let free: Vec<(&str, usize, usize)> = stats
        .iter()
        .map(|s| (s.name.as_str(), s.free, s.claimed))
        .collect();
    assert_eq!(
        free,
        [
            ("fast-gvisor", 2, 0),
            ("fast-kata", 1, 0),
            ("fast-runc", 1, 0)
        ],
        "no slot taken"
    );
    assert_eq!(upstream_ids(), before, "no slot stopped, removed or made");
    assert_eq!(guest.calls().len(), guest_calls, "nothing run in a slot");
    assert_eq!(
        node.calls().len(),
        node_calls,
        "nothing written for a claim"
    );

    // A pod the pool can serve still gets a slot.
    let served = Claim {
        exposed_handler: "fast-gvisor".into(),
        key: key("runsc"),
        config: pod("web-0", &[]),
    };
    manager
        .claim(&served)
        .await
        .expect("claim")
        .expect("a slot for a pod with a hostname");
}
