//! gVisor's own network stack (`--network=sandbox`, the adapter's default)
//! through the `fast-sandbox-runsc` adapter, on the development node: the
//! sentry runs in the pod's network namespace (not the host's), owns the
//! pod's address (runsc moved it from the namespace's interface into its
//! netstack) and answers the host on it.

use std::{os::unix::fs::MetadataExt as _, process::Command};

use fast_sandbox_tests::{
    kubelet::{host_to_pod, SCRIPT},
    pod::{exec, run_pod, start_container, TestPod},
    CaseGuard, DevNode,
};

const HANDLER: &str = "runsc";

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
    let mut cri = node.cri().expect("client");
    let sid = run_pod(&mut cri, &pod, HANDLER).await.expect("pod");
    let cid = start_container(&mut cri, &node, &pod, &sid, "app", SCRIPT, false)
        .await
        .expect("container");
    let netns = cri.netns_path(&sid).await.expect("pod netns");
    let ip = cri.pod_ip(&sid).await.expect("pod IP");

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
    let (_, inside) = exec(&mut cri, &cid, "ip -4 addr").await.expect("ip addr");
    assert!(inside.contains(&format!("inet {ip}/")), "{inside}");

    // The host reaches the pod on its IP, served by netstack.
    let answer = host_to_pod(&ip).await.expect("host to pod");
    assert_eq!(answer.trim(), pod.name, "the pod answers with its hostname");

    cri.remove_sandbox(&sid).await.expect("pod removed");
    pod.remove_pod_cgroups();
    assert!(sentries(&sid).is_empty(), "the sentry is gone");
}
