//! The `fast-sandbox-node` binary as an operator runs it (no root, no
//! containerd: the upstream is simply absent).

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fast_sandbox_proto::cri::{runtime_service_client::RuntimeServiceClient, VersionRequest};
use nix::{sys::signal::Signal, unistd::Pid};

const BIN: &str = env!("CARGO_BIN_EXE_fast-sandbox-node");

/// Polls `done` every few milliseconds for at most `limit`.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn unknown_config_field_fails_naming_field_and_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        "[socket]\npath = \"/tmp/x.sock\"\nmode = \"0666\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `mode`"), "{stderr}");
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
}

async fn version_error(socket: &Path) -> tonic::Status {
    let channel = fast_sandbox_shim::cri_channel(&socket.display().to_string()).expect("endpoint");
    RuntimeServiceClient::new(channel)
        .version(VersionRequest::default())
        .await
        .expect_err("upstream is absent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_until_sigterm_then_removes_its_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("run/cri.sock");
    let upstream = dir.path().join("containerd.sock");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        "[upstream]\ncall_timeout = \"3s\"\n[log]\nformat = \"json\"\n",
    )
    .expect("write");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .env(
            "FAST_SANDBOX_UPSTREAM_ENDPOINT",
            format!("unix://{}", upstream.display()),
        )
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");

    wait_until("the socket", Duration::from_secs(10), || socket.exists());
    let meta = std::fs::symlink_metadata(&socket).expect("stat");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // Serving, and honest about the missing upstream (the env override won).
    let err = version_error(&socket).await;
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(&upstream.display().to_string()),
        "{}",
        err.message()
    );

    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let output = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "{status}: {stderr}");
    assert!(!socket.exists(), "socket removed on shutdown");
    // JSON logs, one object per line.
    let first = stderr.lines().next().expect("some log output");
    assert!(
        first.starts_with('{') && first.contains("\"level\""),
        "{first}"
    );
    assert!(stderr.contains("SIGTERM"), "{stderr}");
}
