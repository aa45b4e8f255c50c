//! Every pool config we ship gives warm hits to a real kubelet's pods
//! (issue 10, item 4): each `[[pool]]` TOML in the README, in docs/*.md and
//! in deploy/node-plugin/configmap.yaml is loaded with the node plugin's
//! own parser, and a sandbox request shaped as kubelet v1.26 and v1.36
//! send it (docs/warm-slots.md, "What kubelet sends") must be eligible for
//! a claim and match the key of a pool of every fast handler the config
//! exposes. No root needed. (The quickstart's benchmark config is checked
//! by hack/bench's own unit tests.)

use std::path::{Path, PathBuf};

use fast_sandbox_node::{
    config::{pool_specs, FileConfig},
    pool::PoolSpec,
};
use fast_sandbox_proto::cri::{
    security_profile::ProfileType, NamespaceMode, NamespaceOption, PodSandboxConfig,
    RunPodSandboxRequest, SecurityProfile,
};
use fast_sandbox_shim::slots::{Claim, HandlerMap};
use fast_sandbox_tests::{clients::repo_root, pod::TestPod};

/// The TOML code blocks holding a `[[pool]]` in a Markdown file.
fn markdown_pool_blocks(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("read markdown");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```toml") => current = Some(String::new()),
            (Some(block), l) if l.starts_with("```") => {
                if block.contains("[[pool]]") {
                    blocks.push(block.clone());
                }
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// The `node.toml` of the DaemonSet's ConfigMap (a YAML block scalar).
fn configmap_node_toml(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read configmap");
    let mut lines = text.lines().skip_while(|l| l.trim() != "node.toml: |");
    lines.next().expect("the ConfigMap has data.node.toml");
    let body: Vec<&str> = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.get(4..).unwrap_or(""))
        .collect();
    body.join("\n")
}

/// Every shipped config with a `[[pool]]`, named by where it comes from.
fn shipped_configs() -> Vec<(String, String)> {
    let root = repo_root();
    let mut out = Vec::new();
    let mut markdown: Vec<PathBuf> = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    markdown.extend(docs);
    for path in markdown {
        for (i, block) in markdown_pool_blocks(&path).into_iter().enumerate() {
            let name = path.strip_prefix(&root).unwrap_or(&path).display();
            out.push((format!("{name} block {i}"), block));
        }
    }
    out.push((
        "deploy/node-plugin/configmap.yaml".into(),
        configmap_node_toml(&root.join("deploy/node-plugin/configmap.yaml")),
    ));
    out
}

/// What kubelet v1.26 (`new_kubelet = false`: also the deprecated
/// `seccomp_profile_path`) or v1.36 sends for an ordinary pod's sandbox.
fn kubelet_sandbox(new_kubelet: bool) -> PodSandboxConfig {
    let dir = std::env::temp_dir();
    let mut config = TestPod::new("shipped-configs", "kubelet-pod", &dir).sandbox_config();
    let security = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .expect("TestPod has a security context");
    security.seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    // Deprecated, but kubelet v1.26 still sets it (kuberuntime_sandbox.go:174).
    #[allow(deprecated)]
    let path = &mut security.seccomp_profile_path;
    *path = if new_kubelet {
        String::new()
    } else {
        "runtime/default".into()
    };
    security.namespace_options = Some(NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    });
    config
}

/// Fails naming the handler when a kubelet pod of a fast handler of
/// `specs` would miss.
fn kubelet_pods_hit(specs: &[PoolSpec]) -> Result<usize, String> {
    let handlers = HandlerMap::new(
        specs
            .iter()
            .map(|s| (s.exposed_handler.clone(), s.key.upstream_handler.clone())),
    );
    let mut exposed: Vec<&str> = specs.iter().map(|s| s.exposed_handler.as_str()).collect();
    exposed.sort_unstable();
    exposed.dedup();
    for handler in &exposed {
        for new_kubelet in [false, true] {
            let request = RunPodSandboxRequest {
                config: Some(kubelet_sandbox(new_kubelet)),
                runtime_handler: (*handler).to_owned(),
            };
            let version = if new_kubelet { "v1.36" } else { "v1.26" };
            let claim = Claim::from_request(&request, &handlers).map_err(|e| {
                format!("handler {handler:?}: a kubelet {version} pod is not eligible: {e}")
            })?;
            if !specs
                .iter()
                .any(|s| s.exposed_handler == *handler && s.key == claim.key)
            {
                let served: Vec<String> = specs
                    .iter()
                    .filter(|s| s.exposed_handler == *handler)
                    .map(|s| s.key.to_string())
                    .collect();
                return Err(format!(
                    "handler {handler:?}: a kubelet {version} pod asks {}, the pools serve {served:?}",
                    claim.key
                ));
            }
        }
    }
    Ok(exposed.len())
}

#[test]
fn every_shipped_pool_config_serves_kubelet_pods() {
    let configs = shipped_configs();
    let names: Vec<&str> = configs.iter().map(|(n, _)| n.as_str()).collect();
    for must in [
        "README.md block 0",
        "docs/warm-slots.md block 0",
        "deploy/node-plugin/configmap.yaml",
    ] {
        assert!(names.contains(&must), "{must} not found among {names:?}");
    }
    for (name, text) in &configs {
        let file: FileConfig =
            toml::from_str(text).unwrap_or_else(|e| panic!("{name}: does not parse: {e}\n{text}"));
        let specs = pool_specs(&file.pools).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(!specs.is_empty(), "{name}: no pools");
        let handlers = kubelet_pods_hit(&specs).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(handlers > 0, "{name}");
    }
}

/// The check can fail: a pool that serves `Unconfined` (the default before
/// issue 10) does not serve kubelet's pods.
#[test]
fn an_unconfined_pool_does_not_serve_kubelet_pods() {
    let file: FileConfig = toml::from_str(
        "[[pool]]\nhandler = \"fast-runc\"\nupstream = \"runc\"\nsize = 1\nshape = { seccomp = \"unconfined\" }\n",
    )
    .expect("valid");
    let specs = pool_specs(&file.pools).expect("valid pools");
    let err = kubelet_pods_hit(&specs).expect_err("must miss");
    assert!(
        err.contains("RuntimeDefault") && err.contains("Unconfined"),
        "{err}"
    );
}
