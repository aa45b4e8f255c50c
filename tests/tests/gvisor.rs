//! gVisor (`runsc` handler: containerd's runc v2 shim with the
//! `fast-sandbox-runsc` adapter as its `BinaryName`) end to end on the
//! development node: kubelet's call sequence straight to containerd and
//! through the shim, exit codes, TTY, multi-container pods, stats and
//! cgroup accounting, and a pod surviving a containerd restart.

use std::{collections::HashMap, path::PathBuf, process::Command, time::Duration};

use anyhow::{ensure, Context as _};
use fast_sandbox_proto::cri::{
    ContainerState, ContainerStatsFilter, ContainerStatsRequest, ContainerStatusRequest,
    CreateContainerRequest, ListContainerStatsRequest, NamespaceMode, PodSandboxStatusRequest,
    RemoveContainerRequest, RunPodSandboxRequest, StartContainerRequest, StopContainerRequest,
};
use fast_sandbox_tests::{
    kubelet::kubelet_sequence,
    pod::{exec, run_pod, start_container, TestPod},
    wait_for, CaseGuard, Cri, DevNode, InProcessShim,
};

const HANDLER: &str = "runsc";

/// The adapter binary (`FAST_SANDBOX_RUNSC_ADAPTER` from the dev node's env
/// file), for tests that start a containerd instance of their own.
fn adapter(test: &str) -> Option<PathBuf> {
    match std::env::var_os("FAST_SANDBOX_RUNSC_ADAPTER") {
        Some(p) => Some(p.into()),
        None if fast_sandbox_tests::in_ci() => {
            panic!("{test}: CI=true but FAST_SANDBOX_RUNSC_ADAPTER is not set")
        }
        None => {
            eprintln!("SKIP {test}: FAST_SANDBOX_RUNSC_ADAPTER is not set (hack/dev-node.sh up)");
            None
        }
    }
}

#[tokio::test]
async fn lifecycle_equivalence_runsc() {
    let test = "lifecycle_equivalence_runsc";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let mut pod = TestPod::new(test, "lifecycle-runsc", logs.path());
    pod.host_port = Some(30803);

    let mut direct = node.cri().expect("containerd client");
    let direct_t = kubelet_sequence(&mut direct, &node, &pod, HANDLER).await;

    let shim = InProcessShim::start(&node.containerd_endpoint)
        .await
        .expect("shim");
    std::fs::remove_dir_all(&pod.log_directory).expect("clean log dir");
    let mut through = shim.cri().expect("shim client");
    let shim_t = kubelet_sequence(&mut through, &node, &pod, HANDLER).await;
    shim.stop().await.expect("shim stops cleanly");

    direct_t.assert_equivalent(&shim_t, "containerd", "shim");
}

/// Waits until container `cid` has exited; returns its exit code.
async fn exit_code(cri: &Cri, cid: &str) -> anyhow::Result<i32> {
    wait_for(
        &format!("container {cid} to exit"),
        Duration::from_secs(20),
        || {
            let mut rt = cri.runtime.clone();
            let cid = cid.to_owned();
            async move {
                let st = rt
                    .container_status(ContainerStatusRequest {
                        container_id: cid,
                        verbose: false,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .status?;
                (st.state == ContainerState::ContainerExited as i32).then_some(st.exit_code)
            }
        },
    )
    .await
}

/// The log lines of container `name` (CRI format, time stamp removed).
fn log_lines(pod: &TestPod, name: &str) -> Vec<String> {
    std::fs::read_to_string(pod.log_directory.join(format!("{name}/0.log")))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_once(' ').map_or(l, |x| x.1).to_owned())
        .collect()
}

/// A container's exit code as kubelet sees it is the workload's, for
/// runsc as for runc: `exit 3` is 3, and a workload that ignores SIGTERM
/// and is killed after StopContainer's grace period is 137.
#[tokio::test]
async fn runsc_exit_codes_match_runc() {
    let test = "runsc_exit_codes_match_runc";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let mut seen = HashMap::new();
    for handler in ["runc", HANDLER] {
        let pod = TestPod::new(test, &format!("exit-{handler}"), logs.path());
        let mut cri = node.cri().expect("client");
        let sid = run_pod(&mut cri, &pod, handler).await.expect("pod");
        let three = start_container(&mut cri, &node, &pod, &sid, "three", "exit 3", false)
            .await
            .expect("container exiting 3");
        let stubborn = start_container(
            &mut cri,
            &node,
            &pod,
            &sid,
            "stubborn",
            "trap '' TERM; echo ready; while :; do sleep 1; done",
            false,
        )
        .await
        .expect("container ignoring TERM");
        let code3 = exit_code(&cri, &three).await.expect("exit 3 reported");
        wait_for(
            "the stubborn container's output",
            Duration::from_secs(10),
            || {
                let ready = log_lines(&pod, "stubborn").contains(&"stdout F ready".to_owned());
                async move { ready.then_some(()) }
            },
        )
        .await
        .expect("stubborn container ran its trap");
        cri.runtime
            .stop_container(StopContainerRequest {
                container_id: stubborn.clone(),
                timeout: 1,
            })
            .await
            .expect("StopContainer");
        let killed = exit_code(&cri, &stubborn).await.expect("kill reported");
        seen.insert(handler, (code3, killed));
        cri.remove_sandbox(&sid).await.expect("pod removed");
        pod.remove_pod_cgroups();
    }
    assert_eq!(seen["runc"], (3, 137), "runc baseline");
    assert_eq!(
        seen[HANDLER], seen["runc"],
        "runsc reports what runc reports"
    );
}

/// A TTY container (kubelet's `tty: true`) starts, sees a terminal, logs
/// through it and its exit is reported.
#[tokio::test]
async fn runsc_tty_container() {
    let test = "runsc_tty_container";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(test, "tty-runsc", logs.path());
    let mut cri = node.cri().expect("client");
    let sid = run_pod(&mut cri, &pod, HANDLER).await.expect("pod");
    let cid = start_container(
        &mut cri,
        &node,
        &pod,
        &sid,
        "tty",
        "if [ -t 1 ]; then echo on-a-tty; else echo no-tty; fi; exit 5",
        true,
    )
    .await
    .expect("tty container starts (StartContainer does not hang)");
    assert_eq!(exit_code(&cri, &cid).await.expect("exit"), 5);
    let lines = log_lines(&pod, "tty");
    assert!(
        lines.iter().any(|l| l.contains("on-a-tty")),
        "the workload saw a terminal and its output reached the log: {lines:?}"
    );
    cri.remove_sandbox(&sid).await.expect("pod removed");
    pod.remove_pod_cgroups();
}

/// PIDs of every process whose parent chain reaches `root` (not `root`).
fn descendants(root: u32) -> Vec<u32> {
    let mut parent = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    let mut out: Vec<u32> = parent
        .keys()
        .copied()
        .filter(|&pid| {
            let mut p = pid;
            for _ in 0..64 {
                match parent.get(&p) {
                    Some(&pp) if pp == root => return true,
                    Some(&pp) if pp > 1 => p = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect();
    out.sort_unstable();
    out
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The shim process of sandbox `sid`: the parent (as child subreaper) of
/// the PID containerd reports for the sandbox.
async fn shim_pid(cri: &mut Cri, sid: &str) -> anyhow::Result<u32> {
    let pid = u32::try_from(cri.pause_pid(sid).await?).context("sandbox pid")?;
    let shim = ppid(pid).context("parent of the sandbox pid")?;
    ensure!(
        cmdline(shim).contains("containerd-shim-runc-v2"),
        "parent {shim} of sandbox pid {pid} is {:?}, not the shim",
        cmdline(shim)
    );
    Ok(shim)
}

/// `/proc/<pid>/cgroup` lines not under `parent` (the root `:/` of a
/// hierarchy nobody uses, as runc leaves it, is fine).
fn cgroups_outside(pid: u32, parent: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.ends_with(":/") && !l.contains(&format!(":{parent}/")))
        .map(str::to_owned)
        .collect()
}

/// Two containers in one gVisor pod share one sentry; each runs, execs and
/// logs on its own; one exiting does not stop the other.
#[tokio::test]
async fn runsc_multi_container_pod() {
    let test = "runsc_multi_container_pod";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(test, "multi-runsc", logs.path());
    let mut cri = node.cri().expect("client");
    let sid = run_pod(&mut cri, &pod, HANDLER).await.expect("pod");
    let idle = "echo up $CNAME; trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done";
    let a = start_container(
        &mut cri,
        &node,
        &pod,
        &sid,
        "a",
        &idle.replace("$CNAME", "a"),
        false,
    )
    .await
    .expect("container a");
    let b = start_container(
        &mut cri,
        &node,
        &pod,
        &sid,
        "b",
        &idle.replace("$CNAME", "b"),
        false,
    )
    .await
    .expect("container b");
    for (cid, name) in [(&a, "a"), (&b, "b")] {
        let (code, out) = exec(&mut cri, cid, &format!("echo exec-{name}; exit 4"))
            .await
            .expect("exec");
        assert_eq!((code, out.as_str()), (4, format!("exec-{name}\n").as_str()));
    }
    // Containers share the pod's network (one sentry, one netns): b sees a
    // listener a opens on loopback.
    let (code, _) = exec(
        &mut cri,
        &a,
        "nc -l -p 7001 -e echo from-a >/dev/null 2>&1 &",
    )
    .await
    .expect("listener in a");
    assert_eq!(code, 0);
    let answer = wait_for("b to reach a's listener", Duration::from_secs(10), || {
        let mut c = cri.clone();
        let b = b.clone();
        async move {
            let (_, out) = exec(&mut c, &b, "echo | nc 127.0.0.1 7001").await.ok()?;
            out.contains("from-a").then_some(out)
        }
    })
    .await
    .expect("pod-local loopback shared between containers");
    assert!(answer.contains("from-a"));

    // One sentry for the pod: exactly one runsc sandbox process among the
    // shim's descendants, all of them charged to the pod's cgroup.
    let shim = shim_pid(&mut cri, &sid).await.expect("shim pid");
    let procs = descendants(shim);
    let sandboxes: Vec<String> = procs
        .iter()
        .map(|&p| cmdline(p))
        .filter(|c| c.starts_with("runsc-sandbox "))
        .collect();
    assert_eq!(sandboxes.len(), 1, "one sentry per pod: {sandboxes:?}");

    // a stops; b still answers.
    cri.runtime
        .stop_container(StopContainerRequest {
            container_id: a.clone(),
            timeout: 10,
        })
        .await
        .expect("stop a");
    assert_eq!(exit_code(&cri, &a).await.expect("a exits"), 0);
    let (code, out) = exec(&mut cri, &b, "echo still-here").await.expect("exec b");
    assert_eq!((code, out.as_str()), (0, "still-here\n"));
    cri.runtime
        .remove_container(RemoveContainerRequest { container_id: a })
        .await
        .expect("remove a");
    assert_eq!(log_lines(&pod, "a"), ["stdout F up a"]);
    assert_eq!(log_lines(&pod, "b"), ["stdout F up b"]);
    cri.remove_sandbox(&sid).await.expect("pod removed");
    pod.remove_pod_cgroups();
}

/// Memory usage of cgroup `rel` in the v1 memory hierarchy.
fn memory_usage(rel: &str) -> Option<u64> {
    std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/{}/memory.usage_in_bytes",
        rel.trim_start_matches('/')
    ))
    .ok()?
    .trim()
    .parse()
    .ok()
}

/// Container stats report the container's own cgroup (not the shim's or
/// containerd's), and every process the pod runs — waiters, `runsc wait`,
/// gofers, the sentry, exec helpers — is charged to the pod's cgroup.
#[tokio::test]
async fn runsc_container_stats_and_pod_cgroup() {
    let test = "runsc_container_stats_and_pod_cgroup";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let _guard = CaseGuard::new(&node, test).await.expect("clean slate");
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(test, "stats-runsc", logs.path());
    let mut cri = node.cri().expect("client");
    let sid = run_pod(&mut cri, &pod, HANDLER).await.expect("pod");
    let cid = start_container(
        &mut cri,
        &node,
        &pod,
        &sid,
        "app",
        fast_sandbox_tests::pod::IDLE_SCRIPT,
        false,
    )
    .await
    .expect("container");
    // A long exec, so its helper process exists while we look.
    let mut exec_cri = cri.clone();
    let exec_cid = cid.clone();
    let long_exec =
        tokio::spawn(async move { exec(&mut exec_cri, &exec_cid, "sleep 3; echo done").await });

    let parent = pod.cgroup_parent();
    let shim = shim_pid(&mut cri, &sid).await.expect("shim pid");
    let procs = wait_for(
        "the exec helper under the shim",
        Duration::from_secs(10),
        || {
            let procs = descendants(shim);
            let has_exec = procs.iter().any(|&p| cmdline(p).starts_with("runsc-exec"));
            async move { has_exec.then_some(procs) }
        },
    )
    .await
    .expect("exec helper");
    let mut outside = Vec::new();
    for &p in &procs {
        let bad = cgroups_outside(p, &parent);
        if !bad.is_empty() {
            outside.push(format!("{p} {:?}: {bad:?}", cmdline(p)));
        }
    }
    assert!(
        outside.is_empty(),
        "processes of the pod outside its cgroup {parent}: {outside:#?}"
    );
    assert!(
        procs.len() >= 5,
        "sentry, gofer, waiters, runsc wait, exec helper: {procs:?}"
    );

    let container_cgroup = format!("{parent}/{cid}");
    // The container's own host processes — its waiter (the PID the shim
    // reads stats by), `runsc wait` and its gofer — are in its cgroup.
    let in_container: Vec<String> = procs
        .iter()
        .filter(|&&p| {
            std::fs::read_to_string(format!("/proc/{p}/cgroup"))
                .is_ok_and(|c| c.contains(&format!(":memory:{container_cgroup}\n")))
        })
        .map(|&p| cmdline(p))
        .collect();
    let runsc_wait = format!("{} ", DevNode::runsc().display());
    for prefix in ["runsc-gofer ", runsc_wait.as_str()] {
        assert!(
            in_container.iter().any(|c| c.starts_with(prefix)),
            "no {prefix:?} in {container_cgroup}: {in_container:#?}"
        );
    }
    assert!(
        in_container.iter().any(|c| c.contains("-waiter ")),
        "the waiter is in {container_cgroup}: {in_container:#?}"
    );
    let own = memory_usage(&container_cgroup).expect("container memory cgroup");
    let stats = cri
        .runtime
        .container_stats(ContainerStatsRequest {
            container_id: cid.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("stats");
    let listed = cri
        .runtime
        .list_container_stats(ListContainerStatsRequest {
            filter: Some(ContainerStatsFilter {
                id: cid.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListContainerStats")
        .into_inner()
        .stats;
    assert_eq!(listed.len(), 1);
    for (what, s) in [
        ("ContainerStats", &stats),
        ("ListContainerStats", &listed[0]),
    ] {
        let mem = s
            .memory
            .as_ref()
            .and_then(|m| m.usage_bytes.as_ref())
            .map(|u| u.value)
            .expect("memory usage");
        // The container's cgroup, not containerd's (hundreds of MiB before
        // the waiter joined it): within 32 MiB of what its cgroup says.
        assert!(
            mem.abs_diff(own) < 32 << 20,
            "{what}: {mem} bytes vs the container cgroup's {own}"
        );
        assert!(
            mem < 128 << 20,
            "{what}: {mem} bytes is not one container's"
        );
        assert!(
            s.cpu
                .as_ref()
                .and_then(|c| c.usage_core_nano_seconds.as_ref())
                .is_some(),
            "{what}: cpu usage reported"
        );
    }
    let (code, out) = long_exec.await.expect("exec task").expect("exec");
    assert_eq!((code, out.as_str()), (0, "done\n"));
    cri.remove_sandbox(&sid).await.expect("pod removed");
    pod.remove_pod_cgroups();
}

/// A private containerd instance with the runsc handler, purged on drop.
struct Instance {
    script: PathBuf,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Instance {
    fn start(node: &DevNode, adapter: &std::path::Path) -> anyhow::Result<Self> {
        // Under /var/tmp: containerd's overlayfs snapshotter needs a real fs.
        let tmp = tempfile::Builder::new()
            .prefix("fs-gv-")
            .tempdir_in("/var/tmp")?;
        let inst = Self {
            script: node.instance_script.clone(),
            dir: tmp.path().join("containerd"),
            _tmp: tmp,
        };
        inst.run(&[
            "start",
            "--runtime",
            &format!("runsc={}", adapter.display()),
        ])?;
        Ok(inst)
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("bash")
            .arg(&self.script)
            .arg(args[0])
            .arg(&self.dir)
            .args(&args[1..])
            .output()
            .with_context(|| format!("running {}", self.script.display()))?;
        ensure!(
            out.status.success(),
            "containerd-instance.sh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.dir.join("containerd.sock").display())
    }

    fn kill_containerd(&self) -> anyhow::Result<()> {
        let raw = std::fs::read_to_string(self.dir.join("containerd.pid"))?;
        let pid = nix::unistd::Pid::from_raw(raw.trim().parse().context("containerd.pid")?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
        Ok(())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .arg("--purge")
            .status();
    }
}

/// containerd killed and restarted under a running gVisor pod: the shim,
/// sentry and waiters live on, containerd reconnects, and the pod still
/// execs, reports its container's exit and stops.
#[tokio::test]
async fn runsc_pod_survives_containerd_restart() {
    let test = "runsc_pod_survives_containerd_restart";
    let Some(node) = DevNode::require(test) else {
        return;
    };
    let Some(adapter) = adapter(test) else {
        return;
    };
    let inst = Instance::start(&node, &adapter).expect("private containerd");
    let logs = tempfile::tempdir().expect("tempdir");
    let pod = TestPod::new(test, "restart-runsc", logs.path());
    let mut cri = Cri::connect(&inst.endpoint()).expect("client");
    // The private instance has no CNI network: a host-network pod.
    let mut config = pod.sandbox_config();
    if let Some(ns) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.network = NamespaceMode::Node as i32;
    }
    if let Some(l) = config.linux.as_mut() {
        l.sysctls.clear();
    }
    pod.prepare_log_dirs(&["app"]).expect("log dirs");
    let sid = cri
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: HANDLER.into(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    let mut cc = pod.container_config(
        "app",
        &node.test_image,
        "trap 'exit 7' TERM; while :; do sleep 1 & wait $!; done",
    );
    if let Some(ns) = cc
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.network = NamespaceMode::Node as i32;
    }
    let cid = cri
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sid.clone(),
            config: Some(cc),
            sandbox_config: Some(config),
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

    inst.kill_containerd().expect("kill containerd");
    inst.run(&["start"])
        .expect("containerd restarts on its state");
    let mut cri = Cri::connect(&inst.endpoint()).expect("client after restart");
    let ready = cri
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: sid.clone(),
            verbose: false,
        })
        .await
        .expect("status after restart")
        .into_inner()
        .status
        .expect("status")
        .state;
    assert_eq!(ready, 0, "the pod is still SANDBOX_READY");
    let (code, out) = exec(&mut cri, &cid, "echo after-restart")
        .await
        .expect("exec after restart");
    assert_eq!((code, out.as_str()), (0, "after-restart\n"));
    cri.runtime
        .stop_container(StopContainerRequest {
            container_id: cid.clone(),
            timeout: 10,
        })
        .await
        .expect("StopContainer after restart");
    assert_eq!(
        exit_code(&cri, &cid).await.expect("exit after restart"),
        7,
        "the exit reaches the restarted containerd"
    );
    cri.remove_sandbox(&sid).await.expect("pod removed");
    pod.remove_pod_cgroups();
}
