//! Every manifest under `deploy/` against the types and code it configures:
//! each YAML document parses into its k8s-openapi type with no field left
//! over (a misspelt field would be silently dropped by `kubectl apply`), the
//! node plugin's ConfigMap loads with the node plugin's own strict config
//! loader, the paths and ports in that config are the ones the DaemonSet
//! mounts and probes, the scheduler configuration names verbs the extender
//! serves, and the RBAC rules cover every API call the controller makes and
//! nothing more.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Probe, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// The namespace everything of fast-sandbox's runs in.
const NAMESPACE: &str = "fast-sandbox-system";

/// The fast RuntimeClasses, each also a handler the shim exposes.
const FAST_CLASSES: [&str; 4] = ["fast-runc", "fast-crun", "fast-gvisor", "fast-kata"];

/// Every API call the controller makes, as (API group, resource, verb).
/// Keep in sync with the table in `docs/controller.md`; the RBAC rules must
/// grant exactly these.
const CONTROLLER_API_CALLS: &[(&str, &str, &str)] = &[
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "pods", "create"),
    ("", "pods", "delete"),
    ("", "nodes", "list"),
    ("", "nodes", "watch"),
    ("fast-sandbox.io", "sandboxpools", "list"),
    ("fast-sandbox.io", "sandboxpools", "watch"),
    ("fast-sandbox.io", "sandboxpools", "patch"),
    ("fast-sandbox.io", "sandboxpools/status", "patch"),
    ("fast-sandbox.io", "fastsandboxes", "list"),
    ("fast-sandbox.io", "fastsandboxes", "watch"),
    ("fast-sandbox.io", "fastsandboxes/status", "patch"),
    // kube-runtime's event Recorder: a new Event, then a patch of its series.
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
];

/// The API calls the controller makes in its own namespace only (leader
/// election, `controller/src/leader.rs`): granted by a Role there, not the
/// ClusterRole.
const CONTROLLER_NAMESPACE_CALLS: &[(&str, &str, &str)] = &[
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// One YAML document of a file under `deploy/`.
#[derive(Debug)]
struct Doc {
    file: String,
    index: usize,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn at(&self) -> String {
        format!(
            "{} document {} ({} {})",
            self.file,
            self.index,
            self.kind(),
            self.name()
        )
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

/// Every document of every YAML file under `deploy/`.
fn docs() -> Vec<Doc> {
    let root = deploy_dir();
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    let mut docs = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let file = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let values: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("deploy/{file} is not valid YAML: {e}"));
        for (index, value) in values.into_iter().enumerate() {
            docs.push(Doc {
                file: file.clone(),
                index,
                value,
            });
        }
    }
    docs
}

fn of_kind(docs: &[Doc], kind: &str) -> Vec<(String, Value)> {
    docs.iter()
        .filter(|d| d.kind() == kind)
        .map(|d| (d.at(), d.value.clone()))
        .collect()
}

/// The single document of `kind` named `name`, as its type.
fn one<T: DeserializeOwned>(docs: &[Doc], kind: &str, name: &str) -> T {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == kind && d.name() == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name}, found {found:?}"
    );
    serde_json::from_value(found[0].value.clone())
        .unwrap_or_else(|e| panic!("{}: {e}", found[0].at()))
}

/// Drops what serialising a typed object leaves out anyway: nulls, and
/// empty maps and lists.
fn prune(value: &Value) -> Option<Value> {
    match value {
        Value::Null => None,
        Value::Object(map) => {
            let map: serde_json::Map<String, Value> = map
                .iter()
                .filter_map(|(k, v)| prune(v).map(|v| (k.clone(), v)))
                .collect();
            (!map.is_empty()).then_some(Value::Object(map))
        }
        Value::Array(items) => {
            let items: Vec<Value> = items.iter().filter_map(prune).collect();
            (!items.is_empty()).then_some(Value::Array(items))
        }
        other => Some(other.clone()),
    }
}

/// The first path where `a` and `b` differ.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(x), Some(y)) => first_difference(x, y, &p),
                    (Some(_), None) => Some(format!("{p}: not a field of the type")),
                    (None, _) => Some(format!("{p}: added by the type")),
                }
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} became {b}")),
    }
}

/// Parses `doc` as `T` and checks that nothing was lost on the way.
fn parses_exactly<T: DeserializeOwned + Serialize>(doc: &Doc) -> Result<(), String> {
    let typed: T = serde_json::from_value(doc.value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let (want, got) = (prune(&doc.value), prune(&back));
    match (&want, &got) {
        (Some(want), Some(got)) => match first_difference(want, got, "") {
            None => Ok(()),
            Some(diff) => Err(diff),
        },
        _ => Err("empty document".into()),
    }
}

#[test]
fn every_document_parses_into_its_type_with_no_field_left_over() {
    let docs = docs();
    assert!(
        docs.len() >= 10,
        "too few documents under deploy/: {docs:?}"
    );
    let mut failures = Vec::new();
    for doc in &docs {
        let api_version = doc.value["apiVersion"].as_str().unwrap_or_default();
        let result = match (api_version, doc.kind()) {
            ("v1", "Namespace") => parses_exactly::<Namespace>(doc),
            ("v1", "ServiceAccount") => parses_exactly::<ServiceAccount>(doc),
            ("v1", "ConfigMap") => parses_exactly::<ConfigMap>(doc),
            ("v1", "Service") => parses_exactly::<Service>(doc),
            ("apps/v1", "DaemonSet") => parses_exactly::<DaemonSet>(doc),
            ("apps/v1", "Deployment") => parses_exactly::<Deployment>(doc),
            ("node.k8s.io/v1", "RuntimeClass") => parses_exactly::<RuntimeClass>(doc),
            ("networking.k8s.io/v1", "NetworkPolicy") => parses_exactly::<NetworkPolicy>(doc),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => parses_exactly::<ClusterRole>(doc),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                parses_exactly::<ClusterRoleBinding>(doc)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => parses_exactly::<Role>(doc),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => parses_exactly::<RoleBinding>(doc),
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
                parses_exactly::<ValidatingAdmissionPolicy>(doc)
            }
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
                parses_exactly::<ValidatingAdmissionPolicyBinding>(doc)
            }
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                parses_exactly::<CustomResourceDefinition>(doc)
            }
            // Not an API object: checked by scheduler_config_calls_the_extender.
            ("kubescheduler.config.k8s.io/v1", "KubeSchedulerConfiguration") => Ok(()),
            // kustomize's input: checked by the_kustomization_applies_every_object.
            ("kustomize.config.k8s.io/v1beta1", "Kustomization") => Ok(()),
            (v, k) => Err(format!("unexpected apiVersion {v:?} kind {k:?}")),
        };
        if let Err(e) = result {
            failures.push(format!("{}: {e}", doc.at()));
        }
        let namespaced = !matches!(
            doc.kind(),
            "Namespace"
                | "RuntimeClass"
                | "ClusterRole"
                | "ClusterRoleBinding"
                | "CustomResourceDefinition"
                | "ValidatingAdmissionPolicy"
                | "ValidatingAdmissionPolicyBinding"
                | "KubeSchedulerConfiguration"
                | "Kustomization"
        );
        let namespace = doc.value["metadata"]["namespace"].as_str();
        if namespaced && namespace != Some(NAMESPACE) {
            failures.push(format!(
                "{}: namespace {namespace:?}, want {NAMESPACE}",
                doc.at()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `kubectl apply -k deploy/` installs every API object under `deploy/`
/// once, CRDs and namespace before what uses them; and both images are
/// named at the workspace version (`hack/images.sh` builds them).
#[test]
fn the_kustomization_applies_every_object() {
    let docs = docs();
    let kustomization = docs
        .iter()
        .find(|d| d.kind() == "Kustomization")
        .expect("deploy/kustomization.yaml");
    assert_eq!(kustomization.file, "kustomization.yaml");
    let listed: Vec<&str> = kustomization.value["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("a resource is a path"))
        .collect();
    let mut objects: Vec<&str> = docs
        .iter()
        .filter(|d| !matches!(d.kind(), "Kustomization" | "KubeSchedulerConfiguration"))
        .map(|d| d.file.as_str())
        .collect();
    objects.dedup();
    let mut sorted = listed.clone();
    sorted.sort_unstable();
    let mut expected = objects.clone();
    expected.sort_unstable();
    assert_eq!(sorted, expected, "every manifest with API objects, once");
    let position = |file: &str| listed.iter().position(|f| *f == file);
    for first in [
        "namespace.yaml",
        "crds/sandboxpools.yaml",
        "crds/fastsandboxes.yaml",
    ] {
        for then in ["node-plugin/daemonset.yaml", "controller/deployment.yaml"] {
            assert!(position(first) < position(then), "{first} before {then}");
        }
    }
    let version = env!("CARGO_PKG_VERSION");
    for (kind, name, image) in [
        ("DaemonSet", "fast-sandbox-node", "fast-sandbox/node"),
        (
            "Deployment",
            "fast-sandbox-controller",
            "fast-sandbox/controller",
        ),
    ] {
        let doc = docs
            .iter()
            .find(|d| d.kind() == kind && d.value["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name}"));
        let used = doc.value["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(used, format!("{image}:{version}"), "{kind} {name}");
    }
}

#[test]
fn the_comparison_catches_a_misspelt_field() {
    let doc = Doc {
        file: "inline".into(),
        index: 0,
        value: serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "x"},
            "automountServiceAccountTokn": false,
        }),
    };
    let err = parses_exactly::<ServiceAccount>(&doc).expect_err("misspelt field");
    assert!(err.contains("automountServiceAccountTokn"), "{err}");
}

fn pod_spec(spec: Option<&PodSpec>, what: &str) -> PodSpec {
    spec.cloned()
        .unwrap_or_else(|| panic!("{what} has no pod spec"))
}

fn only_container(spec: &PodSpec, what: &str) -> Container {
    assert_eq!(spec.containers.len(), 1, "{what}: one container");
    spec.containers[0].clone()
}

/// The port and path of an HTTP probe, and its host.
fn http_probe(probe: Option<&Probe>, what: &str) -> (String, String, Option<String>) {
    let get = probe
        .and_then(|p| p.http_get.clone())
        .unwrap_or_else(|| panic!("{what}: no HTTP probe"));
    let port = match get.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => p.to_string(),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s,
    };
    (port, get.path.unwrap_or_default(), get.host)
}

fn requests(container: &Container) -> BTreeSet<String> {
    container
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default()
}

/// The node plugin's config text from the ConfigMap, and its mount point.
fn node_config(docs: &[Doc]) -> String {
    let map: ConfigMap = one(docs, "ConfigMap", "fast-sandbox-node");
    map.data
        .and_then(|d| d.get("node.toml").cloned())
        .expect("ConfigMap fast-sandbox-node has data node.toml")
}

fn load_node_config(text: &str) -> fast_sandbox_node::config::FileConfig {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.toml");
    std::fs::write(&path, text).expect("write node.toml");
    fast_sandbox_node::config::load(&path)
        .unwrap_or_else(|e| panic!("deploy/node-plugin/configmap.yaml node.toml: {e:#}"))
}

/// The host path mounted under `path` in the node plugin's container (the
/// host directory plus the rest of `path`), or `None` when no hostPath
/// volume covers it.
fn host_path_of(spec: &PodSpec, container: &Container, path: &Path) -> Option<PathBuf> {
    let volumes: BTreeMap<&str, &str> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| {
            v.host_path
                .as_ref()
                .map(|h| (v.name.as_str(), h.path.as_str()))
        })
        .collect();
    container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .filter(|m| m.read_only != Some(true))
        .max_by_key(|m| m.mount_path.len())
        .and_then(|m| {
            let host = volumes.get(m.name.as_str())?;
            let rest = path.strip_prefix(&m.mount_path).ok()?;
            Some(Path::new(host).join(rest))
        })
}

#[test]
fn node_plugin_config_loads_with_the_node_plugins_strict_loader() {
    let docs = docs();
    let text = node_config(&docs);
    let file = load_node_config(&text);
    let host_ip = Some("10.0.0.1".parse().expect("ip"));
    let agent =
        fast_sandbox_node::config::agent_settings(&file.agent, Some("node".into()), host_ip)
            .unwrap_or_else(|e| panic!("deploy/node-plugin/configmap.yaml [agent]: {e:#}"))
            .expect("the agent is on: the controller needs it");
    let tls = agent.tls.expect("the agent serves TLS");
    assert!(
        tls.cert.starts_with("/etc/fast-sandbox-agent-tls"),
        "the credential's mount"
    );
    assert!(agent.token_file.is_none(), "no shared token");
    assert!(agent.max_slots <= 256, "a node-wide slot cap");
    let specs = fast_sandbox_node::config::pool_specs(&file.pools)
        .unwrap_or_else(|e| panic!("deploy/node-plugin/configmap.yaml [[pool]]: {e:#}"));
    let handlers: BTreeSet<&str> = specs.iter().map(|s| s.exposed_handler.as_str()).collect();
    for class in FAST_CLASSES {
        assert!(
            handlers.contains(class),
            "no [[pool]] exposes {class}: its pods would fail on an unknown handler"
        );
    }

    // The loader really is strict for this text: a stray field fails.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.toml");
    std::fs::write(&path, format!("{text}\n[slots]\nstate_dri = \"/x\"\n")).expect("write");
    assert!(fast_sandbox_node::config::load(&path).is_err());
}

#[test]
fn daemonset_mounts_probes_and_privileges_match_the_config() {
    let docs = docs();
    let ds: DaemonSet = one(&docs, "DaemonSet", "fast-sandbox-node");
    let spec = ds.spec.expect("DaemonSet spec");
    assert_eq!(
        spec.update_strategy.and_then(|s| s.type_).as_deref(),
        Some("OnDelete"),
        "a rolling update would wait forever for kubelet (docs/deploy.md)"
    );
    let pod = pod_spec(spec.template.spec.as_ref(), "DaemonSet");
    assert_eq!(
        pod.host_pid,
        Some(true),
        "fix-ups open /proc/<pause pid>/ns"
    );
    assert_eq!(pod.host_network, Some(true), "host UTS and loopback admin");
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let c = only_container(&pod, "DaemonSet");
    assert!(c.image.as_deref().is_some_and(|i| !i.is_empty()), "image");
    assert_eq!(
        c.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    assert_eq!(
        requests(&c),
        BTreeSet::from(["cpu".to_owned(), "memory".to_owned()])
    );
    assert!(
        c.liveness_probe.is_none(),
        "see docs/deploy.md, The bootstrap loop"
    );

    // The supervisor runs `serve`, so the CRI server comes back without
    // kubelet (docs/deploy.md, "Restarts without kubelet").
    let command = c.command.clone().unwrap_or_default();
    assert_eq!(
        command.get(..4),
        Some(&["fast-sandbox-node", "supervise", "--", "serve"].map(String::from)[..]),
        "{command:?}"
    );
    // The config the container is started with is the ConfigMap's.
    let config_arg = command
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .expect("--config=PATH in the command");
    let config_mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(config_arg).starts_with(&m.mount_path))
        .expect("the config file is mounted");
    let config_volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == config_mount.name)
        .and_then(|v| v.config_map.clone())
        .expect("the config mount is a ConfigMap volume");
    assert_eq!(config_volume.name, "fast-sandbox-node");
    assert!(config_arg.ends_with("/node.toml"));

    // Every path the config names is on the host, where containerd and
    // kubelet see it too.
    let file = load_node_config(&node_config(&docs));
    let settings = fast_sandbox_node::config::Settings::resolve(file, Default::default());
    let endpoint = settings
        .upstream
        .endpoint
        .trim_start_matches("unix://")
        .to_owned();
    let sandboxes = settings
        .slots
        .containerd_root
        .join("io.containerd.grpc.v1.cri/sandboxes");
    for path in [
        Path::new(&endpoint),
        settings.socket.path.as_path(),
        settings.slots.state_dir.as_path(),
        sandboxes.as_path(),
        Path::new("/sys/fs/cgroup"),
    ] {
        assert_eq!(
            host_path_of(&pod, &c, path).as_deref(),
            Some(path),
            "{} must be the same host path, mounted writable",
            path.display()
        );
    }
    assert_eq!(
        settings.socket.path,
        Path::new("/run/fast-sandbox/cri.sock"),
        "the socket docs/deploy.md points kubelet at"
    );

    // Scrapers reach /metrics on the node's address, authenticated with
    // the metrics Secret's token, on a declared port.
    let metrics_arg = command
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-addr="))
        .expect("--metrics-addr in the command");
    let host_ip = c.env.iter().flatten().find(|e| e.name == "HOST_IP");
    assert_eq!(
        host_ip
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("status.hostIP")
    );
    // As kubelet expands it on a node at 10.0.0.7.
    let expanded = metrics_arg.replace("$(HOST_IP)", "10.0.0.7");
    let scrape = fast_sandbox_node::config::metrics_settings(
        &load_node_config(&node_config(&docs)).admin,
        Some(&expanded),
    )
    .unwrap_or_else(|e| panic!("--metrics-addr={metrics_arg}: {e:#}"))
    .expect("metrics listener on");
    let token_file = scrape.token_file.expect("scrapes are authenticated");
    let token_mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| token_file.parent() == Some(Path::new(&m.mount_path)))
        .expect("the metrics token is mounted");
    let token_volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == token_mount.name)
        .and_then(|v| v.secret.clone())
        .expect("the metrics token mount is a Secret volume");
    assert_eq!(
        token_volume.secret_name.as_deref(),
        Some("fast-sandbox-metrics-token")
    );
    // A missing metrics Secret must never keep the node's runtime from
    // starting: scrapes are refused instead.
    assert_eq!(token_volume.optional, Some(true));
    assert!(c
        .ports
        .iter()
        .flatten()
        .any(|p| p.name.as_deref() == Some("metrics")
            && p.container_port == i32::from(scrape.address.port())));

    // Probes reach the admin endpoint the config serves.
    let admin = settings.admin.expect("admin endpoint enabled");
    let admin: std::net::SocketAddr = admin.parse().expect("admin address");
    // Readiness follows containerd and recovery; start-up only that the
    // process serves.
    for (what, probe, want) in [
        ("readiness", c.readiness_probe.as_ref(), "/healthz"),
        ("startup", c.startup_probe.as_ref(), "/livez"),
    ] {
        let (port, path, host) = http_probe(probe, what);
        assert_eq!(port, admin.port().to_string(), "{what} probe port");
        assert_eq!(path, want, "{what} probe path");
        assert_eq!(host, Some(admin.ip().to_string()), "{what} probe host");
    }
}

#[test]
fn runtime_classes_name_the_shims_handlers_with_selector_and_overhead() {
    let docs = docs();
    let classes = of_kind(&docs, "RuntimeClass");
    let names: BTreeSet<String> = classes
        .iter()
        .map(|(_, v)| {
            v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        names,
        FAST_CLASSES.iter().map(|s| (*s).to_owned()).collect()
    );
    for class in FAST_CLASSES {
        let rc: RuntimeClass = one(&docs, "RuntimeClass", class);
        assert_eq!(rc.handler, class, "{class}: the shim's exposed handler");
        let selector = rc
            .scheduling
            .and_then(|s| s.node_selector)
            .unwrap_or_default();
        assert_eq!(
            selector
                .get(&format!("fast-sandbox.io/{class}"))
                .map(String::as_str),
            Some("true"),
            "{class}: scheduling.nodeSelector"
        );
        let fixed = rc.overhead.and_then(|o| o.pod_fixed).unwrap_or_default();
        assert!(
            fixed.contains_key("cpu") && fixed.contains_key("memory"),
            "{class}: overhead.podFixed cpu and memory"
        );
    }
}

#[test]
fn controller_deployment_service_and_account_fit_together() {
    let docs = docs();
    let deployment: Deployment = one(&docs, "Deployment", "fast-sandbox-controller");
    let spec = deployment.spec.expect("Deployment spec");
    let pod = pod_spec(spec.template.spec.as_ref(), "Deployment");
    let c = only_container(&pod, "Deployment");
    assert!(c.image.as_deref().is_some_and(|i| !i.is_empty()), "image");
    assert_eq!(
        requests(&c),
        BTreeSet::from(["cpu".to_owned(), "memory".to_owned()])
    );
    for (what, probe) in [
        ("readiness", c.readiness_probe.as_ref()),
        ("liveness", c.liveness_probe.as_ref()),
    ] {
        let (port, path, _) = http_probe(probe, what);
        assert_eq!(port, "extender", "{what} probe port");
        assert_eq!(path, "/healthz", "{what} probe path");
    }
    let ports = c.ports.clone().unwrap_or_default();
    let extender_port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("extender"))
        .expect("a container port named extender");

    let account = pod
        .service_account_name
        .clone()
        .expect("serviceAccountName");
    let _: ServiceAccount = one(&docs, "ServiceAccount", &account);
    let binding: ClusterRoleBinding = one(&docs, "ClusterRoleBinding", "fast-sandbox-controller");
    let subjects = binding.subjects.unwrap_or_default();
    assert!(
        subjects.iter().any(|s| s.kind == "ServiceAccount"
            && s.name == account
            && s.namespace.as_deref() == Some(NAMESPACE)),
        "the binding's subject is the Deployment's account"
    );
    let _: ClusterRole = one(&docs, "ClusterRole", &binding.role_ref.name);

    let service: Service = one(&docs, "Service", "fast-sandbox-controller");
    let service_spec = service.spec.expect("Service spec");
    let labels = spec
        .template
        .metadata
        .and_then(|m| m.labels)
        .unwrap_or_default();
    for (k, v) in service_spec.selector.unwrap_or_default() {
        assert_eq!(labels.get(&k), Some(&v), "Service selector {k}={v}");
    }
    let service_port = &service_spec.ports.unwrap_or_default()[0];
    assert_eq!(
        service_port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("extender".into()))
    );
    assert_eq!(service_port.port, extender_port.container_port);

    // No shared secret: the controller has its own credentials, each
    // node plugin its node's, from the host.
    let secret_of = |spec: &PodSpec| -> BTreeSet<String> {
        spec.volumes
            .iter()
            .flatten()
            .filter_map(|v| v.secret.as_ref().and_then(|s| s.secret_name.clone()))
            .collect()
    };
    let ds: DaemonSet = one(&docs, "DaemonSet", "fast-sandbox-node");
    let ds_pod = pod_spec(
        ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
        "DaemonSet",
    );
    // The node plugin's only Secret is the scrapers' metrics token, which
    // cannot call the agent.
    assert_eq!(
        secret_of(&ds_pod),
        BTreeSet::from(["fast-sandbox-metrics-token".to_owned()])
    );
    assert_eq!(
        secret_of(&pod),
        BTreeSet::from([
            "fast-sandbox-controller-agent-tls".to_owned(),
            "fast-sandbox-extender-tls".to_owned()
        ])
    );
    // The DaemonSet runs where the controller dials: the label a kubelet
    // cannot set on itself.
    let (key, value) = fast_sandbox_controller::agent::DEFAULT_NODE_SELECTOR
        .split_once('=')
        .expect("k=v");
    assert_eq!(
        ds_pod.node_selector.as_ref().and_then(|s| s.get(key)),
        Some(&value.to_owned())
    );
    assert!(key.starts_with("node-restriction.kubernetes.io/"));
    // The agent binds the node's own address.
    let ds_container = only_container(&ds_pod, "DaemonSet");
    let command = ds_container.command.clone().unwrap_or_default();
    assert!(
        command.iter().any(|a| a == "--agent-ip=$(HOST_IP)"),
        "{command:?}"
    );
    let host_ip = ds_container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "HOST_IP");
    let field = host_ip
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(field, Some("status.hostIP"));
}

/// Only kube-scheduler's pods in kube-system reach the controller, and
/// only on the extender port.
#[test]
fn only_the_scheduler_reaches_the_extender() {
    let docs = docs();
    let policy: NetworkPolicy = one(&docs, "NetworkPolicy", "fast-sandbox-controller");
    let spec = policy.spec.expect("spec");
    assert_eq!(
        spec.pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .and_then(|l| l.get("app.kubernetes.io/name"))
            .map(String::as_str),
        Some("fast-sandbox-controller")
    );
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
    let rules = spec.ingress.expect("ingress rules");
    assert_eq!(rules.len(), 1);
    let peers = rules[0].from.clone().expect("from");
    assert_eq!(peers.len(), 1, "one peer: namespace AND pod selector");
    let label = |s: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
                 k: &str| {
        s.as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .and_then(|l| l.get(k).cloned())
    };
    assert_eq!(
        label(&peers[0].namespace_selector, "kubernetes.io/metadata.name").as_deref(),
        Some("kube-system")
    );
    assert_eq!(
        label(&peers[0].pod_selector, "component").as_deref(),
        Some("kube-scheduler")
    );
    let ports = rules[0].ports.clone().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(
        ports[0].port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("extender".into()))
    );
}

/// Does `rule` grant `verb` on `group`/`resource`?
fn grants(rule: &PolicyRule, group: &str, resource: &str, verb: &str) -> bool {
    let has =
        |list: &Option<Vec<String>>, x: &str| list.iter().flatten().any(|v| v == x || v == "*");
    has(&rule.api_groups, group)
        && has(&rule.resources, resource)
        && rule.verbs.iter().any(|v| v == verb || v == "*")
}

/// `rules` grant every call of `calls` and nothing else.
fn grants_exactly(rules: &[PolicyRule], calls: &[(&str, &str, &str)], what: &str) {
    let missing: Vec<_> = calls
        .iter()
        .filter(|(g, r, v)| !rules.iter().any(|rule| grants(rule, g, r, v)))
        .collect();
    assert!(missing.is_empty(), "{what} does not grant {missing:?}");
    let wanted: BTreeSet<(&str, &str, &str)> = calls.iter().copied().collect();
    let mut extra = Vec::new();
    for rule in rules {
        assert!(
            rule.non_resource_urls.is_none() && rule.resource_names.is_none(),
            "unexpected rule {rule:?}"
        );
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    if !wanted.contains(&(g.as_str(), r.as_str(), v.as_str())) {
                        extra.push(format!("{g}/{r} {v}"));
                    }
                }
            }
        }
    }
    assert!(
        extra.is_empty(),
        "{what} grants calls the controller does not make: {extra:?}"
    );
}

#[test]
fn rbac_grants_exactly_the_controllers_api_calls() {
    let docs = docs();
    let role: ClusterRole = one(&docs, "ClusterRole", "fast-sandbox-controller");
    let rules = role.rules.unwrap_or_default();
    grants_exactly(&rules, CONTROLLER_API_CALLS, "the ClusterRole");

    // The table names the resources the code calls: the Sandbox CRD's plural
    // is `fastsandboxes` (agent-sandbox owns `sandboxes`).
    use kube::Resource;
    let sandboxes = fast_sandbox_controller::crd::Sandbox::plural(&()).into_owned();
    assert!(
        CONTROLLER_API_CALLS.iter().any(|(_, r, _)| *r == sandboxes),
        "the API calls name the Sandbox plural {sandboxes:?}"
    );
    // The events the code publishes are events.k8s.io ones, the leases
    // coordination.k8s.io ones: the groups the tables name.
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::events::v1::Event;
    assert!(CONTROLLER_API_CALLS
        .iter()
        .any(|(g, r, _)| *g == Event::group(&()) && *r == Event::plural(&())));
    assert!(CONTROLLER_NAMESPACE_CALLS
        .iter()
        .all(|(g, r, _)| *g == Lease::group(&()) && *r == Lease::plural(&())));

    // Leader election: a Role in the controller's namespace, bound to its
    // ServiceAccount, grants exactly the Lease calls.
    let bindings: Vec<RoleBinding> = docs
        .iter()
        .filter(|d| d.kind() == "RoleBinding")
        .map(|d| serde_json::from_value(d.value.clone()).expect("a RoleBinding"))
        .filter(|b: &RoleBinding| {
            b.subjects.iter().flatten().any(|s| {
                s.kind == "ServiceAccount"
                    && s.name == "fast-sandbox-controller"
                    && s.namespace.as_deref() == Some(NAMESPACE)
            })
        })
        .collect();
    assert_eq!(bindings.len(), 1, "one RoleBinding for the controller");
    let binding = &bindings[0];
    assert_eq!(binding.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(binding.role_ref.kind, "Role");
    let role: Role = one(&docs, "Role", &binding.role_ref.name);
    assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
    grants_exactly(
        &role.rules.unwrap_or_default(),
        CONTROLLER_NAMESPACE_CALLS,
        "the leader-election Role",
    );
}

#[test]
fn rbac_check_rejects_a_missing_verb() {
    let rule = PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec!["pods".into()]),
        verbs: vec!["get".into()],
        ..Default::default()
    };
    assert!(grants(&rule, "", "pods", "get"));
    assert!(!grants(&rule, "", "pods", "create"));
    assert!(!grants(&rule, "apps", "pods", "get"));
}

/// Sends one HTTP/1.1 request and returns the status code.
async fn http_status(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

#[tokio::test]
async fn scheduler_config_calls_the_extender_the_controller_serves() {
    let docs = docs();
    let configs = of_kind(&docs, "KubeSchedulerConfiguration");
    assert_eq!(configs.len(), 1, "one KubeSchedulerConfiguration");
    let (at, config) = &configs[0];
    assert_eq!(
        config["apiVersion"], "kubescheduler.config.k8s.io/v1",
        "{at}"
    );
    let extenders = config["extenders"].as_array().expect("extenders list");
    assert_eq!(extenders.len(), 1, "{at}: one extender");
    let ext = &extenders[0];
    assert_eq!(
        ext["nodeCacheCapable"], true,
        "{at}: the extender keeps node state"
    );
    assert_eq!(
        ext["ignorable"], true,
        "{at}: an extender outage must not stop scheduling"
    );
    assert!(
        ext["weight"].as_i64().is_some_and(|w| w > 0),
        "{at}: weight"
    );
    assert!(
        ext.get("managedResources").is_none(),
        "{at}: no managed resources"
    );

    // The URL names the Service and its port.
    let service: Service = one(&docs, "Service", "fast-sandbox-controller");
    let port = service.spec.and_then(|s| s.ports).expect("ports")[0].port;
    let url = ext["urlPrefix"].as_str().expect("urlPrefix");
    assert_eq!(
        url,
        format!("https://fast-sandbox-controller.{NAMESPACE}.svc:{port}"),
        "{at}: urlPrefix"
    );
    assert_eq!(ext["enableHTTPS"], true, "{at}: HTTPS");
    assert_eq!(
        ext["tlsConfig"]["serverName"],
        format!("fast-sandbox-controller.{NAMESPACE}.svc"),
        "{at}: the certificate's name is checked"
    );
    assert!(
        ext["tlsConfig"]["caFile"].is_string(),
        "{at}: tlsConfig.caFile"
    );
    assert!(ext["tlsConfig"].get("insecure").is_none(), "{at}: verified");

    // kube-scheduler POSTs to <urlPrefix>/<verb>: both answer on the real
    // extender (an empty node list in node-name cache mode).
    let config = fast_sandbox_controller::extender::ExtenderConfig::default();
    let defaults: BTreeSet<&str> = config.fast_classes.keys().map(String::as_str).collect();
    assert_eq!(
        defaults,
        FAST_CLASSES.into_iter().collect(),
        "the extender's default fast classes are deploy/runtimeclasses.yaml's"
    );
    let extender = std::sync::Arc::new(fast_sandbox_controller::extender::Extender::new(
        config,
        fast_sandbox_controller::scoring::Snapshot::new(Vec::new()).expect("empty snapshot"),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(fast_sandbox_controller::extender::serve(listener, extender));
    let args = r#"{"Pod":{"metadata":{"name":"p","namespace":"d","uid":"u"},"spec":{"runtimeClassName":"fast-runc","containers":[{"name":"c","image":"busybox"}]}},"NodeNames":[]}"#;
    for key in ["filterVerb", "prioritizeVerb"] {
        let verb = ext[key].as_str().unwrap_or_else(|| panic!("{at}: {key}"));
        let status = http_status(addr, "POST", &format!("/{verb}"), args).await;
        assert_eq!(status, 200, "{at}: {key} {verb:?} is not served");
    }
    // And the check can fail: a verb the extender does not serve.
    assert_eq!(http_status(addr, "POST", "/bind", args).await, 404);
    server.abort();
}

#[test]
fn containerd_snippet_defines_every_upstream_handler_the_pools_use() {
    let path = deploy_dir().join("containerd/config-snippet.toml");
    let text = std::fs::read_to_string(&path).expect("read config-snippet.toml");
    let config: toml::Value = toml::from_str(&text).expect("config-snippet.toml is TOML");
    assert_eq!(
        config["version"].as_integer(),
        Some(2),
        "containerd 1.6 config version"
    );
    let runtimes = &config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    let file = load_node_config(&node_config(&docs()));
    let upstreams: BTreeSet<String> = file.pools.iter().map(|p| p.upstream.clone()).collect();
    // Kata is configured by Kata's own installer where it exists.
    for upstream in upstreams.iter().filter(|u| *u != "kata") {
        let runtime = runtimes
            .get(upstream)
            .unwrap_or_else(|| panic!("no containerd runtime {upstream:?} for the pools"));
        assert_eq!(
            runtime["runtime_type"].as_str(),
            Some("io.containerd.runc.v2"),
            "{upstream}: runtime_type"
        );
        let binary = runtime["options"]["BinaryName"]
            .as_str()
            .unwrap_or_default();
        assert!(
            binary.starts_with('/'),
            "{upstream}: options.BinaryName {binary:?}"
        );
    }
    assert!(["runc", "crun", "runsc"]
        .iter()
        .all(|u| upstreams.contains(*u)));
}

/// A fast pod with `security`, as kube-scheduler sends it to the extender.
fn fast_pod(class: &str, security: serde_json::Value) -> Value {
    serde_json::json!({
        "metadata": {"name": "p", "namespace": "d", "uid": format!("{class}-{security}")},
        "spec": {
            "runtimeClassName": class,
            "securityContext": security,
            "containers": [{"name": "c", "image": "busybox"}]
        }
    })
}

/// The extender as `run` configures it from the Deployment (the Deployment
/// passes no extender flag, so it runs on the defaults), against nodes that
/// serve the pools of every shipped config (the ConfigMap, the README's and
/// docs' examples, the quickstart's): no pod that would start without the
/// extender (warm or cold) is filtered out of any node, whatever its shape
/// and whatever the nodes' slots, and a node with a free slot of the pod's
/// shape still scores above one without.
#[test]
fn no_shipped_config_strands_a_fast_pod() {
    let docs = docs();
    let deployment: Deployment = one(&docs, "Deployment", "fast-sandbox-controller");
    let pod = pod_spec(
        deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref()),
        "Deployment",
    );
    let command = only_container(&pod, "Deployment")
        .command
        .unwrap_or_default();
    assert!(
        !command.iter().any(|a| a.starts_with("--extender-filter")),
        "the Deployment must not opt into filtering: {command:?}"
    );
    let configs = fast_sandbox_tests::replay::shipped_configs().expect("the shipped configs");
    assert!(configs.len() >= 3, "{} shipped configs", configs.len());
    let mut preferred = 0;
    for config in configs {
        let file = load_node_config(&config.toml);
        let specs = fast_sandbox_node::config::pool_specs(&file.pools)
            .unwrap_or_else(|e| panic!("{}: {e:#}", config.source));
        preferred += no_pod_is_stranded(&config.source, &specs);
    }
    assert!(
        preferred > 0,
        "no config has a warm pool of the default shape"
    );
}

/// [`no_shipped_config_strands_a_fast_pod`] for the pools `specs` of the
/// config `source`; returns how many classes it checked the warm node is
/// preferred for.
fn no_pod_is_stranded(source: &str, specs: &[fast_sandbox_node::pool::PoolSpec]) -> usize {
    let mut preferred = 0;
    use fast_sandbox_controller::extender::{Extender, ExtenderArgs, ExtenderConfig};
    use fast_sandbox_controller::scoring::{NodeState, PoolState, Snapshot};
    use serde::Deserialize;

    let pools = |free: u32| -> Vec<PoolState> {
        specs
            .iter()
            .map(|s| PoolState {
                handler: s.exposed_handler.clone(),
                upstream_handler: s.key.upstream_handler.clone(),
                shape: fast_sandbox_node::agent::shape_key(&s.key.shape),
                free: free.min(u32::try_from(s.size).unwrap_or(u32::MAX)),
                total: u32::try_from(s.size).unwrap_or(u32::MAX),
            })
            .collect()
    };
    let node = |name: &str, ready: bool, pools: Vec<PoolState>| NodeState {
        name: name.into(),
        ready,
        pools,
        images: vec![],
        last_seen_unix_ms: 0,
    };
    let snapshot = Snapshot::new(vec![
        node("warm", true, pools(u32::MAX)),
        node("taken", true, pools(0)),
        node("agent-down", false, pools(u32::MAX)),
    ])
    .expect("snapshot");
    let extender = Extender::new(ExtenderConfig::default(), snapshot);
    let all = ["warm", "taken", "agent-down", "not-reporting"];
    let shapes = [
        ("plain", serde_json::json!({})),
        (
            "seccompProfile: Unconfined",
            serde_json::json!({"seccompProfile": {"type": "Unconfined"}}),
        ),
        ("runAsUser: 1000", serde_json::json!({"runAsUser": 1000})),
        (
            "fsGroup and supplementalGroups",
            serde_json::json!({"fsGroup": 2000, "supplementalGroups": [5, 3]}),
        ),
    ];
    for class in FAST_CLASSES {
        for (what, security) in &shapes {
            let args = ExtenderArgs::deserialize(serde_json::json!({
                "Pod": fast_pod(class, security.clone()),
                "NodeNames": all,
            }))
            .expect("extender args");
            let filtered = extender.filter(args, 0);
            let names = filtered
                .node_names
                .as_ref()
                .map(|n| n.iter().map(|n| n.to_string()).collect::<Vec<_>>());
            assert_eq!(
                names.as_deref(),
                Some(&all.map(String::from)[..]),
                "{source}: {class} pod with {what}: filtered out {:?}",
                filtered.failed_and_unresolvable_nodes
            );
            assert!(filtered.failed_and_unresolvable_nodes.is_empty());
            assert!(filtered.error.is_empty());
        }
        // A node with a free slot of a plain pod's shape is preferred.
        let args = ExtenderArgs::deserialize(serde_json::json!({
            "Pod": fast_pod(class, serde_json::json!({})),
            "NodeNames": ["warm", "taken"],
        }))
        .expect("extender args");
        let scores = extender.prioritize(args, 0).expect("scores");
        let plain = fast_sandbox_controller::extender::pod_shape(None, "runtime-default");
        let warm_pool = specs.iter().any(|s| {
            s.exposed_handler == class
                && s.size > 0
                && fast_sandbox_node::agent::shape_key(&s.key.shape) == plain
        });
        if warm_pool {
            assert!(
                scores[0].score > scores[1].score,
                "{source}: {class}: {scores:?}"
            );
            preferred += 1;
        }
    }
    preferred
}

/// The ValidatingAdmissionPolicy holds the pods the controller's
/// ServiceAccount creates to what a Sandbox's pod may be: it matches that
/// account (the one the Deployment runs as), is bound with `Deny`, fails
/// closed, and has a rule, with a message naming the field, for each thing
/// a Sandbox's pod must not have.
#[test]
fn admission_policy_holds_the_controllers_pods_to_a_sandboxs() {
    let docs = docs();
    let name = "fast-sandbox-controller-pods";
    let policy: ValidatingAdmissionPolicy = one(&docs, "ValidatingAdmissionPolicy", name);
    let binding: ValidatingAdmissionPolicyBinding =
        one(&docs, "ValidatingAdmissionPolicyBinding", name);
    let binding = binding.spec.expect("binding spec");
    assert_eq!(binding.policy_name.as_deref(), Some(name));
    assert_eq!(binding.validation_actions, Some(vec!["Deny".to_owned()]));
    assert!(binding.param_ref.is_none() && binding.match_resources.is_none());

    let spec = policy.spec.expect("policy spec");
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
    let rules = spec
        .match_constraints
        .and_then(|m| m.resource_rules)
        .expect("resource rules");
    assert_eq!(rules.len(), 1);
    let rule = &rules[0];
    assert_eq!(rule.api_groups, Some(vec![String::new()]));
    assert_eq!(rule.resources, Some(vec!["pods".to_owned()]));
    assert_eq!(rule.operations, Some(vec!["CREATE".to_owned()]));

    let deployment: Deployment = one(&docs, "Deployment", "fast-sandbox-controller");
    let account = pod_spec(
        deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref()),
        "controller",
    )
    .service_account_name
    .expect("the controller's ServiceAccount");
    let _: ServiceAccount = one(&docs, "ServiceAccount", &account);
    let user = format!("'system:serviceaccount:{NAMESPACE}:{account}'");
    let conditions = spec.match_conditions.expect("match conditions");
    assert_eq!(conditions.len(), 1);
    let only_controller = conditions[0]
        .expression
        .split_whitespace()
        .collect::<Vec<_>>();
    assert_eq!(
        only_controller,
        ["request.userInfo.username", "==", user.as_str()],
        "matches exactly the controller's ServiceAccount"
    );

    let validations = spec.validations.expect("validations");
    for (field, in_expression) in [
        ("env[*].valueFrom", "has(e.valueFrom)"),
        ("envFrom", "c.envFrom"),
        ("spec.volumes", "has(v.emptyDir)"),
        (
            "automountServiceAccountToken",
            "automountServiceAccountToken == false",
        ),
        ("hostNetwork", "object.spec.hostPID"),
        ("privileged", "c.securityContext.privileged"),
        ("ownerReferences", "o.kind == 'Sandbox'"),
    ] {
        let rule = validations
            .iter()
            .find(|v| v.expression.contains(in_expression))
            .unwrap_or_else(|| panic!("no validation checks {in_expression}"));
        let message = rule.message.as_deref().unwrap_or_default();
        assert!(message.contains(field), "{message:?} names {field}");
        assert_eq!(rule.reason.as_deref(), Some("Forbidden"));
        let open = rule.expression.matches('(').count();
        assert_eq!(
            open,
            rule.expression.matches(')').count(),
            "{}",
            rule.expression
        );
    }
    // Every container list: init and ephemeral containers too.
    let containers = &spec.variables.expect("variables")[0];
    assert_eq!(containers.name, "containers");
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        assert!(
            containers
                .expression
                .contains(&format!("object.spec.{list}")),
            "{list}"
        );
    }
}
