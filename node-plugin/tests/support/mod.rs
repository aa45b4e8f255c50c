//! The real `fast-sandbox-node` binary as the root tests run it: its
//! config, the process (killed when dropped), and clean-up of its pool's
//! slots straight on containerd.

// Each test binary uses a different part of the harness.
#![allow(dead_code)]

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use fast_sandbox_proto::cri::{PodSandboxState, RunPodSandboxRequest, VersionRequest};
use fast_sandbox_shim::slots::{POOL_LABEL, SLOT_TOKEN_LABEL};
use fast_sandbox_tests::{pod::TestPod, wait_for, CaseGuard, Cri, DevNode};

/// How a test's node plugin is set up.
pub struct Setup<'a> {
    pub pool: &'a str,
    pub size: usize,
    /// The containerd it fronts (the development node, or a private one).
    pub node: &'a DevNode,
}

impl Setup<'_> {
    pub fn cgroup_root(&self) -> String {
        format!("/fast-sandbox-test/{}", self.pool)
    }

    /// Writes the node plugin's config into `dir`.
    pub fn write(&self, dir: &Path, admin: SocketAddr) -> PathBuf {
        self.write_with(dir, admin, true)
    }

    /// As [`Setup::write`]; without `explicit_cgroup_root` the config leaves
    /// `placeholder_cgroup_root` to its per-instance default.
    pub fn write_with(&self, dir: &Path, admin: SocketAddr, explicit_cgroup_root: bool) -> PathBuf {
        let path = dir.join("node.toml");
        let cg = if explicit_cgroup_root {
            format!("placeholder_cgroup_root = {:?}\n", self.cgroup_root())
        } else {
            String::new()
        };
        let text = format!(
            "[upstream]\nendpoint = {endpoint:?}\n[socket]\npath = {socket:?}\n[admin]\naddress = \"{admin}\"\n\
             [slots]\nstate_dir = {state:?}\ncontainerd_root = {root:?}\ncni_conf_dir = {cni:?}\n{cg}\
             refill_interval = \"0ms\"\nrefill_delay = \"100ms\"\nhealth_interval = \"1s\"\n\
             [[pool]]\nname = \"{pool}\"\nhandler = \"fast-runc\"\nupstream = \"runc\"\nsize = {size}\n\
             shape = {{ seccomp = \"runtime-default\" }}\n",
            endpoint = self.node.containerd_endpoint,
            socket = dir.join("cri.sock").display().to_string(),
            state = dir.join("state").display().to_string(),
            root = self.node.containerd_root.display().to_string(),
            // The pools' network mode is decided from it.
            cni = self.node.cni_conf_dir().display().to_string(),
            pool = self.pool,
            size = self.size,
        );
        std::fs::write(&path, text).expect("config");
        path
    }
}

/// How [`Node::start`] runs the binary.
#[derive(Clone, Copy)]
struct Launch<'a> {
    binary: &'a Path,
    args: &'a [&'a str],
    failpoints: &'a str,
    /// Without it the config leaves `placeholder_cgroup_root` to its
    /// per-instance default.
    explicit_cgroup_root: bool,
}

impl Default for Launch<'_> {
    fn default() -> Self {
        Self {
            binary: Path::new(env!("CARGO_BIN_EXE_fast-sandbox-node")),
            args: &["serve"],
            failpoints: "",
            explicit_cgroup_root: true,
        }
    }
}

/// A `fast-sandbox-node serve` process (or `supervise -- serve`); killed
/// when dropped.
pub struct Node {
    pub child: std::process::Child,
    pub socket: PathBuf,
    pub admin: SocketAddr,
    pub pool: String,
    pub size: usize,
    pub log: PathBuf,
}

impl Node {
    /// Starts the binary on `dir`'s config; its log goes to `dir/<log>`.
    pub fn spawn(setup: &Setup<'_>, dir: &Path, failpoints: &str, log: &str) -> Self {
        Self::spawn_with(setup, dir, failpoints, log, true)
    }

    /// As [`Node::spawn`]; see [`Setup::write_with`].
    pub fn spawn_with(
        setup: &Setup<'_>,
        dir: &Path,
        failpoints: &str,
        log: &str,
        explicit_cgroup_root: bool,
    ) -> Self {
        let launch = Launch {
            failpoints,
            explicit_cgroup_root,
            ..Launch::default()
        };
        Self::start(setup, dir, log, &launch)
    }

    /// As [`Node::spawn`], running `binary` (another release's).
    pub fn spawn_binary(binary: &Path, setup: &Setup<'_>, dir: &Path, log: &str) -> Self {
        let launch = Launch {
            binary,
            ..Launch::default()
        };
        Self::start(setup, dir, log, &launch)
    }

    /// `supervise -- serve` on `dir`'s config: `child` is the supervisor.
    pub fn supervised(setup: &Setup<'_>, dir: &Path, log: &str) -> Self {
        let launch = Launch {
            args: &["supervise", "--", "serve"],
            ..Launch::default()
        };
        Self::start(setup, dir, log, &launch)
    }

    fn start(setup: &Setup<'_>, dir: &Path, log: &str, launch: &Launch<'_>) -> Self {
        let Launch {
            binary,
            args,
            failpoints,
            explicit_cgroup_root,
        } = *launch;
        let admin = free_port();
        let config = setup.write_with(dir, admin, explicit_cgroup_root);
        let log = dir.join(log);
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = std::process::Command::new(binary)
            .env("FAST_SANDBOX_FAILPOINTS", failpoints)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("FS_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .args(args)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start fast-sandbox-node");
        Self {
            child,
            socket: dir.join("cri.sock"),
            admin,
            pool: setup.pool.to_owned(),
            size: setup.size,
            log,
        }
    }

    /// The shim's endpoint.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client of the shim, once it answers.
    pub async fn cri(&self) -> Cri {
        let cri = Cri::connect(&format!("unix://{}", self.socket.display())).expect("client");
        let log = self.log.clone();
        wait_for("the node plugin to serve", Duration::from_secs(30), || {
            let mut cri = cri.clone();
            async move {
                cri.runtime
                    .version(VersionRequest::default())
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
        cri
    }

    pub async fn free(&self) -> Option<u64> {
        let body = fast_sandbox_node::admin::get(self.admin, "/pools")
            .await
            .ok()?;
        let pools: serde_json::Value = serde_json::from_str(&body).ok()?;
        pools.as_array()?.iter().find(|p| p["name"] == self.pool)?["free"].as_u64()
    }

    pub async fn wait_full(&self) {
        wait_for("the pool to fill", Duration::from_secs(60), || async {
            (self.free().await == Some(self.size as u64)).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log()));
    }

    /// Waits until the log has a line containing every one of `words`.
    pub async fn wait_log(&self, what: &str, words: &[&str]) {
        wait_for(what, Duration::from_secs(30), || async {
            self.log()
                .lines()
                .any(|l| words.iter().all(|w| l.contains(w)))
                .then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log()));
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// SIGTERM, then waits without blocking the runtime: the test's own
    /// client connections must be able to close, or the graceful stop
    /// waits out its timeout for them.
    pub async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        wait_for("the node plugin to stop", Duration::from_secs(30), || {
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            async move { exited.then_some(()) }
        })
        .await
        .expect("stopped");
    }
}

impl Drop for Node {
    /// A failing test must not leave a node plugin refilling its pool.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Stops and removes every sandbox of `pool` straight on containerd, with
/// the cgroups the pool made; returns how many there were.
pub async fn remove_pool_slots(endpoint: &str, pool: &str) -> anyhow::Result<usize> {
    let mut direct = Cri::connect(endpoint)?;
    let slots = direct.list_by_label(POOL_LABEL, pool).await?;
    for sb in &slots {
        direct.remove_sandbox(&sb.id).await?;
        if let Some(uid) = sb.metadata.as_ref().map(|m| &m.uid) {
            fast_sandbox_tests::pod::remove_cgroup_dirs(&format!(
                "/fast-sandbox-test/{pool}/{uid}"
            ));
        }
    }
    fast_sandbox_tests::pod::remove_cgroup_dirs(&format!("/fast-sandbox-test/{pool}"));
    Ok(slots.len())
}

/// Removes the pool's slots (any token) when dropped, also when the test
/// fails, so a failed run leaves nothing for the next one.
pub struct PoolSlotsGuard {
    pub endpoint: String,
    pub pool: String,
}

impl Drop for PoolSlotsGuard {
    fn drop(&mut self) {
        let (endpoint, pool) = (self.endpoint.clone(), self.pool.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(remove_pool_slots(&endpoint, &pool)).ok()
        })
        .join();
    }
}

/// A clean slate for test `case` with pool `pool`: the case's sandboxes and
/// the pool's slots of an earlier run removed, and guards that remove them
/// again when the test ends, however it ends.
pub async fn clean_slate(node: &DevNode, case: &str, pool: &str) -> (CaseGuard, PoolSlotsGuard) {
    let guard = CaseGuard::new(node, case).await.expect("clean slate");
    (guard, clean_pool(node, pool).await)
}

/// The ids of the pool's sandboxes upstream (free, claimed or in flight).
pub async fn pool_ids(endpoint: &str, pool: &str) -> HashSet<String> {
    Cri::connect(endpoint)
        .expect("client")
        .list_by_label(POOL_LABEL, pool)
        .await
        .expect("list slots")
        .into_iter()
        .map(|sb| sb.id)
        .collect()
}

/// The claim records (`*.json`) in `state_dir/claims`.
pub fn records(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state.join("claims")).map_or_else(
        |_| Vec::new(),
        |d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        },
    )
}

/// Removes the slots an earlier run of `pool` left and returns the guard
/// that removes this run's, also when the test fails.
pub async fn clean_pool(node: &DevNode, pool: &str) -> PoolSlotsGuard {
    remove_pool_slots(&node.containerd_endpoint, pool)
        .await
        .expect("no slots of an earlier run");
    PoolSlotsGuard {
        endpoint: node.containerd_endpoint.clone(),
        pool: pool.to_owned(),
    }
}

/// `RunPodSandbox` for `pod` on `fast-runc` through the shim.
pub async fn run(cri: &mut Cri, pod: &TestPod) -> String {
    cri.runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod.sandbox_config()),
            runtime_handler: "fast-runc".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox of {}: {e:?}", pod.name))
        .into_inner()
        .pod_sandbox_id
}

/// Asserts that, through the shim, `pod` has exactly one sandbox, `id`,
/// ready, reported with its own metadata and without the slot token, and
/// with its hostname in its UTS namespace.
pub async fn assert_intact(cri: &mut Cri, pod: &TestPod, id: &str) {
    let listed = cri
        .list_by_label("io.kubernetes.pod.uid", &pod.uid)
        .await
        .expect("list");
    let ids: Vec<&str> = listed.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, [id], "pod {} has exactly its own sandbox", pod.name);
    assert_eq!(
        listed[0].state,
        PodSandboxState::SandboxReady as i32,
        "pod {}'s sandbox still runs",
        pod.name
    );
    let meta = listed[0].metadata.as_ref().expect("metadata");
    assert_eq!(
        (
            meta.name.as_str(),
            meta.namespace.as_str(),
            meta.uid.as_str()
        ),
        (pod.name.as_str(), pod.namespace.as_str(), pod.uid.as_str()),
        "pod {}'s sandbox reports the pod's identity",
        pod.name
    );
    assert!(
        !listed[0].labels.contains_key(SLOT_TOKEN_LABEL),
        "the slot token never shows"
    );
    assert_eq!(
        cri.uts_hostname(id).await.expect("UTS hostname"),
        pod.name,
        "pod {}'s sandbox has its hostname",
        pod.name
    );
}

/// Removes `pods` through the shim as kubelet would (sandbox, then the pod
/// cgroup kubelet owns).
pub async fn remove_pods(cri: &mut Cri, pods: &[&TestPod]) {
    for pod in pods {
        for sb in cri
            .list_by_label("io.kubernetes.pod.uid", &pod.uid)
            .await
            .expect("list")
        {
            cri.remove_sandbox(&sb.id).await.expect("remove");
        }
        pod.remove_pod_cgroups();
    }
}

/// Stops the node plugin, removes the pool's remaining (free) slots,
/// checks there were `free` of them, and that the census is back to
/// `before`.
pub async fn finish(
    node: &DevNode,
    plugin: Node,
    before: &fast_sandbox_tests::census::Census,
    roots: &[String],
    free: usize,
) {
    let pool = plugin.pool.clone();
    plugin.stop().await;
    let removed = remove_pool_slots(&node.containerd_endpoint, &pool)
        .await
        .expect("remove slots");
    assert_eq!(removed, free, "exactly the pool's free slots remain");
    let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
    let after = node
        .settled_census(before, &roots, Duration::from_secs(15))
        .await
        .expect("census");
    assert_eq!(*before, after, "resources leaked");
    eprintln!("census before and after: {after:?}");
}

/// What the node holds now, counting cgroup directories under `roots`.
pub async fn census(node: &DevNode, roots: &[String]) -> fast_sandbox_tests::census::Census {
    let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
    node.census(&roots).await.expect("census")
}
