//! Issue 14 item 4 against a scripted API server (kube-rs `tower-test`): a
//! `Sandbox`'s pod may only use what its creator could use without the
//! controller. Its environment takes literal values only, and binding by
//! `nodeName` respects what kube-scheduler would: taints, cordon and
//! resource fit.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use fast_sandbox_controller::crd::Sandbox;
use fast_sandbox_controller::reconcile::Context;
use http::Method;
use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, Node, Pod, ResourceRequirements, SecretKeySelector, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use serde_json::{json, Value};

/// Script: GET the pod (none), create it, write the status; returns the
/// created pod.
async fn binds(handle: &mut Handle) -> Value {
    let (method, uri, _, respond) = next(handle).await;
    assert_eq!((method, uri), (Method::GET, format!("{PODS}/sb1")));
    not_found(respond, "pod");
    let (method, uri, pod, respond) = next(handle).await;
    assert_eq!((method, path(&uri)), (Method::POST, PODS));
    // What deploy/controller/admission-policy.yaml holds the pod to.
    let spec = &pod["spec"];
    assert_eq!(spec["automountServiceAccountToken"], false);
    for absent in [
        "volumes",
        "serviceAccountName",
        "hostNetwork",
        "hostPID",
        "hostIPC",
    ] {
        assert!(spec.get(absent).is_none(), "{absent} in {spec}");
    }
    assert!(spec["containers"][0].get("envFrom").is_none());
    assert!(spec["containers"][0].get("securityContext").is_none());
    reply(respond, 201, &pod);
    let status = sandbox_status_written(handle, "sb1").await;
    assert_eq!(status["nodeName"], pod["spec"]["nodeName"]);
    pod
}

/// Script: GET the pod (none), then only a `Scheduled=False` status; returns
/// the condition.
async fn waits(handle: &mut Handle) -> Value {
    let (method, _, _, respond) = next(handle).await;
    assert_eq!(method, Method::GET);
    not_found(respond, "pod");
    let status = sandbox_status_written(handle, "sb1").await;
    condition(&status, "Scheduled").clone()
}

/// Reconciles `sb` over API Nodes a and b (a is the scorer's choice: it
/// caches the image) and returns what `script` returned.
async fn place(
    sb: Sandbox,
    api_nodes: [Node; 2],
    prepare: impl FnOnce(&Context),
    script: impl FnOnce(Handle) -> futures::future::BoxFuture<'static, (Handle, Value)> + Send + 'static,
) -> (Action, Value) {
    let (client, handle) = mock();
    let ctx = context_with_nodes(client, sandbox_directory(), &[], api_nodes);
    prepare(&ctx);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let action = scenario(ctx, handle, run_sandbox(sb), |handle| {
        Box::pin(async move {
            let (handle, seen) = script(handle).await;
            tx.send(seen).expect("the test waits");
            handle
        })
    })
    .await;
    (action, rx.await.expect("the script ran"))
}

fn nodes_ab() -> [Node; 2] {
    [
        api_node("a", &[("pool", "fast")]),
        api_node("b", &[("pool", "fast")]),
    ]
}

fn tainted(mut node: Node, key: &str, effect: &str) -> Node {
    node.spec.get_or_insert_default().taints = Some(vec![Taint {
        key: key.into(),
        value: Some("x".into()),
        effect: effect.into(),
        ..Default::default()
    }]);
    node
}

fn binds_to() -> impl FnOnce(Handle) -> futures::future::BoxFuture<'static, (Handle, Value)> {
    |mut handle| {
        Box::pin(async move {
            let pod = binds(&mut handle).await;
            (handle, pod)
        })
    }
}

fn waits_for() -> impl FnOnce(Handle) -> futures::future::BoxFuture<'static, (Handle, Value)> {
    |mut handle| {
        Box::pin(async move {
            let scheduled = waits(&mut handle).await;
            (handle, scheduled)
        })
    }
}

#[tokio::test]
async fn a_sandbox_reading_a_secret_is_refused() {
    let mut sb = sandbox_object("sb1", None);
    sb.spec.env = vec![
        EnvVar {
            name: "MODE".into(),
            value: Some("fast".into()),
            ..Default::default()
        },
        EnvVar {
            name: "TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: "team-admin-token".into(),
                    key: "token".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    // No pod is read or created: only the refusal is written.
    let (action, scheduled) = place(
        sb,
        nodes_ab(),
        |_| {},
        |mut handle| {
            Box::pin(async move {
                let status = sandbox_status_written(&mut handle, "sb1").await;
                assert_eq!(status["phase"], "Failed");
                (handle, condition(&status, "Scheduled").clone())
            })
        },
    )
    .await;
    assert_eq!(scheduled["status"], "False");
    assert_eq!(scheduled["reason"], "EnvValueFromRefused");
    let message = scheduled["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("spec.env[1].valueFrom.secretKeyRef: refused"),
        "{message}"
    );
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_taint_without_a_toleration_keeps_the_pod_off_the_node() {
    for effect in ["NoSchedule", "NoExecute"] {
        let nodes = [
            tainted(api_node("a", &[]), "dedicated", effect),
            nodes_ab()[1].clone(),
        ];
        let (_, pod) = place(sandbox_object("sb1", None), nodes, |_| {}, binds_to()).await;
        assert_eq!(pod["spec"]["nodeName"], "b", "{effect}");
    }
    // A PreferNoSchedule taint does not keep it off.
    let nodes = [
        tainted(api_node("a", &[]), "dedicated", "PreferNoSchedule"),
        nodes_ab()[1].clone(),
    ];
    let (_, pod) = place(sandbox_object("sb1", None), nodes, |_| {}, binds_to()).await;
    assert_eq!(pod["spec"]["nodeName"], "a");
}

#[tokio::test]
async fn a_tolerated_taint_admits_the_pod_and_the_pod_carries_the_toleration() {
    let mut sb = sandbox_object("sb1", None);
    sb.spec.tolerations = vec![Toleration {
        key: Some("dedicated".into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    }];
    let nodes = [
        tainted(api_node("a", &[]), "dedicated", "NoSchedule"),
        nodes_ab()[1].clone(),
    ];
    let (_, pod) = place(sb, nodes, |_| {}, binds_to()).await;
    assert_eq!(pod["spec"]["nodeName"], "a");
    assert_eq!(
        pod["spec"]["tolerations"],
        json!([{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}])
    );
}

#[tokio::test]
async fn a_cordoned_node_is_skipped_and_named_when_nothing_else_is_left() {
    let mut cordoned_a = api_node("a", &[]);
    cordoned_a.spec.get_or_insert_default().unschedulable = Some(true);
    let (_, pod) = place(
        sandbox_object("sb1", None),
        [cordoned_a.clone(), nodes_ab()[1].clone()],
        |_| {},
        binds_to(),
    )
    .await;
    assert_eq!(pod["spec"]["nodeName"], "b");

    let mut cordoned_b = api_node("b", &[]);
    cordoned_b.spec.get_or_insert_default().unschedulable = Some(true);
    let (_, scheduled) = place(
        sandbox_object("sb1", None),
        [cordoned_a, cordoned_b],
        |_| {},
        waits_for(),
    )
    .await;
    assert_eq!(scheduled["reason"], "NoEligibleNode");
    let message = scheduled["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("2: cordoned (spec.unschedulable)"),
        "{message}"
    );
}

fn requesting(cpu: &str) -> Sandbox {
    let mut sb = sandbox_object("sb1", None);
    sb.spec.resources = Some(ResourceRequirements {
        requests: Some(BTreeMap::from([("cpu".to_owned(), Quantity(cpu.into()))])),
        ..Default::default()
    });
    sb
}

/// A running pod on `node` requesting `cpu`, as the pod watch shows it.
fn running_on(node: &str, cpu: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": format!("busy-{node}"), "namespace": "other"},
        "spec": {"nodeName": node, "containers": [{"name": "c",
                 "resources": {"requests": {"cpu": cpu}}}]},
        "status": {"phase": "Running"}
    }))
    .expect("a Pod")
}

#[tokio::test]
async fn a_node_without_room_is_skipped() {
    // a (4 CPUs) runs a pod requesting 2: a Sandbox asking 3 goes to b.
    let busy_a = |ctx: &Context| {
        ctx.usage
            .apply(&watcher::Event::Apply(running_on("a", "2")));
    };
    let (_, pod) = place(requesting("3"), nodes_ab(), busy_a, binds_to()).await;
    assert_eq!(pod["spec"]["nodeName"], "b");
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["requests"]["cpu"],
        "3"
    );
    // Asking 2 it fits on a, its first choice.
    let (_, pod) = place(requesting("2"), nodes_ab(), busy_a, binds_to()).await;
    assert_eq!(pod["spec"]["nodeName"], "a");
    // Asking more than any node has: it waits, and says why.
    let (action, scheduled) = place(requesting("4500m"), nodes_ab(), busy_a, waits_for()).await;
    assert_eq!(scheduled["reason"], "NoEligibleNode");
    let message = scheduled["message"].as_str().unwrap_or_default();
    assert!(message.contains("2: insufficient cpu"), "{message}");
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(5)));
}

/// CPU milli-units and pods counted on `node`.
fn counted(ctx: &Context, node: &str) -> Option<(i128, i64)> {
    ctx.usage.with_totals(|totals| {
        totals
            .get(node)
            .map(|r| (r.milli.get("cpu").copied().unwrap_or(0), r.pods))
    })
}

#[tokio::test]
async fn a_placement_counts_its_requests_until_its_pod_is_seen_and_a_failed_one_none() {
    let (client, mut handle) = mock();
    handle.allow(100);
    let ctx = Arc::new(context_with_nodes(
        client,
        sandbox_directory(),
        &[],
        nodes_ab(),
    ));
    let server = tokio::spawn(async move {
        binds(&mut handle).await;
        // The second create fails: nothing stays counted for it.
        let (_, _, _, respond) = next(&mut handle).await;
        not_found(respond, "pod");
        let (method, _, _, respond) = next(&mut handle).await;
        assert_eq!(method, Method::POST);
        reply(
            respond,
            500,
            &json!({"kind": "Status", "apiVersion": "v1",
            "status": "Failure", "message": "etcd timeout", "code": 500}),
        );
        let status = sandbox_status_written(&mut handle, "sb2").await;
        assert_eq!(condition(&status, "Scheduled")["reason"], "PodCreateFailed");
        handle
    });
    let reconcile =
        |sb: Sandbox| fast_sandbox_controller::sandbox::reconcile(Arc::new(sb), ctx.clone());
    reconcile(requesting("3"))
        .await
        .expect("the first reconcile");
    // Before any pod watch shows it, a counts the pod's 3 CPUs: a second
    // Sandbox asking 3 would not fit there.
    assert_eq!(counted(&ctx, "a"), Some((3000, 1)));
    let mut second = requesting("1");
    second.metadata.name = Some("sb2".into());
    second.metadata.uid = Some("uid-sb2".into());
    assert!(
        reconcile(second).await.is_err(),
        "a failed create is an error"
    );
    let (a, b) = (counted(&ctx, "a"), counted(&ctx, "b").unwrap_or_default());
    assert_eq!(
        (a, b.1),
        (Some((3000, 1)), 0),
        "the failed pod is not counted"
    );
    tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("the script finished")
        .expect("the script did not panic");
}
