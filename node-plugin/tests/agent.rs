//! The node agent in process, over real gRPC on 127.0.0.1: a `PoolManager`
//! against a small fake CRI upstream (sandboxes and images in memory, see
//! `fast_sandbox_tests::fake_cri`), the agent in front of it, and a client.
//! A claim reaches a watcher within 100 ms; every call without the right
//! bearer token is refused with no data; pool sizes are set by handler and
//! shape. No root, no containerd.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use fast_sandbox_node::agent;
use fast_sandbox_proto::nodeagent::{
    node_agent_client::NodeAgentClient, GetNodeStatusRequest, NodeStatus, SetPoolSizeRequest,
    WatchNodeStatusRequest,
};
use fast_sandbox_tests::fake_cri::PoolRig;
use tonic::{transport::Channel, Code, Request, Status};

const TOKEN: &str = "test-token-0123456789";
const POOL_SIZE: usize = 2;

/// The fake upstream, a pool manager keeping `POOL_SIZE` slots in pool
/// `fast-runc`, and the agent of node `node-a`; everything stops when the
/// test's runtime ends.
struct Rig {
    pools: PoolRig,
    agent: SocketAddr,
}

async fn rig() -> Rig {
    let pools = PoolRig::start("fast-runc", POOL_SIZE).await;
    let (agent, server) = agent::bind(
        "127.0.0.1:0".parse().expect("address"),
        pools.agent_parts("node-a", TOKEN),
        std::future::pending(),
    )
    .await
    .expect("agent binds");
    tokio::spawn(server);
    Rig { pools, agent }
}

type AddAuth = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;
type Client = NodeAgentClient<tonic::service::interceptor::InterceptedService<Channel, AddAuth>>;

/// A client sending `authorization` (or nothing).
async fn client(addr: SocketAddr, authorization: Option<&str>) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("agent URI")
        .connect()
        .await
        .expect("connect to the agent");
    let value: Option<tonic::metadata::MetadataValue<_>> =
        authorization.map(|a| a.parse().expect("header value"));
    let add: AddAuth = Box::new(move |mut r: Request<()>| {
        if let Some(v) = &value {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    });
    NodeAgentClient::with_interceptor(channel, add)
}

/// A client with the right token, and the watch it opened.
async fn watch(addr: SocketAddr) -> (Client, tonic::Streaming<NodeStatus>) {
    let mut client = client(addr, Some(&format!("Bearer {TOKEN}"))).await;
    let stream = client
        .watch_node_status(WatchNodeStatusRequest {})
        .await
        .expect("watch")
        .into_inner();
    (client, stream)
}

/// Reads statuses until one satisfies `pred`, or fails after `limit`.
async fn next_matching(
    stream: &mut tonic::Streaming<NodeStatus>,
    limit: Duration,
    what: &str,
    pred: impl Fn(&NodeStatus) -> bool,
) -> NodeStatus {
    let wait = async {
        loop {
            let status = stream
                .message()
                .await
                .expect("the watch stream")
                .expect("the watch stream ended");
            if pred(&status) {
                return status;
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .unwrap_or_else(|_| panic!("no status with {what} within {limit:?}"))
}

fn free(status: &NodeStatus) -> Option<u32> {
    status.pools.first().map(|p| p.free)
}

#[tokio::test]
async fn a_claim_reaches_a_watcher_within_100ms() {
    let rig = rig().await;
    let (_client, mut stream) = watch(rig.agent).await;
    let full = next_matching(&mut stream, Duration::from_secs(10), "a full pool", |s| {
        free(s) == Some(2)
    })
    .await;
    assert_eq!(full.node_name, "node-a");
    let pool = &full.pools[0];
    assert_eq!(
        (
            pool.name.as_str(),
            pool.handler.as_str(),
            pool.upstream_handler.as_str()
        ),
        ("fast-runc", "fast-runc", "runc")
    );
    assert_eq!(pool.shape, "seccomp=unconfined");
    assert_eq!((pool.desired, pool.claimed), (2, 0));

    let mut latencies = Vec::new();
    let mut last = full;
    for round in 0..POOL_SIZE {
        let before = last.generation;
        let claimed_at = Instant::now();
        let sandbox_id = rig.pools.claim().await;
        assert_eq!(sandbox_id.len(), 64);
        let want = u32::try_from(POOL_SIZE - round - 1).expect("small");
        last = next_matching(&mut stream, Duration::from_millis(100), "the claim", |s| {
            free(s) == Some(want)
        })
        .await;
        latencies.push(claimed_at.elapsed());
        assert!(last.generation > before, "generation moves forward");
    }
    eprintln!("claim → watcher latency: {latencies:?}");
    // The claims themselves are reported once the pods hold them (maybe in
    // the status already seen: updates are coalesced).
    if last.pools[0].claimed != 2 {
        last = next_matching(&mut stream, Duration::from_millis(100), "2 claimed", |s| {
            s.pools[0].claimed == 2
        })
        .await;
    }
    assert_eq!(free(&last), Some(0));
}

#[tokio::test]
async fn status_reports_images_and_health() {
    let rig = rig().await;
    let (mut client, mut stream) = watch(rig.agent).await;
    let status = next_matching(&mut stream, Duration::from_secs(10), "images", |s| {
        !s.images.is_empty()
    })
    .await;
    assert_eq!(
        status.images[0].repo_tags,
        vec!["127.0.0.1:5000/busybox:v1"]
    );
    assert_eq!(
        status.images[0].repo_digests,
        vec!["127.0.0.1:5000/busybox@sha256:1"]
    );
    assert_eq!(status.images[0].size_bytes, 1_234_567);
    let health = status.health.expect("health");
    assert!(health.ready && health.upstream_reachable, "{health:?}");
    assert!(!status.boot_id.is_empty());

    let pulled = client
        .get_node_status(GetNodeStatusRequest {})
        .await
        .expect("get")
        .into_inner();
    assert_eq!(pulled.node_name, "node-a");
    assert!(pulled.generation >= status.generation);
}

#[tokio::test]
async fn a_watcher_sees_the_node_go_unready_and_back_with_the_reason() {
    let rig = rig().await;
    let (mut client, mut stream) = watch(rig.agent).await;
    let first = next_matching(&mut stream, Duration::from_secs(10), "ready", |s| {
        s.health.as_ref().is_some_and(|h| h.ready)
    })
    .await;

    rig.pools
        .health
        .set_upstream(Err(Status::deadline_exceeded("no answer within 1s")));
    let down = next_matching(&mut stream, Duration::from_secs(1), "not ready", |s| {
        s.health.as_ref().is_some_and(|h| !h.ready)
    })
    .await;
    let health = down.health.clone().expect("health");
    assert!(!health.upstream_reachable, "{health:?}");
    assert!(
        health.message.contains("does not answer Version")
            && health.message.contains("no answer within 1s"),
        "{health:?}"
    );
    assert!(
        down.generation > first.generation,
        "a health change is a change"
    );
    let pulled = client
        .get_node_status(GetNodeStatusRequest {})
        .await
        .expect("get")
        .into_inner();
    assert!(
        !pulled.health.expect("health").ready,
        "GetNodeStatus agrees"
    );

    rig.pools.health.set_upstream(Ok(()));
    let up = next_matching(&mut stream, Duration::from_secs(1), "ready again", |s| {
        s.health.as_ref().is_some_and(|h| h.ready)
    })
    .await;
    let health = up.health.expect("health");
    assert!(
        health.upstream_reachable && health.message.is_empty(),
        "{health:?}"
    );
    assert!(up.generation > down.generation);
}

#[tokio::test]
async fn every_call_needs_the_token_and_gets_no_data_without_it() {
    let rig = rig().await;
    for auth in [
        None,
        Some("Bearer wrong-token".to_owned()),
        Some(format!("Bearer {TOKEN}x")),
        Some(TOKEN.to_owned()),
        Some(format!("Basic {TOKEN}")),
    ] {
        let mut client = client(rig.agent, auth.as_deref()).await;
        let get = client
            .get_node_status(GetNodeStatusRequest {})
            .await
            .expect_err("status without the token");
        assert_eq!(get.code(), Code::Unauthenticated, "{auth:?}");
        assert!(!get.message().contains("node-a"), "{}", get.message());
        let watch = client
            .watch_node_status(WatchNodeStatusRequest {})
            .await
            .expect_err("watch without the token");
        assert_eq!(watch.code(), Code::Unauthenticated, "{auth:?}");
        let set = client
            .set_pool_size(SetPoolSizeRequest {
                handler: "fast-runc".into(),
                shape: "seccomp=unconfined".into(),
                size: 7,
            })
            .await
            .expect_err("set without the token");
        assert_eq!(set.code(), Code::Unauthenticated, "{auth:?}");
    }
    assert_eq!(
        rig.pools.manager.stats()[0].desired,
        POOL_SIZE,
        "no size changed"
    );
}

#[tokio::test]
async fn set_pool_size_by_handler_and_shape() {
    let rig = rig().await;
    let (mut client, mut stream) = watch(rig.agent).await;
    let answer = client
        .set_pool_size(SetPoolSizeRequest {
            handler: "fast-runc".into(),
            shape: "seccomp=unconfined".into(),
            size: 3,
        })
        .await
        .expect("set")
        .into_inner();
    assert_eq!(answer.pool, "fast-runc");
    next_matching(&mut stream, Duration::from_secs(10), "3 free of 3", |s| {
        s.pools[0].desired == 3 && s.pools[0].free == 3
    })
    .await;

    let unknown = client
        .set_pool_size(SetPoolSizeRequest {
            handler: "fast-runc".into(),
            shape: "seccomp=runtime-default".into(),
            size: 1,
        })
        .await
        .expect_err("no such pool");
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown.message().contains("runtime-default"),
        "{}",
        unknown.message()
    );
    let huge = client
        .set_pool_size(SetPoolSizeRequest {
            handler: "fast-runc".into(),
            shape: "seccomp=unconfined".into(),
            size: 100_000,
        })
        .await
        .expect_err("too large");
    assert_eq!(huge.code(), Code::InvalidArgument);
    assert!(huge.message().contains("size"), "{}", huge.message());
    assert_eq!(rig.pools.manager.stats()[0].desired, 3);
}
