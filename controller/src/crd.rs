//! The project's custom resources, group `fast-sandbox.io`, version
//! `v1alpha1`. The YAML under `deploy/crds/` is generated from these types
//! (`fast-sandbox-controller crdgen`), never edited by hand.
//!
//! - [`SandboxPool`] is **cluster-scoped**: it sizes warm pools on nodes, and
//!   nodes, RuntimeClasses and the node plugin's pools are cluster-wide
//!   things; a namespaced pool would let one namespace's object reserve
//!   capacity on nodes every namespace shares, and two namespaces could ask
//!   one node for the same (handler, shape) pool with different sizes.
//! - [`Sandbox`] is **namespaced**: it is one workload, and its pod lives in
//!   its namespace. Its resource names are `fastsandboxes` / `fastsandbox` /
//!   `fsb`, not the defaults `sandboxes` / `sandbox`: kubernetes-sigs
//!   agent-sandbox defines a kind `Sandbox` too (group `agents.x-k8s.io`),
//!   and with both installed `kubectl get sandboxes` would pick one of them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::nodes::SandboxShape;

/// The API group of every fast-sandbox resource.
pub const GROUP: &str = "fast-sandbox.io";
/// Label on a `Sandbox`'s pod: the pool whose slot it is meant to take.
pub const POOL_LABEL: &str = "fast-sandbox.io/pool-name";
/// Label on a `Sandbox`'s pod: the `Sandbox` it runs (the pod watch selects
/// on it).
pub const SANDBOX_LABEL: &str = "fast-sandbox.io/sandbox";

/// Warm sandbox slots kept on every node matching a selector, for one
/// RuntimeClass and one sandbox shape.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fast-sandbox.io",
    version = "v1alpha1",
    kind = "SandboxPool",
    status = "SandboxPoolStatus",
    shortname = "sbpool",
    category = "fast-sandbox",
    printcolumn = r#"{"name":"Class","type":"string","jsonPath":".spec.runtimeClassName"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.readyNodes"}"#,
    printcolumn = r#"{"name":"Free","type":"integer","jsonPath":".status.free"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.total"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPoolSpec {
    /// Nodes whose labels contain all of these get the pool; empty: every
    /// node running the node plugin.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// The RuntimeClass pods name to take a slot (`fast-runc`); it must be one
    /// of the controller's fast classes.
    pub runtime_class_name: String,
    /// Free slots to keep per node.
    pub slots_per_node: SlotRange,
    /// The sandbox shape of the slots; a pod takes a slot only if its
    /// pod-level security context has exactly this shape.
    #[serde(default)]
    pub shape: SandboxShape,
}

/// Bounds of a pool's size on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlotRange {
    /// Free slots kept on an idle node.
    pub min: u32,
    /// The most free slots asked of one node, however busy.
    pub max: u32,
}

/// What the controller last saw of a pool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPoolStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Matching nodes whose node plugin reports and accepted the size.
    #[serde(default)]
    pub ready_nodes: u32,
    /// Free slots over all matching nodes.
    #[serde(default)]
    pub free: u32,
    /// Slots over all matching nodes.
    #[serde(default)]
    pub total: u32,
    /// Per matching node, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodePoolStatus>,
    /// `Ready`: every matching node serves the pool at its desired size.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The pool on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePoolStatus {
    /// The node's name.
    pub node: String,
    /// The node plugin reports and is ready.
    pub ready: bool,
    /// Free slots as last reported.
    pub free: u32,
    /// Slots as last reported.
    pub total: u32,
    /// The free-slot count the controller asked for.
    pub desired: u32,
    /// The size this pool last pushed to the node and the node accepted:
    /// only such nodes are drained when the pool is deleted or leaves them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<u32>,
    /// Why the node does not serve the pool, if it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One container started in a warm sandbox on a node the controller chooses,
/// without going through kube-scheduler.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fast-sandbox.io",
    version = "v1alpha1",
    kind = "Sandbox",
    singular = "fastsandbox",
    plural = "fastsandboxes",
    namespaced,
    status = "SandboxStatus",
    shortname = "fsb",
    category = "fast-sandbox",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"IP","type":"string","jsonPath":".status.podIP"}"#,
    printcolumn = r#"{"name":"Start-ms","type":"integer","jsonPath":".status.timeToRunningMs"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    /// The container image.
    pub image: String,
    /// The entrypoint (the image's when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Arguments to the entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment of the container: literal values only. The controller
    /// creates the pod with its own rights, so `valueFrom` (a Secret's or
    /// ConfigMap's key, …) is refused: it would read what the `Sandbox`'s
    /// creator may not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Tolerations of the pod: the controller binds only to nodes whose
    /// `NoSchedule`/`NoExecute` taints (and cordon) these tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Resource requests and limits of the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// A fast RuntimeClass; may be left out when `pool` is set (the pool's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    /// A `SandboxPool`: only its nodes are candidates, and the pod gets its
    /// shape. Without it, any node with a pool of the RuntimeClass and the
    /// default shape is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// Where a `Sandbox` is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SandboxPhase {
    /// Not placed yet, or its pod is not running yet.
    Pending,
    /// Its container runs.
    Running,
    /// Its container exited 0.
    Succeeded,
    /// Its container failed, its pod is gone, or the spec is invalid.
    Failed,
    /// The pod's state cannot be known (its node does not answer).
    Unknown,
}

/// What the controller last saw of a `Sandbox`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SandboxPhase>,
    /// The node the pod was bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The pool the pod was placed for (also its `fast-sandbox.io/pool-name`
    /// label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The pod's IP.
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// When the controller created the pod (Unix time, ms, controller clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_created_unix_ms: Option<u64>,
    /// From the pod's creation to the controller seeing it Running, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_running_ms: Option<u64>,
    /// `Scheduled` (placed on a node, or why not) and `Ready` (running).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Why the CRD YAML could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CrdGenError {
    #[error("serializing the {kind} CRD: {source}")]
    Yaml {
        kind: &'static str,
        source: serde_saphyr::ser::Error,
    },
    #[error("writing {path}: {source}", path = path.display())]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Every CRD as (file name, YAML), in a stable order.
pub fn crd_yaml() -> Result<Vec<(&'static str, String)>, CrdGenError> {
    use kube::CustomResourceExt;
    let header = "# Generated by `fast-sandbox-controller crdgen` from controller/src/crd.rs.\n\
                  # Do not edit: change the Rust types and regenerate.\n";
    let yaml = |kind: &'static str, crd| {
        serde_saphyr::to_string(&crd)
            .map(|body| format!("{header}{body}"))
            .map_err(|source| CrdGenError::Yaml { kind, source })
    };
    Ok(vec![
        (
            "sandboxpools.yaml",
            yaml("SandboxPool", SandboxPool::crd())?,
        ),
        ("fastsandboxes.yaml", yaml("Sandbox", Sandbox::crd())?),
    ])
}

/// Writes [`crd_yaml`] into `dir` (created if missing); returns the paths.
pub fn write_crds(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, CrdGenError> {
    std::fs::create_dir_all(dir).map_err(|source| CrdGenError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut written = Vec::new();
    for (name, yaml) in crd_yaml()? {
        let path = dir.join(name);
        std::fs::write(&path, yaml).map_err(|source| CrdGenError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::{CustomResourceExt, Resource};

    #[test]
    fn scopes_and_names() {
        let pool = SandboxPool::crd();
        assert_eq!(pool.spec.scope, "Cluster");
        assert_eq!(pool.spec.group, GROUP);
        assert_eq!(
            pool.metadata.name.as_deref(),
            Some("sandboxpools.fast-sandbox.io")
        );
        let sandbox = Sandbox::crd();
        assert_eq!(sandbox.spec.scope, "Namespaced");
        // Distinct from agent-sandbox's `sandboxes` / `sandbox`.
        assert_eq!(sandbox.spec.names.plural, "fastsandboxes");
        assert_eq!(sandbox.spec.names.singular.as_deref(), Some("fastsandbox"));
        assert_eq!(sandbox.spec.names.short_names, Some(vec!["fsb".to_owned()]));
        assert_eq!(
            sandbox.metadata.name.as_deref(),
            Some("fastsandboxes.fast-sandbox.io")
        );
        assert_eq!(Sandbox::api_version(&()), "fast-sandbox.io/v1alpha1");
        // Status is a subresource, so reconcilers write it apart from spec.
        let version = &sandbox.spec.versions[0];
        assert!(version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some());
    }

    #[test]
    fn spec_round_trips_with_the_documented_field_names() {
        let json = serde_json::json!({
            "nodeSelector": {"pool": "fast"},
            "runtimeClassName": "fast-runc",
            "slotsPerNode": {"min": 2, "max": 8},
            "shape": {"seccomp": "runtime-default", "runAsUser": 1000, "supplementalGroups": [5]}
        });
        let spec: SandboxPoolSpec = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(spec.slots_per_node, SlotRange { min: 2, max: 8 });
        assert_eq!(spec.shape.run_as_user, Some(1000));
        assert_eq!(serde_json::to_value(&spec).unwrap(), json);
    }
}
