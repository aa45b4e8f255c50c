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

    warm.manager.set_size(&warm.pool, 0);
    warm.wait_free(0).await.expect("pool emptied");
    warm.stop().await.expect("pool stops");
}
