//! Capture mode: every call through the shim is written as one JSON line
//! with the message bytes exactly as received, the decoded request and
//! answer, and the outcome; relayed and intercepted calls alike.

mod support;

use std::{sync::Arc, time::Duration};

use base64::Engine as _;
use fast_sandbox_proto::cri;
use fast_sandbox_shim::{slots::SlotSource, Capture, Shim};
use prost::Message;
use support::{
    pods::Pods,
    raw_call,
    slots::{handlers, kubelet_pod, run_request, start_pods, FakeSlots},
    upstream_config, wait_for, ShimUnderTest,
};

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test]
async fn every_call_is_captured_with_its_exact_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream_path = dir.path().join("upstream.sock");
    let upstream = start_pods(&upstream_path, Pods::default());
    let cfg = upstream_config(&upstream_path);
    let file = dir.path().join("capture.jsonl");
    let capture = Capture::open(&file).expect("capture file");
    let source: Arc<dyn SlotSource> = Arc::new(FakeSlots::default());
    let shim = ShimUnderTest::start_shim(&cfg, dir.path().join("shim.sock"), move |upstream| {
        Shim::with_slots(upstream, handlers(), source).with_capture(capture)
    })
    .await;

    // Relayed: Version (this fake upstream answers it Unimplemented).
    // Intercepted: a RunPodSandbox that goes cold.
    let version = cri::VersionRequest {
        version: "v1".into(),
    }
    .encode_to_vec();
    let unimplemented = raw_call(
        shim.channel(),
        "/runtime.v1.RuntimeService/Version",
        version.clone(),
    )
    .await
    .expect_err("the fake has no Version");
    let run = run_request("fast-runc", kubelet_pod("captured")).encode_to_vec();
    let answer = raw_call(
        shim.channel(),
        "/runtime.v1.RuntimeService/RunPodSandbox",
        run.clone(),
    )
    .await
    .expect("run");
    // Refused before upstream: captured with its code.
    let err = raw_call(
        shim.channel(),
        "/runtime.v1.RuntimeService/Version",
        vec![0xff; 4],
    )
    .await
    .expect_err("malformed");

    let captured = wait_for("three captured calls", Duration::from_secs(5), || {
        let lines = lines(&file);
        async move { (lines.len() >= 3).then_some(lines) }
    })
    .await;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let v = &captured[0];
    assert_eq!(v["method"], "/runtime.v1.RuntimeService/Version");
    assert_eq!(v["request_pb"], b64(&version));
    assert_eq!(v["request"]["version"], "v1");
    assert_eq!(v["code"], i64::from(unimplemented.code() as i32));
    assert_eq!(v["message"], unimplemented.message());
    assert!(v["response"].is_null(), "{v}");
    assert_eq!(v["authority"], "localhost");

    let r = &captured[1];
    assert_eq!(r["method"], "/runtime.v1.RuntimeService/RunPodSandbox");
    assert_eq!(r["request_pb"], b64(&run));
    assert_eq!(r["request"]["runtime_handler"], "fast-runc");
    assert_eq!(r["request"]["config"]["metadata"]["name"], "captured");
    assert_eq!(r["response_pb"], b64(&answer));
    assert_eq!(r["code"], 0);
    assert!(r["response"]["pod_sandbox_id"].is_string(), "{r}");
    assert!(r["elapsed_us"].as_u64().is_some());

    let bad = &captured[2];
    assert_eq!(bad["code"], i64::from(err.code() as i32));
    assert!(bad["response_pb"].is_null());
    assert!(bad["request"].is_null());

    shim.stop().await.expect("clean shutdown");
    upstream.stop().await;
}
