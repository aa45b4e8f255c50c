//! Issue 13 against a scripted API server (kube-rs `tower-test`): pools own
//! only the sizes they pushed, every failure shows in status, waiting
//! `Sandbox`es are retried when a node reports, and the controller can be
//! uninstalled in any order (it starts without a CRD; `uninstall` removes
//! its finalizers).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use fast_sandbox_controller::crd::{SandboxPool, SandboxStatus};
use fast_sandbox_controller::nodes::{NodeError, NodeProblem, StaticNodes};
use fast_sandbox_controller::reconcile::Context;
use fast_sandbox_controller::run;
use fast_sandbox_controller::scoring::{NodeState, Snapshot};
use futures::StreamExt;
use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use serde_json::{json, Value};

fn deleted(mut pool: SandboxPool) -> SandboxPool {
    pool.metadata.deletion_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(1).expect("a time"),
    ));
    pool
}

/// Script: only the finalizer's removal.
fn releases_only(
    name: &'static str,
) -> impl FnOnce(Handle) -> futures::future::BoxFuture<'static, Handle> {
    move |mut handle| {
        Box::pin(async move {
            let (method, uri, body, respond) = next(&mut handle).await;
            assert_eq!(
                (method, path(&uri)),
                (Method::PATCH, format!("{POOLS}/{name}").as_str())
            );
            assert_eq!(
                body[1],
                json!({"op": "remove", "path": "/metadata/finalizers/0"})
            );
            reply(
                respond,
                200,
                &json!({"apiVersion": "fast-sandbox.io/v1alpha1",
                "kind": "SandboxPool", "metadata": {"name": name},
                "spec": {"runtimeClassName": "fast-runc", "slotsPerNode": {"min": 0, "max": 0}}}),
            );
            handle
        })
    }
}

fn sizes(nodes: &StaticNodes) -> Vec<(String, u32)> {
    nodes
        .pushed()
        .into_iter()
        .map(|(n, s)| (n, s.size))
        .collect()
}

#[tokio::test]
async fn deleting_an_invalid_pool_drains_nothing() {
    let nodes = Arc::new(StaticNodes::new(
        Snapshot::new(vec![node_state("a", vec![warm(2, 2)], vec![])]).expect("snapshot"),
    ));
    // min above max: never valid, so it never pushed; a valid pool of the
    // same class and shape serves the node.
    let invalid = deleted(pool_object("bad", 9, 2, None));
    let valid = pool_object("good", 2, 6, Some(pushed_to(&["a"])));
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), &[invalid.clone(), valid]);
    scenario(ctx, handle, run_pool(invalid), releases_only("bad")).await;
    assert_eq!(sizes(&nodes), []);
}

#[tokio::test]
async fn deleting_a_pool_leaves_the_slots_another_pool_asks_for() {
    let nodes = Arc::new(StaticNodes::new(
        Snapshot::new(vec![
            node_state("a", vec![warm(2, 2)], vec![]),
            node_state("b", vec![warm(2, 2)], vec![]),
        ])
        .expect("snapshot"),
    ));
    let gone = deleted(pool_object("old", 2, 6, Some(pushed_to(&["a", "b"]))));
    let other = pool_object("new", 2, 6, Some(pushed_to(&["a", "b"])));
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), &[gone.clone(), other]);
    scenario(ctx, handle, run_pool(gone), releases_only("old")).await;
    assert_eq!(sizes(&nodes), []);
}

#[tokio::test]
async fn deleting_a_pool_drains_only_the_nodes_it_pushed_to() {
    let nodes = Arc::new(StaticNodes::new(
        Snapshot::new(vec![
            node_state("a", vec![warm(2, 2)], vec![]),
            node_state("b", vec![warm(2, 2)], vec![]),
        ])
        .expect("snapshot"),
    ));
    // b matches the selector but the pool never got a size to it.
    let pool = deleted(pool_object("p", 2, 6, Some(pushed_to(&["a"]))));
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), std::slice::from_ref(&pool));
    scenario(ctx, handle, run_pool(pool), releases_only("p")).await;
    assert_eq!(sizes(&nodes), [("a".to_owned(), 0)]);
}

#[tokio::test]
async fn a_refused_token_is_the_pools_condition() {
    let nodes = Arc::new(StaticNodes::new(
        Snapshot::new(vec![
            node_state("a", vec![warm(2, 2)], vec![]),
            NodeState {
                ready: false,
                ..node_state("b", vec![], vec![])
            },
        ])
        .expect("snapshot"),
    ));
    let refused = "the node agent refused the token (Unauthenticated: bad); the controller's \
                   and the node plugin's fast-sandbox-agent-token differ";
    nodes.set_problem("b", Some(NodeProblem::TokenRejected(refused.into())));
    let pool = pool_object("p", 2, 6, None);
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
            assert_eq!(status["nodes"][1]["message"], refused);
            let ready = condition(status, "Ready");
            assert_eq!(ready["status"], "False");
            assert_eq!(ready["reason"], "AgentTokenRejected");
            assert!(
                ready["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("fast-sandbox-agent-token")),
                "{ready}"
            );
            reply(respond, 200, &answer);
            handle
        })
    })
    .await;
    // Nothing pushed to the node that refused.
    assert_eq!(sizes(&nodes), [("a".to_owned(), 2)]);
}

#[tokio::test]
async fn a_node_without_the_pool_is_the_pools_condition() {
    let nodes = Arc::new(StaticNodes::new(
        Snapshot::new(vec![
            node_state("a", vec![warm(2, 2)], vec![]),
            node_state("b", vec![], vec![]),
        ])
        .expect("snapshot"),
    ));
    // b's node plugin has no pool of this handler and shape (its agent
    // answers NOT_FOUND).
    let reason =
        "no pool for handler \"fast-runc\" and shape \"seccomp=runtime-default\" on this node";
    nodes.refuse(
        "b",
        Some(NodeError::NoSuchPool {
            node: "b".into(),
            reason: reason.into(),
        }),
    );
    let pool = pool_object("p", 2, 6, None);
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), std::slice::from_ref(&pool));
    let answer = serde_json::to_value(&pool).expect("JSON");
    let action = scenario(ctx, handle, run_pool(pool), |mut handle| {
        Box::pin(async move {
            let (_, _, body, respond) = next(&mut handle).await;
            let status = &body["status"];
            assert_eq!(status["nodes"][1]["node"], "b");
            assert!(status["nodes"][1].get("pushed").is_none(), "{status}");
            let message = status["nodes"][1]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("node plugin's config") && message.contains(reason),
                "{message}"
            );
            let ready = condition(status, "Ready");
            assert_eq!(ready["reason"], "PoolMissingOnNode");
            reply(respond, 200, &answer);
            handle
        })
    })
    .await;
    // Not a push failure to retry in 10 s: the node's config must change.
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

fn sandbox_answer(name: &str) -> Value {
    json!({"apiVersion": "fast-sandbox.io/v1alpha1", "kind": "Sandbox",
           "metadata": {"name": name, "namespace": "team"}, "spec": {"image": "x"}})
}

#[tokio::test]
async fn a_pod_the_api_server_rejects_is_a_condition() {
    let nodes = Arc::new(StaticNodes::new(
        Snapshot::new(vec![node_state("a", vec![warm(1, 4)], vec![])]).expect("snapshot"),
    ));
    let (client, handle) = mock();
    let ctx = context(client, nodes, &[]);
    let action = scenario(
        ctx,
        handle,
        run_sandbox(sandbox_object("sb1", None)),
        |mut handle| {
            Box::pin(async move {
                let (method, _, _, respond) = next(&mut handle).await;
                assert_eq!(method, Method::GET);
                not_found(respond, "pod");
                let (method, uri, _, respond) = next(&mut handle).await;
                assert_eq!((method, path(&uri)), (Method::POST, PODS));
                let message =
                    "Pod \"sb1\" is invalid: spec.containers[0].env[0].name: Invalid value: \"1x\"";
                reply(
                    respond,
                    422,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": message, "reason": "Invalid", "code": 422}),
                );
                let (method, uri, body, respond) = next(&mut handle).await;
                assert_eq!(
                    (method, path(&uri)),
                    (Method::PATCH, format!("{SANDBOXES}/sb1/status").as_str())
                );
                let status = &body["status"];
                assert_eq!(status["phase"], "Failed");
                let scheduled = condition(status, "Scheduled");
                assert_eq!(scheduled["reason"], "PodRejected");
                assert_eq!(
                    scheduled["message"],
                    format!("the API server rejected the pod: {message}")
                );
                reply(respond, 200, &sandbox_answer("sb1"));
                handle
            })
        },
    )
    .await;
    assert_eq!(action, Action::await_change());
}

/// A placed `Sandbox` whose pod was created `ago_ms` before now.
fn placed(name: &str, ago_ms: u64) -> fast_sandbox_controller::crd::Sandbox {
    let mut sb = sandbox_object(name, None);
    sb.status = Some(SandboxStatus {
        node_name: Some("a".into()),
        pod_created_unix_ms: Some(NOW_MS - ago_ms),
        ..Default::default()
    });
    sb
}

fn pulling_pod(name: &str) -> Value {
    let mut pod = owned_pod(name, "a", "Pending");
    pod["status"]["containerStatuses"] = json!([{
        "name": "sandbox", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"waiting": {"reason": "ImagePullBackOff",
                              "message": "Back-off pulling image \"registry.example/agent:1\""}}
    }]);
    pod
}

/// Script: `GET` the pod → one stuck pulling its image; then the status
/// `PATCH`, returned with its responder.
async fn pulling_then_status(handle: &mut Handle) -> (Value, Respond) {
    let (method, _, _, respond) = next(handle).await;
    assert_eq!(method, Method::GET);
    reply(respond, 200, &pulling_pod("sb1"));
    let (method, _, body, respond) = next(handle).await;
    assert_eq!(method, Method::PATCH);
    (body, respond)
}

#[tokio::test]
async fn an_image_pull_failure_is_reported_within_the_grace() {
    let (client, handle) = mock();
    let ctx = context(client, sandbox_directory(), &[]);
    let action = scenario(
        ctx,
        handle,
        run_sandbox(placed("sb1", 20_000)),
        |mut handle| {
            Box::pin(async move {
                let (body, respond) = pulling_then_status(&mut handle).await;
                let status = &body["status"];
                assert_eq!(status["phase"], "Pending");
                let ready = condition(status, "Ready");
                assert_eq!(ready["reason"], "ImagePullFailing");
                assert!(
                    ready["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("ImagePullBackOff")),
                    "{ready}"
                );
                reply(respond, 200, &sandbox_answer("sb1"));
                handle
            })
        },
    )
    .await;
    // Looked at again when the grace (120 s by default) runs out.
    assert_eq!(action, Action::requeue(Duration::from_secs(100)));
}

#[tokio::test]
async fn an_image_pull_failure_past_the_grace_fails_the_sandbox_and_frees_its_slot() {
    let (client, handle) = mock();
    let ctx = context(client, sandbox_directory(), &[]);
    let action = scenario(
        ctx,
        handle,
        run_sandbox(placed("sb1", 200_000)),
        |mut handle| {
            Box::pin(async move {
                let (body, respond) = pulling_then_status(&mut handle).await;
                let status = &body["status"];
                assert_eq!(status["phase"], "Failed");
                let ready = condition(status, "Ready");
                assert_eq!(ready["reason"], "ImagePullFailed");
                reply(respond, 200, &sandbox_answer("sb1"));
                // The pod goes, and with it the warm slot it holds.
                let (method, uri, _, respond) = next(&mut handle).await;
                assert_eq!(
                    (method, path(&uri)),
                    (Method::DELETE, format!("{PODS}/sb1").as_str())
                );
                reply(respond, 200, &pulling_pod("sb1"));
                handle
            })
        },
    )
    .await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn time_to_running_counts_from_the_sandboxs_creation() {
    let (client, handle) = mock();
    let ctx = context(client, sandbox_directory(), &[]);
    // Created 6 s ago; it waited for a slot, its pod is 500 ms old.
    let mut sb = placed("sb1", 500);
    sb.metadata.creation_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_millisecond(i64::try_from(NOW_MS - 6_000).expect("ms"))
            .expect("a time"),
    ));
    scenario(ctx, handle, run_sandbox(sb), |mut handle| {
        Box::pin(async move {
            let (_, _, _, respond) = next(&mut handle).await;
            reply(respond, 200, &owned_pod("sb1", "a", "Running"));
            let (_, _, body, respond) = next(&mut handle).await;
            assert_eq!(body["status"]["timeToRunningMs"], 6_000);
            assert_eq!(body["status"]["podCreatedUnixMs"], NOW_MS - 500);
            reply(respond, 200, &sandbox_answer("sb1"));
            handle
        })
    })
    .await;
}

#[tokio::test]
async fn a_waiting_sandbox_is_retried_as_soon_as_a_node_reports() {
    let full = || Snapshot::new(vec![node_state("a", vec![warm(0, 4)], vec![])]).expect("snapshot");
    let nodes = Arc::new(StaticNodes::new(full()));
    let (client, handle) = mock();
    let ctx = Arc::new(context(client, nodes.clone(), &[]));
    let mut retries = Box::pin(ctx.waiting_on_nodes(|_| true));
    let sb = sandbox_object("sb1", None);
    let reconciled = {
        let ctx = ctx.clone();
        let sb = Arc::new(sb.clone());
        tokio::spawn(async move { fast_sandbox_controller::sandbox::reconcile(sb, ctx).await })
    };
    let mut handle = handle;
    handle.allow(10);
    let (_, _, _, respond) = next(&mut handle).await;
    not_found(respond, "pod");
    let (_, _, body, respond) = next(&mut handle).await;
    assert_eq!(
        condition(&body["status"], "Scheduled")["reason"],
        "NoEligibleNode"
    );
    reply(respond, 200, &sandbox_answer("sb1"));
    let action = reconciled.await.expect("joined").expect("reconciled");
    // The timer is only the fallback.
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));

    // A report with a freed slot: the Sandbox is handed back at once.
    let freed_at = std::time::Instant::now();
    nodes
        .replace(Snapshot::new(vec![node_state("a", vec![warm(1, 4)], vec![])]).expect("snapshot"));
    let retried = tokio::time::timeout(Duration::from_secs(1), retries.next())
        .await
        .expect("retried well before the 5 s timer")
        .expect("the stream lives");
    assert_eq!(retried, ObjectRef::from_obj(&sb));
    eprintln!(
        "slot freed → waiting Sandbox handed back for placement: {:?}",
        freed_at.elapsed()
    );

    // Deleted while waiting: forgotten, never handed back.
    let mut gone = Box::pin(ctx.waiting_on_nodes(|_| false));
    nodes.replace(full());
    let next = tokio::time::timeout(Duration::from_millis(200), gone.next()).await;
    assert!(next.is_err(), "a deleted Sandbox was handed back: {next:?}");
    nodes.replace(full());
    let next = tokio::time::timeout(Duration::from_millis(200), retries.next()).await;
    assert!(next.is_err(), "forgotten for good: {next:?}");
}

#[tokio::test]
async fn the_controller_starts_without_the_sandbox_crd() {
    let (client, mut handle) = mock();
    handle.allow(10);
    let script = tokio::spawn(async move {
        let (method, uri, _, respond) = next(&mut handle).await;
        assert_eq!((method, uri.as_str()), (Method::GET, "/version"));
        reply(
            respond,
            200,
            &json!({"major": "1", "minor": "26", "gitVersion": "v1.26.0",
            "gitCommit": "", "gitTreeState": "", "buildDate": "", "goVersion": "",
            "compiler": "", "platform": ""}),
        );
        let (_, uri, _, respond) = next(&mut handle).await;
        assert_eq!(path(&uri), POOLS);
        reply(
            respond,
            200,
            &json!({"apiVersion": "fast-sandbox.io/v1alpha1",
            "kind": "SandboxPoolList", "metadata": {}, "items": []}),
        );
        let (_, uri, _, respond) = next(&mut handle).await;
        assert_eq!(path(&uri), "/apis/fast-sandbox.io/v1alpha1/fastsandboxes");
        not_found(respond, "the server could not find the requested resource");
        handle
    });
    let served = run::preflight(&client, "https://test")
        .await
        .expect("starts");
    assert_eq!(
        served,
        run::Served {
            sandbox_pools: true,
            sandboxes: false
        }
    );
    script.await.expect("script");
}

#[tokio::test]
async fn uninstall_removes_only_the_controllers_finalizer() {
    let (client, mut handle) = mock();
    handle.allow(10);
    let script = tokio::spawn(async move {
        let (method, uri, _, respond) = next(&mut handle).await;
        assert_eq!((method, path(&uri)), (Method::GET, POOLS));
        let mut ours = serde_json::to_value(pool_object("p", 1, 2, None)).expect("JSON");
        ours["metadata"]["finalizers"] = json!(["example.com/keep", "fast-sandbox.io/pool"]);
        let mut theirs = serde_json::to_value(pool_object("q", 1, 2, None)).expect("JSON");
        theirs["metadata"]["finalizers"] = json!(["example.com/keep"]);
        reply(
            respond,
            200,
            &json!({"apiVersion": "fast-sandbox.io/v1alpha1",
            "kind": "SandboxPoolList", "metadata": {}, "items": [ours.clone(), theirs]}),
        );
        let (method, uri, body, respond) = next(&mut handle).await;
        assert_eq!(
            (method, path(&uri)),
            (Method::PATCH, format!("{POOLS}/p").as_str())
        );
        assert_eq!(
            body,
            json!({"metadata": {"finalizers": ["example.com/keep"], "resourceVersion": "1"}})
        );
        reply(respond, 200, &ours);
        handle
    });
    assert_eq!(run::remove_finalizers(&client).await.expect("removed"), 1);
    let mut handle = script.await.expect("script");
    drop(client);
    let extra = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("the client was dropped");
    assert!(extra.is_none(), "no other request");
}

/// Not ready, and why, in a waiting `Sandbox`'s condition.
#[tokio::test]
async fn a_sandbox_says_why_a_node_is_not_ready() {
    let nodes = Arc::new(StaticNodes::new(
        Snapshot::new(vec![NodeState {
            ready: false,
            ..node_state("a", vec![warm(4, 4)], vec![])
        }])
        .expect("snapshot"),
    ));
    nodes.set_problem(
        "a",
        Some(NodeProblem::AgentNotReady(
            "the node plugin cannot reach its containerd".into(),
        )),
    );
    let (client, handle) = mock();
    let ctx: Context = context(client, nodes, &[]);
    scenario(
        ctx,
        handle,
        run_sandbox(sandbox_object("sb1", None)),
        |mut handle| {
            Box::pin(async move {
                let (_, _, _, respond) = next(&mut handle).await;
                not_found(respond, "pod");
                let (_, _, body, respond) = next(&mut handle).await;
                let message = condition(&body["status"], "Scheduled")["message"].clone();
                assert!(
                    message.as_str().is_some_and(|m| m
                        .contains("1: NodeNotReady: the node plugin cannot reach its containerd")),
                    "{message}"
                );
                reply(respond, 200, &sandbox_answer("sb1"));
                handle
            })
        },
    )
    .await;
}

#[tokio::test]
async fn a_pool_whose_nodes_all_left_clears_them_from_its_status() {
    let nodes = Arc::new(StaticNodes::new(
        Snapshot::new(vec![node_state("a", vec![warm(2, 2)], vec![])]).expect("snapshot"),
    ));
    let mut pool = pool_object("p", 2, 6, Some(pushed_to(&["a"])));
    pool.spec.node_selector = [("pool".to_owned(), "none".to_owned())].into();
    let (client, handle) = mock();
    let ctx = context(client, nodes.clone(), std::slice::from_ref(&pool));
    let answer = serde_json::to_value(&pool).expect("JSON");
    scenario(ctx, handle, run_pool(pool), |mut handle| {
        Box::pin(async move {
            let (method, _, body, respond) = next(&mut handle).await;
            assert_eq!(method, Method::PATCH);
            let status = body["status"].as_object().expect("a status object");
            // A merge patch without the key would keep node a forever.
            assert_eq!(status.get("nodes"), Some(&Value::Null), "{body}");
            assert_eq!(
                condition(&body["status"], "Ready")["reason"],
                "NoMatchingNodes"
            );
            reply(respond, 200, &answer);
            handle
        })
    })
    .await;
    // The node it left is drained.
    assert_eq!(sizes(&nodes), [("a".to_owned(), 0)]);
}
