//! gVisor's own network stack (`--network=sandbox`, the adapter's default)
//! through the `fast-sandbox-runsc` adapter, on the development node: the
//! sentry runs in the pod's network namespace (not the host's), owns the
//! pod's address (runsc moved it from the namespace's interface into its
//! netstack) and answers the host on it.

use std::{os::unix::fs::MetadataExt as _, process::Command};

use anyhow::Context as _;
use fast_sandbox_proto::cri::{
    CreateContainerRequest, ExecSyncRequest, PodSandboxStatusRequest, RunPodSandboxRequest,
    StartContainerRequest,
};
use fast_sandbox_tests::{
    kubelet::{host_to_pod, SCRIPT},
    pod::TestPod,
    CaseGuard, Cri, DevNode,
};

const HANDLER: &str = "runsc";

/// The pod's IP and its network namespace path, from containerd's status.
async fn ip_and_netns(cri: &mut Cri, sid: &str) -> anyhow::Result<(String, String)> {
    let status = cri
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: sid.to_owned(),
            verbose: true,
        })
        .await?
        .into_inner();
    let ip = status
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .filter(|ip| !ip.is_empty())
        .context("no pod IP")?;
    let info: serde_json::Value =
        serde_json::from_str(status.info.get("info").context("no verbose info")?)?;
    let netns = info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .context("no network namespace path in the sandbox's spec")?;
    Ok((ip, netns.to_owned()))
}

/// PIDs of runsc's sentry (`runsc-sandbox`) for sandbox `sid`.
fn sentries(sid: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                c.starts_with("runsc-sandbox ") && c.contains(sid)
            })
        })
        .collect()
}

fn ns_inode(path: &str) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .ino()
}

#[tokio::test]
async fn runsc_pod_runs_on_gvisors_network_stack() {
    let test = "runsc_pod_runs_on_gvisors_network_stack";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(test, "netstack-runsc", logs.path());
    pod.prepare_log_dirs(&["app"]).expect("log dirs");
    let mut cri = node.cri().expect("client");
    let sid = cri
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod.sandbox_config()),
            runtime_handler: HANDLER.into(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    let cid = cri
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sid.clone(),
            config: Some(pod.container_config("app", &node.test_image, SCRIPT)),
            sandbox_config: Some(pod.sandbox_config()),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    cri.runtime
        .start_container(StartContainerRequest {
            container_id: cid.clone(),
        })
        .await
        .expect("StartContainer");
    let (ip, netns) = ip_and_netns(&mut cri, &sid).await.expect("pod network");

    // One sentry, in the pod's namespace: not in the host's.
    let sentry = sentries(&sid);
    assert_eq!(sentry.len(), 1, "one sentry for {sid}: {sentry:?}");
    let sentry_ns = ns_inode(&format!("/proc/{}/ns/net", sentry[0]));
    assert_eq!(sentry_ns, ns_inode(&netns), "the sentry is in {netns}");
    assert_ne!(sentry_ns, ns_inode("/proc/self/ns/net"), "not the host's");

    // runsc moved the address into netstack: the namespace's interface has
    // lost it (with --network=host it keeps it and the host kernel serves).
    let host_side = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["ip", "-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("nsenter ip addr");
    assert!(host_side.status.success(), "{host_side:?}");
    let host_side = String::from_utf8_lossy(&host_side.stdout);
    assert!(
        !host_side.contains(&format!(" {ip}/")),
        "{ip} still on the host side of {netns}: {host_side}"
    );
    // ... and netstack has it.
    let inside = cri
        .runtime
        .exec_sync(ExecSyncRequest {
            container_id: cid.clone(),
            cmd: vec!["ip".into(), "-4".into(), "addr".into()],
            timeout: 10,
        })
        .await
        .expect("exec ip addr")
        .into_inner();
    let inside = String::from_utf8_lossy(&inside.stdout);
    assert!(inside.contains(&format!("inet {ip}/")), "{inside}");

    // The host reaches the pod on its IP, served by netstack.
    let answer = host_to_pod(&ip).await.expect("host to pod");
    assert_eq!(answer.trim(), pod.name, "the pod answers with its hostname");

    cri.remove_sandbox(&sid).await.expect("pod removed");
    pod.remove_pod_cgroups();
    assert!(sentries(&sid).is_empty(), "the sentry is gone");
}
