//! Both reconcilers against a scripted API server (kube-rs `tower-test`):
//! each scenario lists the exact HTTP requests the reconcile must make, in
//! order, answers them, and then checks that no other request came.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use fast_sandbox_controller::crd::{SandboxPoolStatus, SandboxStatus, POOL_LABEL, SANDBOX_LABEL};
use fast_sandbox_controller::events::{Note, RecordedEvents};
use fast_sandbox_controller::metrics::Metrics;
use fast_sandbox_controller::nodes::{NodeDirectory, SandboxShape, StaticNodes};
use fast_sandbox_controller::scoring::{NodeState, PoolState, Snapshot};
use http::Method;
use kube::runtime::controller::Action;
use serde_json::{json, Value};

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

#[tokio::test]
async fn pool_created_pushes_sizes_to_matching_nodes_and_writes_status() {
    let nodes = two_node_directory();
    let (client, handle) = mock();
    let pool = pool_object("p", 2, 6, None);
    let events = Arc::new(RecordedEvents::default());
    let ctx =
        context(client, nodes.clone(), std::slice::from_ref(&pool)).with_events(events.clone());
    let action = scenario(ctx, handle, run_pool(pool.clone()), |mut handle| {
        Box::pin(async move {
            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!(method, Method::PATCH);
            assert_eq!(path(&uri), format!("{POOLS}/p/status"));
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
            reply(respond, 200, &serde_json::to_value(&pool).expect("JSON"));
            handle
        })
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    let pushed: Vec<(String, u32)> = nodes
        .pushed()
        .into_iter()
        .map(|(n, s)| (n, s.size))
        .collect();
    // a has 1 of 2 taken: min 2 + 1; b has no pool yet: min. Never c.
    assert_eq!(pushed, vec![("a".to_owned(), 3), ("b".to_owned(), 2)]);
    // An administrator sees the pool scaled and why it is not served yet.
    let recorded = events.take();
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

#[tokio::test]
async fn new_pool_gets_its_finalizer_before_anything_is_pushed() {
    let nodes = two_node_directory();
    let (client, handle) = mock();
    let mut pool = pool_object("p", 2, 6, None);
    pool.metadata.finalizers = None;
    let ctx = context(client, nodes.clone(), std::slice::from_ref(&pool));
    let answer = serde_json::to_value(&pool).expect("JSON");
    let action = scenario(ctx, handle, run_pool(pool), |mut handle| {
        Box::pin(async move {
            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!(method, Method::PATCH);
            assert_eq!(path(&uri), format!("{POOLS}/p"));
            assert_eq!(
                body,
                json!([
                    {"op": "test", "path": "/metadata/finalizers", "value": null},
                    {"op": "add", "path": "/metadata/finalizers", "value": ["fast-sandbox.io/pool"]}
                ])
            );
            reply(respond, 200, &answer);
            handle
        })
    })
    .await;
    assert_eq!(action, Action::await_change());
    assert!(nodes.pushed().is_empty());
}

#[tokio::test]
async fn node_lost_is_reported_and_gets_no_push() {
    let nodes = two_node_directory();
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
    // b's node plugin is gone from the directory.
    nodes.replace(
        Snapshot::new(vec![node_state("a", vec![warm(2, 2)], vec![])]).expect("a snapshot"),
    );
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), std::slice::from_ref(&pool));
    let answer = serde_json::to_value(&pool).expect("JSON");
    scenario(ctx, handle, run_pool(pool), |mut handle| {
        Box::pin(async move {
            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!(
                (method, path(&uri)),
                (Method::PATCH, format!("{POOLS}/p/status").as_str())
            );
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
            assert!(
                ready["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("b (no report")),
                "{ready}"
            );
            reply(respond, 200, &answer);
            handle
        })
    })
    .await;
    let pushed: Vec<String> = nodes.pushed().into_iter().map(|(n, _)| n).collect();
    assert_eq!(pushed, vec!["a".to_owned()]);
}

#[tokio::test]
async fn pool_resized_pushes_the_new_sizes() {
    let nodes = two_node_directory();
    let mut pool = pool_object("p", 5, 8, None);
    pool.metadata.generation = Some(2);
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), std::slice::from_ref(&pool));
    let answer = serde_json::to_value(&pool).expect("JSON");
    scenario(ctx, handle, run_pool(pool), |mut handle| {
        Box::pin(async move {
            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!(
                (method, path(&uri)),
                (Method::PATCH, format!("{POOLS}/p/status").as_str())
            );
            assert_eq!(body["status"]["observedGeneration"], 2);
            assert_eq!(body["status"]["nodes"][0]["desired"], 6);
            assert_eq!(body["status"]["nodes"][1]["desired"], 5);
            reply(respond, 200, &answer);
            handle
        })
    })
    .await;
    let pushed: Vec<(String, u32)> = nodes
        .pushed()
        .into_iter()
        .map(|(n, s)| (n, s.size))
        .collect();
    assert_eq!(pushed, vec![("a".to_owned(), 6), ("b".to_owned(), 5)]);
}

#[tokio::test]
async fn pool_with_min_above_max_gets_a_condition_naming_the_field() {
    let nodes = two_node_directory();
    let pool = pool_object("p", 9, 2, None);
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), std::slice::from_ref(&pool));
    let answer = serde_json::to_value(&pool).expect("JSON");
    let action = scenario(ctx, handle, run_pool(pool), |mut handle| {
        Box::pin(async move {
            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!(
                (method, path(&uri)),
                (Method::PATCH, format!("{POOLS}/p/status").as_str())
            );
            let ready = condition(&body["status"], "Ready");
            assert_eq!(ready["reason"], "InvalidSpec");
            assert_eq!(ready["message"], "spec.slotsPerNode: min 9 is above max 2");
            reply(respond, 200, &answer);
            handle
        })
    })
    .await;
    assert_eq!(action, Action::await_change());
    assert!(nodes.pushed().is_empty());
}

#[tokio::test]
async fn deleted_pool_is_drained_from_its_nodes_then_released() {
    let nodes = two_node_directory();
    let mut pool = pool_object("p", 2, 6, Some(pushed_to(&["a", "b"])));
    pool.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1).expect("a time"),
    ));
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), std::slice::from_ref(&pool));
    let answer = serde_json::to_value(&pool).expect("JSON");
    scenario(ctx, handle, run_pool(pool), |mut handle| {
        Box::pin(async move {
            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!((method, path(&uri)), (Method::PATCH, format!("{POOLS}/p").as_str()));
            assert_eq!(
                body,
                json!([
                    {"op": "test", "path": "/metadata/finalizers/0", "value": "fast-sandbox.io/pool"},
                    {"op": "remove", "path": "/metadata/finalizers/0"}
                ])
            );
            reply(respond, 200, &answer);
            handle
        })
    })
    .await;
    let pushed: Vec<(String, u32)> = nodes
        .pushed()
        .into_iter()
        .map(|(n, s)| (n, s.size))
        .collect();
    assert_eq!(pushed, vec![("a".to_owned(), 0), ("b".to_owned(), 0)]);
}

// ---- Sandbox ----------------------------------------------------------------

/// Script: GET pod → 404, POST pod → 201 (asserting node), PATCH status.
fn binds_to(
    name: &'static str,
    node: &'static str,
) -> impl FnOnce(Handle) -> futures::future::BoxFuture<'static, Handle> {
    move |mut handle| {
        Box::pin(async move {
            let (method, uri, _, respond) = next(&mut handle).await;
            assert_eq!(
                (method, uri.as_str()),
                (Method::GET, format!("{PODS}/{name}").as_str())
            );
            not_found(respond, "pod");
            let (method, uri, pod, respond) = next(&mut handle).await;
            assert_eq!((method, path(&uri)), (Method::POST, PODS));
            assert_eq!(pod["metadata"]["name"], name);
            assert_eq!(pod["spec"]["nodeName"], node);
            let mut created = pod.clone();
            created["metadata"]["uid"] = json!(format!("pod-{name}"));
            reply(respond, 201, &created);
            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!(
                (method, path(&uri)),
                (Method::PATCH, format!("{SANDBOXES}/{name}/status").as_str())
            );
            assert_eq!(body["status"]["nodeName"], node);
            assert_eq!(body["status"]["phase"], "Pending");
            reply(
                respond,
                200,
                &json!({"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": name, "namespace": "team"},
                "spec": {"image": "x"}}),
            );
            handle
        })
    }
}

#[tokio::test]
async fn sandbox_created_binds_a_pod_to_the_best_node() {
    let nodes = sandbox_directory();
    let (client, handle) = mock();
    let pool = pool_object("p", 1, 4, None);
    let events = Arc::new(RecordedEvents::default());
    let metrics = Arc::new(Metrics::default());
    let ctx = context(client, nodes.clone(), std::slice::from_ref(&pool))
        .with_events(events.clone())
        .with_metrics(metrics.clone());
    let sb = sandbox_object("sb1", None);
    let action = scenario(ctx, handle, run_sandbox(sb), |mut handle| {
        Box::pin(async move {
            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!(method, Method::GET);
            assert_eq!(uri, format!("{PODS}/sb1"));
            assert_eq!(body, Value::Null);
            not_found(respond, "pod");

            let (method, uri, pod, respond) = next(&mut handle).await;
            assert_eq!((method, path(&uri)), (Method::POST, PODS));
            assert_eq!(pod["metadata"]["name"], "sb1");
            assert_eq!(pod["metadata"]["namespace"], "team");
            assert_eq!(pod["metadata"]["labels"][POOL_LABEL], "p");
            assert_eq!(pod["metadata"]["labels"][SANDBOX_LABEL], "sb1");
            assert_eq!(
                pod["metadata"]["ownerReferences"],
                json!([{"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox", "name": "sb1",
                        "uid": "uid-sb1", "controller": true}])
            );
            // Image affinity wins over b's extra free slots.
            assert_eq!(pod["spec"]["nodeName"], "a");
            assert_eq!(pod["spec"]["runtimeClassName"], "fast-runc");
            assert_eq!(pod["spec"]["restartPolicy"], "Never");
            assert_eq!(
                pod["spec"]["containers"][0]["image"],
                "registry.example/agent:1"
            );
            assert_eq!(pod["spec"]["containers"][0]["command"], json!(["python"]));
            assert_eq!(
                pod["spec"]["containers"][0]["args"],
                json!(["-c", "print(1)"])
            );
            let mut created = pod.clone();
            created["metadata"]["uid"] = json!("pod-uid");
            reply(respond, 201, &created);

            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!(
                (method, path(&uri)),
                (Method::PATCH, format!("{SANDBOXES}/sb1/status").as_str())
            );
            let status = &body["status"];
            assert_eq!(status["phase"], "Pending");
            assert_eq!(status["nodeName"], "a");
            assert_eq!(status["pool"], "p");
            assert_eq!(status["podCreatedUnixMs"], NOW_MS);
            assert_eq!(condition(status, "Scheduled")["status"], "True");
            reply(
                respond,
                200,
                &json!({"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": "sb1", "namespace": "team"}, "spec": {"image": "x"}}),
            );
            handle
        })
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    // The placement is counted at once.
    assert_eq!(nodes.snapshot().assumed("a", HANDLER, SHAPE), Ok(1));
    let reasons: Vec<(String, String, bool)> = events
        .take()
        .into_iter()
        .map(|(name, note)| (name, note.reason, note.warning))
        .collect();
    assert_eq!(
        reasons,
        [
            ("sb1".to_owned(), "Bound".to_owned(), false),
            ("sb1".to_owned(), "PodPending".to_owned(), false)
        ]
    );
    let text = metrics.encode().expect("metrics");
    assert!(
        text.contains("fast_sandbox_controller_placements_total{outcome=\"bound\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn two_sandboxes_do_not_both_take_the_last_free_slot() {
    let nodes = sandbox_directory();
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), &[]);
    scenario(
        ctx,
        handle,
        run_sandbox(sandbox_object("first", None)),
        binds_to("first", "a"),
    )
    .await;
    // a's only free slot is assumed taken: the second goes to b.
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), &[]);
    scenario(
        ctx,
        handle,
        run_sandbox(sandbox_object("second", None)),
        binds_to("second", "b"),
    )
    .await;
    assert_eq!(nodes.snapshot().assumed("b", HANDLER, SHAPE), Ok(1));
}

#[tokio::test]
async fn sandbox_in_a_pool_goes_only_to_the_pools_nodes_with_its_shape() {
    // c (pool=slow) has the most free slots, but the pool selects pool=fast.
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
    let (client, handle) = mock();
    let ctx = context(client, nodes, std::slice::from_ref(&pool));
    scenario(
        ctx,
        handle,
        run_sandbox(sandbox_object("sb", Some("shaped"))),
        |mut handle| {
            Box::pin(async move {
                let (_, _, _, respond) = next(&mut handle).await;
                not_found(respond, "pod");
                let (method, _, pod, respond) = next(&mut handle).await;
                assert_eq!(method, Method::POST);
                assert_eq!(pod["spec"]["nodeName"], "b");
                assert_eq!(pod["metadata"]["labels"][POOL_LABEL], "shaped");
                // The pod's sandbox gets the pool's shape, so it takes its slot.
                assert_eq!(
                    pod["spec"]["securityContext"],
                    json!({"seccompProfile": {"type": "RuntimeDefault"}, "runAsUser": 1000})
                );
                reply(respond, 201, &pod);
                let (method, _, _, respond) = next(&mut handle).await;
                assert_eq!(method, Method::PATCH);
                reply(
                    respond,
                    200,
                    &json!({"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": "sb", "namespace": "team"}, "spec": {"image": "x"}}),
                );
                handle
            })
        },
    )
    .await;
}

#[tokio::test]
async fn reconciling_a_placed_sandbox_again_reads_its_pod_and_creates_none() {
    let nodes = sandbox_directory();
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), &[]);
    let mut sb = sandbox_object("sb1", None);
    sb.status = Some(SandboxStatus {
        node_name: Some("a".into()),
        pod_created_unix_ms: Some(NOW_MS - 180),
        ..Default::default()
    });
    scenario(ctx, handle, run_sandbox(sb), |mut handle| {
        Box::pin(async move {
            let (method, uri, _, respond) = next(&mut handle).await;
            assert_eq!(
                (method, uri.as_str()),
                (Method::GET, format!("{PODS}/sb1").as_str())
            );
            reply(respond, 200, &owned_pod("sb1", "a", "Running"));
            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!(
                (method, path(&uri)),
                (Method::PATCH, format!("{SANDBOXES}/sb1/status").as_str())
            );
            let status = &body["status"];
            assert_eq!(status["phase"], "Running");
            assert_eq!(status["nodeName"], "a");
            assert_eq!(status["podIP"], "10.0.0.7");
            assert_eq!(status["timeToRunningMs"], 180);
            assert_eq!(condition(status, "Ready")["status"], "True");
            reply(
                respond,
                200,
                &json!({"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": "sb1", "namespace": "team"}, "spec": {"image": "x"}}),
            );
            handle
        })
    })
    .await;
    // No second placement was counted either.
    assert_eq!(nodes.snapshot().assumed("a", HANDLER, SHAPE), Ok(0));
}

#[tokio::test]
async fn a_create_that_already_happened_reads_the_existing_pod() {
    let nodes = sandbox_directory();
    let (client, handle) = mock();
    let ctx = context(client, nodes, &[]);
    scenario(
        ctx,
        handle,
        run_sandbox(sandbox_object("sb1", None)),
        |mut handle| {
            Box::pin(async move {
                let (_, _, _, respond) = next(&mut handle).await;
                not_found(respond, "pod");
                let (method, _, _, respond) = next(&mut handle).await;
                assert_eq!(method, Method::POST);
                reply(
                    respond,
                    409,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "pods \"sb1\" already exists", "reason": "AlreadyExists", "code": 409}),
                );
                let (method, uri, _, respond) = next(&mut handle).await;
                assert_eq!(
                    (method, uri.as_str()),
                    (Method::GET, format!("{PODS}/sb1").as_str())
                );
                reply(respond, 200, &owned_pod("sb1", "a", "Pending"));
                let (method, _, body, respond) = next(&mut handle).await;
                assert_eq!(method, Method::PATCH);
                assert_eq!(body["status"]["phase"], "Pending");
                reply(
                    respond,
                    200,
                    &json!({"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": "sb1", "namespace": "team"}, "spec": {"image": "x"}}),
                );
                handle
            })
        },
    )
    .await;
}

#[tokio::test]
async fn deleted_sandbox_makes_no_request_and_creates_nothing() {
    let nodes = sandbox_directory();
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), &[]);
    let mut sb = sandbox_object("sb1", None);
    sb.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1).expect("a time"),
    ));
    let action = scenario(ctx, handle, run_sandbox(sb), |handle| {
        Box::pin(async move { handle })
    })
    .await;
    assert_eq!(action, Action::await_change());
    assert_eq!(nodes.snapshot().assumed("a", HANDLER, SHAPE), Ok(0));
}

#[tokio::test]
async fn sandbox_whose_pod_is_gone_fails_instead_of_being_placed_again() {
    let nodes = sandbox_directory();
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), &[]);
    let mut sb = sandbox_object("sb1", None);
    sb.status = Some(SandboxStatus {
        node_name: Some("a".into()),
        phase: Some(fast_sandbox_controller::crd::SandboxPhase::Running),
        ..Default::default()
    });
    scenario(ctx, handle, run_sandbox(sb), |mut handle| {
        Box::pin(async move {
            let (method, _, _, respond) = next(&mut handle).await;
            assert_eq!(method, Method::GET);
            not_found(respond, "pod");
            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!(
                (method, path(&uri)),
                (Method::PATCH, format!("{SANDBOXES}/sb1/status").as_str())
            );
            assert_eq!(body["status"]["phase"], "Failed");
            assert_eq!(condition(&body["status"], "Ready")["reason"], "PodLost");
            reply(
                respond,
                200,
                &json!({"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": "sb1", "namespace": "team"}, "spec": {"image": "x"}}),
            );
            handle
        })
    })
    .await;
    assert_eq!(nodes.snapshot().assumed("a", HANDLER, SHAPE), Ok(0));
}

#[tokio::test]
async fn sandbox_with_no_eligible_node_gets_a_condition_and_no_pod() {
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
    let (client, handle) = mock();
    let events = Arc::new(RecordedEvents::default());
    let ctx = context(client, nodes, &[]).with_events(events.clone());
    let action = scenario(ctx, handle, run_sandbox(sandbox_object("sb1", None)), |mut handle| {
        Box::pin(async move {
            let (method, _, _, respond) = next(&mut handle).await;
            assert_eq!(method, Method::GET);
            not_found(respond, "pod");
            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!((method, path(&uri)), (Method::PATCH, format!("{SANDBOXES}/sb1/status").as_str()));
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
            reply(respond, 200, &json!({"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": "sb1", "namespace": "team"}, "spec": {"image": "x"}}));
            handle
        })
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    // Waiting is a warning an administrator sees on the Sandbox.
    let recorded = events.take();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].0, "sb1");
    assert!(recorded[0].1.warning);
    assert_eq!(recorded[0].1.reason, "NoEligibleNode");
}

#[tokio::test]
async fn sandbox_with_a_bad_field_gets_a_condition_naming_it() {
    let nodes = sandbox_directory();
    let (client, handle) = mock();
    let ctx = context(client, nodes, &[]);
    let mut sb = sandbox_object("sb1", None);
    sb.spec.runtime_class_name = Some("runc".into());
    let action = scenario(ctx, handle, run_sandbox(sb), |mut handle| {
        Box::pin(async move {
            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!(
                (method, path(&uri)),
                (Method::PATCH, format!("{SANDBOXES}/sb1/status").as_str())
            );
            assert_eq!(body["status"]["phase"], "Failed");
            let scheduled = condition(&body["status"], "Scheduled");
            assert_eq!(scheduled["reason"], "InvalidSpec");
            assert_eq!(
                scheduled["message"],
                "spec.runtimeClassName: \"runc\" is not a fast RuntimeClass \
                 (fast-crun, fast-gvisor, fast-kata, fast-runc)"
            );
            reply(
                respond,
                200,
                &json!({"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": "sb1", "namespace": "team"}, "spec": {"image": "x"}}),
            );
            handle
        })
    })
    .await;
    assert_eq!(action, Action::await_change());
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
