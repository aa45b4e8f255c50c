//! The shim forwards CRI faithfully: in-process, against a fake upstream on a
//! temporary unix socket (no root, no containerd).

mod support;

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    time::Duration,
};

use fast_sandbox_proto::cri;
use futures::StreamExt;
use support::*;
use tokio::time::Instant;
use tonic::{Code, Request};

fn status_request(id: &str) -> cri::ContainerStatusRequest {
    cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    }
}

#[tokio::test]
async fn unary_responses_equal_upstreams() {
    let rig = Rig::start().await;
    let mut shim = rig.shim.runtime();
    let mut direct = rig.direct();

    let req = cri::VersionRequest {
        version: "v1".into(),
    };
    let via_shim = shim.version(req.clone()).await.expect("version via shim");
    let straight = direct.version(req).await.expect("version direct");
    assert_eq!(via_shim.get_ref(), straight.get_ref());
    assert_eq!(via_shim.get_ref(), &version_response("v1"));

    let list = shim
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("list via shim");
    assert_eq!(list.into_inner().items, sandboxes());

    let status = shim
        .container_status(status_request("c1"))
        .await
        .expect("status via shim");
    let straight = direct
        .container_status(status_request("c1"))
        .await
        .expect("status direct");
    assert_eq!(status.get_ref(), straight.get_ref());

    let run = shim
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: "web".into(),
                    uid: "u1".into(),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                ..Default::default()
            }),
            runtime_handler: "runc".into(),
        })
        .await
        .expect("run via shim");
    assert_eq!(run.get_ref().pod_sandbox_id, "sb-web");

    let images = rig
        .shim
        .image()
        .list_images(cri::ListImagesRequest::default())
        .await
        .expect("images via shim");
    assert_eq!(images.get_ref().images[0].id, "sha256:abc");
}

#[tokio::test]
async fn streaming_urls_are_upstreams() {
    let rig = Rig::start().await;
    let exec = rig
        .shim
        .runtime()
        .exec(cri::ExecRequest {
            container_id: "c9".into(),
            cmd: vec!["sh".into()],
            ..Default::default()
        })
        .await
        .expect("exec via shim");
    assert_eq!(exec.get_ref().url, "http://127.0.0.1:10010/exec/c9");
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let rig = Rig::start().await;
    let mut shim = rig.shim.runtime();
    let mut direct = rig.direct();

    for id in ["missing", ""] {
        let via_shim = shim
            .container_status(status_request(id))
            .await
            .expect_err("error via shim");
        let straight = direct
            .container_status(status_request(id))
            .await
            .expect_err("error direct");
        assert_eq!(via_shim.code(), straight.code(), "{id:?}");
        assert_eq!(via_shim.message(), straight.message(), "{id:?}");
        assert_eq!(via_shim.details(), straight.details(), "{id:?}");
    }

    let not_found = shim
        .container_status(status_request("missing"))
        .await
        .expect_err("not found");
    assert_eq!(not_found.code(), Code::NotFound);
    assert_eq!(not_found.details(), NOT_FOUND_DETAILS);
    assert_eq!(
        not_found.metadata().get("x-fake-reason").expect("metadata"),
        "gone"
    );

    let invalid = shim
        .container_status(status_request(""))
        .await
        .expect_err("invalid");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert_eq!(invalid.message(), "container id must not be empty");

    let unimplemented = shim
        .remove_container(cri::RemoveContainerRequest::default())
        .await
        .expect_err("unimplemented upstream");
    assert_eq!(unimplemented.code(), Code::Unimplemented);
    assert_eq!(unimplemented.message(), "fake upstream: remove_container");

    let run = shim
        .run_pod_sandbox(cri::RunPodSandboxRequest::default())
        .await
        .expect_err("malformed by upstream's rules");
    assert_eq!(run.code(), Code::InvalidArgument);
    assert!(rig.shim.is_serving());
}

#[tokio::test]
async fn metadata_crosses_the_hop_deliberately() {
    let rig = Rig::start().await;
    let mut req = Request::new(cri::VersionRequest::default());
    req.metadata_mut()
        .insert("x-request-id", "42".parse().expect("ascii"));
    req.set_timeout(Duration::from_secs(3));
    let response = rig.shim.runtime().version(req).await.expect("version");

    // Upstream's response metadata reaches the caller.
    assert_eq!(
        response
            .metadata()
            .get("x-fake-upstream")
            .expect("response metadata"),
        "yes"
    );

    // The caller's custom metadata reaches upstream; the deadline is the
    // caller's remaining time, not copied verbatim and not the shim default.
    let seen = rig.fake.seen.last();
    assert_eq!(seen.get("x-request-id").expect("forwarded"), "42");
    let timeout = seen
        .get("grpc-timeout")
        .expect("deadline forwarded")
        .to_str()
        .expect("ascii");
    let parsed = parse_timeout(timeout);
    assert!(
        parsed <= Duration::from_secs(3) && parsed > Duration::from_secs(2),
        "{timeout}"
    );

    // Without a caller deadline upstream gets the shim's default (5 s here).
    rig.shim
        .runtime()
        .version(cri::VersionRequest::default())
        .await
        .expect("version");
    let seen = rig.fake.seen.last();
    let parsed = parse_timeout(
        seen.get("grpc-timeout")
            .expect("default deadline forwarded")
            .to_str()
            .expect("ascii"),
    );
    assert!(parsed <= Duration::from_secs(5) && parsed > Duration::from_secs(4));
}

fn parse_timeout(value: &str) -> Duration {
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().expect("digits");
    match unit {
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        other => panic!("unexpected unit {other}"),
    }
}

#[tokio::test]
async fn event_stream_is_relayed() {
    let rig = Rig::start().await;
    let stream = rig
        .shim
        .runtime()
        .get_container_events(cri::GetEventsRequest::default())
        .await
        .expect("open stream")
        .into_inner();
    let received: Vec<_> = stream
        .map(|item| item.expect("event"))
        .collect::<Vec<_>>()
        .await;
    assert_eq!(received, events());
}

#[tokio::test]
async fn shutdown_ends_open_event_streams() {
    let rig = Rig::start().await;
    let mut req = Request::new(cri::GetEventsRequest::default());
    req.metadata_mut()
        .insert(HOLD_OPEN, "1".parse().expect("ascii"));
    let mut stream = rig
        .shim
        .runtime()
        .get_container_events(req)
        .await
        .expect("open stream")
        .into_inner();
    for want in events() {
        assert_eq!(stream.next().await.expect("item").expect("event"), want);
    }
    let socket = rig.shim.socket.clone();
    let started = Instant::now();
    rig.shim.stop().await.expect("clean shutdown");
    // Well under the shim's drain timeout: the stream did not hold it up.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(stream.next().await.is_none_or(|end| end.is_err()));
    assert!(!socket.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn large_messages_pass() {
    let rig = Rig::start().await;
    let list = rig
        .shim
        .runtime()
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                id: BIG_LIST.into(),
                ..Default::default()
            }),
        })
        .await
        .expect("5 MiB list via shim");
    assert_eq!(list.into_inner().containers, big_container_list());
}

#[tokio::test]
async fn absent_upstream_is_unavailable_until_it_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream_path = dir.path().join("upstream.sock");
    let cfg = upstream_config(&upstream_path);
    let shim = ShimUnderTest::start(&cfg, dir.path().join("shim.sock")).await;
    let mut client = shim.runtime();

    for _ in 0..3 {
        let err = client
            .version(cri::VersionRequest::default())
            .await
            .expect_err("no upstream yet");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(err.message().contains(&cfg.endpoint), "{}", err.message());
    }
    assert!(shim.is_serving());

    let fake = Fake::default();
    let upstream = start_fake(&upstream_path, fake.clone());
    let response = wait_for("upstream to be reachable", Duration::from_secs(5), || {
        let mut client = client.clone();
        async move { client.version(cri::VersionRequest::default()).await.ok() }
    })
    .await;
    assert_eq!(response.get_ref(), &version_response(""));
    upstream.stop().await;
    shim.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn upstream_restart_is_survived() {
    let mut rig = Rig::start().await;
    let mut client = rig.shim.runtime();
    client
        .version(cri::VersionRequest::default())
        .await
        .expect("up");

    rig.upstream.take().expect("running").stop().await;
    let err = wait_for(
        "the shim to notice upstream is gone",
        Duration::from_secs(5),
        || {
            let mut client = client.clone();
            async move { client.version(cri::VersionRequest::default()).await.err() }
        },
    )
    .await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(rig.shim.is_serving());

    rig.upstream = Some(start_fake(&rig.upstream_path(), rig.fake.clone()));
    wait_for("upstream to be back", Duration::from_secs(5), || {
        let mut client = client.clone();
        async move { client.version(cri::VersionRequest::default()).await.ok() }
    })
    .await;
}

#[tokio::test]
async fn hung_upstream_hits_the_shim_default() {
    let rig = Rig::start_with(|cfg| fast_sandbox_shim::UpstreamConfig {
        call_timeout: Duration::from_millis(300),
        ..cfg
    })
    .await;
    let started = Instant::now();
    let err = rig
        .shim
        .runtime()
        .container_status(status_request(HANG))
        .await
        .expect_err("hangs");
    let elapsed = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("default"), "{}", err.message());
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    // Still serving, and the hung call did not poison the connection.
    rig.shim
        .runtime()
        .version(cri::VersionRequest::default())
        .await
        .expect("version after a timeout");
}

#[tokio::test]
async fn callers_shorter_deadline_wins() {
    let rig = Rig::start_with(|cfg| fast_sandbox_shim::UpstreamConfig {
        call_timeout: Duration::from_secs(30),
        ..cfg
    })
    .await;
    let mut client = plain_runtime_client(&rig.shim.socket);
    // Repeated: the shim's timer must beat tonic's own `grpc-timeout` guards
    // (server side, and the channel towards upstream; both answer Cancelled)
    // every time, not usually.
    for _ in 0..10 {
        let mut req = Request::new(status_request(HANG));
        req.set_timeout(Duration::from_millis(150));
        let started = Instant::now();
        let err = client.container_status(req).await.expect_err("hangs");
        let elapsed = started.elapsed();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(err.message().contains("caller"), "{}", err.message());
        assert!(
            elapsed >= Duration::from_millis(140) && elapsed < Duration::from_secs(3),
            "{elapsed:?}"
        );
    }
}

#[tokio::test]
async fn malformed_request_bytes_are_rejected_without_reaching_upstream() {
    let rig = Rig::start().await;
    let before = rig.fake.seen.count();
    let err = raw_call(
        rig.shim.channel(),
        "/runtime.v1.RuntimeService/Version",
        vec![0xff, 0xff, 0xff, 0xff],
    )
    .await
    .expect_err("not protobuf");
    assert_ne!(err.code(), Code::Ok);
    assert_eq!(rig.fake.seen.count(), before, "nothing forwarded");

    let err = raw_call(
        rig.shim.channel(),
        "/runtime.v1.RuntimeService/NoSuchMethod",
        Vec::new(),
    )
    .await
    .expect_err("unknown method");
    assert_eq!(err.code(), Code::Unimplemented);

    rig.shim
        .runtime()
        .version(cri::VersionRequest::default())
        .await
        .expect("still serving");
}

/// A call the shim does not change is relayed as bytes: upstream's answer
/// reaches the caller as upstream sent it, however broken (a message that
/// does not decode, status details that are not base64), exactly as if the
/// caller talked to upstream; the shim itself is not disturbed by it.
#[tokio::test]
async fn broken_upstream_replies_pass_unchanged_and_do_not_take_the_shim_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream_path = dir.path().join("upstream.sock");
    let upstream = start_broken_upstream(&upstream_path);
    let cfg = upstream_config(&upstream_path);
    let shim = ShimUnderTest::start(&cfg, dir.path().join("shim.sock")).await;

    let answer = raw_call(
        shim.channel(),
        "/runtime.v1.RuntimeService/Version",
        Vec::new(),
    )
    .await
    .expect("upstream's bytes");
    assert_eq!(answer, b"\xff\xff\xff\xff");

    let (head, _) = plain_http_call(
        &shim.socket,
        "/runtime.v1.RuntimeService/ContainerStatus",
        &status_request("x"),
    )
    .await;
    let header = |name: &str| {
        head.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("grpc-status").as_deref(), Some("5"), "{head:?}");
    assert_eq!(
        header("grpc-status-details-bin").as_deref(),
        Some("!!! not base64 !!!")
    );

    shim.runtime()
        .status(cri::StatusRequest::default())
        .await
        .expect("a good reply still goes through");
    assert!(shim.is_serving());
    upstream.stop().await;
    shim.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn served_socket_is_owner_only_and_removed_on_shutdown() {
    let rig = Rig::start().await;
    let socket = rig.shim.socket.clone();
    let meta = std::fs::symlink_metadata(&socket).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    rig.shim.stop().await.expect("clean shutdown");
    assert!(!socket.exists());
}

#[tokio::test]
async fn serve_refuses_a_regular_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("shim.sock");
    std::fs::write(&path, b"not a socket").expect("write");
    let cfg = upstream_config(&dir.path().join("upstream.sock"));
    let upstream = fast_sandbox_shim::Upstream::connect_lazy(&cfg).expect("config");
    let socket = fast_sandbox_shim::SocketConfig {
        path: path.clone(),
        group: None,
    };
    let err = fast_sandbox_shim::serve(fast_sandbox_shim::Shim::new(upstream), &socket, async {})
        .await
        .expect_err("regular file");
    assert!(
        matches!(err, fast_sandbox_shim::ShimError::NotASocket { .. }),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).expect("kept"), b"not a socket");
}

/// An upstream error is a trailers-only answer (the status in headers that
/// end the stream). Relayed, it must stay one: gRPC-Go (kubelet) reads
/// headers with a status followed by an empty DATA frame as `Internal:
/// server closed the stream without sending trailers`. Seen by the raw h2
/// client, which shows where the stream ended.
#[tokio::test]
async fn a_relayed_error_stays_trailers_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream_path = dir.path().join("upstream.sock");
    let upstream = start_broken_upstream(&upstream_path);
    let cfg = upstream_config(&upstream_path);
    let shim = ShimUnderTest::start(&cfg, dir.path().join("shim.sock")).await;

    let io = tokio::net::UnixStream::connect(&shim.socket)
        .await
        .expect("connect");
    let (mut sender, connection) = h2::client::handshake(io).await.expect("handshake");
    let driver = tokio::spawn(connection);
    let request = http::Request::post("http://localhost/runtime.v1.RuntimeService/ContainerStatus")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (answer, mut stream) = sender.send_request(request, false).expect("send");
    let mut body = vec![0u8, 0, 0, 0, 0];
    let message = prost::Message::encode_to_vec(&status_request("x"));
    body[1..5].copy_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    body.extend_from_slice(&message);
    stream.send_data(body.into(), true).expect("data");
    let answer = answer.await.expect("an answer");
    assert_eq!(
        answer.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"5"[..]),
        "{answer:?}"
    );
    assert!(
        answer.body().is_end_stream(),
        "the status headers must end the stream: {answer:?}"
    );
    driver.abort();
    upstream.stop().await;
    shim.stop().await.expect("clean shutdown");
}
