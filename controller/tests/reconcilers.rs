//! Both reconcilers against a scripted API server (kube-rs `tower-test`):
//! each scenario of the tables below names the node directory and objects
//! the reconcile observes, the exact HTTP requests it must make, in order
//! (with their answers), and what it must leave behind (its action, the
//! sizes pushed to nodes, the placements counted, the Events). One runner
//! plays them all and checks that no other request came.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use fast_sandbox_controller::crd::{
    Sandbox, SandboxPhase, SandboxPool, SandboxPoolStatus, SandboxStatus, POOL_LABEL, SANDBOX_LABEL,
};
use fast_sandbox_controller::events::{Note, RecordedEvents};
use fast_sandbox_controller::metrics::Metrics;
use fast_sandbox_controller::nodes::{NodeDirectory, SandboxShape, StaticNodes};
use fast_sandbox_controller::scoring::{NodeState, PoolState, Snapshot};
use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use serde_json::{json, Value};

/// What a scenario reconciles.
enum Object {
    Pool(SandboxPool),
    Sandbox(Sandbox),
}

/// One scenario: what the reconcile observes, what it must do.
struct Case {
    name: &'static str,
    nodes: Arc<StaticNodes>,
    /// The pools the context's reflector holds.
    pools: Vec<SandboxPool>,
    object: Object,
    calls: Vec<Call>,
    action: Action,
    /// Sizes pushed to nodes, in order (`None`: not checked).
    pushed: Option<Vec<(String, u32)>>,
    /// Placements counted on node `a` (`None`: not checked).
    assumed_on_a: Option<u32>,
    /// Events, as (reason, warning) (`None`: not checked).
    events: Option<Vec<(String, bool)>>,
    /// A line `/metrics` must hold after the reconcile.
    metrics: Option<&'static str>,
}

impl Case {
    fn new(name: &'static str, nodes: Arc<StaticNodes>, object: Object, action: Action) -> Self {
        Case {
            name,
            nodes,
            pools: Vec::new(),
            object,
            calls: Vec::new(),
            action,
            pushed: None,
            assumed_on_a: None,
            events: None,
            metrics: None,
        }
    }

    fn metrics(mut self, line: &'static str) -> Self {
        self.metrics = Some(line);
        self
    }

    fn pools(mut self, pools: Vec<SandboxPool>) -> Self {
        self.pools = pools;
        self
    }

    fn calls(mut self, calls: Vec<Call>) -> Self {
        self.calls = calls;
        self
    }

    fn pushed(mut self, pushed: &[(&'static str, u32)]) -> Self {
        self.pushed = Some(owned(pushed));
        self
    }

    fn assumed_on_a(mut self, count: u32) -> Self {
        self.assumed_on_a = Some(count);
        self
    }

    fn events(mut self, events: &[(&'static str, bool)]) -> Self {
        self.events = Some(owned(events));
        self
    }
}

/// `pairs` with owned names.
fn owned<T: Copy>(pairs: &[(&str, T)]) -> Vec<(String, T)> {
    pairs.iter().map(|(n, t)| ((*n).to_owned(), *t)).collect()
}

/// Plays `case`: the reconcile against its script, then its checks.
/// Returns the Events recorded, as (object, note).
async fn play(case: Case) -> Vec<(String, Note)> {
    let (name, nodes) = (case.name, case.nodes.clone());
    let (client, handle) = mock();
    let events = Arc::new(RecordedEvents::default());
    let metrics = Arc::new(Metrics::default());
    let ctx = context(client, nodes.clone(), &case.pools)
        .with_events(events.clone())
        .with_metrics(metrics.clone());
    let action = match case.object {
        Object::Pool(pool) => scenario(ctx, handle, run_pool(pool), script(case.calls)).await,
        Object::Sandbox(sb) => scenario(ctx, handle, run_sandbox(sb), script(case.calls)).await,
    };
    assert_eq!(action, case.action, "{name}: action");
    if let Some(expected) = case.pushed {
        let pushed: Vec<(String, u32)> = nodes
            .pushed()
            .into_iter()
            .map(|(n, s)| (n, s.size))
            .collect();
        assert_eq!(pushed, expected, "{name}: sizes pushed");
    }
    if let Some(count) = case.assumed_on_a {
        let assumed = nodes.snapshot().assumed("a", HANDLER, SHAPE);
        assert_eq!(assumed, Ok(count), "{name}: placements counted on a");
    }
    if let Some(line) = case.metrics {
        let text = metrics.encode().expect("metrics");
        assert!(text.contains(line), "{name}: {line} not in {text}");
    }
    let recorded = events.take();
    if let Some(expected) = case.events {
        let recorded: Vec<(String, bool)> = recorded
            .iter()
            .map(|(_, note)| (note.reason.clone(), note.warning))
            .collect();
        assert_eq!(recorded, expected, "{name}: events");
    }
    recorded
}

/// Plays every case, in order, naming the one that fails.
async fn play_all(cases: Vec<Case>) {
    for case in cases {
        let name = case.name;
        if let Err(error) = tokio::spawn(play(case)).await {
            panic!("scenario {name:?} failed: {error}");
        }
    }
}

fn deleted_at() -> Option<Time> {
    Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(1).expect("a time"),
    ))
}

/// The JSON of `object`, what the API server answers a patch of it with.
fn json_of(object: &impl serde::Serialize) -> Value {
    serde_json::to_value(object).expect("JSON")
}

// ---- SandboxPool ------------------------------------------------------------

fn two_node_directory() -> Arc<StaticNodes> {
    Arc::new(StaticNodes::new(
        Snapshot::new(vec![
            node_state("a", vec![warm(1, 2)], vec![]),
            node_state("b", vec![], vec![]),
            node_state("c", vec![warm(4, 4)], vec![]),
        ])
        .expect("a snapshot"),
    ))
}

fn pool_status_patch() -> Call {
    Call::patch(format!("{POOLS}/p/status"))
}

/// A pool whose nodes lost b's node plugin.
fn pool_with_b_lost() -> Case {
    let pool = pool_object(
        "p",
        2,
        6,
        Some(SandboxPoolStatus {
            observed_generation: Some(1),
            ready_nodes: 2,
            free: 4,
            total: 4,
            ..pushed_to(&["a", "b"])
        }),
    );
    let nodes = two_node_directory();
    nodes.replace(
        Snapshot::new(vec![node_state("a", vec![warm(2, 2)], vec![])]).expect("a snapshot"),
    );
    let answer = json_of(&pool);
    Case::new(
        "node lost: reported, no push",
        nodes,
        Object::Pool(pool.clone()),
        Action::requeue(Duration::from_secs(300)),
    )
    .pools(vec![pool])
    .calls(vec![pool_status_patch()
        .body(|body| {
            let status = &body["status"];
            assert_eq!(status["readyNodes"], 1);
            assert_eq!(status["nodes"][1]["node"], "b");
            assert_eq!(status["nodes"][1]["ready"], false);
            assert_eq!(
                status["nodes"][1]["message"],
                "no report from a node plugin on this node"
            );
            let ready = condition(status, "Ready");
            assert_eq!(ready["status"], "False");
            let message = ready["message"].as_str().unwrap_or_default();
            assert!(message.contains("b (no report"), "{ready}");
        })
        .answer(Answer::Json(200, answer))])
    .pushed(&[("a", 2)])
}

fn pool_cases() -> Vec<Case> {
    let created = pool_object("p", 2, 6, None);
    let mut unfinalized = pool_object("p", 2, 6, None);
    unfinalized.metadata.finalizers = None;
    let mut resized = pool_object("p", 5, 8, None);
    resized.metadata.generation = Some(2);
    let inverted = pool_object("p", 9, 2, None);
    let mut deleted = pool_object("p", 2, 6, Some(pushed_to(&["a", "b"])));
    deleted.metadata.deletion_timestamp = deleted_at();
    let answer = |pool: &SandboxPool| Answer::Json(200, json_of(pool));
    let pool_case = |name, pool: &SandboxPool, action| {
        Case::new(
            name,
            two_node_directory(),
            Object::Pool(pool.clone()),
            action,
        )
        .pools(vec![pool.clone()])
    };
    vec![
        // a has 1 of 2 taken: min 2 + 1; b has no pool yet: min. Never c.
        pool_case("created: sizes pushed, status written", &created, Action::requeue(Duration::from_secs(300)))
            .calls(vec![pool_status_patch()
                .body(|body| {
                    let status = &body["status"];
                    assert_eq!(status["readyNodes"], 1);
                    assert_eq!(status["free"], 1);
                    assert_eq!(status["total"], 2);
                    assert_eq!(
                        status["nodes"],
                        json!([
                            {"node": "a", "ready": true, "free": 1, "total": 2, "desired": 3, "pushed": 3},
                            {"node": "b", "ready": false, "free": 0, "total": 0, "desired": 2, "pushed": 2,
                             "message": "waiting for the node to report the pool"}
                        ])
                    );
                    let ready = condition(status, "Ready");
                    assert_eq!(ready["status"], "False");
                    assert_eq!(ready["reason"], "NodesNotReady");
                    assert_eq!(status["observedGeneration"], 1);
                })
                .answer(answer(&created))])
            .pushed(&[("a", 3), ("b", 2)])
            // An administrator sees the pool scaled and why it is not served yet.
            .events(&[("Scaled", false), ("NodesNotReady", true)]),
        pool_case("new pool: finalizer first, nothing pushed", &unfinalized, Action::await_change())
            .calls(vec![Call::patch(format!("{POOLS}/p"))
                .body(|body| {
                    assert_eq!(
                        body,
                        &json!([
                            {"op": "test", "path": "/metadata/finalizers", "value": null},
                            {"op": "add", "path": "/metadata/finalizers", "value": ["fast-sandbox.io/pool"]}
                        ])
                    );
                })
                .answer(answer(&unfinalized))])
            .pushed(&[]),
        pool_with_b_lost(),
        pool_case("resized: new sizes pushed", &resized, Action::requeue(Duration::from_secs(300)))
            .calls(vec![pool_status_patch()
                .body(|body| {
                    assert_eq!(body["status"]["observedGeneration"], 2);
                    assert_eq!(body["status"]["nodes"][0]["desired"], 6);
                    assert_eq!(body["status"]["nodes"][1]["desired"], 5);
                })
                .answer(answer(&resized))])
            .pushed(&[("a", 6), ("b", 5)]),
        pool_case("min above max: a condition naming the field", &inverted, Action::await_change())
            .calls(vec![pool_status_patch()
                .body(|body| {
                    let ready = condition(&body["status"], "Ready");
                    assert_eq!(ready["reason"], "InvalidSpec");
                    assert_eq!(ready["message"], "spec.slotsPerNode: min 9 is above max 2");
                })
                .answer(answer(&inverted))])
            .pushed(&[]),
        pool_case("deleted: drained from its nodes, then released", &deleted, Action::await_change())
            .calls(vec![Call::patch(format!("{POOLS}/p"))
                .body(|body| {
                    assert_eq!(
                        body,
                        &json!([
                            {"op": "test", "path": "/metadata/finalizers/0", "value": "fast-sandbox.io/pool"},
                            {"op": "remove", "path": "/metadata/finalizers/0"}
                        ])
                    );
                })
                .answer(answer(&deleted))])
            .pushed(&[("a", 0), ("b", 0)]),
    ]
}

#[tokio::test]
async fn pool_scenarios() {
    play_all(pool_cases()).await;
}

/// The size message names the pool, its handler and its shape; the
/// Events say what was asked of which node, and why it is not served yet.
#[tokio::test]
async fn a_created_pools_sizes_and_events_name_it() {
    let case = pool_cases().remove(0);
    let nodes = case.nodes.clone();
    let recorded = play(case).await;
    assert_eq!(
        recorded,
        [
            (
                "p".to_owned(),
                Note::normal("Scaled", "Scale", "free warm slots asked of 2 nodes: a →3, b →2".into())
            ),
            (
                "p".to_owned(),
                Note::warning(
                    "NodesNotReady",
                    "Ready",
                    "1 of 2 nodes do not serve the pool: b (waiting for the node to report the pool)"
                        .into()
                )
            ),
        ]
    );
    let first = &nodes.pushed()[0].1;
    assert_eq!(
        (
            first.pool.as_str(),
            first.handler.as_str(),
            first.shape_key.as_str()
        ),
        ("p", HANDLER, SHAPE)
    );
}

// ---- Sandbox ----------------------------------------------------------------

/// GET pod → 404, POST pod (bound to `node`) → 201, PATCH status (Pending
/// on `node`).
fn binds_to(name: &'static str, node: &'static str) -> Vec<Call> {
    vec![
        Call::get(format!("{PODS}/{name}")).answer(Answer::NotFound),
        Call::post(PODS).body(move |pod| {
            assert_eq!(pod["metadata"]["name"], name);
            assert_eq!(pod["spec"]["nodeName"], node);
        }),
        Call::sandbox_status(name).body(move |body| {
            assert_eq!(body["status"]["nodeName"], node);
            assert_eq!(body["status"]["phase"], "Pending");
        }),
    ]
}

fn sandbox_case(name: &'static str, sb: Sandbox, action: Action) -> Case {
    Case::new(name, sandbox_directory(), Object::Sandbox(sb), action)
}

/// c (pool=slow) has the most free slots, but the pool selects pool=fast.
fn shaped_pool_case() -> Case {
    let shaped = |free| PoolState {
        shape: "seccomp=runtime-default;uid=1000".into(),
        ..warm(free, 8)
    };
    let nodes = Arc::new(StaticNodes::new(
        Snapshot::new(vec![
            node_state("a", vec![warm(4, 4)], vec![]),
            node_state("b", vec![shaped(1)], vec![]),
            node_state("c", vec![shaped(8)], vec![]),
        ])
        .expect("a snapshot"),
    ));
    let mut pool = pool_object("shaped", 1, 8, None);
    pool.spec.shape = SandboxShape {
        seccomp: Some("runtime-default".into()),
        run_as_user: Some(1000),
        ..Default::default()
    };
    let sb = sandbox_object("sb", Some("shaped"));
    Case::new(
        "in a pool: only the pool's nodes with its shape",
        nodes,
        Object::Sandbox(sb),
        Action::requeue(Duration::from_secs(300)),
    )
    .pools(vec![pool])
    .calls(vec![
        Call::get(format!("{PODS}/sb")).answer(Answer::NotFound),
        Call::post(PODS).body(|pod| {
            assert_eq!(pod["spec"]["nodeName"], "b");
            assert_eq!(pod["metadata"]["labels"][POOL_LABEL], "shaped");
            // The pod's sandbox gets the pool's shape, so it takes its slot.
            assert_eq!(
                pod["spec"]["securityContext"],
                json!({"seccompProfile": {"type": "RuntimeDefault"}, "runAsUser": 1000})
            );
        }),
        Call::sandbox_status("sb"),
    ])
}

/// a has no free slot, b no pool, c a pool but no ready node plugin.
fn no_eligible_node_case() -> Case {
    let nodes = Arc::new(StaticNodes::new(
        Snapshot::new(vec![
            node_state("a", vec![warm(0, 4)], vec![]),
            node_state("b", vec![], vec![]),
            NodeState {
                ready: false,
                ..node_state("c", vec![warm(4, 4)], vec![])
            },
        ])
        .expect("a snapshot"),
    ));
    let sb = sandbox_object("sb1", None);
    Case::new(
        "no eligible node: a condition, no pod",
        nodes,
        Object::Sandbox(sb),
        Action::requeue(Duration::from_secs(5)),
    )
    .calls(vec![
        Call::get(format!("{PODS}/sb1")).answer(Answer::NotFound),
        Call::sandbox_status("sb1").body(|body| {
            let status = &body["status"];
            assert_eq!(status["phase"], "Pending");
            assert!(status.get("nodeName").is_none());
            let scheduled = condition(status, "Scheduled");
            assert_eq!(scheduled["status"], "False");
            assert_eq!(scheduled["reason"], "NoEligibleNode");
            assert_eq!(
                scheduled["message"],
                "no eligible node among 3 reporting for handler fast-runc and shape seccomp=runtime-default \
                 (1: fast-sandbox node plugin not ready; 1: no warm pool for this runtime handler and shape; \
                 1: warm pool has no free slot)"
            );
        }),
    ])
    // Waiting is a warning an administrator sees on the Sandbox.
    .events(&[("NoEligibleNode", true)])
}

fn sandbox_cases() -> Vec<Case> {
    let mut placed = sandbox_object("sb1", None);
    placed.status = Some(SandboxStatus {
        node_name: Some("a".into()),
        pod_created_unix_ms: Some(NOW_MS - 180),
        ..Default::default()
    });
    let mut deleted = sandbox_object("sb1", None);
    deleted.metadata.deletion_timestamp = deleted_at();
    let mut running = sandbox_object("sb1", None);
    running.status = Some(SandboxStatus {
        node_name: Some("a".into()),
        phase: Some(SandboxPhase::Running),
        ..Default::default()
    });
    let mut bad_class = sandbox_object("sb1", None);
    bad_class.spec.runtime_class_name = Some("runc".into());
    let resync = Action::requeue(Duration::from_secs(300));
    vec![
        shaped_pool_case(),
        sandbox_case("placed: its pod read, none created", placed, resync.clone())
            .calls(vec![
                Call::get(format!("{PODS}/sb1"))
                    .answer(Answer::Json(200, owned_pod("sb1", "a", "Running"))),
                Call::sandbox_status("sb1").body(|body| {
                    let status = &body["status"];
                    assert_eq!(status["phase"], "Running");
                    assert_eq!(status["nodeName"], "a");
                    assert_eq!(status["podIP"], "10.0.0.7");
                    assert_eq!(status["timeToRunningMs"], 180);
                    assert_eq!(condition(status, "Ready")["status"], "True");
                }),
            ])
            // No second placement was counted either.
            .assumed_on_a(0),
        sandbox_case(
            "a create that already happened: the pod read",
            sandbox_object("sb1", None),
            resync,
        )
        .calls(vec![
            Call::get(format!("{PODS}/sb1")).answer(Answer::NotFound),
            Call::post(PODS).answer(Answer::AlreadyExists),
            Call::get(format!("{PODS}/sb1"))
                .answer(Answer::Json(200, owned_pod("sb1", "a", "Pending"))),
            Call::sandbox_status("sb1").body(|body| {
                assert_eq!(body["status"]["phase"], "Pending");
            }),
        ]),
        sandbox_case(
            "deleted: no request, nothing created",
            deleted,
            Action::await_change(),
        )
        .assumed_on_a(0),
        sandbox_case(
            "pod gone: failed, not placed again",
            running,
            Action::await_change(),
        )
        .calls(vec![
            Call::get(format!("{PODS}/sb1")).answer(Answer::NotFound),
            Call::sandbox_status("sb1").body(|body| {
                assert_eq!(body["status"]["phase"], "Failed");
                assert_eq!(condition(&body["status"], "Ready")["reason"], "PodLost");
            }),
        ])
        .assumed_on_a(0),
        no_eligible_node_case(),
        sandbox_case(
            "a bad field: a condition naming it",
            bad_class,
            Action::await_change(),
        )
        .calls(vec![Call::sandbox_status("sb1").body(|body| {
            assert_eq!(body["status"]["phase"], "Failed");
            let scheduled = condition(&body["status"], "Scheduled");
            assert_eq!(scheduled["reason"], "InvalidSpec");
            assert_eq!(
                scheduled["message"],
                "spec.runtimeClassName: \"runc\" is not a fast RuntimeClass \
                     (fast-crun, fast-gvisor, fast-kata, fast-runc)"
            );
        })]),
    ]
}

#[tokio::test]
async fn sandbox_scenarios() {
    play_all(sandbox_cases()).await;
}

/// The full pod a `Sandbox` makes, on the best node (image affinity over
/// b's extra free slots), counted at once and in the metrics.
#[tokio::test]
async fn sandbox_created_binds_a_pod_to_the_best_node() {
    let pool = pool_object("p", 1, 4, None);
    let sb = sandbox_object("sb1", None);
    let case = sandbox_case("created", sb, Action::requeue(Duration::from_secs(300)))
        .pools(vec![pool])
        .calls(vec![
            Call::get(format!("{PODS}/sb1"))
                .body(|body| assert_eq!(body, &Value::Null))
                .answer(Answer::NotFound),
            Call::post(PODS).body(|pod| {
                assert_eq!(pod["metadata"]["name"], "sb1");
                assert_eq!(pod["metadata"]["namespace"], "team");
                assert_eq!(pod["metadata"]["labels"][POOL_LABEL], "p");
                assert_eq!(pod["metadata"]["labels"][SANDBOX_LABEL], "sb1");
                assert_eq!(
                    pod["metadata"]["ownerReferences"],
                    json!([{"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox", "name": "sb1",
                            "uid": "uid-sb1", "controller": true}])
                );
                assert_eq!(pod["spec"]["nodeName"], "a");
                assert_eq!(pod["spec"]["runtimeClassName"], "fast-runc");
                assert_eq!(pod["spec"]["restartPolicy"], "Never");
                let container = &pod["spec"]["containers"][0];
                assert_eq!(container["image"], "registry.example/agent:1");
                assert_eq!(container["command"], json!(["python"]));
                assert_eq!(container["args"], json!(["-c", "print(1)"]));
            }),
            Call::sandbox_status("sb1").body(|body| {
                let status = &body["status"];
                assert_eq!(status["phase"], "Pending");
                assert_eq!(status["nodeName"], "a");
                assert_eq!(status["pool"], "p");
                assert_eq!(status["podCreatedUnixMs"], NOW_MS);
                assert_eq!(condition(status, "Scheduled")["status"], "True");
            }),
        ])
        .assumed_on_a(1)
        .events(&[("Bound", false), ("PodPending", false)])
        .metrics("fast_sandbox_controller_placements_total{outcome=\"bound\"} 1");
    let recorded = play(case).await;
    assert!(
        recorded.iter().all(|(name, _)| name == "sb1"),
        "{recorded:?}"
    );
}

#[tokio::test]
async fn two_sandboxes_do_not_both_take_the_last_free_slot() {
    let nodes = sandbox_directory();
    let bind = |name, node| {
        let case = Case::new(
            name,
            nodes.clone(),
            Object::Sandbox(sandbox_object(name, None)),
            Action::requeue(Duration::from_secs(300)),
        );
        case.calls(binds_to(name, node))
    };
    play(bind("first", "a")).await;
    // a's only free slot is assumed taken: the second goes to b.
    play(bind("second", "b")).await;
    assert_eq!(nodes.snapshot().assumed("b", HANDLER, SHAPE), Ok(1));
}

// ---- Events through the API server ------------------------------------------

/// What the reconcilers emit reaches the Events API the RBAC grants
/// (`events.k8s.io` create, then patch for a repeat), in the object's
/// namespace (`default` for a cluster-scoped pool), and is counted.
#[tokio::test]
async fn events_are_created_then_patched_through_the_events_api() {
    use fast_sandbox_controller::events::{EventSink, KubeEvents};
    use kube::Resource;
    let (client, mut handle) = mock();
    handle.allow(10);
    let metrics = Arc::new(Metrics::default());
    let events = KubeEvents::start(client, Some("replica-a".into()), metrics.clone());
    let pool = pool_object("p", 1, 2, None);
    let note = Note::warning("PushFailed", "Scale", "node a: unreachable".into());
    events.publish(pool.object_ref(&()), note.clone());
    let (method, uri, body, respond) = next(&mut handle).await;
    assert_eq!(
        (method, path(&uri)),
        (
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/default/events"
        )
    );
    assert_eq!(body["regarding"]["kind"], "SandboxPool");
    assert_eq!(body["regarding"]["name"], "p");
    assert_eq!(body["reason"], "PushFailed");
    assert_eq!(body["type"], "Warning");
    assert_eq!(body["note"], "node a: unreachable");
    assert_eq!(body["reportingController"], "fast-sandbox.io/controller");
    assert_eq!(body["reportingInstance"], "replica-a");
    reply(respond, 201, &body);
    // The same again is a patch of the series, not a new Event.
    events.publish(pool.object_ref(&()), note);
    let (method, uri, body, respond) = next(&mut handle).await;
    assert_eq!(method, Method::PATCH);
    assert!(
        path(&uri).starts_with("/apis/events.k8s.io/v1/namespaces/default/events/p."),
        "{uri}"
    );
    assert_eq!(body["series"]["count"], 2);
    reply(respond, 200, &body);
    let published = "fast_sandbox_controller_events_total{outcome=\"published\"} 2";
    tokio::time::timeout(Duration::from_secs(5), async {
        while !metrics.encode().expect("metrics").contains(published) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("both events counted as published");
}
