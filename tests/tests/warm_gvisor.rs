//! Warm ≡ cold for gVisor (`fast-gvisor` → `runsc` through the
//! `fast-sandbox-runsc` adapter): the `guest-exec` fix-up (sandbox files
//! rewritten in place, hostname set inside the sentry by `pause
//! --set-hostname`, every host process of the slot moved to the pod's
//! cgroup) makes a claimed slot give the same transcript as a cold start.

mod support;

use std::time::Duration;

use fast_sandbox_node::config::NetworkMode;
use fast_sandbox_proto::cri::{
    RemovePodSandboxRequest, RunPodSandboxRequest, StopPodSandboxRequest,
};
use fast_sandbox_tests::{kubelet::kubelet_sequence, pod::TestPod, wait_for, CaseGuard, DevNode};
use support::WarmNode;

const HANDLER: &str = "runsc";
const EXPOSED: &str = "fast-runsc";

#[tokio::test]
async fn warm_equals_cold_runsc() {
    let test = "warm_equals_cold_runsc";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(test, "warm-cold-runsc", logs.path());

    // Cold: the pool exists but is empty, so the claim misses.
    let warm = WarmNode::start_with(&node, "wc-runsc", HANDLER, 0, NetworkMode::Keep)
        .await
        .expect("pool");
    let mut cri = warm.shim.cri().expect("client");
    let cold_t = kubelet_sequence(&mut cri, &node, &pod, EXPOSED).await;
    assert_eq!(warm.hits(), 0, "the cold run must not have claimed a slot");

    // Warm: one free slot, claimed by the same pod spec.
    assert!(warm.manager.set_size(&warm.pool, 1));
    warm.wait_free(1).await.expect("slot created");
    std::fs::remove_dir_all(&pod.log_directory).expect("clean log dir");
    let warm_t = kubelet_sequence(&mut cri, &node, &pod, EXPOSED).await;
    assert_eq!(
        warm.hits(),
        1,
        "the warm run must have claimed the free slot"
    );
    warm.empty_and_stop().await;

    cold_t.assert_equivalent(&warm_t, "cold", "warm");
}

/// Host processes whose command line names `sandbox_id` (runsc's sentry
/// and gofer, the adapter's waiter and its `runsc wait`), with their
/// `/proc/<pid>/cgroup` lines.
fn sandbox_processes(sandbox_id: &str) -> Vec<(i32, String, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // The shim stays in containerd's cgroup, warm or cold (as for runc).
        if !cmdline.contains(sandbox_id) || cmdline.contains("containerd-shim") {
            continue;
        }
        let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        out.push((pid, cmdline, cgroup.lines().map(str::to_owned).collect()));
    }
    out
}

/// The processes still in sandbox `sid`'s placeholder leaf (any uid
/// directory under `placeholder_root`, every hierarchy), as `hierarchy pid
/// name ppid`.
fn placeholder_leftovers(placeholder_root: &str, sid: &str) -> Vec<String> {
    let mut out = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let root = h.path().join(placeholder_root.trim_start_matches('/'));
        for uid in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let procs = std::fs::read_to_string(uid.path().join(sid).join("cgroup.procs"));
            for pid in procs.unwrap_or_default().split_whitespace() {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let field = |k: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(k))
                        .map_or("?", str::trim)
                        .to_owned()
                };
                out.push(format!(
                    "{} {pid} {} ppid {}",
                    h.file_name().to_string_lossy(),
                    field("Name:"),
                    field("PPid:")
                ));
            }
        }
    }
    out
}

/// A claimed runsc slot's sentry, gofer and adapter processes all leave the
/// placeholder cgroup for `<pod cgroup_parent>/<sandbox id>` (every v1
/// hierarchy; runsc leaves them at the unified root, warm and cold alike),
/// and the sentry answers with the pod's hostname.
#[tokio::test]
async fn warm_runsc_slot_processes_move_to_the_pod_cgroup() {
    let test = "warm_runsc_slot_processes_move_to_the_pod_cgroup";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(test, "cgroup-runsc", logs.path());
    let warm = WarmNode::start_with(&node, "cg-runsc", HANDLER, 1, NetworkMode::Keep)
        .await
        .expect("pool");
    warm.wait_free(1).await.expect("slot created");
    let mut cri = warm.shim.cri().expect("client");
    pod.prepare_log_dirs(&[]).expect("log dirs");
    let sid = cri
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod.sandbox_config()),
            runtime_handler: EXPOSED.into(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    assert_eq!(warm.hits(), 1, "served from the slot");

    let placeholder_root = warm.cgroup_root.clone();
    let want = format!("{}/{sid}", pod.cgroup_parent());
    let moved = wait_for(
        "every process of the slot in the pod's cgroup",
        Duration::from_secs(15),
        || {
            let (sid, want, placeholder_root) =
                (sid.clone(), want.clone(), placeholder_root.clone());
            async move {
                let procs = sandbox_processes(&sid);
                let kinds = [
                    "runsc-sandbox",
                    "runsc-gofer",
                    "__fast-sandbox-runsc-waiter",
                ];
                let all_kinds = kinds
                    .iter()
                    .all(|k| procs.iter().any(|(_, cmd, _)| cmd.contains(k)));
                let all_moved = procs.iter().all(|(_, _, lines)| {
                    lines.iter().all(|l| {
                        let (controllers, path) = l
                            .split_once(':')
                            .and_then(|(_, rest)| rest.split_once(':'))
                            .unwrap_or(("", l));
                        !path.starts_with(&placeholder_root)
                            && (controllers.is_empty() && path == "/" || path == want)
                    })
                });
                // The emptied placeholder leaf stays (runsc spawns later
                // gofers in it) but holds nothing: also no systrap stub,
                // which is a child of the sentry with an empty cmdline, so
                // only the leaf's own list shows it.
                let leaf_empty = placeholder_leftovers(&placeholder_root, &sid).is_empty();
                (all_kinds && all_moved && leaf_empty).then_some(procs)
            }
        },
    )
    .await;
    let procs = match moved {
        Ok(procs) => procs,
        Err(e) => panic!(
            "{e:#}: {:#?}; left in the placeholder: {:?}",
            sandbox_processes(&sid),
            placeholder_leftovers(&placeholder_root, &sid)
        ),
    };
    assert!(procs.len() >= 3, "{procs:#?}");

    cri.runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sid.clone(),
        })
        .await
        .expect("StopPodSandbox");
    cri.runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: sid.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    warm.empty_and_stop().await;
    pod.remove_pod_cgroups();
    assert!(
        sandbox_processes(&sid).is_empty(),
        "no process of the sandbox is left"
    );
}

/// The pause's hostname channel end to end (the adapter's FIFOs, the
/// pause's `hostname SEQ NAME` requests, the node plugin's client): a runsc
/// sandbox whose hostname is set through it alone, with no `runsc exec`,
/// shows the new name to its first container. What a warm claim does
/// before its barrier opens (docs/runtimes.md, "The hostname channel").
#[tokio::test]
async fn runsc_hostname_channel_sets_the_sandbox_hostname() {
    use fast_sandbox_node::fixup::{ChannelTemplate, GuestOps as _, RealGuestOps};
    use fast_sandbox_tests::pod::{exec, run_pod, start_container};

    let test = "runsc_hostname_channel";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(test, "hostname-channel", logs.path());
    let mut cri = node.cri().expect("client");
    let sid = run_pod(&mut cri, &pod, HANDLER).await.expect("sandbox");

    let dir = ChannelTemplate::runsc_adapter(&support::runsc_root(&node)).render(&sid);
    let set = RealGuestOps
        .channel_hostname(dir, "set-by-channel", Duration::from_secs(5))
        .await;
    let started = start_container(&mut cri, &node, &pod, &sid, "app", "sleep 60", false).await;
    let seen = match &started {
        Ok(cid) => exec(&mut cri, cid, "hostname").await.ok(),
        Err(_) => None,
    };
    cri.remove_sandbox(&sid).await.expect("remove");
    pod.remove_pod_cgroups();

    set.expect("the pause answers on its channel (pause image and adapter of this tree)");
    started.expect("container");
    let (code, out) = seen.expect("exec");
    assert_eq!((code, out.trim()), (0, "set-by-channel"));
}
