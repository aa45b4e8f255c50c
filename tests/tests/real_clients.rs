//! Real CRI clients of other stacks through the shim (issue 10, item 2).
//!
//! - Go: `tests/clients/go`, built offline from Debian's golang-go and
//!   golang-google-grpc-dev (grpc-go 1.33), dialing exactly as kubelet
//!   v1.26's remote runtime client: target = the socket path, a custom unix
//!   dialer, no authority override. It sends the socket path as the HTTP/2
//!   `:authority`.
//! - Python: `tests/clients/python`, PyPI's grpcio (>= 1.57) with its
//!   default `unix:` target.
//!
//! Each client runs the same scenario twice: straight to containerd (handler
//! `runc`) and through an in-process shim with a warm `fast-runc` pool of
//! one slot whose refill is held back (so its first pod is a warm hit and
//! its second a cold miss). Version, Status, RunPodSandbox (warm and cold),
//! PodSandboxStatus, CreateContainer, StartContainer, ListPodSandbox,
//! ExecSync, Exec (the streaming URL), GetContainerEvents, StopContainer,
//! RemoveContainer, StopPodSandbox, RemovePodSandbox: the answers must be
//! equal after the normalization documented in
//! `fast_sandbox_tests::clients`.
//!
//! The toolchains come from `hack/clients.sh` (run by `hack/test.sh`);
//! without them the tests skip locally and fail under `CI=true`.

mod support;

use std::{path::Path, process::Command, time::Duration};

use fast_sandbox_node::{config::NetworkMode, metrics::Miss};
use fast_sandbox_tests::{
    clients::{self, assert_same_answers, ClientRun},
    in_ci,
    pod::{remove_cgroup_dirs, TEST_NAMESERVER},
    CaseGuard, DevNode,
};
use support::{remove_pool_leftovers, WarmNode};

/// The toolchain, or `None` after saying why the test skips.
fn require<T>(test: &str, found: Result<T, String>) -> Option<T> {
    match found {
        Ok(v) => Some(v),
        Err(why) if in_ci() => panic!("{test}: CI=true but a client toolchain is missing: {why}"),
        Err(why) => {
            eprintln!("SKIP {test}: {why}; run hack/clients.sh (hack/test.sh does) and source its env file");
            None
        }
    }
}

/// The scenario's arguments, common to both clients (flag names without
/// dashes; the Go client takes `-name`, the Python one `--name`).
fn scenario_args(
    node: &DevNode,
    endpoint: &str,
    handler: &str,
    case: &str,
    logs: &Path,
) -> Vec<(&'static str, String)> {
    vec![
        ("endpoint", endpoint.to_owned()),
        ("handler", handler.to_owned()),
        ("image", node.test_image.clone()),
        ("case", case.to_owned()),
        ("log-root", logs.display().to_string()),
        ("nameserver", TEST_NAMESERVER.to_owned()),
    ]
}

/// Runs a client off the async workers: the shim it talks to is served on
/// this test's runtime.
async fn run_client(mut cmd: Command) -> ClientRun {
    tokio::task::spawn_blocking(move || ClientRun::run(&mut cmd))
        .await
        .expect("client task")
        .expect("the client runs")
}

/// Runs `client` straight to containerd and through a warm shim, and
/// checks both the warm/cold outcome and that the answers match.
async fn compare(test: &str, pool: &str, node: &DevNode, client: impl Fn(&str, &str) -> Command) {
    let _guard = CaseGuard::new(node, test).await.expect("clean slate");
    remove_pool_leftovers(node, pool).await.expect("leftovers");

    let direct = run_client(client(&node.containerd_endpoint, "runc")).await;
    for uid in direct.pod_uids() {
        remove_cgroup_dirs(&format!("/kubepods/besteffort/pod{uid}"));
    }
    assert!(
        direct.success && direct.fatal.is_none(),
        "{test}: the client failed straight to containerd: {:?}\n{}",
        direct.fatal,
        direct.stderr
    );

    // One free slot; no refill for the rest of the test, so the first pod
    // is a warm hit and the second a cold miss (pool_empty).
    let warm = WarmNode::start_tuned(
        node,
        pool,
        "runc",
        1,
        NetworkMode::Keep,
        Duration::from_secs(600),
    )
    .await
    .expect("pool");
    warm.wait_free(1).await.expect("slot created");
    let shim = run_client(client(&warm.shim.endpoint(), "fast-runc")).await;
    for uid in shim.pod_uids() {
        remove_cgroup_dirs(&format!("/kubepods/besteffort/pod{uid}"));
    }
    let hits = warm.hits();
    let empty = warm
        .metrics
        .misses
        .get_or_create(&Miss {
            handler: "fast-runc".into(),
            reason: "pool_empty",
        })
        .get();
    warm.stop().await.expect("pool stops");

    assert!(
        shim.success && shim.fatal.is_none(),
        "{test}: the client failed through the shim: {}\nstderr:\n{}",
        shim.fatal.as_deref().unwrap_or("(no fatal line)"),
        shim.stderr
    );
    assert_eq!(hits, 1, "{test}: the first pod must have been a warm hit");
    assert_eq!(
        empty, 1,
        "{test}: the second pod must have started cold (pool_empty)"
    );
    assert!(
        shim.outcome("Exec client-warm")
            .and_then(|o| o.pointer("/ok/url"))
            .and_then(serde_json::Value::as_str)
            .is_some_and(|u| u.starts_with("http://")),
        "{test}: Exec must return the streaming URL"
    );
    assert_same_answers(&shim, &direct, &["fast-runc"], test);
}

/// The Go client dials as kubelet v1.26 (socket path as `:authority`); on a
/// shim that rejects that authority its first call, Version, fails.
#[tokio::test]
async fn go_client_dialing_as_kubelet_1_26_matches_containerd() {
    let test = "go_client_dialing_as_kubelet_1_26_matches_containerd";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let Some(()) = require(test, clients::go_toolchain()) else {
        return;
    };
    let build = tempfile::tempdir().expect("tempdir");
    let gocache = std::env::var_os("FAST_SANDBOX_CLIENTS_GOCACHE")
        .map_or_else(|| build.path().join("gocache"), Into::into);
    let binary =
        clients::build_go_client(build.path(), &gocache).expect("the Go client builds offline");
    let logs = tempfile::tempdir().expect("tempdir");
    compare(test, "rc-go", &node, |endpoint, handler| {
        let mut cmd = Command::new(&binary);
        for (flag, value) in scenario_args(&node, endpoint, handler, test, logs.path()) {
            cmd.arg(format!("-{flag}")).arg(value);
        }
        cmd
    })
    .await;
}

/// grpcio's default `unix:` target.
#[tokio::test]
async fn python_grpcio_client_matches_containerd() {
    let test = "python_grpcio_client_matches_containerd";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let Some(python) = require(test, clients::python()) else {
        return;
    };
    let stubs = tempfile::tempdir().expect("tempdir");
    clients::python_stubs(&python, stubs.path()).expect("grpcio-tools generates the stubs");
    let logs = tempfile::tempdir().expect("tempdir");
    compare(test, "rc-py", &node, |endpoint, handler| {
        let mut cmd = Command::new(&python);
        cmd.arg(clients::python_client());
        for (flag, value) in scenario_args(&node, endpoint, handler, test, logs.path()) {
            cmd.arg(format!("--{flag}")).arg(value);
        }
        cmd.arg("--stubs").arg(stubs.path());
        cmd
    })
    .await;
}
