//! `RunPodSandbox` → claim decision (`Claim::from_request`), the cold
//! request of a miss (`make_cold`) and the placeholder round trip, for
//! arbitrary protobuf bytes and for structured pods. Never panics, and:
//! - a claim's pool key names exactly the upstream handler its exposed
//!   handler maps to (handler isolation);
//! - a claim is only made for a pod a slot can serve: metadata present, no
//!   host network/PID/IPC, no host port, not privileged, no user
//!   namespace, no untrusted or bandwidth annotation;
//! - the claim's config is the pod's, less the reserved runtime-handler
//!   label, and nothing else;
//! - a cold request runs the mapped upstream handler and carries the
//!   exposed one in the reserved label, over any value the pod set;
//! - a placeholder of the claim's key validates back into the same key.

#![no_main]

use arbitrary::Arbitrary;
use fast_sandbox_fuzz::{handlers, pod_string, ArbPod, Str, TOKEN};
use fast_sandbox_proto::cri::{self, NamespaceMode, RunPodSandboxRequest};
use fast_sandbox_shim::{
    fuzzing::make_cold_request,
    slots::{Claim, Ineligible, MissReason, Placeholder, RUNTIME_HANDLER_LABEL, SLOT_NAMESPACE},
};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

#[derive(Debug, Arbitrary)]
enum Input {
    /// Whatever arrives on the wire as a `RunPodSandboxRequest`.
    Wire(Vec<u8>),
    /// A well-formed request of an arbitrary pod.
    Pod {
        handler: Str,
        pod: Option<Box<ArbPod>>,
    },
}

fn check(request: &RunPodSandboxRequest) {
    let handlers = handlers();
    let exposed = request.runtime_handler.as_str();
    let result = Claim::from_request(request, &handlers);
    let again = Claim::from_request(request, &handlers);
    assert_eq!(
        result.as_ref().map(|c| &c.key),
        again.as_ref().map(|c| &c.key),
        "deterministic"
    );
    match result {
        Ok(claim) => checked_claim(request, &claim),
        Err(err) => {
            // Every cause has a stable metric label and a message.
            assert!(MissReason::ALL.contains(&err.reason()));
            assert!(!err.to_string().is_empty());
            match handlers.upstream_for(exposed) {
                None => assert_eq!(err, Ineligible::NotFastHandler(exposed.to_owned())),
                Some(_) => assert_ne!(err.reason(), MissReason::NotFastHandler),
            }
        }
    }
    if let Some(upstream) = handlers.upstream_for(exposed) {
        let mut cold = request.clone();
        make_cold_request(&mut cold, exposed, upstream);
        assert_eq!(cold.runtime_handler, upstream);
        match (&cold.config, &request.config) {
            (Some(cold_config), Some(pod)) => {
                assert_eq!(
                    cold_config
                        .labels
                        .get(RUNTIME_HANDLER_LABEL)
                        .map(String::as_str),
                    Some(exposed),
                    "the shim's value of the reserved label, never the pod's"
                );
                let mut expected = pod.clone();
                expected
                    .labels
                    .insert(RUNTIME_HANDLER_LABEL.to_owned(), exposed.to_owned());
                assert_eq!(cold_config, &expected, "nothing else changes");
            }
            (None, None) => {}
            _ => panic!("make_cold added or removed the config"),
        }
    }
}

fn checked_claim(request: &RunPodSandboxRequest, claim: &Claim) {
    let handlers = handlers();
    assert_eq!(claim.exposed_handler, request.runtime_handler);
    assert_eq!(
        Some(claim.key.upstream_handler.as_str()),
        handlers.upstream_for(&request.runtime_handler),
        "handler isolation: a claim names exactly the mapped upstream handler"
    );
    let pod = request.config.as_ref().expect("a claim has a config");
    let mut expected = pod.clone();
    expected.labels.remove(RUNTIME_HANDLER_LABEL);
    assert_eq!(
        claim.config, expected,
        "the pod's config, less the reserved label"
    );
    assert!(pod.metadata.is_some());

    let node = NamespaceMode::Node as i32;
    let security = pod.linux.as_ref().and_then(|l| l.security_context.as_ref());
    if let Some(ns) = security.and_then(|s| s.namespace_options.as_ref()) {
        assert!(ns.network != node && ns.pid != node && ns.ipc != node);
        assert!(ns.userns_options.as_ref().is_none_or(|u| u.mode == node));
    }
    assert!(security.is_none_or(|s| !s.privileged));
    assert!(pod.port_mappings.iter().all(|p| p.host_port <= 0));
    for annotation in [
        "io.kubernetes.cri.untrusted-workload",
        "kubernetes.io/ingress-bandwidth",
        "kubernetes.io/egress-bandwidth",
    ] {
        assert!(!pod.annotations.contains_key(annotation));
    }
    let groups = &claim.key.shape.supplemental_groups;
    assert!(
        groups.windows(2).all(|w| w[0] < w[1]),
        "sorted, deduplicated"
    );
    assert!(claim.key.shape.run_as_group.is_none() || claim.key.shape.run_as_user.is_some());

    // The placeholder a pool builds for this key is a claim of the same key.
    let cgroup = "/fast-sandbox-slots/fuzz";
    let slot = Placeholder {
        name: "slot-0",
        namespace: SLOT_NAMESPACE,
        uid: "slot-uid-0",
        pool: "fuzz",
        token: TOKEN,
        cgroup_parent: cgroup,
    };
    let placeholder = claim.key.placeholder_request(&slot);
    assert_eq!(placeholder.runtime_handler, claim.key.upstream_handler);
    let back = Claim::from_request(
        &RunPodSandboxRequest {
            config: placeholder.config,
            runtime_handler: claim.exposed_handler.clone(),
        },
        &handlers,
    )
    .expect("a placeholder is eligible");
    assert_eq!(back.key, claim.key, "placeholder round trip");
}

fuzz_target!(|input: Input| {
    let request = match input {
        Input::Wire(bytes) => match RunPodSandboxRequest::decode(bytes.as_slice()) {
            Ok(request) => request,
            Err(err) => {
                assert!(!err.to_string().is_empty());
                return;
            }
        },
        Input::Pod { handler, pod } => RunPodSandboxRequest {
            runtime_handler: pod_string(&handler),
            config: pod.as_deref().map(ArbPod::build),
        },
    };
    check(&request);
    // What the shim forwards re-encodes to something upstream decodes the same.
    let bytes = request.encode_to_vec();
    let decoded = RunPodSandboxRequest::decode(bytes.as_slice()).expect("re-encoded request");
    assert_eq!(decoded, request);
    let _: Option<&cri::PodSandboxConfig> = decoded.config.as_ref();
});
