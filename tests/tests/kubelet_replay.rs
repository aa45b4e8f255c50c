//! CRI traffic recorded from real kubelets (tests/recordings/, see its
//! README), replayed through a node plugin running each pool config this
//! project ships, against the development node's containerd.
//!
//! Every recorded pod must get what the config promises a real kubelet's
//! pod: a warm slot when a pool of its handler has slots and the pod is
//! eligible, a cold start when it is not (host network). Pods of a handler
//! the config does not expose are not replayed (a node with that config has
//! no such RuntimeClass). Lifecycle calls (RunPodSandbox … RemovePodSandbox,
//! ExecSync, Exec) must answer as they did for the recording, and ExecSync
//! probes must print what they printed then (hostname, sysctls): a warm pod
//! is indistinguishable from the cold one kubelet saw.

use std::path::PathBuf;

use fast_sandbox_tests::{
    replay::{
        remove_recorded_pods, replay, repo_root, shipped_configs, ReplayNode, ShippedConfig,
        Transcript,
    },
    DevNode,
};

/// One replay at a time in this binary: the recorded pods have fixed
/// names and uids, which containerd reserves.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn transcripts() -> Vec<PathBuf> {
    let dir = repo_root().join("tests/recordings");
    let found = Transcript::find(&dir).expect("tests/recordings");
    assert!(!found.is_empty(), "no *.jsonl under {}", dir.display());
    found
}

/// The shipped configs whose source starts with `prefix`.
fn configs(prefix: &str) -> Vec<ShippedConfig> {
    let found: Vec<_> = shipped_configs()
        .expect("shipped configs")
        .into_iter()
        .filter(|c| c.source.starts_with(prefix))
        .collect();
    assert!(!found.is_empty(), "no shipped config from {prefix}");
    found
}

async fn replay_shipped(test: &str, prefix: &str) {
    replay_configs(test, configs(prefix)).await;
}

async fn replay_configs(test: &str, configs: Vec<ShippedConfig>) {
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let mut problems = Vec::new();
    for config in configs {
        for path in transcripts() {
            let transcript = Transcript::load(&path).expect("transcript");
            let rel = path
                .strip_prefix(repo_root())
                .unwrap_or(&path)
                .display()
                .to_string();
            remove_recorded_pods(&node).await.expect("clean slate");
            let rn = match ReplayNode::start(&node, &config).await {
                Ok(rn) => rn,
                Err(e) => {
                    problems.push(format!(
                        "{}: the node plugin does not start: {e:#}",
                        config.source
                    ));
                    break;
                }
            };
            let report = replay(&rn, &transcript).await;
            rn.stop().await.expect("pools stop");
            let left = remove_recorded_pods(&node).await.expect("clean up");
            let report = match report {
                Ok(r) => r,
                Err(e) => {
                    problems.push(format!("{} × {rel}: replay failed: {e:#}", config.source));
                    continue;
                }
            };
            eprintln!(
                "{} × {rel}: pods {:?}\n  replayed {:?}\n  skipped {:?}\n  other calls whose code differed: {:?}",
                config.source,
                report
                    .pods
                    .iter()
                    .map(|p| format!(
                        "{} {} expect {:?} warm {:?}",
                        p.pod, p.handler, p.expect, p.warm
                    ))
                    .collect::<Vec<_>>(),
                report.replayed,
                report.skipped,
                report.code_differences,
            );
            if left > 0 {
                problems.push(format!(
                    "{} × {rel}: {left} recorded pod(s) still in containerd after the replay \
                     deleted them",
                    config.source
                ));
            }
            problems.extend(
                report
                    .problems()
                    .into_iter()
                    .map(|p| format!("{} × {rel}: {p}", config.source)),
            );
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[tokio::test]
async fn replay_on_the_daemonset_configmap() {
    replay_shipped(
        "replay_on_the_daemonset_configmap",
        "deploy/node-plugin/configmap.yaml",
    )
    .await;
}

#[tokio::test]
async fn replay_on_the_readme_config() {
    replay_shipped("replay_on_the_readme_config", "README.md").await;
}

#[tokio::test]
async fn replay_on_the_warm_slots_doc_config() {
    replay_shipped("replay_on_the_warm_slots_doc_config", "docs/warm-slots.md").await;
}

#[tokio::test]
async fn replay_on_the_quickstart_config() {
    replay_shipped("replay_on_the_quickstart_config", "hack/quickstart.sh").await;
}

/// The control: pools that serve what kubelet asks (seccomp
/// `RuntimeDefault`) for every handler recorded. Shows the replay itself
/// gets warm hits, so a shipped config that fails is the config's fault.
#[tokio::test]
async fn replay_on_runtime_default_pools() {
    let mut toml = String::new();
    for (handler, upstream) in [
        ("fast-runc", "runc"),
        ("fast-crun", "crun"),
        ("fast-gvisor", "runsc"),
    ] {
        toml.push_str(&format!(
            "[[pool]]\nhandler = \"{handler}\"\nupstream = \"{upstream}\"\nsize = 2\n\
             shape = {{ seccomp = \"runtime-default\" }}\n"
        ));
    }
    replay_configs(
        "replay_on_runtime_default_pools",
        vec![ShippedConfig {
            source: "control (runtime-default pools)".into(),
            toml,
        }],
    )
    .await;
}

/// Every shipped config is found where it is expected, and parses.
#[test]
fn shipped_configs_are_found() {
    let configs = shipped_configs().expect("shipped configs");
    for prefix in [
        "deploy/node-plugin/configmap.yaml",
        "README.md",
        "docs/warm-slots.md",
        "hack/quickstart.sh",
    ] {
        let c: Vec<_> = configs
            .iter()
            .filter(|c| c.source.starts_with(prefix))
            .collect();
        assert!(!c.is_empty(), "no config found in {prefix}");
        for c in c {
            assert!(c.toml.contains("[[pool]]"), "{}: {}", c.source, c.toml);
            // What `fast-sandbox-node serve` checks before it starts.
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("node.toml");
            std::fs::write(&path, &c.toml).expect("write");
            let file = fast_sandbox_node::config::load(&path)
                .unwrap_or_else(|e| panic!("{}: {e:#}", c.source));
            fast_sandbox_node::config::pool_specs(&file.pools)
                .unwrap_or_else(|e| panic!("{}: [[pool]]: {e:#}", c.source));
            fast_sandbox_node::config::fixup_mechanisms(&file.pools)
                .unwrap_or_else(|e| panic!("{}: [[pool]] fix-up: {e:#}", c.source));
        }
    }
}
