//! Issue 11: a restart, an upgrade or an uninstall of the node plugin, with
//! the real binary against the development node's containerd.
//!
//! - kill -9 and graceful stop with claimed and free slots (the upgrade
//!   path: the binary is replaced between two runs on the same state):
//!   CRI is served with the claimed pods' identity, the claimed pods are
//!   untouched, every free slot is adopted (none rebuilt).
//! - Upgrade from another release's binary (`FAST_SANDBOX_PREVIOUS_NODE_BINARY`,
//!   which hack/test.sh builds from the revision in hack/previous-release;
//!   skipped locally without it, a failure under `CI=true`): the same.
//! - `claims/` deleted while claimed pods run: the records come back from
//!   their copies in the sandboxes' directories; no pod is stopped.
//! - Two instances with the default placeholder cgroup root: restarting
//!   one never touches the other's slots, cgroups or records; then
//!   `fast-sandbox-node uninstall` leaves nothing of either.
//!
//! Needs root and the development node (`hack/dev-node.sh up`); skips
//! locally without them, fails under `CI=true`.

use std::{collections::HashSet, path::Path, time::Duration};

use fast_sandbox_tests::{pod::TestPod, CaseGuard, DevNode};

mod support;
use support::{
    assert_intact, census, clean_pool, clean_slate, finish, pool_ids, records, remove_pods, run,
    Node, PoolSlotsGuard, Setup,
};

/// The tests of this file count what the whole containerd holds.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The free slots upstream: the pool's sandboxes less the claimed ones.
async fn free_ids(node: &DevNode, pool: &str, claimed: &[String]) -> HashSet<String> {
    let mut ids = pool_ids(&node.containerd_endpoint, pool).await;
    for c in claimed {
        ids.remove(c);
    }
    ids
}

/// Restarts on the same state: the claimed pods are untouched and every
/// free slot is adopted, whether the previous run was killed or stopped.
#[tokio::test]
async fn restart_keeps_claimed_pods_and_adopts_free_slots() {
    let _serial = SERIAL.lock().await;
    let test = "restart_keeps_claimed_pods_and_adopts_free_slots";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let setup = Setup {
        pool: "restart-adopt",
        size: 6,
        node: &node,
    };
    let _guards = clean_slate(&node, test, setup.pool).await;
    let logs = tempfile::tempdir().expect("tempdir");
    let pods: Vec<TestPod> = (0..2)
        .map(|i| TestPod::new(test, &format!("adopt-{i}"), logs.path()))
        .collect();
    let mut roots = vec![setup.cgroup_root()];
    roots.extend(pods.iter().map(TestPod::cgroup_parent));
    let before = census(&node, &roots).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut plugin = Node::spawn(&setup, dir.path(), "", "run-0.log");
    plugin.wait_full().await;
    let mut cri = plugin.cri().await;
    let mut claimed = Vec::new();
    for pod in &pods {
        claimed.push(run(&mut cri, pod).await);
    }
    plugin.wait_full().await;
    let mut free = free_ids(&node, setup.pool, &claimed).await;
    assert_eq!(free.len(), setup.size);
    drop(cri);

    for (run, kill) in [(1, true), (2, false)] {
        if kill {
            plugin.kill9();
        } else {
            plugin.stop().await;
        }
        plugin = Node::spawn(&setup, dir.path(), "", &format!("run-{run}.log"));
        let mut cri = plugin.cri().await;
        for (pod, id) in pods.iter().zip(&claimed) {
            assert_intact(&mut cri, pod, id).await;
        }
        plugin.wait_full().await;
        let now = free_ids(&node, setup.pool, &claimed).await;
        assert_eq!(
            now,
            free,
            "run {run} (after {}): every free slot adopted, none rebuilt; log:\n{}",
            if kill { "kill -9" } else { "a graceful stop" },
            plugin.log()
        );
        free = now;
    }

    let mut cri = plugin.cri().await;
    remove_pods(&mut cri, &pods.iter().collect::<Vec<_>>()).await;
    drop(cri);
    assert!(
        records(&dir.path().join("state")).is_empty(),
        "records gone"
    );
    finish(&node, plugin, &before, &roots, setup.size).await;
}

/// `claims/` deleted while claimed pods run: recovery stops none of them;
/// their records come back from the copies.
#[tokio::test]
async fn lost_claims_dir_stops_no_pod() {
    let _serial = SERIAL.lock().await;
    let test = "lost_claims_dir_stops_no_pod";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let setup = Setup {
        pool: "restart-lost",
        size: 2,
        node: &node,
    };
    let _guards = clean_slate(&node, test, setup.pool).await;
    let logs = tempfile::tempdir().expect("tempdir");
    let pods: Vec<TestPod> = (0..2)
        .map(|i| TestPod::new(test, &format!("lost-{i}"), logs.path()))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut plugin = Node::spawn(&setup, dir.path(), "", "first.log");
    plugin.wait_full().await;
    let mut cri = plugin.cri().await;
    let mut claimed = Vec::new();
    for pod in &pods {
        claimed.push(run(&mut cri, pod).await);
    }
    drop(cri);
    // No slot creation in flight at the kill (containerd 1.6 leaks the shim
    // of a cancelled RunPodSandbox).
    plugin.wait_full().await;
    plugin.kill9();
    let state = dir.path().join("state");
    std::fs::remove_dir_all(state.join("claims")).expect("delete claims/");

    let plugin = Node::spawn(&setup, dir.path(), "", "second.log");
    plugin.wait_full().await;
    let mut cri = plugin.cri().await;
    for (pod, id) in pods.iter().zip(&claimed) {
        assert_intact(&mut cri, pod, id).await;
    }
    assert_eq!(records(&state).len(), pods.len(), "records rebuilt");
    assert!(
        plugin.log().contains("rebuilt from its copy"),
        "log:\n{}",
        plugin.log()
    );
    remove_pods(&mut cri, &pods.iter().collect::<Vec<_>>()).await;
    drop(cri);
    plugin.stop().await;
}

/// The placeholder cgroup root an instance with default settings uses.
fn default_root(dir: &Path) -> String {
    let token = std::fs::read_to_string(dir.join("state/token")).expect("token");
    format!(
        "/fast-sandbox-slots/{}",
        fast_sandbox_node::pool::records::instance_id(token.trim())
    )
}

/// Removes the pools' slots, then the instances' default cgroup roots,
/// when dropped: also when the test fails before `uninstall`.
#[derive(Default)]
struct Cleanup {
    pools: Vec<PoolSlotsGuard>,
    trees: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // The slots first: a cgroup with a pause in it cannot be removed.
        self.pools.clear();
        for root in &self.trees {
            for h in std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                let base = h.path().join(root.trim_start_matches('/'));
                let children = std::fs::read_dir(&base).into_iter().flatten().flatten();
                for child in children.filter(|c| c.path().is_dir()) {
                    let _ = std::fs::remove_dir(child.path());
                }
                let _ = std::fs::remove_dir(base);
            }
        }
    }
}

/// Directories in the cpu hierarchy under `root`.
fn cgroup_children(root: &str) -> usize {
    std::fs::read_dir(format!("/sys/fs/cgroup/cpu{root}"))
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0)
}

/// Two node plugins with default cgroup roots never touch each other's
/// slots, cgroups or records; `uninstall` then leaves nothing of either.
#[tokio::test]
async fn two_instances_keep_apart_and_uninstall_leaves_nothing() {
    let _serial = SERIAL.lock().await;
    let test = "two_instances_keep_apart_and_uninstall_leaves_nothing";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _case = CaseGuard::new(&node, test).await.expect("clean slate");
    let setups = [("restart-two-a", 3), ("restart-two-b", 2)].map(|(pool, size)| Setup {
        pool,
        size,
        node: &node,
    });
    let mut cleanup = Cleanup::default();
    for s in &setups {
        cleanup.pools.push(clean_pool(&node, s.pool).await);
    }
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(test, "two-a-pod", logs.path());
    let roots = ["/fast-sandbox-slots".to_owned(), pod.cgroup_parent()];
    let before = census(&node, &roots).await;

    let dirs = [
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    ];
    let mut plugins: Vec<Node> = setups
        .iter()
        .zip(&dirs)
        .map(|(s, d)| Node::spawn_with(s, d.path(), "", "run-0.log", false))
        .collect();
    for p in &plugins {
        p.wait_full().await;
    }
    let cg = dirs.each_ref().map(|d| default_root(d.path()));
    cleanup.trees = cg.to_vec();
    assert_ne!(cg[0], cg[1], "each instance has its own cgroup root");
    let mut cri = plugins[0].cri().await;
    let claimed = run(&mut cri, &pod).await;
    drop(cri);
    plugins[0].wait_full().await;
    let mut slots = Vec::new();
    for s in &setups {
        slots.push(pool_ids(&node.containerd_endpoint, s.pool).await);
    }
    // One placeholder cgroup per slot; the claimed slot's stays until its
    // sandbox is removed.
    let cgroups = cg.each_ref().map(|r| cgroup_children(r));
    assert_eq!(cgroups, [4, 2], "one placeholder cgroup per slot");

    // Each restarts (kill -9) while the other runs: nothing of the other
    // is touched, its own slots are adopted.
    for i in [0, 1] {
        plugins[i].kill9();
        plugins[i] = Node::spawn_with(&setups[i], dirs[i].path(), "", "run-1.log", false);
        plugins[i].wait_full().await;
        for j in [0, 1] {
            assert_eq!(
                pool_ids(&node.containerd_endpoint, setups[j].pool).await,
                slots[j],
                "instance {j}'s slots after instance {i} restarted"
            );
            assert_eq!(
                cgroup_children(&cg[j]),
                cgroups[j],
                "instance {j}'s cgroups"
            );
        }
    }
    let mut cri = plugins[0].cri().await;
    assert_intact(&mut cri, &pod, &claimed).await;
    drop(cri);

    // Uninstall both (the claimed slot of the first too), as an
    // administrator would: stop, then `uninstall` with the same config.
    for (p, d) in plugins.into_iter().zip(&dirs) {
        p.stop().await;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fast-sandbox-node"))
            .arg("uninstall")
            .arg("--config")
            .arg(d.path().join("node.toml"))
            .output()
            .expect("run uninstall");
        assert!(
            out.status.success(),
            "uninstall failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!d.path().join("state").exists(), "state removed");
        assert!(!d.path().join("cri.sock").exists(), "socket removed");
    }
    for s in &setups {
        assert!(pool_ids(&node.containerd_endpoint, s.pool).await.is_empty());
    }
    for r in &cg {
        assert!(
            !Path::new(&format!("/sys/fs/cgroup/cpu{r}")).exists(),
            "cgroup root {r} removed"
        );
    }
    // Kubelet removes the pod's own cgroup; the test has no kubelet.
    pod.remove_pod_cgroups();
    let after = node
        .settled_census(
            &before,
            &roots.iter().map(String::as_str).collect::<Vec<_>>(),
            Duration::from_secs(15),
        )
        .await
        .expect("census");
    assert_eq!(before, after, "uninstall left something behind");
}

/// A node plugin started without pools on the state of one that had them
/// (after a graceful stop, which keeps the free slots): the free slots stay
/// hidden, the claimed pod is shown with its identity.
#[tokio::test]
async fn without_pools_the_slots_stay_hidden() {
    let _serial = SERIAL.lock().await;
    let test = "without_pools_the_slots_stay_hidden";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let setup = Setup {
        pool: "restart-nopools",
        size: 2,
        node: &node,
    };
    let _guards = clean_slate(&node, test, setup.pool).await;
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(test, "nopools", logs.path());
    let roots = [setup.cgroup_root(), pod.cgroup_parent()];
    let before = census(&node, &roots).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = Node::spawn(&setup, dir.path(), "", "with-pools.log");
    plugin.wait_full().await;
    let mut cri = plugin.cri().await;
    let claimed = run(&mut cri, &pod).await;
    plugin.wait_full().await;
    drop(cri);
    plugin.stop().await;
    let free = free_ids(&node, setup.pool, std::slice::from_ref(&claimed)).await;
    assert_eq!(
        free.len(),
        setup.size,
        "a graceful stop keeps the free slots"
    );

    // The same state, socket and admin address, no [[pool]].
    let config = std::fs::read_to_string(dir.path().join("node.toml")).expect("config");
    let without = &config[..config.find("[[pool]]").expect("a pool section")];
    let path = dir.path().join("no-pools.toml");
    std::fs::write(&path, without).expect("config");
    let log = dir.path().join("no-pools.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fast-sandbox-node"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start fast-sandbox-node");
    let plugin = Node {
        child,
        socket: dir.path().join("cri.sock"),
        admin: plugin_admin(&config),
        pool: setup.pool.to_owned(),
        size: 0,
        log,
    };
    let mut cri = plugin.cri().await;
    let shown: HashSet<String> = cri
        .runtime
        .list_pod_sandbox(fast_sandbox_proto::cri::ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items
        .into_iter()
        .map(|sb| sb.id)
        .collect();
    assert!(
        shown.is_disjoint(&free),
        "free slots listed to kubelet by a node plugin without pools"
    );
    assert_intact(&mut cri, &pod, &claimed).await;
    // Kubelet removes the pod: the node plugin without pools cleans up
    // after its slot as the pools would (record, cgroups).
    remove_pods(&mut cri, &[&pod]).await;
    assert!(records(&dir.path().join("state")).is_empty(), "record gone");
    drop(cri);
    finish(&node, plugin, &before, &roots, setup.size).await;
}

/// The admin address in a config `Setup` wrote.
fn plugin_admin(config: &str) -> std::net::SocketAddr {
    config
        .lines()
        .find_map(|l| l.strip_prefix("address = "))
        .and_then(|a| a.trim_matches('"').parse().ok())
        .expect("admin address")
}

/// The upgrade: the previous release's binary runs the pool and claims,
/// stops, and this one starts on its state: the claimed pods are untouched
/// and every free slot the old binary made is adopted.
#[tokio::test]
async fn upgrade_from_the_previous_binary_keeps_pods_and_adopts_slots() {
    let _serial = SERIAL.lock().await;
    let test = "upgrade_from_the_previous_binary_keeps_pods_and_adopts_slots";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let Some(previous) = std::env::var_os("FAST_SANDBOX_PREVIOUS_NODE_BINARY") else {
        assert!(
            !fast_sandbox_tests::in_ci(),
            "{test}: FAST_SANDBOX_PREVIOUS_NODE_BINARY names no binary of the previous release (hack/test.sh builds it)"
        );
        eprintln!("{test}: skipped, FAST_SANDBOX_PREVIOUS_NODE_BINARY names no binary of the previous release");
        return;
    };
    let setup = Setup {
        pool: "restart-upgrade",
        size: 4,
        node: &node,
    };
    let _guards = clean_slate(&node, test, setup.pool).await;
    let logs = tempfile::tempdir().expect("tempdir");
    let pods: Vec<TestPod> = (0..2)
        .map(|i| TestPod::new(test, &format!("upgrade-{i}"), logs.path()))
        .collect();
    let mut roots = vec![setup.cgroup_root()];
    roots.extend(pods.iter().map(TestPod::cgroup_parent));
    let before = census(&node, &roots).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let old = Node::spawn_binary(Path::new(&previous), &setup, dir.path(), "old.log");
    old.wait_full().await;
    let mut cri = old.cri().await;
    let mut claimed = Vec::new();
    for pod in &pods {
        claimed.push(run(&mut cri, pod).await);
    }
    old.wait_full().await;
    drop(cri);
    let free = free_ids(&node, setup.pool, &claimed).await;
    assert_eq!(free.len(), setup.size);
    old.stop().await;

    let new = Node::spawn(&setup, dir.path(), "", "new.log");
    let mut cri = new.cri().await;
    for (pod, id) in pods.iter().zip(&claimed) {
        assert_intact(&mut cri, pod, id).await;
    }
    new.wait_full().await;
    assert_eq!(
        free_ids(&node, setup.pool, &claimed).await,
        free,
        "every free slot of the old binary adopted; log:\n{}",
        new.log()
    );

    remove_pods(&mut cri, &pods.iter().collect::<Vec<_>>()).await;
    drop(cri);
    assert!(
        records(&dir.path().join("state")).is_empty(),
        "records gone"
    );
    finish(&node, new, &before, &roots, setup.size).await;
}
