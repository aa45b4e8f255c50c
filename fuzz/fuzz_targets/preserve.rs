//! The field-preserving rewrite (`shim/src/preserve.rs`) over arbitrary
//! bytes: the first byte picks the message type, the next two the edit,
//! the rest is the message as upstream (or kubelet) sent it. For bytes
//! that decode as that type, with edits like the shim's (identity, labels,
//! handler, IPs, namespaces, verbose info, dropped list items) and
//! structural ones (sub-messages added or cleared, lists grown):
//! - (a) nothing panics, and the rewrite accepts every message prost does;
//! - (b) the output decodes (prost) to exactly the edited typed message;
//! - (c) every unknown field occurrence that the contract keeps (at the
//!   top, and in sub-messages the merge reaches) is in the output at the
//!   same place, and the output has no unknown field the input lacked
//!   (oracle: `fast_sandbox_fuzz::wire`, its own reading of the schema);
//! - (d) an edit that changes nothing returns the input's very bytes.
//!
//! Bytes that do not decode must be refused, not panic.

#![no_main]

use std::{collections::HashMap, fmt::Debug};

use fast_sandbox_fuzz::wire::{
    is_sub_multiset, occurrences, surviving, unknowns, Occurrence, Schema,
};
use fast_sandbox_proto::cri;
use fast_sandbox_shim::fuzzing::{preserve_rewrite, preserve_rewrite_items};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn bit(bits: u16, n: u16) -> bool {
    bits >> n & 1 == 1
}

fn labels() -> HashMap<String, String> {
    HashMap::from([("app".to_owned(), "web".to_owned())])
}

fn metadata() -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: "web".into(),
        uid: "uid-web".into(),
        namespace: "default".into(),
        attempt: 1,
    }
}

/// Edits of a sandbox status, as rewrite.rs makes them and more.
fn edit_status(bits: u16, s: &mut cri::PodSandboxStatus) {
    if bit(bits, 0) {
        s.metadata = Some(metadata());
    }
    if bit(bits, 1) {
        s.labels = labels();
        s.annotations.clear();
    }
    if bit(bits, 2) {
        if let Some(n) = s.network.as_mut() {
            n.ip = "10.9.9.9".into();
        }
    }
    if bit(bits, 3) {
        s.linux = Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
            }),
        });
    }
    if bit(bits, 4) {
        s.runtime_handler = "fast-runc".into();
        s.created_at = s.created_at.wrapping_add(1);
    }
    if bit(bits, 5) {
        s.network = None;
    }
    if bit(bits, 6) {
        if let Some(n) = s.network.as_mut() {
            n.additional_ips.push(cri::PodIp {
                ip: "fd00::9".into(),
            });
        }
    }
    if bit(bits, 7) {
        if let Some(m) = s.metadata.as_mut() {
            m.attempt = m.attempt.wrapping_add(1);
        }
    }
}

/// Edits of the container statuses next to a sandbox status.
fn edit_containers(bits: u16, containers: &mut Vec<cri::ContainerStatus>) {
    if bit(bits, 10) {
        match containers.first_mut() {
            Some(c) => c.reason = "edited".into(),
            None => containers.push(cri::ContainerStatus::default()),
        }
    }
}

fn edit_status_response(bits: u16, r: &mut cri::PodSandboxStatusResponse) {
    if bit(bits, 13) {
        r.status.get_or_insert_with(Default::default);
    }
    if let Some(s) = r.status.as_mut() {
        edit_status(bits, s);
    }
    if bit(bits, 8) {
        r.info.clear();
    }
    if bit(bits, 9) {
        r.info.insert("info".into(), "{}".into());
    }
    edit_containers(bits, &mut r.containers_statuses);
    if bit(bits, 11) {
        r.status = None;
    }
    if bit(bits, 12) {
        r.timestamp = r.timestamp.wrapping_add(1);
    }
}

fn edit_event(bits: u16, e: &mut cri::ContainerEventResponse) {
    if bit(bits, 13) {
        e.pod_sandbox_status.get_or_insert_with(Default::default);
    }
    if let Some(s) = e.pod_sandbox_status.as_mut() {
        edit_status(bits, s);
    }
    edit_containers(bits, &mut e.containers_statuses);
    if bit(bits, 11) {
        e.pod_sandbox_status = None;
    }
    if bit(bits, 12) {
        e.container_id = "edited".into();
    }
}

/// A cold miss (intercept.rs `make_cold`) and more.
fn edit_run(bits: u16, r: &mut cri::RunPodSandboxRequest) {
    if bit(bits, 0) {
        r.runtime_handler = "runc".into();
    }
    if bit(bits, 13) {
        r.config.get_or_insert_with(Default::default);
    }
    if let Some(c) = r.config.as_mut() {
        if bit(bits, 1) {
            c.labels
                .insert("fast-sandbox.io/runtime-handler".into(), "fast-runc".into());
        }
        if bit(bits, 2) {
            if let Some(l) = c.linux.as_mut() {
                l.cgroup_parent = "/edited".into();
            }
        }
        if bit(bits, 3) {
            if let Some(s) = c.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
                s.privileged = !s.privileged;
            }
        }
        if bit(bits, 4) {
            c.port_mappings.push(cri::PortMapping::default());
        }
        if bit(bits, 5) {
            c.metadata = Some(metadata());
        }
    }
    if bit(bits, 11) {
        r.config = None;
    }
}

fn edit_item(bits: u16, i: &mut cri::PodSandbox) {
    if bit(bits, 0) {
        i.metadata = Some(metadata());
    }
    if bit(bits, 1) {
        i.labels = labels();
        i.annotations.clear();
    }
    if bit(bits, 2) {
        i.runtime_handler = "fast-runc".into();
        i.created_at = i.created_at.wrapping_add(1);
    }
    if bit(bits, 3) {
        if let Some(m) = i.metadata.as_mut() {
            m.name = "edited".into();
        }
    }
}

fn edit_stats(bits: u16, s: &mut cri::PodSandboxStats) {
    if let Some(a) = s.attributes.as_mut() {
        if bit(bits, 0) {
            a.metadata = Some(metadata());
        }
        if bit(bits, 1) {
            a.labels = labels();
        }
        if bit(bits, 2) {
            a.annotations.clear();
        }
    }
    if bit(bits, 3) {
        if let Some(l) = s.linux.as_mut() {
            l.cpu = Some(cri::CpuUsage::default());
            l.memory = None;
        }
    }
}

/// (c) for one message: `out` keeps what the contract keeps of `input`'s
/// unknown fields, and invents none.
fn check_unknowns(
    schema: &Schema,
    name: &str,
    input: &[u8],
    before: &[u8],
    after: &[u8],
    out: &[u8],
) {
    let kept = surviving(schema, name, input, before, after);
    let found = unknowns(schema, name, out);
    assert!(
        is_sub_multiset(&kept, &found),
        "unknown fields lost:\nkept {kept:?}\nfound {found:?}"
    );
    let had = unknowns(schema, name, input);
    assert!(
        is_sub_multiset(&found, &had),
        "unknown fields invented:\nfound {found:?}\nhad {had:?}"
    );
}

fn check<M>(schema: &Schema, name: &str, input: &[u8], edit: &dyn Fn(&mut M))
where
    M: Message + Default + Clone + PartialEq + Debug,
{
    let Ok(decoded) = M::decode(input) else {
        assert!(preserve_rewrite::<M>(name, input, |_| ()).is_err());
        return;
    };
    // (d)
    let same = preserve_rewrite::<M>(name, input, |_| ()).expect("prost decodes it");
    assert_eq!(same, input, "no edit, yet other bytes");
    let mut edited = decoded.clone();
    edit(&mut edited);
    let out = preserve_rewrite::<M>(name, input, |m| edit(m)).expect("prost decodes it");
    if edited == decoded {
        assert_eq!(out, input, "an edit that changed nothing, yet other bytes");
    }
    // (b)
    let got = M::decode(out.as_slice()).expect("the output decodes");
    assert_eq!(got, edited);
    // (c)
    let (before, after) = (decoded.encode_to_vec(), edited.encode_to_vec());
    check_unknowns(schema, name, input, &before, &after, &out);
}

/// The list form: item `i` is dropped when `drop(i)`, else edited.
fn check_items<L, M>(
    schema: &Schema,
    item: &str,
    number: u32,
    input: &[u8],
    items_of: fn(L) -> Vec<M>,
    drop: &dyn Fn(usize) -> bool,
    edit: &dyn Fn(&mut M),
) where
    L: Message + Default,
    M: Message + Default + Clone + PartialEq + Debug,
{
    let Ok(list) = L::decode(input) else {
        return;
    };
    let mut index = 0;
    let out = preserve_rewrite_items::<M>(item, number, input, |m| {
        let keep = !drop(index);
        index += 1;
        if keep {
            edit(m);
        }
        keep
    })
    .expect("prost decodes it");
    let originals: Vec<M> = items_of(list);
    let mut expected = Vec::new();
    let mut kept = Vec::new();
    for (i, original) in originals.iter().enumerate() {
        if !drop(i) {
            let mut edited = original.clone();
            edit(&mut edited);
            expected.push(edited);
            kept.push(i);
        }
    }
    // (b)
    let got = items_of(L::decode(out.as_slice()).expect("the output decodes"));
    assert_eq!(got, expected);
    // (d)
    if kept.len() == originals.len() && expected == originals {
        assert_eq!(out, input, "nothing edited or dropped, yet other bytes");
    }
    // Every other field of the list as it was; each kept item as in (c).
    let (input_fields, out_fields) = (
        occurrences(input).expect("decoded before"),
        occurrences(&out).expect("decoded before"),
    );
    let others = |all: &[Occurrence<'_>]| -> Vec<Vec<u8>> {
        all.iter()
            .filter(|o| o.number != number)
            .map(|o| o.raw.to_vec())
            .collect()
    };
    assert_eq!(others(&out_fields), others(&input_fields));
    let items = |all: &[Occurrence<'_>]| -> Vec<Vec<u8>> {
        all.iter()
            .filter(|o| o.number == number)
            .filter_map(|o| o.payload.map(<[u8]>::to_vec))
            .collect()
    };
    let (inputs, outputs) = (items(&input_fields), items(&out_fields));
    assert_eq!(outputs.len(), kept.len());
    for ((i, edited), got) in kept.iter().zip(&expected).zip(&outputs) {
        let (before, after) = (originals[*i].encode_to_vec(), edited.encode_to_vec());
        check_unknowns(schema, item, &inputs[*i], &before, &after, got);
    }
}

fuzz_target!(|data: &[u8]| {
    let [kind, b0, b1, message @ ..] = data else {
        return;
    };
    let bits = u16::from_le_bytes([*b0, *b1]);
    let schema = Schema::cri();
    match kind % 5 {
        0 => check::<cri::PodSandboxStatusResponse>(
            schema,
            ".runtime.v1.PodSandboxStatusResponse",
            message,
            &|r| edit_status_response(bits, r),
        ),
        1 => check::<cri::ContainerEventResponse>(
            schema,
            ".runtime.v1.ContainerEventResponse",
            message,
            &|e| edit_event(bits, e),
        ),
        2 => check::<cri::RunPodSandboxRequest>(
            schema,
            ".runtime.v1.RunPodSandboxRequest",
            message,
            &|r| edit_run(bits, r),
        ),
        3 => check_items::<cri::ListPodSandboxResponse, cri::PodSandbox>(
            schema,
            ".runtime.v1.PodSandbox",
            1,
            message,
            |l| l.items,
            &|i| bit(bits, 8 + (i % 8) as u16),
            &|i| edit_item(bits, i),
        ),
        _ => check_items::<cri::ListPodSandboxStatsResponse, cri::PodSandboxStats>(
            schema,
            ".runtime.v1.PodSandboxStats",
            1,
            message,
            |l| l.stats,
            &|i| bit(bits, 8 + (i % 8) as u16),
            &|s| edit_stats(bits, s),
        ),
    }
});
