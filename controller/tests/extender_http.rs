//! The extender over real HTTP on 127.0.0.1, with the JSON kube-scheduler
//! sends (both the Go field names and the lower-case ones).

use std::net::SocketAddr;
use std::sync::Arc;

use fast_sandbox_controller::extender::{self, Extender, ExtenderConfig};
use fast_sandbox_controller::scoring::{
    CachedImage, NodeState, Policy, PoolState, SlotPolicy, Snapshot,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SHAPE: &str = "seccomp=runtime-default";

fn node(name: &str, free: Option<u32>, images: Vec<CachedImage>) -> NodeState {
    NodeState {
        name: name.into(),
        ready: true,
        pools: free
            .map(|free| PoolState {
                handler: "fast-runc".into(),
                upstream_handler: "runc".into(),
                shape: SHAPE.into(),
                free,
                total: 4,
            })
            .into_iter()
            .collect(),
        images,
        last_seen_unix_ms: u64::MAX / 2,
    }
}

fn big_image() -> CachedImage {
    CachedImage {
        tags: vec!["docker.io/library/python:3.12".into()],
        digests: vec![],
        size_bytes: 900 * 1024 * 1024,
    }
}

/// a: 2 free + the image; b: 2 free; c: pool empty; d: no pool; e: down.
fn snapshot() -> Snapshot {
    let mut down = node("e", Some(4), vec![]);
    down.ready = false;
    Snapshot::new(vec![
        node("a", Some(2), vec![big_image()]),
        node("b", Some(2), vec![]),
        node("c", Some(0), vec![big_image()]),
        node("d", None, vec![big_image()]),
        down,
    ])
    .expect("a valid snapshot")
}

async fn start(slots: SlotPolicy) -> SocketAddr {
    let config = ExtenderConfig {
        policy: Policy {
            slots,
            stale_after_ms: None,
        },
        filter_nodes: true,
        ..ExtenderConfig::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("bound address");
    let extender = Arc::new(Extender::new(config, snapshot()));
    tokio::spawn(extender::serve(listener, extender));
    addr
}

/// One HTTP/1.1 POST; returns the status code and the body.
async fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    call(addr, "POST", path, body).await
}

async fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

async fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Value {
    let (status, body) = post(addr, path, &body.to_string()).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("a JSON answer")
}

fn pod(runtime_class: Option<&str>) -> Value {
    let mut spec = json!({
        "containers": [{"name": "main", "image": "python:3.12"}],
    });
    if let Some(class) = runtime_class {
        spec["runtimeClassName"] = json!(class);
    }
    json!({"metadata": {"name": "p", "namespace": "ns", "uid": "u1"}, "spec": spec})
}

const ALL: [&str; 6] = ["a", "b", "c", "d", "e", "unknown"];

#[tokio::test]
async fn filter_by_name_keeps_nodes_with_a_free_slot_under_require() {
    let addr = start(SlotPolicy::Require).await;
    let result = post_json(
        addr,
        "/filter",
        &json!({"pod": pod(Some("fast-runc")), "nodenames": ALL}),
    )
    .await;
    assert_eq!(result["nodenames"], json!(["a", "b"]));
    let failed = &result["failedAndUnresolvableNodes"];
    assert_eq!(failed["c"], "warm pool has no free slot");
    assert_eq!(
        failed["d"],
        "no warm pool for this runtime handler and shape"
    );
    assert_eq!(failed["e"], "fast-sandbox node plugin not ready");
    assert_eq!(failed["unknown"], "no fast-sandbox status for this node");
    assert!(result.get("error").is_none());
}

#[tokio::test]
async fn filter_accepts_the_go_field_names() {
    let addr = start(SlotPolicy::Prefer).await;
    let result = post_json(
        addr,
        "/filter",
        &json!({"Pod": pod(Some("fast-runc")), "NodeNames": ALL, "Nodes": null}),
    )
    .await;
    // Under prefer an empty pool stays a candidate.
    assert_eq!(result["nodenames"], json!(["a", "b", "c"]));
}

#[tokio::test]
async fn filter_with_node_objects_answers_with_node_objects() {
    let addr = start(SlotPolicy::Require).await;
    let items: Vec<Value> = ALL
        .iter()
        .map(|n| json!({"metadata": {"name": n, "labels": {"zone": "z1"}}}))
        .collect();
    let result = post_json(
        addr,
        "/filter",
        &json!({"pod": pod(Some("fast-runc")), "nodes": {"metadata": {}, "items": items}}),
    )
    .await;
    let names: Vec<&str> = result["nodes"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        result["nodes"]["items"][0]["metadata"]["labels"]["zone"],
        "z1"
    );
    assert!(result.get("nodenames").is_none());
}

#[tokio::test]
async fn prioritize_prefers_free_slots_then_cached_images() {
    let addr = start(SlotPolicy::Prefer).await;
    let result = post_json(
        addr,
        "/prioritize",
        &json!({"pod": pod(Some("fast-runc")), "nodenames": ALL}),
    )
    .await;
    let scores: Vec<(String, i64)> = result
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_owned(),
                h["score"].as_i64().unwrap(),
            )
        })
        .collect();
    let score = |n: &str| scores.iter().find(|(h, _)| h == n).unwrap().1;
    assert_eq!(scores.len(), ALL.len());
    assert!(scores.iter().all(|(_, s)| (0..=10).contains(s)));
    // a and b both have two free slots; the image only a holds breaks it.
    assert!(score("a") > score("b"), "{scores:?}");
    assert!(score("b") > score("c"), "{scores:?}");
    assert_eq!(score("d"), 0);
    assert_eq!(score("e"), 0);
    assert_eq!(score("unknown"), 0);
}

#[tokio::test]
async fn other_pods_pass_through_with_equal_scores() {
    let addr = start(SlotPolicy::Require).await;
    for class in [None, Some("runc"), Some("gvisor")] {
        let args = json!({"pod": pod(class), "nodenames": ALL});
        let filtered = post_json(addr, "/filter", &args).await;
        assert_eq!(filtered["nodenames"], json!(ALL));
        assert!(filtered.get("failedAndUnresolvableNodes").is_none());
        let scores = post_json(addr, "/prioritize", &args).await;
        let scores = scores.as_array().unwrap();
        assert_eq!(scores.len(), ALL.len());
        assert!(scores.iter().all(|h| h["score"] == 0));
    }
}

#[tokio::test]
async fn malformed_arguments_are_an_error_not_a_pass() {
    let addr = start(SlotPolicy::Require).await;
    let (status, body) = post(addr, "/filter", "{not json").await;
    assert_eq!(status, 400);
    let result: Value = serde_json::from_str(&body).unwrap();
    assert!(result["error"]
        .as_str()
        .unwrap()
        .starts_with("bad extender arguments"));
    assert!(result.get("nodenames").is_none());

    let (status, _) = post(addr, "/prioritize", r#"{"nodenames": 5}"#).await;
    assert_eq!(status, 422);
    let (status, body) = post(addr, "/prioritize", r#"{"nodenames": ["a"]}"#).await;
    assert_eq!(
        (status, body.as_str()),
        (400, "no pod in the extender arguments")
    );

    let result = post_json(addr, "/filter", &json!({"nodenames": ["a"]})).await;
    assert_eq!(result["error"], "no pod in the extender arguments");
}

#[test]
fn the_documented_example_snapshot_loads() {
    let json = include_bytes!("../../docs/scheduling-snapshot.example.json");
    let snapshot = extender::parse_snapshot(json).unwrap();
    assert_eq!(snapshot.len(), 2);
    assert!(extender::parse_snapshot(b"{}").is_err());
    let duplicate = br#"[{"name":"a","ready":true,"last_seen_unix_ms":0},
                         {"name":"a","ready":true,"last_seen_unix_ms":0}]"#;
    assert!(extender::parse_snapshot(duplicate).is_err());
}

#[tokio::test]
async fn metrics_count_each_verb_the_extender_answers() {
    let addr = start(SlotPolicy::Prefer).await;
    let args = json!({"pod": pod(Some("fast-runc")), "nodenames": ALL});
    post_json(addr, "/filter", &args).await;
    post_json(addr, "/filter", &args).await;
    post_json(addr, "/prioritize", &args).await;
    let (status, text) = call(addr, "GET", "/metrics", "").await;
    assert_eq!(status, 200, "{text}");
    for line in [
        "fast_sandbox_controller_extender_request_duration_seconds_count{verb=\"filter\"} 2",
        "fast_sandbox_controller_extender_request_duration_seconds_count{verb=\"prioritize\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    // A malformed request is an error answer, not a timed decision.
    assert_eq!(post(addr, "/filter", "{").await.0, 400);
    let (_, text) = call(addr, "GET", "/metrics", "").await;
    assert!(text.contains("{verb=\"filter\"} 2"), "{text}");
}

#[tokio::test]
async fn health_and_unknown_routes() {
    let addr = start(SlotPolicy::Prefer).await;
    assert_eq!(call(addr, "GET", "/healthz", "").await, (200, "ok".into()));
    assert_eq!(call(addr, "GET", "/filter", "").await.0, 405);
    assert_eq!(post(addr, "/bind", "{}").await.0, 404);
}

#[tokio::test]
async fn a_reload_changes_answers_and_a_bad_file_keeps_the_old_snapshot() {
    let config = ExtenderConfig {
        filter_nodes: true,
        ..ExtenderConfig::default()
    };
    let extender = Arc::new(Extender::new(config, snapshot()));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(extender::serve(listener, extender.clone()));
    let args = json!({"pod": pod(Some("fast-runc")), "nodenames": ["a", "z"]});
    let before = post_json(addr, "/filter", &args).await;
    assert_eq!(before["nodenames"], json!(["a"]));

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("snapshot.json");
    let nodes = vec![node("z", Some(1), vec![])];
    std::fs::write(&file, serde_json::to_vec(&nodes).expect("json")).expect("write");
    assert_eq!(extender.reload(&file).expect("reload"), 1);
    let after = post_json(addr, "/filter", &args).await;
    assert_eq!(after["nodenames"], json!(["z"]));

    std::fs::write(&file, b"[{").expect("write");
    assert!(extender.reload(&file).is_err());
    assert!(extender.reload(&dir.path().join("missing.json")).is_err());
    assert_eq!(post_json(addr, "/filter", &args).await, after);
}
