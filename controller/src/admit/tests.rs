use super::*;
use k8s_openapi::api::core::v1::{Container, NodeSpec, NodeStatus, PodStatus};

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
        .collect()
}

fn node(taints: Vec<Taint>, unschedulable: bool, allocatable: &[(&str, &str)]) -> Node {
    Node {
        spec: Some(NodeSpec {
            taints: Some(taints),
            unschedulable: Some(unschedulable),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            allocatable: Some(quantities(allocatable)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn taint(key: &str, value: Option<&str>, effect: &str) -> Taint {
    Taint {
        key: key.into(),
        value: value.map(str::to_owned),
        effect: effect.into(),
        ..Default::default()
    }
}

fn wants(pairs: &[(&str, &str)]) -> Requests {
    Requests {
        milli: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), milli_value(v).expect("a quantity")))
            .collect(),
        pods: 1,
    }
}

const ROOMY: &[(&str, &str)] = &[("cpu", "4"), ("memory", "8Gi"), ("pods", "110")];

#[test]
fn quantities_parse_to_milli_units_rounding_up() {
    let cases = [
        ("1", 1000),
        ("100m", 100),
        ("1.5", 1500),
        ("0.1", 100),
        ("1Ki", 1024 * 1000),
        ("1.5Gi", 1536 * 1024 * 1024 * 1000),
        ("2k", 2_000_000),
        ("1e3", 1_000_000),
        ("1E-3", 1),
        ("1n", 1),
        ("1500u", 2),
        ("-2", -2000),
        ("110", 110_000),
    ];
    for (text, want) in cases {
        assert_eq!(milli_value(text), Some(want), "{text}");
    }
    for bad in [
        "",
        "abc",
        "1Xi",
        "1..2",
        ".",
        "1e",
        "99999999999999999999999999999999",
    ] {
        assert_eq!(milli_value(bad), None, "{bad}");
    }
}

#[test]
fn a_pod_requests_its_containers_at_least_its_largest_init_container_and_overhead() {
    let container = |requests: &[(&str, &str)], limits: &[(&str, &str)]| Container {
        name: "c".into(),
        resources: Some(ResourceRequirements {
            requests: (!requests.is_empty()).then(|| quantities(requests)),
            limits: (!limits.is_empty()).then(|| quantities(limits)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let spec = PodSpec {
        containers: vec![
            container(&[("cpu", "100m")], &[("cpu", "1"), ("memory", "1Gi")]),
            container(&[("cpu", "200m"), ("memory", "64Mi")], &[]),
        ],
        init_containers: Some(vec![container(&[("cpu", "2")], &[])]),
        overhead: Some(quantities(&[("cpu", "10m"), ("memory", "16Mi")])),
        ..Default::default()
    };
    let requests = pod_requests(&spec);
    assert_eq!(requests.pods, 1);
    // cpu: max(100m + 200m, 2) + 10m; memory: the limit stands for the
    // missing request: 1Gi + 64Mi + 16Mi.
    assert_eq!(requests.milli["cpu"], 2010);
    assert_eq!(
        requests.milli["memory"],
        (1024 + 64 + 16) * 1024 * 1024 * 1000
    );
}

#[test]
fn taints_need_a_matching_toleration() {
    let tainted = node(
        vec![
            taint("dedicated", Some("gpu"), "NoSchedule"),
            taint("soft", None, "PreferNoSchedule"),
        ],
        false,
        ROOMY,
    );
    let want = wants(&[]);
    assert_eq!(
        admits(&tainted, &[], &want, None),
        Err("taint dedicated=gpu:NoSchedule not tolerated".into())
    );
    let equal = Toleration {
        key: Some("dedicated".into()),
        value: Some("gpu".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    };
    assert_eq!(
        admits(&tainted, std::slice::from_ref(&equal), &want, None),
        Ok(())
    );
    let other_value = Toleration {
        value: Some("cpu".into()),
        ..equal.clone()
    };
    assert!(admits(&tainted, &[other_value], &want, None).is_err());
    let other_effect = Toleration {
        effect: Some("NoExecute".into()),
        ..equal
    };
    assert!(admits(&tainted, &[other_effect], &want, None).is_err());
    let exists_any = Toleration {
        operator: Some("Exists".into()),
        ..Default::default()
    };
    assert_eq!(admits(&tainted, &[exists_any], &want, None), Ok(()));
    let no_execute = node(vec![taint("evict", None, "NoExecute")], false, ROOMY);
    assert!(admits(&no_execute, &[], &want, None).is_err());
}

#[test]
fn a_cordoned_node_admits_only_a_pod_tolerating_unschedulable() {
    let cordoned = node(vec![], true, ROOMY);
    let want = wants(&[]);
    assert_eq!(
        admits(&cordoned, &[], &want, None),
        Err("cordoned (spec.unschedulable)".into())
    );
    let tolerate = Toleration {
        key: Some(UNSCHEDULABLE_TAINT.into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    };
    assert_eq!(admits(&cordoned, &[tolerate], &want, None), Ok(()));
}

#[test]
fn requests_must_fit_what_the_node_has_left() {
    let small = node(
        vec![],
        false,
        &[("cpu", "2"), ("memory", "1Gi"), ("pods", "3")],
    );
    let used = Requests {
        milli: [("cpu".to_owned(), 1500)].into(),
        pods: 2,
    };
    assert_eq!(
        admits(&small, &[], &wants(&[("cpu", "500m")]), Some(&used)),
        Ok(())
    );
    assert_eq!(
        admits(&small, &[], &wants(&[("cpu", "501m")]), Some(&used)),
        Err("insufficient cpu".into())
    );
    assert_eq!(
        admits(&small, &[], &wants(&[("nvidia.com/gpu", "1")]), None),
        Err("insufficient nvidia.com/gpu".into())
    );
    let full = Requests {
        pods: 3,
        ..Default::default()
    };
    assert_eq!(
        admits(&small, &[], &wants(&[]), Some(&full)),
        Err("too many pods (allocatable pods)".into())
    );
}

fn bound_pod(name: &str, node: &str, cpu: &str, phase: &str) -> Pod {
    Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some("team".into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "c".into(),
                resources: Some(ResourceRequirements {
                    requests: Some(quantities(&[("cpu", cpu)])),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        }),
    }
}

#[test]
fn usage_follows_the_pod_watch_and_assumptions() {
    let usage = NodeUsage::default();
    let cpu = |node: &str| {
        usage.with_totals(|t| {
            t.get(node)
                .map(|r| (r.milli.get("cpu").copied().unwrap_or(0), r.pods))
        })
    };
    usage.apply(&watcher::Event::Init);
    usage.apply(&watcher::Event::InitApply(bound_pod(
        "x", "a", "1", "Running",
    )));
    usage.apply(&watcher::Event::InitApply(bound_pod(
        "done",
        "a",
        "3",
        "Succeeded",
    )));
    usage.apply(&watcher::Event::InitDone);
    assert_eq!(cpu("a"), Some((1000, 1)));
    // The controller's own placement counts until the watch shows the pod,
    // then the watched pod replaces it (not counted twice).
    usage.assume("team", "sb", "a", wants(&[("cpu", "250m")]));
    assert_eq!(cpu("a"), Some((1250, 2)));
    usage.apply(&watcher::Event::Apply(bound_pod(
        "sb", "a", "250m", "Pending",
    )));
    assert_eq!(cpu("a"), Some((1250, 2)));
    // Finished or deleted pods free their requests.
    usage.apply(&watcher::Event::Apply(bound_pod(
        "sb",
        "a",
        "250m",
        "Succeeded",
    )));
    assert_eq!(cpu("a"), Some((1000, 1)));
    usage.apply(&watcher::Event::Delete(bound_pod("x", "a", "1", "Running")));
    assert_eq!(cpu("a"), Some((0, 0)));
    usage.assume("team", "late", "b", wants(&[("cpu", "1")]));
    usage.forget("team", "late");
    assert_eq!(cpu("b"), Some((0, 0)));
}
