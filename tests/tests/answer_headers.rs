//! A relayed answer carries containerd's HTTP/2 headers and no others: the
//! shim's HTTP/2 server must not add its own (hyper's adds `date` to every
//! answer unless told not to; containerd's gRPC-Go server sends none).
//! Compared on the real containerd of the development node, for a relayed
//! unary call and an intercepted one.

use std::collections::BTreeSet;

use fast_sandbox_proto::cri::{ListPodSandboxRequest, VersionRequest};
use fast_sandbox_tests::{Cri, DevNode, InProcessShim};

/// The header names of a `Version` and a `ListPodSandbox` answer.
async fn answer_headers(cri: &mut Cri) -> [BTreeSet<String>; 2] {
    let names = |m: tonic::metadata::MetadataMap| {
        m.into_headers()
            .keys()
            .map(|k| k.as_str().to_owned())
            .collect::<BTreeSet<_>>()
    };
    let version = cri
        .runtime
        .version(VersionRequest::default())
        .await
        .expect("Version");
    let list = cri
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox");
    [names(version.into_parts().0), names(list.into_parts().0)]
}

#[tokio::test]
async fn answers_carry_containerds_headers_and_no_others() {
    let Some(node) = DevNode::require("answers_carry_containerds_headers_and_no_others") else {
        return;
    };
    let shim = InProcessShim::start(&node.containerd_endpoint)
        .await
        .expect("shim");
    let direct = answer_headers(&mut node.cri().expect("containerd client")).await;
    let through = answer_headers(&mut shim.cri().expect("shim client")).await;
    for (call, (d, t)) in ["Version (relayed)", "ListPodSandbox (intercepted)"]
        .iter()
        .zip(direct.iter().zip(through.iter()))
    {
        assert_eq!(
            t, d,
            "{call}: the shim's answer headers differ from containerd's"
        );
    }
    shim.stop().await.expect("shim stopped");
}
