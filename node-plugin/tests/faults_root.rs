//! The fault-injection matrix (issue 6, item 1) for what `recovery_root`
//! does not cover: the real `fast-sandbox-node` binary, with faults armed
//! through `FAST_SANDBOX_FAILPOINTS`, against a real containerd.
//!
//! - `refill.created` held, then kill -9: the slot created upstream but not
//!   yet in the pool is found at restart and adopted (it is healthy), never
//!   leaked or served twice.
//! - `return(error)` at `claim.recorded`, `claim.applied`, `refill.created`:
//!   a failed claim starts the pod cold without an error, leaves no record
//!   and no slot behind; a failed refill removes what it created.
//! - Corrupted state: a truncated record, a garbage record, a record of a
//!   sandbox that is gone and a `.tmp` leftover: the node starts, says so at
//!   ERROR naming each file, and never destroys a claimed sandbox silently.
//! - containerd killed and restarted (a private instance of our own, never
//!   the shared development node's): claimed pods keep their identity, free
//!   slots still serve claims.
//!
//! Every test counts sandboxes, netns, IPs, mounts, shims and cgroup
//! directories before and after, and removes what it made on every path.
//! Needs root and the development node (`hack/dev-node.sh up`); skips
//! locally without them, fails under `CI=true`.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Duration,
};

use fast_sandbox_proto::cri::{ListPodSandboxRequest, VersionRequest};
use fast_sandbox_tests::{pod::TestPod, wait_for, CaseGuard, DevNode};

mod support;

/// The tests of this file count what the whole containerd holds, so they
/// must not run at the same time (the harness runs a file's tests in
/// parallel threads).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
use support::{
    assert_intact, census, finish, pool_ids, records, remove_pods, remove_pool_slots, run, Node,
    PoolSlotsGuard, Setup,
};

/// The census roots of a test: the pool's placeholder cgroups and each
/// pod's own cgroup parent (where a claim moves the pause), not the shared
/// `/kubepods/besteffort` that other tests' pods live in.
fn roots(setup: &Setup<'_>, pods: &[&TestPod]) -> Vec<String> {
    std::iter::once(setup.cgroup_root())
        .chain(pods.iter().map(|p| p.cgroup_parent()))
        .collect()
}

#[tokio::test]
async fn kill_9_while_a_refill_is_held_leaks_no_slot() {
    let _serial = SERIAL.lock().await;
    let test = "kill_9_while_a_refill_is_held_leaks_no_slot";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let setup = Setup {
        pool: "faults-refill",
        size: 2,
        node: &node,
    };
    let _case = CaseGuard::new(&node, test).await.expect("clean slate");
    remove_pool_slots(&node.containerd_endpoint, setup.pool)
        .await
        .expect("no slots of an earlier run");
    let _slots = PoolSlotsGuard {
        endpoint: node.containerd_endpoint.clone(),
        pool: setup.pool.to_owned(),
    };
    let logs = tempfile::tempdir().expect("tempdir");
    let (a, b) = (
        TestPod::new(test, "refill-a", logs.path()),
        TestPod::new(test, "refill-b", logs.path()),
    );
    let roots = roots(&setup, &[&a, &b]);
    let before = census(&node, &roots).await;

    // The first two creations fill the pool; the refill after the claim is
    // held right after upstream created its sandbox.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut plugin = Node::spawn(
        &setup,
        dir.path(),
        "refill.created=2*off->return(60000)",
        "first.log",
    );
    plugin.wait_full().await;
    let filled = pool_ids(&node.containerd_endpoint, setup.pool).await;
    assert_eq!(filled.len(), setup.size);
    let mut cri = plugin.cri().await;
    let id_a = run(&mut cri, &a).await;
    assert!(filled.contains(&id_a), "pod a got a warm slot");
    plugin
        .wait_log("the refill held", &["injected delay", "refill.created"])
        .await;
    let held: Vec<String> = pool_ids(&node.containerd_endpoint, setup.pool)
        .await
        .difference(&filled)
        .cloned()
        .collect();
    assert_eq!(held.len(), 1, "one slot created upstream, held: {held:?}");
    drop(cri);
    plugin.kill9();

    let plugin = Node::spawn(&setup, dir.path(), "", "second.log");
    let mut cri = plugin.cri().await;
    // CRI is served before the reconciliation with upstream; pod a is
    // reported with its identity from the first answer.
    assert_intact(&mut cri, &a, &id_a).await;
    // The held slot is a healthy slot of the pool: adopted, not leaked and
    // not rebuilt (issue 11).
    plugin.wait_full().await;
    let now = pool_ids(&node.containerd_endpoint, setup.pool).await;
    assert!(
        now.contains(&held[0]),
        "the held slot was adopted; log:\n{}",
        plugin.log()
    );
    assert_eq!(
        now.len(),
        setup.size + 1,
        "the pool's free slots and pod a's, nothing else: {now:?}"
    );
    let id_b = run(&mut cri, &b).await;
    assert_ne!(id_b, id_a, "a slot is never handed out twice");
    assert!(
        now.contains(&id_b),
        "pod b got a warm slot after the restart"
    );
    assert_intact(&mut cri, &b, &id_b).await;
    plugin.wait_full().await;

    remove_pods(&mut cri, &[&a, &b]).await;
    assert!(
        records(&dir.path().join("state")).is_empty(),
        "records gone"
    );
    drop(cri);
    finish(&node, plugin, &before, &roots, setup.size).await;
}

#[tokio::test]
async fn injected_failures_start_pods_cold_and_leave_nothing() {
    let _serial = SERIAL.lock().await;
    let test = "injected_failures_start_pods_cold_and_leave_nothing";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let setup = Setup {
        pool: "faults-error",
        size: 2,
        node: &node,
    };
    let _case = CaseGuard::new(&node, test).await.expect("clean slate");
    remove_pool_slots(&node.containerd_endpoint, setup.pool)
        .await
        .expect("no slots of an earlier run");
    let _slots = PoolSlotsGuard {
        endpoint: node.containerd_endpoint.clone(),
        pool: setup.pool.to_owned(),
    };
    let logs = tempfile::tempdir().expect("tempdir");
    let pods: Vec<TestPod> = ["error-recorded", "error-applied", "error-none"]
        .iter()
        .map(|n| TestPod::new(test, n, logs.path()))
        .collect();
    let pod_refs: Vec<&TestPod> = pods.iter().collect();
    let roots = roots(&setup, &pod_refs);
    let before = census(&node, &roots).await;

    // The first creation fails after upstream made its sandbox; the first
    // claim fails once its record is written, the second once its fix-up
    // is applied (the first never gets there); the third succeeds.
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let plugin = Node::spawn(
        &setup,
        dir.path(),
        "refill.created=1*return(error);claim.recorded=1*return(error);claim.applied=1*return(error)",
        "node.log",
    );
    plugin.wait_full().await;
    plugin
        .wait_log(
            "the failed creation",
            &["injected failure", "refill.created"],
        )
        .await;
    assert_eq!(
        pool_ids(&node.containerd_endpoint, setup.pool).await.len(),
        setup.size,
        "the sandbox of the failed creation was removed"
    );
    let mut cri = plugin.cri().await;
    for (pod, fails) in pods.iter().zip([true, true, false]) {
        plugin.wait_full().await;
        let free = pool_ids(&node.containerd_endpoint, setup.pool).await;
        let id = run(&mut cri, pod).await;
        let after = pool_ids(&node.containerd_endpoint, setup.pool).await;
        if fails {
            assert!(!free.contains(&id), "pod {} started cold", pod.name);
            assert!(
                records(&state).is_empty(),
                "no record of a failed claim is left"
            );
            let gone: Vec<&String> = free.difference(&after).collect();
            assert_eq!(
                gone.len(),
                1,
                "the slot of the failed claim was destroyed, not returned"
            );
        } else {
            assert!(free.contains(&id), "pod {} got a warm slot", pod.name);
            assert_eq!(records(&state).len(), 1, "the claim is recorded");
        }
        assert_intact(&mut cri, pod, &id).await;
    }
    for point in ["claim.recorded", "claim.applied"] {
        assert!(
            plugin
                .log()
                .lines()
                .any(|l| l.contains("injected failure") && l.contains(point)),
            "{point} fired"
        );
    }
    plugin.wait_full().await;

    remove_pods(&mut cri, &pod_refs).await;
    assert!(records(&state).is_empty(), "records gone");
    drop(cri);
    finish(&node, plugin, &before, &roots, setup.size).await;
}

#[tokio::test]
async fn corrupted_claim_records_are_reported_and_no_claimed_sandbox_is_destroyed() {
    let _serial = SERIAL.lock().await;
    let test = "corrupted_claim_records_are_reported_and_no_claimed_sandbox_is_destroyed";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let setup = Setup {
        pool: "faults-corrupt",
        size: 3,
        node: &node,
    };
    let _case = CaseGuard::new(&node, test).await.expect("clean slate");
    remove_pool_slots(&node.containerd_endpoint, setup.pool)
        .await
        .expect("no slots of an earlier run");
    let _slots = PoolSlotsGuard {
        endpoint: node.containerd_endpoint.clone(),
        pool: setup.pool.to_owned(),
    };
    let logs = tempfile::tempdir().expect("tempdir");
    let pods: Vec<TestPod> = [
        "corrupt-truncated",
        "corrupt-garbage",
        "corrupt-gone",
        "corrupt-intact",
    ]
    .iter()
    .map(|n| TestPod::new(test, n, logs.path()))
    .collect();
    // Claims a slot after the restart.
    let next = TestPod::new(test, "corrupt-next", logs.path());
    let pod_refs: Vec<&TestPod> = pods.iter().chain([&next]).collect();
    let roots = roots(&setup, &pod_refs);
    let before = census(&node, &roots).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let mut plugin = Node::spawn(&setup, dir.path(), "", "first.log");
    let mut ids = Vec::new();
    {
        let mut cri = plugin.cri().await;
        for pod in &pods {
            plugin.wait_full().await;
            let free = pool_ids(&node.containerd_endpoint, setup.pool).await;
            let id = run(&mut cri, pod).await;
            assert!(free.contains(&id), "pod {} got a warm slot", pod.name);
            ids.push(id);
        }
        // Each claim's deferred cgroup move has run (the pause sits in the
        // pod's cgroup), so recovery faces fully claimed slots.
        for (pod, id) in pods.iter().zip(&ids) {
            let leaf = format!("/sys/fs/cgroup/cpu{}/{id}", pod.cgroup_parent());
            wait_for("the cgroup move", Duration::from_secs(10), || async {
                Path::new(&leaf).is_dir().then_some(())
            })
            .await
            .expect("pause moved to the pod's cgroup");
        }
    }
    // No slot creation in flight at the kill: containerd 1.6 leaks the
    // shim of a RunPodSandbox cancelled mid-way (containerd/containerd#6860),
    // which the census would count.
    plugin.wait_full().await;
    plugin.kill9();

    // Corrupt the state while the node plugin is down.
    let record = |id: &str| state.join("claims").join(format!("{id}.json"));
    let truncated = record(&ids[0]);
    let text = std::fs::read(&truncated).expect("record");
    std::fs::write(&truncated, &text[..text.len() / 2]).expect("truncate");
    let garbage = record(&ids[1]);
    std::fs::write(&garbage, b"\x00\xffnot a claim record\n").expect("garbage");
    // The truncated record's copy in its sandbox's directory survives (it
    // is rebuilt from it); the garbage one has none left.
    let copy = |id: &str| {
        fast_sandbox_node::pool::records::sandboxes_dir(&node.containerd_root)
            .join(id)
            .join(fast_sandbox_node::pool::records::COPY_NAME)
    };
    assert!(copy(&ids[0]).is_file(), "a claim record has a copy");
    std::fs::remove_file(copy(&ids[1])).expect("remove the copy");
    let gone = record(&ids[2]);
    node.cri()
        .expect("client")
        .remove_sandbox(&ids[2])
        .await
        .expect("remove upstream");
    pods[2].remove_pod_cgroups();
    let leftover = state.join("claims").join(format!("{}.tmp", "e".repeat(64)));
    std::fs::write(&leftover, b"{\"sandbox_id\":").expect("tmp leftover");

    let plugin = Node::spawn(&setup, dir.path(), "", "second.log");
    let mut cri = plugin.cri().await;
    let log = plugin.log();
    for bad in [&truncated, &garbage] {
        let path = bad.display().to_string();
        assert!(
            log.lines()
                .any(|l| l.contains("ERROR") && l.contains(&path)),
            "an ERROR names {path}; log:\n{log}"
        );
    }
    assert!(!leftover.exists(), "the unfinished write is swept");
    // The intact claim is untouched; the truncated record is rebuilt from
    // its copy once the background recovery has run.
    assert_intact(&mut cri, &pods[3], &ids[3]).await;
    plugin.wait_full().await;
    assert_intact(&mut cri, &pods[0], &ids[0]).await;
    assert!(
        !gone.exists(),
        "the record of the removed sandbox is dropped"
    );
    // The sandboxes whose records are unreadable were claimed by pods: they
    // are neither destroyed nor served again. Their pods cannot be known, so
    // they are shown as sandboxes of pods kubelet does not know (under the
    // placeholder's identity, without its labels), which kubelet stops and
    // removes; each pod's next sync makes it a new sandbox.
    let upstream = pool_ids(&node.containerd_endpoint, setup.pool).await;
    let shown = cri
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items;
    for (pod, id) in pods.iter().zip(&ids).skip(1).take(1) {
        assert!(
            upstream.contains(id),
            "claimed sandbox {id} with an unreadable record was destroyed; log:\n{log}"
        );
        let sb = shown
            .iter()
            .find(|sb| &sb.id == id)
            .unwrap_or_else(|| panic!("{id} is shown to kubelet"));
        let meta = sb.metadata.as_ref().expect("metadata");
        assert_ne!(meta.uid, pod.uid, "no identity is made up for {}", pod.name);
        assert!(
            sb.labels.is_empty(),
            "no placeholder label shows: {:?}",
            sb.labels
        );
        assert!(
            cri.list_by_label("io.kubernetes.pod.uid", &pod.uid)
                .await
                .expect("list")
                .is_empty(),
            "pod {} finds no sandbox of its own",
            pod.name
        );
    }
    plugin.wait_full().await;
    let id = run(&mut cri, &next).await;
    assert!(!ids.contains(&id), "a claimed slot is never served again");
    assert_intact(&mut cri, &next, &id).await;

    // Kubelet's garbage collection of the unknown sandbox, through the
    // shim: the pool forgets it and drops its unreadable record.
    cri.remove_sandbox(&ids[1]).await.expect("remove");
    assert!(!garbage.exists(), "the unreadable record is dropped");
    remove_pods(&mut cri, &[&pods[0], &pods[3], &next]).await;
    assert!(records(&state).is_empty(), "records gone");
    // Kubelet destroys a pod's cgroup recursively; the pool cannot know
    // the pod cgroup an unreadable record named, so the pause's leaf in it
    // is left to kubelet.
    for (pod, id) in pods.iter().zip(&ids).skip(1).take(1) {
        fast_sandbox_tests::pod::remove_cgroup_dirs(&format!("{}/{id}", pod.cgroup_parent()));
        pod.remove_pod_cgroups();
    }
    next.remove_pod_cgroups();
    drop(cri);
    finish(&node, plugin, &before, &roots, setup.size).await;
}

/// A private containerd instance (`hack/containerd-instance.sh`) on its own
/// bridge and subnet, stopped and purged when dropped: killing it disturbs
/// no other test.
struct Instance {
    script: PathBuf,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Instance {
    const SUBNET: &'static str = "10.231.0.0/24";
    const BRIDGE: &'static str = "fsbfault0";

    fn start(node: &DevNode) -> Self {
        // Under /var/tmp: containerd's overlayfs snapshotter needs a real fs.
        let tmp = tempfile::Builder::new()
            .prefix("fs-faults-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let inst = Self {
            script: node.instance_script.clone(),
            dir: tmp.path().join("containerd"),
            _tmp: tmp,
        };
        inst.run(&[
            "start",
            "--cni-subnet",
            Self::SUBNET,
            "--bridge",
            Self::BRIDGE,
        ]);
        inst
    }

    fn run(&self, args: &[&str]) {
        let out = std::process::Command::new("bash")
            .arg(&self.script)
            .arg(args[0])
            .arg(&self.dir)
            .args(&args[1..])
            .output()
            .expect("containerd-instance.sh");
        assert!(
            out.status.success(),
            "containerd-instance.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The instance as a `DevNode` (for the census and the node's config).
    fn node(&self, dev: &DevNode) -> DevNode {
        DevNode {
            containerd_endpoint: format!("unix://{}", self.dir.join("containerd.sock").display()),
            containerd_root: self.dir.join("root"),
            containerd_state: self.dir.join("state"),
            ..dev.clone()
        }
    }

    fn kill9(&self) {
        let pid: i32 = std::fs::read_to_string(self.dir.join("containerd.pid"))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
        // Reaped by nobody we know: gone once its /proc entry is, or a zombie.
        let gone = (0..200).any(|_| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let dead = stat.is_empty()
                || stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, r)| r.starts_with('Z'));
            if !dead {
                std::thread::sleep(Duration::from_millis(50));
            }
            dead
        });
        assert!(gone, "containerd {pid} did not die");
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .arg("--purge")
            .output();
    }
}

#[tokio::test]
async fn containerd_restart_keeps_claimed_pods_and_free_slots() {
    let _serial = SERIAL.lock().await;
    let test = "containerd_restart_keeps_claimed_pods_and_free_slots";
    let Some(dev) = DevNode::require(test) else {
        return;
    };
    let instance = Instance::start(&dev);
    let node = instance.node(&dev);
    let setup = Setup {
        pool: "faults-restart",
        size: 2,
        node: &node,
    };
    let _slots = PoolSlotsGuard {
        endpoint: node.containerd_endpoint.clone(),
        pool: setup.pool.to_owned(),
    };
    let logs = tempfile::tempdir().expect("tempdir");
    let (a, b) = (
        TestPod::new(test, "restart-a", logs.path()),
        TestPod::new(test, "restart-b", logs.path()),
    );
    let roots = roots(&setup, &[&a, &b]);
    let before = census(&node, &roots).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = Node::spawn(&setup, dir.path(), "", "node.log");
    plugin.wait_full().await;
    let filled = pool_ids(&node.containerd_endpoint, setup.pool).await;
    let mut cri = plugin.cri().await;
    let id_a = run(&mut cri, &a).await;
    assert!(filled.contains(&id_a), "pod a got a warm slot");
    plugin.wait_full().await;
    let free_before: HashSet<String> = pool_ids(&node.containerd_endpoint, setup.pool)
        .await
        .into_iter()
        .filter(|id| *id != id_a)
        .collect();

    instance.kill9();
    let err = cri
        .runtime
        .version(VersionRequest::default())
        .await
        .expect_err("containerd is down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    instance.run(&["start"]);

    // Through the same node plugin, not restarted: the claimed pod keeps
    // its sandbox and identity, and a free slot still serves a claim.
    wait_for(
        "the shim to reach containerd again",
        Duration::from_secs(30),
        || {
            let mut cri = cri.clone();
            async move {
                cri.runtime
                    .list_pod_sandbox(ListPodSandboxRequest::default())
                    .await
                    .ok()
            }
        },
    )
    .await
    .expect("serving again");
    assert_intact(&mut cri, &a, &id_a).await;
    let id_b = run(&mut cri, &b).await;
    assert!(
        free_before.contains(&id_b),
        "a slot made before the restart serves pod b ({id_b} not in {free_before:?})"
    );
    assert_intact(&mut cri, &b, &id_b).await;
    assert_intact(&mut cri, &a, &id_a).await;
    plugin.wait_full().await;

    remove_pods(&mut cri, &[&a, &b]).await;
    assert!(
        records(&dir.path().join("state")).is_empty(),
        "records gone"
    );
    drop(cri);
    finish(&node, plugin, &before, &roots, setup.size).await;
}
