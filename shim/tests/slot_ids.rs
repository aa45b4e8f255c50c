//! Calls that name a sandbox by id, with slots: an unclaimed slot's id (or
//! a unique prefix of it) gets exactly containerd 1.6.20's answer for an
//! unknown id and never reaches upstream; a claimed slot's id, or any other
//! sandbox's, is forwarded. In process, against the stateful fake upstream.

mod support;

use fast_sandbox_proto::cri::{self, runtime_service_client::RuntimeServiceClient};
use support::{
    pods::{create_not_found, port_forward_not_found, stats_not_found, stop_not_found},
    slots::{kubelet_pod, run_request, runc_key, SlotsRig},
};
use tonic::{transport::Channel, Code, Status};

type Client = RuntimeServiceClient<Channel>;

async fn run(client: &mut Client, handler: &str, name: &str) -> String {
    client
        .run_pod_sandbox(run_request(handler, kubelet_pod(name)))
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id
}

fn container(sandbox: &str) -> cri::CreateContainerRequest {
    support::slots::create_request(sandbox, "web")
}

/// What every id-naming call answered: errors as (code, message), the rest
/// as what the answer held.
#[derive(Debug, PartialEq, Eq)]
struct Answers {
    stop: Result<(), (Code, String)>,
    remove: Result<(), (Code, String)>,
    create: Result<(), (Code, String)>,
    port_forward: Result<(), (Code, String)>,
    stats: Result<(), (Code, String)>,
    containers: Result<usize, (Code, String)>,
    container_stats: Result<usize, (Code, String)>,
}

fn err(status: Status) -> (Code, String) {
    (status.code(), status.message().to_owned())
}

/// Every call that names sandbox `id`, in an order that keeps a real
/// sandbox alive until the end (so each call sees it).
async fn name_it(client: &mut Client, id: &str) -> Answers {
    let create = client.create_container(container(id)).await;
    let containers = client
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: id.into(),
                ..Default::default()
            }),
        })
        .await;
    let container_stats = client
        .list_container_stats(cri::ListContainerStatsRequest {
            filter: Some(cri::ContainerStatsFilter {
                pod_sandbox_id: id.into(),
                ..Default::default()
            }),
        })
        .await;
    let port_forward = client
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: id.into(),
            port: vec![8080],
        })
        .await;
    let stats = client
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: id.into(),
        })
        .await;
    let stop = client
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        })
        .await;
    let remove = client
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        })
        .await;
    Answers {
        stop: stop.map(drop).map_err(err),
        remove: remove.map(drop).map_err(err),
        create: create.map(drop).map_err(err),
        port_forward: port_forward.map(drop).map_err(err),
        stats: stats.map(drop).map_err(err),
        containers: containers
            .map(|r| r.into_inner().containers.len())
            .map_err(err),
        container_stats: container_stats
            .map(|r| r.into_inner().stats.len())
            .map_err(err),
    }
}

/// containerd 1.6.20's answers for an unknown sandbox id, as requested.
fn unknown(requested: &str) -> Answers {
    Answers {
        stop: Err((Code::NotFound, stop_not_found(requested))),
        remove: Ok(()),
        create: Err((Code::NotFound, create_not_found(requested))),
        port_forward: Err((Code::NotFound, port_forward_not_found(requested))),
        stats: Err((Code::NotFound, stats_not_found(requested))),
        containers: Ok(0),
        container_stats: Ok(0),
    }
}

#[tokio::test]
async fn an_unclaimed_slot_is_an_unknown_id() {
    let rig = SlotsRig::start().await;
    let slots = rig.fill(&runc_key(), 2).await;
    let mut shim = rig.shim.runtime();
    let mut direct = rig.direct();

    for slot in &slots {
        for (id, lookups) in [(slot.as_str(), 0), (&slot[..12], 1), (&slot[..1], 1)] {
            let seen_before = rig.pods.seen.count();
            let answers = name_it(&mut shim, id).await;
            assert_eq!(answers, unknown(id), "{id}");
            // Nothing reached upstream but stats (forwarded, judged by its
            // answer) and, for a prefix, one status lookup per other call.
            let upstream_calls = rig.pods.seen.count() - seen_before;
            assert_eq!(upstream_calls, 1 + 6 * lookups, "{id}");

            // Word for word what upstream says for an id it does not know.
            let absent = "f".repeat(id.len());
            assert_eq!(name_it(&mut direct, &absent).await, unknown(&absent));
        }
    }

    // The slots stay free and alive: nothing stopped, removed or created
    // in them, nothing forgotten by the source, and a claim still gets one.
    {
        let store = rig.pods.store();
        assert!(store.sandboxes.iter().all(|s| s.ready));
        assert!(store.containers.is_empty());
    }
    assert_eq!(rig.pods.ids(), slots);
    assert!(rig.slots.record().removed.is_empty());
    assert!(slots.iter().all(|s| rig.slots.claimed(s).is_none()));
    let claimed = run(&mut shim, "fast-runc", "web").await;
    assert!(slots.contains(&claimed));
    rig.stop().await;
}

#[tokio::test]
async fn claimed_slots_and_other_sandboxes_are_forwarded() {
    let rig = SlotsRig::start().await;
    let slots = rig.fill(&runc_key(), 2).await;
    let mut shim = rig.shim.runtime();
    let warm = run(&mut shim, "fast-runc", "warm").await;
    let free = slots
        .iter()
        .find(|s| **s != warm)
        .cloned()
        .expect("a free slot");
    let cold = run(&mut shim, "fast-crun", "cold").await;
    let ordinary = run(&mut shim, "runc", "plain").await;

    let forwarded = Answers {
        stop: Ok(()),
        remove: Ok(()),
        create: Ok(()),
        port_forward: Ok(()),
        stats: Ok(()),
        containers: Ok(1),
        container_stats: Ok(1),
    };
    // By full id: no lookup, one upstream call per call.
    for id in [&cold, &ordinary] {
        let seen_before = rig.pods.seen.count();
        assert_eq!(name_it(&mut shim, id).await, forwarded, "{id}");
        assert_eq!(rig.pods.seen.count() - seen_before, 7, "{id}");
    }
    // A claimed slot by prefix: forwarded as well, and forgotten by the
    // source under its full id once removed.
    assert_eq!(name_it(&mut shim, &warm[..12]).await, forwarded);
    assert_eq!(rig.slots.record().removed, [cold.clone(), ordinary, warm]);
    assert_eq!(rig.pods.ids(), [free], "the free slot is left");
    assert_eq!(rig.pods.store().containers.len(), 3);
    rig.stop().await;
}

#[tokio::test]
async fn ids_upstream_cannot_resolve_are_its_to_answer() {
    let rig = SlotsRig::start().await;
    rig.fill(&runc_key(), 1).await;
    let mut shim = rig.shim.runtime();
    let mut direct = rig.direct();
    for id in ["", "not-an-id", &"0".repeat(64)] {
        let through_shim = name_it(&mut shim, id).await;
        assert_eq!(through_shim, name_it(&mut direct, id).await, "{id:?}");
    }
    assert_eq!(
        name_it(&mut shim, &"0".repeat(64)).await,
        unknown(&"0".repeat(64))
    );
    let empty = name_it(&mut shim, "").await;
    assert_eq!(empty.stop.map_err(|e| e.0), Err(Code::Unknown));
    rig.stop().await;
}
