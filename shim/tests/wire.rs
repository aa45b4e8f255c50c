//! Bad input on the shim's socket, at the wire: malformed protobuf bodies,
//! broken gRPC framing, oversized messages, garbage instead of HTTP/2, and
//! `RunPodSandbox` without a config. Each gets a gRPC error (as tonic gives
//! it, or upstream's own for a well-formed request upstream rejects), the
//! server keeps serving, and nothing reaches upstream or the slot source:
//! no sandbox is created, no slot is taken. In process, against the
//! stateful fake upstream and the recording fake slot source.

mod support;

use bytes::{BufMut, Bytes, BytesMut};
use fast_sandbox_proto::cri;
use fast_sandbox_shim::{slots::MissReason, MAX_MESSAGE_SIZE};
use support::{
    raw_call,
    slots::{kubelet_pod, run_request, runc_key, SlotsRig},
};
use tokio::{io::AsyncWriteExt as _, net::UnixStream};
use tonic::{codegen::http, Code};

const RUN: &str = "/runtime.v1.RuntimeService/RunPodSandbox";

/// Protobuf of a `RunPodSandboxRequest` for `fast-runc` of an ordinary pod.
fn good_run_body() -> Vec<u8> {
    prost::Message::encode_to_vec(&run_request("fast-runc", kubelet_pod("wire")))
}

/// Bodies prost must refuse, each with what is wrong with it.
fn malformed_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let good = good_run_body();
    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    let mut bad_utf8 = Vec::new();
    // Field 2 (runtime_handler), length-delimited, not UTF-8.
    bad_utf8.extend_from_slice(&[0x12, 0x02, 0xff, 0xfe]);
    let mut wire_type_7 = good.clone();
    wire_type_7.extend_from_slice(&[0x0f]);
    vec![
        ("all 0xff", vec![0xff; 16]),
        ("truncated half way", truncated),
        ("string field not UTF-8", bad_utf8),
        // Field 1 (config) says 2^35 bytes follow.
        (
            "length beyond the body",
            vec![0x0a, 0x80, 0x80, 0x80, 0x80, 0x01, 0x00],
        ),
        (
            "varint longer than 10 bytes",
            vec![
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ),
        ("invalid wire type 7", wire_type_7),
        // Field 1 declared as a varint where a message belongs.
        ("message field sent as a varint", vec![0x08, 0x01]),
        // Nesting deeper than prost's recursion limit (100).
        ("nesting beyond the recursion limit", nested_config(200)),
    ]
}

/// A config holding an unknown field 15 as a group of groups `depth` deep
/// (start-group tags, wire type 3): prost skips unknown groups recursively.
fn nested_config(depth: usize) -> Vec<u8> {
    let inner = vec![0x7b; depth]; // field 15, start group
    let mut body = vec![0x0a];
    prost::encoding::encode_varint(inner.len() as u64, &mut body);
    body.extend_from_slice(&inner);
    body
}

/// Nothing reached upstream since it had seen `upstream_calls` calls (the
/// placeholders' creation), so no sandbox was run, and the slot source was
/// never asked for a slot.
fn assert_untouched(rig: &SlotsRig, upstream_calls: usize, what: &str) {
    assert_eq!(rig.pods.seen.count(), upstream_calls, "{what}: forwarded");
    let record = rig.slots.record();
    assert!(record.claims.is_empty(), "{what}: a slot was claimed");
    assert!(record.misses.is_empty(), "{what}: counted as a miss");
}

async fn still_serving(rig: &SlotsRig) {
    assert!(rig.shim.is_serving(), "the server task ended");
    rig.shim
        .runtime()
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("the shim still answers");
}

#[tokio::test]
async fn malformed_protobuf_is_refused_before_upstream() {
    let rig = SlotsRig::start().await;
    rig.fill(&runc_key(), 1).await;
    let upstream_calls = rig.pods.seen.count();
    for (what, body) in malformed_bodies() {
        let err = raw_call(rig.shim.channel(), RUN, body)
            .await
            .expect_err(what);
        // tonic's answer to an undecodable message.
        assert_eq!(err.code(), Code::Internal, "{what}: {err:?}");
        assert!(!err.message().is_empty(), "{what}");
        assert_untouched(&rig, upstream_calls, what);
    }
    // The same socket still claims for a well-formed request.
    let answer = raw_call(rig.shim.channel(), RUN, good_run_body())
        .await
        .expect("a good request after the bad ones");
    let answer: cri::RunPodSandboxResponse =
        prost::Message::decode(answer.as_slice()).expect("a RunPodSandboxResponse");
    assert_eq!(rig.slots.record().claims.len(), 1);
    assert!(rig.slots.claimed(&answer.pod_sandbox_id).is_some());
    still_serving(&rig).await;
    rig.stop().await;
}

/// tonic 0.14 answers a message over the server's limit with `OutOfRange`
/// naming both sizes (older tonic said `ResourceExhausted`).
#[tokio::test]
async fn oversized_message_is_refused_and_not_forwarded() {
    let rig = SlotsRig::start().await;
    let upstream_calls = rig.pods.seen.count();
    let mut body = good_run_body();
    body.resize(MAX_MESSAGE_SIZE + 1, 0);
    let err = raw_call(rig.shim.channel(), RUN, body)
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{err:?}");
    assert_untouched(&rig, upstream_calls, "oversized");
    still_serving(&rig).await;
    rig.stop().await;
}

/// One gRPC call over a raw HTTP/2 stream: `body` is sent as the request
/// body verbatim (gRPC framing included or not), then the stream ends, or
/// is reset if `reset`. Returns the grpc-status and message (`None`: the
/// stream was reset or the connection closed without one).
async fn h2_call(rig: &SlotsRig, body: Bytes, reset: bool) -> Option<(Code, String)> {
    let io = UnixStream::connect(&rig.shim.socket)
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(io).await.expect("h2 handshake");
    let driver = tokio::spawn(connection);
    let mut client = client.ready().await.expect("h2 ready");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{RUN}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut stream) = client.send_request(request, false).expect("send");
    if reset {
        stream.send_data(body, false).expect("data");
        stream.send_reset(h2::Reason::CANCEL);
        driver.abort();
        return None;
    }
    stream.send_data(body, true).expect("data");
    let response = response.await.ok()?;
    let status_of = |headers: &http::HeaderMap| {
        headers.get("grpc-status").map(|code| {
            let code = code
                .to_str()
                .expect("ascii")
                .parse::<i32>()
                .expect("a number");
            let message = headers
                .get("grpc-message")
                .map(|m| m.to_str().expect("ascii").to_owned())
                .unwrap_or_default();
            (Code::from_i32(code), message)
        })
    };
    // A trailers-only answer carries the status in its headers.
    if let Some(status) = status_of(response.headers()) {
        driver.abort();
        return Some(status);
    }
    let mut body = response.into_body();
    // Bounded: the answer to one request.
    for _ in 0..64 {
        match body.data().await {
            Some(Ok(_)) => {}
            Some(Err(_)) => return None,
            None => break,
        }
    }
    let trailers = body.trailers().await.ok()??;
    driver.abort();
    status_of(&trailers)
}

fn grpc_frame(compressed: bool, declared_len: u32, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + payload.len());
    frame.put_u8(u8::from(compressed));
    frame.put_u32(declared_len);
    frame.put_slice(payload);
    frame.freeze()
}

#[tokio::test]
async fn broken_grpc_framing_is_refused_before_upstream() {
    let rig = SlotsRig::start().await;
    rig.fill(&runc_key(), 1).await;
    let upstream_calls = rig.pods.seen.count();
    let good = good_run_body();
    let len = u32::try_from(good.len()).expect("small");
    let over = u32::try_from(MAX_MESSAGE_SIZE + 1).expect("fits");
    let cases: [(&str, Bytes, &[Code]); 5] = [
        (
            "frame shorter than its declared length",
            grpc_frame(false, len + 100, &good),
            &[Code::Internal],
        ),
        (
            "declared length over the limit, few bytes sent",
            grpc_frame(false, over, &good),
            &[Code::OutOfRange],
        ),
        (
            "compressed flag without an encoding",
            grpc_frame(true, len, &good),
            &[Code::Internal, Code::Unimplemented],
        ),
        (
            "a partial frame header",
            Bytes::from_static(&[0, 0, 0]),
            &[Code::Internal],
        ),
        (
            "no message at all",
            Bytes::new(),
            &[Code::Internal, Code::Unimplemented],
        ),
    ];
    for (what, body, codes) in cases {
        let (code, message) = h2_call(&rig, body, false)
            .await
            .unwrap_or_else(|| panic!("{what}: no grpc-status"));
        assert!(codes.contains(&code), "{what}: {code:?} {message}");
        assert_untouched(&rig, upstream_calls, what);
    }
    // A client that gives up half way through its message.
    assert!(h2_call(&rig, grpc_frame(false, len, &good[..10]), true)
        .await
        .is_none());
    // Garbage where the HTTP/2 preface belongs: that connection is closed.
    let mut garbage = UnixStream::connect(&rig.shim.socket)
        .await
        .expect("connect");
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\xff\xfe\x00\x01")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut garbage, &mut rest),
    )
    .await
    .expect("the shim closes a connection that is not HTTP/2");
    assert_untouched(&rig, upstream_calls, "garbage and resets");
    still_serving(&rig).await;
    // And still claims.
    let answer = raw_call(rig.shim.channel(), RUN, good)
        .await
        .expect("a good request after the bad ones");
    let answer: cri::RunPodSandboxResponse =
        prost::Message::decode(answer.as_slice()).expect("a RunPodSandboxResponse");
    assert!(rig.slots.claimed(&answer.pod_sandbox_id).is_some());
    rig.stop().await;
}

/// No config on a warm handler: not a claim (no slot is taken); forwarded
/// cold like any invalid request, so the caller gets upstream's own error
/// (containerd 1.6: `Unknown`, "sandbox config must include metadata"),
/// exactly as without the shim (`tests/tests/cri_bad_requests.rs` compares
/// with the real containerd), counted as an invalid-config miss.
#[tokio::test]
async fn run_without_config_takes_no_slot_and_gets_upstreams_error() {
    let rig = SlotsRig::start().await;
    let slots = rig.fill(&runc_key(), 1).await;
    let mut shim = rig.shim.runtime();
    let mut direct = rig.direct();
    let request = cri::RunPodSandboxRequest {
        config: None,
        runtime_handler: "fast-runc".into(),
    };
    let through = shim
        .run_pod_sandbox(request.clone())
        .await
        .expect_err("no config");
    let upstream = direct
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            runtime_handler: "runc".into(),
            ..request
        })
        .await
        .expect_err("no config");
    assert_eq!(
        (through.code(), through.message()),
        (upstream.code(), upstream.message())
    );
    assert!(through.message().contains("metadata"), "{through:?}");
    assert!(rig.slots.record().claims.is_empty());
    assert_eq!(rig.slots.misses(), [MissReason::InvalidConfig]);
    assert!(
        rig.slots.claimed(&slots[0]).is_none(),
        "the slot stays free"
    );
    let runs = rig.pods.store().runs.clone();
    let forwarded = runs
        .iter()
        .rev()
        .nth(1)
        .expect("forwarded through the shim");
    assert_eq!(forwarded.runtime_handler, "runc");
    assert_eq!(forwarded.config, None);
    assert_eq!(rig.pods.ids(), slots, "no sandbox was created");
    still_serving(&rig).await;
    rig.stop().await;
}
