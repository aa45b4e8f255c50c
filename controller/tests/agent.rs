//! The controller's gRPC node directory (`controller/src/agent.rs`) against
//! a real node agent (`fast-sandbox-node`'s `agent::bind`) in process, over
//! gRPC on 127.0.0.1, in front of a `PoolManager` and a small fake CRI
//! upstream (`fast_sandbox_tests::fake_cri`). No root, no containerd, no
//! cluster.
//!
//! Every wait is on a condition with a deadline: snapshot changes through
//! `subscribe()`, connection health polled in 5 ms steps.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use fast_sandbox_controller::{
    agent::{AgentConfig, AgentDirectory, AgentError, AgentToken, NodeHealth},
    nodes::{NodeDirectory, NodeError, PoolSize, SandboxShape},
    scoring::{Policy, Rejection, Request as Placement, Scorer, Snapshot},
};
use fast_sandbox_node::agent as node_agent;
use fast_sandbox_tests::fake_cri::PoolRig;
use tokio::sync::oneshot;

const TOKEN: &str = "test-token-0123456789";
const NODE: &str = "node-a";
const HANDLER: &str = "fast-runc";
const SHAPE: &str = "seccomp=unconfined";
const POOL_SIZE: usize = 2;

/// A running node agent.
struct Agent {
    address: SocketAddr,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    /// Stops the agent and waits (bounded) until it no longer serves.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.served)
            .await
            .expect("the agent stops within 10 s")
            .expect("the agent task")
            .expect("the agent served");
    }
}

/// The fake upstream and a pool manager keeping `POOL_SIZE` slots in pool
/// `HANDLER`; agents are started (and stopped) in front of it with
/// [`start_agent`].
async fn rig() -> PoolRig {
    PoolRig::start(HANDLER, POOL_SIZE).await
}

/// Serves the node agent of `NODE` in front of `rig` on `address` (port 0:
/// any free one).
async fn start_agent(rig: &PoolRig, address: SocketAddr) -> Agent {
    serve(address, rig.agent_parts(NODE, TOKEN)).await
}

/// Serves `parts` on `address` until the returned agent is stopped.
async fn serve(address: SocketAddr, parts: node_agent::AgentParts) -> Agent {
    let (stop, stopped) = oneshot::channel::<()>();
    let (address, server) = node_agent::bind(address, parts, async move {
        let _ = stopped.await;
    })
    .await
    .expect("agent binds");
    Agent {
        address,
        stop,
        served: tokio::spawn(server),
    }
}

/// A directory with test timings: fast retries, a slow refresh (so every
/// snapshot change a test sees comes from a report or a node change).
fn directory(token: &str) -> AgentDirectory {
    let mut config = AgentConfig::new(AgentToken::new(token).expect("token"));
    config.backoff_initial = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(100);
    config.call_timeout = Duration::from_secs(2);
    config.keepalive = Duration::from_secs(2);
    config.refresh = Duration::from_secs(600);
    AgentDirectory::new(config)
}

/// Waits until the directory's snapshot satisfies `pred`, woken by its
/// change counter; fails after `limit`.
async fn snapshot_until(
    directory: &AgentDirectory,
    limit: Duration,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let mut changes = directory.subscribe();
    let wait = async {
        loop {
            changes.borrow_and_update();
            let snapshot = directory.snapshot();
            if pred(&snapshot) {
                return snapshot;
            }
            changes.changed().await.expect("the directory lives");
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .unwrap_or_else(|_| panic!("no snapshot with {what} within {limit:?}"))
}

/// Polls the node's health every 5 ms until `pred` holds; fails after
/// `limit`.
async fn health_until(
    directory: &AgentDirectory,
    node: &str,
    limit: Duration,
    what: &str,
    pred: impl Fn(&NodeHealth) -> bool,
) -> NodeHealth {
    let deadline = Instant::now() + limit;
    loop {
        let health = directory.health(node).expect("node known");
        if pred(&health) {
            return health;
        }
        assert!(
            Instant::now() < deadline,
            "no health with {what} within {limit:?}: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The node's pool as the snapshot holds it: (ready, free, total).
fn pool(snapshot: &Snapshot) -> Option<(bool, u32, u32)> {
    let node = snapshot.node(NODE)?;
    let pool = node
        .pools
        .iter()
        .find(|p| p.handler == HANDLER && p.shape == SHAPE)?;
    Some((node.ready, pool.free, pool.total))
}

fn size(size: u32) -> PoolSize {
    PoolSize {
        pool: "p".into(),
        handler: HANDLER.into(),
        shape: SandboxShape::default(),
        shape_key: SHAPE.into(),
        size,
    }
}

/// Waits (10 s at most) until the node's pool is ready and full.
async fn full_pool(directory: &AgentDirectory) -> Arc<Snapshot> {
    snapshot_until(directory, Duration::from_secs(10), "a full pool", |s| {
        pool(s) == Some((true, 2, 2))
    })
    .await
}

/// Connects `directory` to `agent` and waits for the full pool.
async fn follow(directory: &AgentDirectory, agent: &Agent) {
    directory
        .upsert(NODE, &agent.address.to_string())
        .expect("upsert");
    full_pool(directory).await;
}

#[tokio::test]
async fn a_claim_on_the_node_is_in_the_snapshot_within_100ms() {
    let rig = rig().await;
    let agent = start_agent(&rig, "127.0.0.1:0".parse().expect("addr")).await;
    let directory = directory(TOKEN);
    follow(&directory, &agent).await;
    let snapshot = directory.snapshot();
    let node = snapshot.node(NODE).expect("node");
    assert_eq!(node.pools[0].upstream_handler, "runc");
    assert_eq!(node.images[0].tags, ["127.0.0.1:5000/busybox:v1"]);
    assert_eq!(node.images[0].size_bytes, 1_234_567);
    let health = directory.health(NODE).expect("health");
    assert!(health.connected && health.reports >= 1, "{health:?}");

    // The controller places a pod here and counts it at once; the node's
    // report of the claim settles that assumption.
    directory.assume(NODE, HANDLER, SHAPE);
    assert_eq!(directory.snapshot().assumed(NODE, HANDLER, SHAPE), Ok(1));

    let mut latencies = Vec::new();
    for want in (0..POOL_SIZE as u32).rev() {
        let claimed_at = Instant::now();
        rig.claim().await;
        // Free one fewer, claimed one more (total = free + claimed: while
        // the claim is under way the slot is in neither).
        let snapshot = snapshot_until(&directory, Duration::from_millis(100), "the claim", |s| {
            pool(s) == Some((true, want, 2))
        })
        .await;
        let latency = claimed_at.elapsed();
        latencies.push(latency);
        assert!(latency < Duration::from_millis(100), "{latency:?}");
        // The free count moved in place: the node is still ready, its
        // assumption settled by the first claim.
        assert_eq!(pool(&snapshot), Some((true, want, 2)));
    }
    snapshot_until(&directory, Duration::from_millis(100), "settled", |s| {
        s.assumed(NODE, HANDLER, SHAPE) == Ok(0)
    })
    .await;
    eprintln!("claim → controller snapshot latency: {latencies:?}");

    // A pool change on the node (its desired size) is reported at once,
    // and a slot not built yet counts neither as free nor as taken: the
    // total stays the slots that exist (free + claimed).
    let resized_at = Instant::now();
    let reports = directory.health(NODE).expect("health").reports;
    assert!(rig.manager.set_size(HANDLER, 3));
    health_until(
        &directory,
        NODE,
        Duration::from_millis(100),
        "the resize reported",
        |h| h.reports > reports,
    )
    .await;
    assert_eq!(pool(&directory.snapshot()), Some((true, 0, 2)));
    eprintln!(
        "pool resize → controller report latency: {:?}",
        resized_at.elapsed()
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_wrong_token_gets_no_data_and_the_node_is_unhealthy() {
    let rig = rig().await;
    let agent = start_agent(&rig, "127.0.0.1:0".parse().expect("addr")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "wrong-token\n").expect("write token");
    let mut config = AgentConfig::new(AgentToken::from_file(&token_file).expect("token"));
    config.token_file = Some(token_file.clone());
    config.backoff_initial = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(50);
    config.refresh = Duration::from_secs(600);
    let directory = AgentDirectory::new(config);
    directory
        .upsert(NODE, &agent.address.to_string())
        .expect("upsert");

    // Refused, and retried: several failures, every one Unauthenticated.
    let health = health_until(
        &directory,
        NODE,
        Duration::from_secs(10),
        "3 refusals",
        |h| h.failures >= 3,
    )
    .await;
    assert!(
        matches!(health.last_error, Some(AgentError::Unauthenticated { .. })),
        "{health:?}"
    );
    assert!(!health.connected);
    assert_eq!(health.reports, 0);
    let message = health.last_error.expect("error").to_string();
    assert!(message.contains("token"), "{message}");
    // No data: the node is known but not ready, with no pools or images,
    // so no placement goes there.
    let snapshot = directory.snapshot();
    let node = snapshot.node(NODE).expect("the node is listed");
    assert!(!node.ready && node.pools.is_empty() && node.images.is_empty());
    let request = Placement {
        handler: HANDLER.into(),
        shape: SHAPE.into(),
        images: Vec::new(),
    };
    let scorer = Scorer::new(&snapshot, &request, Policy::default(), 0);
    assert_eq!(scorer.score(NODE), Err(Rejection::NotReady));
    // Pushes are refused too, and say why.
    match directory.set_pool_size(NODE, &size(1)).await {
        Err(NodeError::Refused { reason, .. }) => assert!(reason.contains("token"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(rig.manager.stats()[0].desired, POOL_SIZE);

    // The Secret is rotated to the right token: re-read after the next
    // refusal, and the node reports.
    std::fs::write(&token_file, TOKEN).expect("write token");
    full_pool(&directory).await;
    agent.stop().await;
}

#[tokio::test]
async fn set_pool_size_reaches_the_nodes_pool() {
    let rig = rig().await;
    let agent = start_agent(&rig, "127.0.0.1:0".parse().expect("addr")).await;
    let directory = directory(TOKEN);
    follow(&directory, &agent).await;

    directory
        .set_pool_size(NODE, &size(3))
        .await
        .expect("pushed");
    assert_eq!(rig.manager.stats()[0].desired, 3);
    snapshot_until(&directory, Duration::from_secs(10), "3 free of 3", |s| {
        pool(s) == Some((true, 3, 3))
    })
    .await;

    // A pool the node does not have: refused as such, with the node's
    // reason.
    let mut other = size(1);
    other.shape_key = "seccomp=runtime-default".into();
    match directory.set_pool_size(NODE, &other).await {
        Err(NodeError::NoSuchPool { reason, .. }) => {
            assert!(reason.contains("runtime-default"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        directory.set_pool_size("node-b", &size(1)).await,
        Err(NodeError::UnknownNode("node-b".into()))
    );

    // Unchanged sizes are not sent again: with the agent gone, the same
    // size still succeeds (nothing to send), a new one cannot be sent.
    agent.stop().await;
    snapshot_until(&directory, Duration::from_secs(10), "not ready", |s| {
        pool(s).is_some_and(|p| !p.0)
    })
    .await;
    directory
        .set_pool_size(NODE, &size(3))
        .await
        .expect("unchanged: skipped");
    match directory.set_pool_size(NODE, &size(4)).await {
        Err(NodeError::Unreachable { .. } | NodeError::Timeout { .. }) => {}
        other => panic!("expected the node to be unreachable, got {other:?}"),
    }
    assert_eq!(rig.manager.stats()[0].desired, 3);
}

#[tokio::test]
async fn a_stopped_agent_makes_the_node_stale_and_a_restarted_one_is_followed_again() {
    let rig = rig().await;
    let agent = start_agent(&rig, "127.0.0.1:0".parse().expect("addr")).await;
    let address = agent.address;
    let directory = directory(TOKEN);
    follow(&directory, &agent).await;
    let seen = directory
        .snapshot()
        .node(NODE)
        .expect("node")
        .last_seen_unix_ms;
    let request = Placement {
        handler: HANDLER.into(),
        shape: SHAPE.into(),
        images: Vec::new(),
    };

    agent.stop().await;
    let down = snapshot_until(&directory, Duration::from_secs(10), "not ready", |s| {
        pool(s).is_some_and(|p| !p.0)
    })
    .await;
    let node = down.node(NODE).expect("still listed");
    assert_eq!(node.last_seen_unix_ms, seen, "last-seen time frozen");
    assert_eq!(
        Scorer::new(&down, &request, Policy::default(), 0).score(NODE),
        Err(Rejection::NotReady)
    );
    // It keeps trying while the agent is down.
    let health = health_until(
        &directory,
        NODE,
        Duration::from_secs(10),
        "2 failures",
        |h| h.failures >= 2,
    )
    .await;
    assert!(!health.connected, "{health:?}");

    // Back on the same address: the directory reconnects by itself.
    let agent = start_agent(&rig, address).await;
    let up = snapshot_until(&directory, Duration::from_secs(10), "ready again", |s| {
        pool(s) == Some((true, 2, 2))
    })
    .await;
    assert!(Scorer::new(&up, &request, Policy::default(), 0)
        .score(NODE)
        .is_ok());
    let health = directory.health(NODE).expect("health");
    assert!(health.connected && health.failures == 0, "{health:?}");
    // And it follows the new process's changes.
    rig.claim().await;
    snapshot_until(&directory, Duration::from_millis(100), "the claim", |s| {
        pool(s) == Some((true, 1, 2))
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn a_node_removed_from_the_directory_is_dropped_from_the_snapshot() {
    let rig = rig().await;
    let agent = start_agent(&rig, "127.0.0.1:0".parse().expect("addr")).await;
    let directory = directory(TOKEN);
    follow(&directory, &agent).await;
    // A second node whose agent is not there: listed, never ready.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dead = silent.local_addr().expect("addr");
    drop(silent);
    directory
        .upsert("node-b", &dead.to_string())
        .expect("upsert");
    let health = health_until(
        &directory,
        "node-b",
        Duration::from_secs(10),
        "a failure",
        |h| h.failures >= 1,
    )
    .await;
    assert!(
        matches!(health.last_error, Some(AgentError::Unreachable { .. })),
        "{health:?}"
    );
    assert_eq!(directory.snapshot().len(), 2);

    let mut changes = directory.subscribe();
    changes.borrow_and_update();
    assert!(directory.remove(NODE));
    assert!(
        changes.has_changed().expect("directory lives"),
        "subscribers told"
    );
    let snapshot = directory.snapshot();
    assert!(snapshot.node(NODE).is_none());
    assert_eq!(snapshot.len(), 1);
    assert!(directory.health(NODE).is_none());
    assert_eq!(
        directory.set_pool_size(NODE, &size(3)).await,
        Err(NodeError::UnknownNode(NODE.into()))
    );
    assert!(!directory.remove(NODE));
    // Its stream is gone: node changes no longer reach the snapshot.
    rig.claim().await;
    assert!(directory.remove("node-b"));
    assert!(directory.snapshot().is_empty());
    assert_eq!(directory.node_names(), Vec::<String>::new());
    agent.stop().await;
}

/// A Node as the API server serves it, with its `InternalIP`.
fn api_node(name: &str, ip: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "resourceVersion": "1",
            "labels": {"node-restriction.kubernetes.io/fast-sandbox": "true"},
        },
        "status": {"addresses": [
            {"type": "Hostname", "address": name},
            {"type": "InternalIP", "address": ip},
        ]},
    })
}

type ApiRequest = http::Request<kube::client::Body>;
type ApiResponse = http::Response<kube::client::Body>;

/// The next request of the discovery's Node watch, within 5 s.
async fn next_request(
    handle: &mut tower_test::mock::Handle<ApiRequest, ApiResponse>,
) -> (ApiRequest, tower_test::mock::SendResponse<ApiResponse>) {
    tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("the node watch sent a request in time")
        .expect("the client is alive")
}

/// A directory following the Nodes a scripted API server lists
/// (`selector` as given), the agents at `agent`'s port; the discovery task
/// and the API server's handle.
fn discovering(
    agent: &Agent,
    selector: Option<&'static str>,
) -> (
    Arc<AgentDirectory>,
    tower_test::mock::Handle<ApiRequest, ApiResponse>,
    tokio::task::JoinHandle<()>,
) {
    let (mock, handle) = tower_test::mock::pair::<ApiRequest, ApiResponse>();
    let client = kube::Client::new(mock, "default");
    let directory = Arc::new(directory(TOKEN));
    let following = directory.clone();
    let port = agent.address.port();
    let discovery = tokio::spawn(async move {
        following
            .discover(kube::Api::all(client), selector, port)
            .await;
    });
    (directory, handle, discovery)
}

/// Answers a Node list request with `items`.
fn send_node_list(
    respond: tower_test::mock::SendResponse<ApiResponse>,
    items: Vec<serde_json::Value>,
) {
    let list = serde_json::json!({
        "apiVersion": "v1",
        "kind": "NodeList",
        "metadata": {"resourceVersion": "1"},
        "items": items,
    });
    respond.send_response(
        http::Response::builder()
            .body(kube::client::Body::from(
                serde_json::to_vec(&list).expect("JSON"),
            ))
            .expect("response"),
    );
}

#[tokio::test]
async fn nodes_are_discovered_from_the_node_watch_and_dropped_when_deleted() {
    let rig = rig().await;
    let agent = start_agent(&rig, "127.0.0.1:0".parse().expect("addr")).await;
    let selector = Some(fast_sandbox_controller::agent::DEFAULT_NODE_SELECTOR);
    let (directory, mut handle, discovery) = discovering(&agent, selector);

    // The list: only the selected Nodes. The agent is found at the Node's
    // InternalIP and the agent port, and reports.
    let (request, respond) = next_request(&mut handle).await;
    let uri = request.uri().to_string();
    assert_eq!(request.method(), http::Method::GET);
    assert!(uri.starts_with("/api/v1/nodes?"), "{uri}");
    assert!(
        uri.contains("labelSelector=node-restriction.kubernetes.io%2Ffast-sandbox%3Dtrue"),
        "{uri}"
    );
    assert!(!uri.contains("watch=true"), "a list first: {uri}");
    send_node_list(respond, vec![api_node(NODE, "127.0.0.1")]);
    full_pool(&directory).await;
    assert_eq!(
        directory.health(NODE).expect("health").address,
        agent.address.to_string()
    );

    // The watch: the Node is deleted, and so dropped from the snapshot.
    let (request, respond) = next_request(&mut handle).await;
    let uri = request.uri().to_string();
    assert!(uri.contains("watch=true"), "{uri}");
    let mut event = serde_json::to_vec(&serde_json::json!({
        "type": "DELETED",
        "object": api_node(NODE, "127.0.0.1"),
    }))
    .expect("JSON");
    event.push(b'\n');
    respond.send_response(
        http::Response::builder()
            .body(kube::client::Body::from(event))
            .expect("response"),
    );
    snapshot_until(&directory, Duration::from_secs(10), "no node", |s| {
        s.is_empty()
    })
    .await;
    assert!(directory.health(NODE).is_none());
    discovery.abort();
    agent.stop().await;
}

// ---- Mutual TLS (controller/src/agent/tls.rs, node-plugin/src/agent/tls.rs)

use fast_sandbox_controller::certs::{Ca, CertError, Issued, DEFAULT_DAYS};
use fast_sandbox_proto::tls::{client_config, server_config, Reloading, TlsFiles};

/// `issued` and `ca`'s certificate in a new directory, as both ends read
/// them.
fn credential(ca: &Ca, issued: Result<Issued, CertError>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    ca.write_dir(&issued.expect("issued"), dir.path())
        .expect("write");
    dir
}

/// Serves the agent of `NODE` over mutual TLS with the credential in `dir`.
async fn start_tls_agent(rig: &PoolRig, dir: &std::path::Path) -> Agent {
    let mut parts = rig.agent_parts(NODE, TOKEN);
    parts.token = None;
    parts.tls = Some(Arc::new(
        Reloading::new(TlsFiles::in_dir(dir), server_config).expect("agent credential"),
    ));
    serve("127.0.0.1:0".parse().expect("addr"), parts).await
}

/// A directory dialling over mutual TLS with the credential in `dir`, no
/// token, test timings.
fn tls_directory(dir: &std::path::Path) -> AgentDirectory {
    let tls = Reloading::new(TlsFiles::in_dir(dir), client_config).expect("controller credential");
    let mut config = AgentConfig::with_credentials(None, Some(Arc::new(tls)));
    config.backoff_initial = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(50);
    config.call_timeout = Duration::from_secs(2);
    config.refresh = Duration::from_secs(600);
    AgentDirectory::new(config)
}

/// The node was dialled at least three times and never reported.
async fn refused_three_times(directory: &AgentDirectory) {
    let health = health_until(
        directory,
        NODE,
        Duration::from_secs(10),
        "3 failures",
        |h| h.failures >= 3,
    )
    .await;
    assert!(!health.connected && health.reports == 0, "{health:?}");
    let node = directory.snapshot();
    let node = node.node(NODE).expect("listed");
    assert!(!node.ready && node.pools.is_empty(), "{node:?}");
}

#[tokio::test]
async fn over_mutual_tls_the_node_reports_and_takes_pool_sizes() {
    let rig = rig().await;
    let ca = Ca::generate().expect("CA");
    let agent_dir = credential(&ca, ca.issue_node(NODE, DEFAULT_DAYS));
    let controller_dir = credential(&ca, ca.issue_controller(DEFAULT_DAYS));
    let agent = start_tls_agent(&rig, agent_dir.path()).await;
    let directory = tls_directory(controller_dir.path());
    follow(&directory, &agent).await;
    directory
        .set_pool_size(NODE, &size(3))
        .await
        .expect("pushed");
    assert_eq!(rig.manager.stats()[0].desired, 3);
    agent.stop().await;
}

/// An agent whose certificate names another node (a node answering on an
/// address its kubelet wrote for another Node), or comes from another CA,
/// gets no call; a client presenting a node's certificate (server
/// authentication only) or none is refused by the agent.
#[tokio::test]
async fn an_agent_without_a_valid_credential_gets_nothing() {
    let rig = rig().await;
    let ca = Ca::generate().expect("CA");
    let controller_dir = credential(&ca, ca.issue_controller(DEFAULT_DAYS));

    // The agent of node-b answers where node-a was expected.
    let impostor = credential(&ca, ca.issue_node("node-b", DEFAULT_DAYS));
    let agent = start_tls_agent(&rig, impostor.path()).await;
    let directory = tls_directory(controller_dir.path());
    directory
        .upsert(NODE, &agent.address.to_string())
        .expect("upsert");
    refused_three_times(&directory).await;
    let error = directory.health(NODE).and_then(|h| h.last_error);
    let reason = error.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        reason.contains("TLS handshake as node \"node-a\"") && reason.contains("certificate"),
        "the log says why: {reason}"
    );
    let pushed = directory.set_pool_size(NODE, &size(1)).await;
    assert!(pushed.is_err(), "{pushed:?}");
    assert_eq!(rig.manager.stats()[0].desired, POOL_SIZE);
    agent.stop().await;

    // A certificate for node-a, but from a CA the controller does not trust.
    let other = Ca::generate().expect("other CA");
    let foreign = credential(&other, other.issue_node(NODE, DEFAULT_DAYS));
    let agent = start_tls_agent(&rig, foreign.path()).await;
    let directory = tls_directory(controller_dir.path());
    directory
        .upsert(NODE, &agent.address.to_string())
        .expect("upsert");
    refused_three_times(&directory).await;
    agent.stop().await;

    // The right agent, but the caller holds only a node's certificate.
    let good = credential(&ca, ca.issue_node(NODE, DEFAULT_DAYS));
    let agent = start_tls_agent(&rig, good.path()).await;
    let as_node = credential(&ca, ca.issue_node("node-c", DEFAULT_DAYS));
    let directory = tls_directory(as_node.path());
    directory
        .upsert(NODE, &agent.address.to_string())
        .expect("upsert");
    refused_three_times(&directory).await;

    // And a cleartext caller with the right token gets nothing either.
    let plain = self::directory(TOKEN);
    plain
        .upsert(NODE, &agent.address.to_string())
        .expect("upsert");
    refused_three_times(&plain).await;
    agent.stop().await;
}

/// The agent's credential is replaced on disk (a rotation to a new CA):
/// the same agent process serves the new one from the next handshake, and
/// the controller, trusting only the new CA, gets its reports.
#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let rig = rig().await;
    let (old, new) = (Ca::generate().expect("CA"), Ca::generate().expect("CA"));
    let agent_dir = credential(&old, old.issue_node(NODE, DEFAULT_DAYS));
    let controller_dir = credential(&new, new.issue_controller(DEFAULT_DAYS));
    let agent = start_tls_agent(&rig, agent_dir.path()).await;
    let directory = tls_directory(controller_dir.path());
    directory
        .upsert(NODE, &agent.address.to_string())
        .expect("upsert");
    refused_three_times(&directory).await;

    let rotated = new.issue_node(NODE, DEFAULT_DAYS).expect("node");
    new.write_dir(&rotated, agent_dir.path()).expect("rotate");
    full_pool(&directory).await;
    agent.stop().await;
}

/// `SetPoolSize` keeps the sum of all pools' sizes within the node's
/// `agent.max_slots`, and says which setting refused it.
#[tokio::test]
async fn the_node_wide_slot_cap_is_enforced() {
    let rig = rig().await;
    let mut parts = rig.agent_parts(NODE, TOKEN);
    parts.max_slots = 3;
    let agent = serve("127.0.0.1:0".parse().expect("addr"), parts).await;
    let directory = directory(TOKEN);
    follow(&directory, &agent).await;
    directory
        .set_pool_size(NODE, &size(3))
        .await
        .expect("within the cap");
    match directory.set_pool_size(NODE, &size(4)).await {
        Err(NodeError::Refused { reason, .. }) => {
            assert!(reason.contains("agent.max_slots (3)"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(rig.manager.stats()[0].desired, 3);
    agent.stop().await;
}

/// A Node that carries only the old opt-in label (which its own kubelet
/// may have set) is not dialled even when the selector lets it through;
/// the one an administrator labelled is.
#[tokio::test]
async fn a_self_labelled_node_is_not_dialled() {
    let rig = rig().await;
    let agent = start_agent(&rig, "127.0.0.1:0".parse().expect("addr")).await;
    let (directory, mut handle, discovery) = discovering(&agent, None);
    let mut self_labelled = api_node("node-b", "127.0.0.1");
    self_labelled["metadata"]["labels"] = serde_json::json!({"fast-sandbox.io/node": "true"});
    let (_, respond) = next_request(&mut handle).await;
    send_node_list(respond, vec![self_labelled, api_node(NODE, "127.0.0.1")]);
    let snapshot = full_pool(&directory).await;
    assert!(snapshot.node("node-b").is_none());
    assert!(directory.health("node-b").is_none());
    discovery.abort();
    agent.stop().await;
}
