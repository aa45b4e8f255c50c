//! What the `Sandbox` path checks itself because it binds by `nodeName` and
//! so skips kube-scheduler: whether a node admits the pod (taints, cordon,
//! resource fit), and how much of each node the pods on it already request
//! ([`NodeUsage`], fed by a watch of every bound, unfinished pod).
//!
//! The rules are kube-scheduler's `TaintToleration`, `NodeUnschedulable`
//! and `NodeResourcesFit` filters: a `NoSchedule` or `NoExecute` taint
//! needs a toleration; a cordoned node (`spec.unschedulable`) needs one for
//! `node.kubernetes.io/unschedulable:NoSchedule`; the pod's requests plus
//! those of the pods on the node must fit the node's allocatable, and the
//! node's pod count must stay within its allocatable `pods`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use k8s_openapi::api::core::v1::{Node, Pod, PodSpec, ResourceRequirements, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::runtime::watcher;
use kube::ResourceExt;

/// The taint kube-scheduler's cordon check stands for.
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// Requests, per resource name in milli-units (1 CPU = 1000; 1 byte of
/// memory = 1000), and a pod count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requests {
    pub milli: BTreeMap<String, i128>,
    pub pods: i64,
}

impl Requests {
    fn add(&mut self, other: &Requests, sign: i128) {
        for (name, value) in &other.milli {
            *self.milli.entry(name.clone()).or_default() += sign * value;
        }
        self.pods += i64::try_from(sign).unwrap_or(0) * other.pods;
    }
}

/// A Kubernetes quantity (`100m`, `1.5Gi`, `2e3`) in milli-units, rounded
/// up as the API server's `MilliValue` does; `None` when it does not parse
/// or is out of range.
pub fn milli_value(quantity: &str) -> Option<i128> {
    let s = quantity.trim();
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || whole.len() + fraction.len() > 30 {
        return None;
    }
    let digits = format!("{whole}{fraction}");
    let mantissa: i128 = digits.parse().ok()?;
    // value = mantissa * num / den, in units; times 1000 for milli-units.
    let (num, den): (i128, i128) = match suffix {
        "" => (1, 1),
        "n" => (1, 1_000_000_000),
        "u" => (1, 1_000_000),
        "m" => (1, 1000),
        "k" => (1000, 1),
        "M" => (10i128.pow(6), 1),
        "G" => (10i128.pow(9), 1),
        "T" => (10i128.pow(12), 1),
        "P" => (10i128.pow(15), 1),
        "E" => (10i128.pow(18), 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        exponent => {
            let e: i32 = exponent.strip_prefix(['e', 'E'])?.parse().ok()?;
            let pow = 10i128.checked_pow(e.unsigned_abs().min(40))?;
            if e >= 0 {
                (pow, 1)
            } else {
                (1, pow)
            }
        }
    };
    let scale = 10i128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let top = mantissa.checked_mul(num)?.checked_mul(1000)?;
    let bottom = den.checked_mul(scale)?;
    let value = top.div_euclid(bottom) + i128::from(top.rem_euclid(bottom) != 0);
    Some(if negative { -value } else { value })
}

/// Requests of one container: its requests, else its limits (the API
/// server defaults requests to limits).
fn container_requests(resources: Option<&ResourceRequirements>) -> BTreeMap<String, i128> {
    let Some(resources) = resources else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for map in [&resources.limits, &resources.requests]
        .into_iter()
        .flatten()
    {
        for (name, quantity) in map {
            if let Some(value) = milli_value(&quantity.0) {
                out.insert(name.clone(), value);
            }
        }
    }
    out
}

/// What a pod requests of its node, as kube-scheduler counts it: the sum
/// of its containers', at least the largest init container's, plus its
/// overhead.
pub fn pod_requests(spec: &PodSpec) -> Requests {
    let mut milli: BTreeMap<String, i128> = BTreeMap::new();
    for container in &spec.containers {
        for (name, value) in container_requests(container.resources.as_ref()) {
            *milli.entry(name).or_default() += value;
        }
    }
    for init in spec.init_containers.iter().flatten() {
        for (name, value) in container_requests(init.resources.as_ref()) {
            let entry = milli.entry(name).or_default();
            *entry = (*entry).max(value);
        }
    }
    for (name, quantity) in spec.overhead.iter().flatten() {
        if let Some(value) = milli_value(&quantity.0) {
            *milli.entry(name.clone()).or_default() += value;
        }
    }
    Requests { milli, pods: 1 }
}

/// Whether `toleration` tolerates `taint` (the API's matching rules).
fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_ok = toleration
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key = toleration.key.as_deref().unwrap_or_default();
    match toleration.operator.as_deref() {
        Some("Exists") => effect_ok && (key.is_empty() || key == taint.key),
        _ => {
            effect_ok
                && key == taint.key
                && toleration.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
    }
}

/// Why `node` does not admit a pod with `tolerations` asking `want`, given
/// what the pods on it request (`used`); `Ok` when it does. The reason is
/// the same for every node with the same cause, so they can be counted.
pub fn admits(
    node: &Node,
    tolerations: &[Toleration],
    want: &Requests,
    used: Option<&Requests>,
) -> Result<(), String> {
    let spec = node.spec.clone().unwrap_or_default();
    if spec.unschedulable == Some(true) {
        let cordon = Taint {
            key: UNSCHEDULABLE_TAINT.into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        if !tolerations.iter().any(|t| tolerates(t, &cordon)) {
            return Err("cordoned (spec.unschedulable)".into());
        }
    }
    for taint in spec.taints.iter().flatten() {
        let binding = matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute");
        if binding && !tolerations.iter().any(|t| tolerates(t, taint)) {
            let value = taint
                .value
                .as_deref()
                .map(|v| format!("={v}"))
                .unwrap_or_default();
            return Err(format!(
                "taint {}{value}:{} not tolerated",
                taint.key, taint.effect
            ));
        }
    }
    let empty = BTreeMap::new();
    let allocatable = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .unwrap_or(&empty);
    let amount = |name: &str| {
        allocatable
            .get(name)
            .and_then(|q: &Quantity| milli_value(&q.0))
            .unwrap_or(0)
    };
    let none = Requests::default();
    let used = used.unwrap_or(&none);
    if i128::from(used.pods + want.pods) * 1000 > amount("pods") {
        return Err("too many pods (allocatable pods)".into());
    }
    for (name, value) in want.milli.iter().filter(|(_, v)| **v > 0) {
        let taken = used.milli.get(name).copied().unwrap_or(0);
        if taken + value > amount(name) {
            return Err(format!("insufficient {name}"));
        }
    }
    Ok(())
}

/// The requests of the bound, unfinished pods, per node: fed by a pod watch
/// ([`NodeUsage::apply`]) and by the `Sandbox` path's own placements
/// ([`NodeUsage::assume`]) until the watch shows their pods.
#[derive(Debug, Default)]
pub struct NodeUsage {
    inner: Mutex<Index>,
}

#[derive(Debug, Default)]
struct Index {
    /// `namespace/name` → (node, requests).
    pods: HashMap<String, (String, Requests)>,
    nodes: HashMap<String, Requests>,
    /// A relist in progress.
    relist: Option<HashMap<String, (String, Requests)>>,
}

impl Index {
    fn remove(&mut self, key: &str) {
        if let Some((node, old)) = self.pods.remove(key) {
            if let Some(total) = self.nodes.get_mut(&node) {
                total.add(&old, -1);
            }
        }
    }

    fn insert(&mut self, key: String, node: String, requests: Requests) {
        self.remove(&key);
        self.nodes
            .entry(node.clone())
            .or_default()
            .add(&requests, 1);
        self.pods.insert(key, (node, requests));
    }
}

/// The node and requests of `pod`, if it holds resources on a node (bound
/// and not finished).
fn holding(pod: &Pod) -> Option<(String, Requests)> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    Some((node, pod_requests(spec)))
}

fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

impl NodeUsage {
    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one event of the pod watch.
    pub fn apply(&self, event: &watcher::Event<Pod>) {
        let mut index = self.index();
        match event {
            watcher::Event::Init => index.relist = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(relist), Some(held)) = (index.relist.as_mut(), holding(pod)) {
                    relist.insert(pod_key(pod), held);
                }
            }
            watcher::Event::InitDone => {
                let pods = index.relist.take().unwrap_or_default();
                let mut nodes: HashMap<String, Requests> = HashMap::new();
                for (node, requests) in pods.values() {
                    nodes.entry(node.clone()).or_default().add(requests, 1);
                }
                *index = Index {
                    pods,
                    nodes,
                    relist: None,
                };
            }
            watcher::Event::Apply(pod) => match holding(pod) {
                Some((node, requests)) => index.insert(pod_key(pod), node, requests),
                None => index.remove(&pod_key(pod)),
            },
            watcher::Event::Delete(pod) => index.remove(&pod_key(pod)),
        }
    }

    /// Counts a pod the controller is about to create on `node` (replaced
    /// by the watch's view of it when that arrives).
    pub fn assume(&self, namespace: &str, name: &str, node: &str, requests: Requests) {
        self.index()
            .insert(format!("{namespace}/{name}"), node.to_owned(), requests);
    }

    /// Forgets a pod counted by [`NodeUsage::assume`] that was not created.
    pub fn forget(&self, namespace: &str, name: &str) {
        self.index().remove(&format!("{namespace}/{name}"));
    }

    /// Runs `f` with the per-node totals, under one lock.
    pub fn with_totals<T>(&self, f: impl FnOnce(&HashMap<String, Requests>) -> T) -> T {
        f(&self.index().nodes)
    }
}

#[cfg(test)]
mod tests;
