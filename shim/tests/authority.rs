//! Any `:authority` a real CRI client sends is accepted, as containerd
//! accepts it: a socket path (kubelet, crictl and critest before kubernetes
//! PR #123463; grpc-python from 1.57; grpcurl), a %-encoded path,
//! `localhost` (gRPC-Go today), `host:port`. Driven by a real HTTP/2 client,
//! curl (nghttp2), which puts its `Host` header into `:authority` as given.

mod support;

use std::{path::Path, process::Command};

use fast_sandbox_shim::ShimError;
use support::Rig;

const VERSION: &str = "/runtime.v1.RuntimeService/Version";

/// One unary `Version` call with `authority` through curl; curl's output:
/// response headers and trailers, then the body's length.
fn curl_version(socket: &Path, authority: &str, body_file: &Path) -> String {
    let out = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--http2-prior-knowledge",
            "--max-time",
            "10",
        ])
        .arg("--unix-socket")
        .arg(socket)
        .args(["-H", &format!("Host: {authority}")])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("--data-binary")
        .arg(format!("@{}", body_file.display()))
        .args(["--dump-header", "-", "--output", "/dev/null"])
        .args(["--write-out", "body=%{size_download}\n"])
        .arg(format!("http://localhost{VERSION}"))
        .output()
        .unwrap_or_else(|e| panic!("running curl (Debian package curl): {e}"));
    assert!(
        out.status.success(),
        "curl with :authority {authority:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_authority_a_real_client_sends_is_served() {
    let rig = Rig::start().await;
    let body = rig.dir.path().join("empty-request");
    // A gRPC frame: not compressed, length 0 (an empty VersionRequest).
    std::fs::write(&body, [0u8; 5]).unwrap_or_else(|e| panic!("{e}"));
    let socket = rig.shim.socket.clone();
    let encoded = socket.display().to_string().replace('/', "%2F");
    let authorities = [
        socket.display().to_string(),
        encoded,
        "localhost".to_owned(),
        "127.0.0.1:10010".to_owned(),
    ];
    for authority in &authorities {
        let (socket, body, sent) = (socket.clone(), body.clone(), authority.clone());
        let out = tokio::task::spawn_blocking(move || curl_version(&socket, &sent, &body))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.starts_with("HTTP/2 200"), "{authority}: {out}");
        assert!(out.contains("grpc-status: 0"), "{authority}: {out}");
        let size: usize = out
            .lines()
            .find_map(|l| l.strip_prefix("body="))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no body size in {out}"));
        // The 5-byte gRPC prefix and a non-empty VersionResponse.
        assert!(size > 5, "{authority}: {out}");
    }
    assert_eq!(rig.fake.seen.count(), authorities.len());
    let stopped: Result<(), ShimError> = rig.shim.stop().await;
    stopped.unwrap_or_else(|e| panic!("{e}"));
}
