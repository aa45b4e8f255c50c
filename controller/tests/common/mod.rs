//! What the controller's API-level tests share: a scripted API server
//! (kube-rs `tower-test`) that asserts every request in order, and the
//! fixtures (nodes, pools, Sandboxes, pods) the scenarios are built from.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fast_sandbox_controller::crd::{
    NodePoolStatus, Sandbox, SandboxPool, SandboxPoolSpec, SandboxPoolStatus, SandboxSpec,
    SlotRange, POOL_LABEL, SANDBOX_LABEL,
};
use fast_sandbox_controller::nodes::{SandboxShape, StaticNodes};
use fast_sandbox_controller::reconcile::{Context, ReconcileConfig};
use fast_sandbox_controller::scoring::{CachedImage, NodeState, PoolState, Snapshot};
use fast_sandbox_controller::{pool, sandbox};
use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Node;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::reflector;
use kube::runtime::watcher;
use kube::Client;
use serde_json::{json, Value};

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
pub type Respond = tower_test::mock::SendResponse<Response<Body>>;

pub const NOW_MS: u64 = 1_700_000_000_000;
pub const HANDLER: &str = "fast-runc";
pub const SHAPE: &str = "seccomp=runtime-default";
pub const MIB: u64 = 1024 * 1024;

// ---- the scripted API server ------------------------------------------------

/// The next request: method, path with query, JSON body (Null if none).
pub async fn next(handle: &mut Handle) -> (Method, String, Value, Respond) {
    let (request, respond) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("the reconciler sent a request in time")
        .expect("the client is alive");
    let method = request.method().clone();
    let uri = request.uri().to_string();
    let bytes = request
        .into_body()
        .collect_bytes()
        .await
        .expect("a readable body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("a JSON body")
    };
    (method, uri, body, respond)
}

pub fn reply(respond: Respond, status: u16, body: &Value) {
    respond.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).expect("JSON")))
            .expect("a response"),
    );
}

pub fn not_found(respond: Respond, what: &str) {
    reply(
        respond,
        404,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    );
}

/// Runs `reconcile` against `script`, then checks that the script saw every
/// request: once the reconcile is done and the client dropped, no request
/// may be left.
pub async fn scenario<R, S>(ctx: Context, mut handle: Handle, reconcile: R, script: S) -> Action
where
    R: FnOnce(Arc<Context>) -> futures::future::BoxFuture<'static, Result<Action, String>>,
    S: FnOnce(Handle) -> futures::future::BoxFuture<'static, Handle>,
{
    let ctx = Arc::new(ctx);
    handle.allow(100);
    let server = tokio::spawn(script(handle));
    let action = reconcile(ctx)
        .await
        .unwrap_or_else(|e| panic!("reconcile failed: {e}"));
    let mut handle = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the script finished")
        .expect("the script did not panic");
    let extra = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("the client was dropped");
    if let Some((request, _)) = extra {
        panic!("unexpected request {} {}", request.method(), request.uri());
    }
    action
}

/// One request a reconcile must make next, and the scripted answer.
pub struct Call {
    method: Method,
    /// The path, without the query.
    path: String,
    /// Checks on the request's JSON body (`Null` when it has none).
    check: Box<dyn FnOnce(&Value) + Send>,
    answer: Answer,
}

/// What the scripted API server answers a [`Call`].
pub enum Answer {
    /// This status and JSON body.
    Json(u16, Value),
    /// 404, the object is not there.
    NotFound,
    /// 201 with the request's own body, given a uid: a created object.
    Created,
    /// 409, the object exists already.
    AlreadyExists,
}

impl Call {
    fn new(method: Method, path: impl Into<String>) -> Self {
        Call {
            method,
            path: path.into(),
            check: Box::new(|_| {}),
            answer: Answer::Json(200, Value::Null),
        }
    }

    pub fn get(path: impl Into<String>) -> Self {
        Call::new(Method::GET, path)
    }

    pub fn post(path: impl Into<String>) -> Self {
        Call::new(Method::POST, path).answer(Answer::Created)
    }

    pub fn patch(path: impl Into<String>) -> Self {
        Call::new(Method::PATCH, path)
    }

    /// A status patch of Sandbox `name`, answered with a Sandbox.
    pub fn sandbox_status(name: &str) -> Self {
        Call::patch(format!("{SANDBOXES}/{name}/status")).answer(Answer::Json(
            200,
            json!({"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox",
                   "metadata": {"name": name, "namespace": "team"}, "spec": {"image": "x"}}),
        ))
    }

    /// Checks the request body with `check`.
    pub fn body(mut self, check: impl FnOnce(&Value) + Send + 'static) -> Self {
        self.check = Box::new(check);
        self
    }

    pub fn answer(mut self, answer: Answer) -> Self {
        self.answer = answer;
        self
    }

    /// Takes the next request, asserts it is this call, answers it.
    async fn serve(self, handle: &mut Handle) {
        let (method, uri, body, respond) = next(handle).await;
        assert_eq!(
            (&method, path(&uri)),
            (&self.method, self.path.as_str()),
            "request {method} {uri}"
        );
        (self.check)(&body);
        match self.answer {
            Answer::Json(status, answer) => reply(respond, status, &answer),
            Answer::NotFound => not_found(respond, "object"),
            Answer::Created => {
                let mut created = body;
                let name = created["metadata"]["name"]
                    .as_str()
                    .unwrap_or("x")
                    .to_owned();
                created["metadata"]["uid"] = json!(format!("pod-{name}"));
                reply(respond, 201, &created);
            }
            Answer::AlreadyExists => reply(
                respond,
                409,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": "already exists", "reason": "AlreadyExists", "code": 409}),
            ),
        }
    }
}

/// A script that serves `calls` in order (for [`scenario`]).
pub fn script(
    calls: Vec<Call>,
) -> impl FnOnce(Handle) -> futures::future::BoxFuture<'static, Handle> {
    move |mut handle| {
        Box::pin(async move {
            for call in calls {
                call.serve(&mut handle).await;
            }
            handle
        })
    }
}

// ---- fixtures ---------------------------------------------------------------

pub fn node_state(name: &str, pools: Vec<PoolState>, images: Vec<CachedImage>) -> NodeState {
    NodeState {
        name: name.into(),
        ready: true,
        pools,
        images,
        last_seen_unix_ms: NOW_MS,
    }
}

pub fn warm(free: u32, total: u32) -> PoolState {
    PoolState {
        handler: HANDLER.into(),
        upstream_handler: "runc".into(),
        shape: SHAPE.into(),
        free,
        total,
    }
}

/// An API Node with `labels`, room for 110 pods, 4 CPUs and 8 GiB.
pub fn api_node(name: &str, labels: &[(&str, &str)]) -> Node {
    let mut node: Node = serde_json::from_value(json!({
        "metadata": {"name": name},
        "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"}}
    }))
    .expect("a Node");
    node.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    node
}

pub fn pool_object(
    name: &str,
    min: u32,
    max: u32,
    status: Option<SandboxPoolStatus>,
) -> SandboxPool {
    let mut pool = SandboxPool::new(
        name,
        SandboxPoolSpec {
            node_selector: BTreeMap::from([("pool".to_owned(), "fast".to_owned())]),
            runtime_class_name: "fast-runc".into(),
            slots_per_node: SlotRange { min, max },
            shape: SandboxShape::default(),
        },
    );
    pool.metadata.uid = Some(format!("uid-{name}"));
    pool.metadata.generation = Some(1);
    pool.metadata.resource_version = Some("1".into());
    pool.metadata.finalizers = Some(vec![pool::FINALIZER.into()]);
    pool.status = status;
    pool
}

/// A context over the directory `nodes`, API nodes a, b (`pool=fast`) and c
/// (`pool=slow`), and the pools given.
pub fn context(client: Client, nodes: Arc<StaticNodes>, pools: &[SandboxPool]) -> Context {
    let api_nodes = [
        api_node("a", &[("pool", "fast")]),
        api_node("b", &[("pool", "fast")]),
        api_node("c", &[("pool", "slow")]),
    ];
    context_with_nodes(client, nodes, pools, api_nodes)
}

/// [`context`] over the API Nodes given.
pub fn context_with_nodes(
    client: Client,
    nodes: Arc<StaticNodes>,
    pools: &[SandboxPool],
    api_nodes: impl IntoIterator<Item = Node>,
) -> Context {
    let (node_store, mut node_writer) = reflector::store();
    node_writer.apply_watcher_event(&watcher::Event::Init);
    for node in api_nodes {
        node_writer.apply_watcher_event(&watcher::Event::InitApply(node));
    }
    node_writer.apply_watcher_event(&watcher::Event::InitDone);
    let (pool_store, mut pool_writer) = reflector::store();
    pool_writer.apply_watcher_event(&watcher::Event::Init);
    for pool in pools {
        pool_writer.apply_watcher_event(&watcher::Event::InitApply(pool.clone()));
    }
    pool_writer.apply_watcher_event(&watcher::Event::InitDone);
    Context::new(
        client,
        nodes,
        node_store,
        pool_store,
        ReconcileConfig::default(),
    )
    .with_clock(|| NOW_MS)
}

pub fn mock() -> (Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

pub fn run_pool(
    pool: SandboxPool,
) -> impl FnOnce(Arc<Context>) -> futures::future::BoxFuture<'static, Result<Action, String>> {
    move |ctx| {
        Box::pin(async move {
            pool::reconcile(Arc::new(pool), ctx)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

pub fn run_sandbox(
    sb: Sandbox,
) -> impl FnOnce(Arc<Context>) -> futures::future::BoxFuture<'static, Result<Action, String>> {
    move |ctx| {
        Box::pin(async move {
            sandbox::reconcile(Arc::new(sb), ctx)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

pub const POOLS: &str = "/apis/fast-sandbox.io/v1alpha1/sandboxpools";
pub const SANDBOXES: &str = "/apis/fast-sandbox.io/v1alpha1/namespaces/team/fastsandboxes";
pub const PODS: &str = "/api/v1/namespaces/team/pods";

/// The path of a request without its query.
pub fn path(uri: &str) -> &str {
    uri.split('?').next().unwrap_or(uri)
}

/// Script step: the next request is a status patch of Sandbox `name`;
/// answers it and returns the status written.
pub async fn sandbox_status_written(handle: &mut Handle, name: &str) -> Value {
    let (method, uri, body, respond) = next(handle).await;
    assert_eq!(
        (method, path(&uri)),
        (Method::PATCH, format!("{SANDBOXES}/{name}/status").as_str())
    );
    reply(
        respond,
        200,
        &json!({"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": name, "namespace": "team"}, "spec": {"image": "x"}}),
    );
    body["status"].clone()
}

pub fn condition<'v>(status: &'v Value, type_: &str) -> &'v Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

/// A pool status that says the pool pushed a size to each of `nodes`.
pub fn pushed_to(nodes: &[&str]) -> SandboxPoolStatus {
    SandboxPoolStatus {
        nodes: nodes
            .iter()
            .map(|n| NodePoolStatus {
                node: (*n).into(),
                ready: true,
                free: 2,
                total: 2,
                desired: 2,
                pushed: Some(2),
                message: None,
            })
            .collect(),
        ..Default::default()
    }
}

pub fn sandbox_object(name: &str, pool: Option<&str>) -> Sandbox {
    let mut sb = Sandbox::new(
        name,
        SandboxSpec {
            image: "registry.example/agent:1".into(),
            command: vec!["python".into()],
            args: vec!["-c".into(), "print(1)".into()],
            env: vec![],
            tolerations: vec![],
            resources: None,
            runtime_class_name: pool.is_none().then(|| "fast-runc".to_owned()),
            pool: pool.map(str::to_owned),
        },
    );
    sb.metadata.namespace = Some("team".into());
    sb.metadata.uid = Some(format!("uid-{name}"));
    sb.metadata.generation = Some(1);
    sb
}

/// a: one free slot and the image (1000 MiB, on half the nodes: +9);
/// b: three free slots, no image. a scores 64 + 9 = 73, b 68.
pub fn sandbox_directory() -> Arc<StaticNodes> {
    let image = CachedImage {
        tags: vec!["registry.example/agent:1".into()],
        digests: vec![],
        size_bytes: 1000 * MIB,
    };
    Arc::new(StaticNodes::new(
        Snapshot::new(vec![
            node_state("a", vec![warm(1, 4)], vec![image]),
            node_state("b", vec![warm(3, 4)], vec![]),
        ])
        .expect("a snapshot"),
    ))
}

pub fn owned_pod(name: &str, node: &str, phase: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "team", "uid": "pod-uid",
                     "creationTimestamp": "2023-11-14T22:13:20Z",
                     "labels": {POOL_LABEL: "p", SANDBOX_LABEL: name},
                     "ownerReferences": [{"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox",
                        "name": name, "uid": format!("uid-{name}"), "controller": true}]},
        "spec": {"nodeName": node, "containers": [{"name": "sandbox", "image": "x"}]},
        "status": {"phase": phase, "podIP": "10.0.0.7"}
    })
}
