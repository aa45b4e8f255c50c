//! The shim's `Status` against containerd's real answer (issue 10 item 6):
//! through a shim with a warm pool exposing `fast-runc` (upstream `runc`),
//! as `fast-sandbox-node` serves it, `runtime_handlers` keeps every entry
//! containerd lists, unchanged and in order, and adds `fast-runc` with
//! exactly the features containerd reports for `runc` (recursive read-only
//! mounts, user namespaces), so kubelet 1.30+ knows the handler.
//!
//! containerd 1.6 lists no handlers (the field is newer): there the shim
//! must not invent any. containerd 2.x lists them; run this with
//! `FAST_SANDBOX_UPSTREAM=containerd2` (hack/test.sh does), where an empty
//! upstream list fails the test instead of passing it vacuously.
//!
//! And the two features it reports behave on `fast-runc` as on `runc`, end
//! to end: a pod with its own user namespace, and containers with recursive
//! read-only mounts (including the one containerd 2 refuses), started or
//! refused alike on both handlers, on either containerd.

mod support;

use fast_sandbox_proto::cri::{RuntimeHandler, StatusRequest, StatusResponse};
use fast_sandbox_tests::{Cri, DevNode};
use support::WarmNode;

async fn status(cri: &mut Cri) -> StatusResponse {
    cri.runtime
        .status(StatusRequest { verbose: false })
        .await
        .expect("Status")
        .into_inner()
}

fn names(handlers: &[RuntimeHandler]) -> Vec<&str> {
    handlers.iter().map(|h| h.name.as_str()).collect()
}

#[tokio::test]
async fn status_lists_fast_runc_with_runcs_features() {
    let test = "status_lists_fast_runc_with_runcs_features";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let on_containerd2 = std::env::var("FAST_SANDBOX_UPSTREAM").as_deref() == Ok("containerd2");
    let warm = WarmNode::start(&node, "real-status", "runc", 1)
        .await
        .expect("warm pool starts");
    warm.wait_free(1).await.expect("a free slot");

    let direct = status(&mut node.cri().expect("client")).await;
    let shimmed = status(&mut warm.shim.cri().expect("client")).await;
    // Upstream again: nothing changed in between (the list is static).
    let direct_after = status(&mut node.cri().expect("client")).await;
    assert_eq!(
        direct.runtime_handlers, direct_after.runtime_handlers,
        "containerd's handler list changed during the test"
    );
    eprintln!(
        "containerd lists {:?}; the shim lists {:?}",
        direct.runtime_handlers, shimmed.runtime_handlers
    );

    let upstream = &direct.runtime_handlers;
    if on_containerd2 {
        assert!(
            upstream
                .iter()
                .any(|h| h.name == "runc" && h.features.is_some()),
            "containerd 2 lists no runc handler with features: {upstream:?}"
        );
    }

    // Every upstream entry, unchanged and in upstream's order, first.
    assert!(
        shimmed.runtime_handlers.len() >= upstream.len(),
        "the shim dropped handlers: {:?} vs upstream {:?}",
        names(&shimmed.runtime_handlers),
        names(upstream)
    );
    assert_eq!(
        &shimmed.runtime_handlers[..upstream.len()],
        &upstream[..],
        "upstream's entries must pass unchanged"
    );

    // Then fast-runc, once, as a copy of runc's entry; nothing else.
    let added = &shimmed.runtime_handlers[upstream.len()..];
    match upstream.iter().find(|h| h.name == "runc") {
        Some(runc) => {
            let expected = RuntimeHandler {
                name: "fast-runc".into(),
                features: runc.features,
            };
            assert_eq!(added, [expected], "fast-runc must carry runc's features");
            eprintln!(
                "runc's features on this containerd: {:?}",
                runc.features.unwrap_or_default()
            );
        }
        None => assert!(
            added.is_empty(),
            "upstream lists no runc, so no fast-runc: {:?}",
            names(added)
        ),
    }

    // The rest of the answer is containerd's.
    assert_eq!(shimmed.features, direct.features, "runtime features");
    let conditions = |s: &StatusResponse| {
        s.status
            .as_ref()
            .map(|st| {
                st.conditions
                    .iter()
                    .map(|c| (c.r#type.clone(), c.status))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert_eq!(conditions(&shimmed), conditions(&direct), "conditions");

    warm.empty_and_stop().await;
}

/// `text` with every 64-hex-digit id (containers, sandboxes) as `<id>`.
fn without_ids(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_hexdigit() && !c.is_ascii_uppercase() {
            run.push(c);
            continue;
        }
        out.push_str(if run.len() == 64 { "<id>" } else { &run });
        run.clear();
        out.push(c);
    }
    out.pop();
    out
}

/// What a call ended with, comparable across handlers: Ok, or the gRPC code
/// and the message with the pod's own ids and names taken out.
fn outcome<T>(
    result: &Result<T, tonic::Status>,
    names: &[&str],
) -> Result<(), (tonic::Code, String)> {
    match result {
        Ok(_) => Ok(()),
        Err(status) => {
            let mut message = status.message().to_owned();
            for name in names {
                message = message.replace(name, "<pod>");
            }
            Err((status.code(), without_ids(&message)))
        }
    }
}

#[test]
fn ids_are_taken_out_of_messages() {
    let id = "a".repeat(64);
    assert_eq!(
        without_ids(&format!("container \"{id}\" spec: x{id}")),
        "container \"<id>\" spec: x<id>"
    );
    assert_eq!(without_ids("deadbeef"), "deadbeef");
}

/// A pod asking for its own user namespace is no claim (no slot has one):
/// on `fast-runc` it starts cold on `runc` and ends exactly as the same pod
/// on `runc` — started on both, or refused on both with the same error
/// (containerd 1.6 has no user namespaces for pods; 2.1 needs idmap mounts
/// from the kernel and runc).
#[tokio::test]
async fn a_user_namespace_pod_behaves_on_fast_runc_as_on_runc() {
    let test = "a_user_namespace_pod_behaves_on_fast_runc_as_on_runc";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let case = "userns-equiv";
    let _guard = fast_sandbox_tests::CaseGuard::new(&node, case)
        .await
        .expect("clean slate");
    let warm = WarmNode::start(&node, "userns-equiv", "runc", 1)
        .await
        .expect("warm pool starts");
    warm.wait_free(1).await.expect("a free slot");
    let logs = tempfile::tempdir().expect("log dir");
    let mapping = vec![fast_sandbox_proto::cri::IdMapping {
        host_id: 200_000,
        container_id: 0,
        length: 65_536,
    }];
    let mut results = Vec::new();
    for (handler, endpoint) in [
        ("runc", node.containerd_endpoint.clone()),
        ("fast-runc", warm.shim.endpoint()),
    ] {
        let pod =
            fast_sandbox_tests::pod::TestPod::new(case, &format!("userns-{handler}"), logs.path());
        pod.prepare_log_dirs(&[]).expect("log dir");
        let mut config = pod.sandbox_config();
        let options = config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
            .expect("namespace options");
        options.userns_options = Some(fast_sandbox_proto::cri::UserNamespace {
            mode: fast_sandbox_proto::cri::NamespaceMode::Pod as i32,
            uids: mapping.clone(),
            gids: mapping.clone(),
        });
        let mut cri = fast_sandbox_tests::Cri::connect(&endpoint).expect("client");
        let result = cri
            .runtime
            .run_pod_sandbox(fast_sandbox_proto::cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: handler.into(),
            })
            .await
            .map(tonic::Response::into_inner);
        eprintln!(
            "{handler}: {:?}",
            result.as_ref().map(|r| &r.pod_sandbox_id)
        );
        if let Ok(started) = &result {
            cri.remove_sandbox(&started.pod_sandbox_id)
                .await
                .expect("remove the pod");
        }
        pod.remove_pod_cgroups();
        results.push(outcome(&result, &[&pod.name, &pod.uid]));
    }
    assert_eq!(results[0], results[1], "runc vs fast-runc");
    assert_eq!(
        warm.hits(),
        0,
        "a user-namespace pod must never be served warm"
    );
    assert_eq!(warm.free(), 1, "the slot stays free");
    warm.empty_and_stop().await;
}

/// A container with a recursive read-only mount (or one containerd must
/// refuse: recursive read-only on a writable mount) in a warm `fast-runc`
/// pod ends as in a cold `runc` pod: created on both or refused on both
/// with the same error, as containerd decides from runc's features.
#[tokio::test]
async fn recursive_read_only_mounts_behave_on_fast_runc_as_on_runc() {
    let test = "recursive_read_only_mounts_behave_on_fast_runc_as_on_runc";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let case = "rro-equiv";
    let _guard = fast_sandbox_tests::CaseGuard::new(&node, case)
        .await
        .expect("clean slate");
    let warm = WarmNode::start(&node, "rro-equiv", "runc", 1)
        .await
        .expect("warm pool starts");
    warm.wait_free(1).await.expect("a free slot");
    let logs = tempfile::tempdir().expect("log dir");
    let volume = tempfile::tempdir().expect("volume");
    let mut results = Vec::new();
    for (handler, endpoint) in [
        ("runc", node.containerd_endpoint.clone()),
        ("fast-runc", warm.shim.endpoint()),
    ] {
        let pod =
            fast_sandbox_tests::pod::TestPod::new(case, &format!("rro-{handler}"), logs.path());
        pod.prepare_log_dirs(&["ro", "rw"]).expect("log dirs");
        let mut cri = fast_sandbox_tests::Cri::connect(&endpoint).expect("client");
        let config = pod.sandbox_config();
        let sandbox = cri
            .runtime
            .run_pod_sandbox(fast_sandbox_proto::cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        let mut per_pod = Vec::new();
        for (name, readonly) in [("ro", true), ("rw", false)] {
            let mut container = pod.container_config(name, &node.test_image, "sleep 1");
            container.mounts.push(fast_sandbox_proto::cri::Mount {
                container_path: "/data".into(),
                host_path: volume.path().display().to_string(),
                readonly,
                recursive_read_only: true,
                ..Default::default()
            });
            let result = cri
                .runtime
                .create_container(fast_sandbox_proto::cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox.clone(),
                    config: Some(container),
                    sandbox_config: Some(config.clone()),
                })
                .await;
            eprintln!(
                "{handler} {name}: {:?}",
                result.as_ref().map(|r| &r.get_ref().container_id)
            );
            per_pod.push(outcome(&result, &[&pod.name, &pod.uid, &sandbox]));
        }
        cri.remove_sandbox(&sandbox).await.expect("remove the pod");
        pod.remove_pod_cgroups();
        results.push(per_pod);
    }
    assert_eq!(warm.hits(), 1, "the fast-runc pod must be a warm hit");
    assert_eq!(
        results[0], results[1],
        "runc vs fast-runc, [read-only, writable]"
    );
    // containerd 1.6 does not know the field (it mounts read-write); 2.x
    // refuses it on a writable mount.
    if std::env::var("FAST_SANDBOX_UPSTREAM").as_deref() == Ok("containerd2") {
        assert!(
            results[0][1].is_err(),
            "recursive read-only on a writable mount must be refused: {:?}",
            results[0][1]
        );
    }
    warm.empty_and_stop().await;
}
