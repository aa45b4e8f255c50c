//! containerd killed under the shim: calls fail with `Unavailable`, the shim
//! stays up, and it serves again once containerd is back — without a restart
//! of the shim. Runs on a private containerd instance of its own, so killing
//! it disturbs no other test.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{ensure, Context as _};
use fast_sandbox_proto::cri::{ListPodSandboxRequest, VersionRequest};
use fast_sandbox_tests::{wait_for, DevNode, InProcessShim};
use nix::{sys::signal, unistd::Pid};

/// A private containerd instance, stopped and purged when dropped.
struct Instance {
    script: PathBuf,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Instance {
    fn start(node: &DevNode) -> anyhow::Result<Self> {
        // Under /var/tmp: containerd's overlayfs snapshotter needs a real fs.
        let tmp = tempfile::Builder::new()
            .prefix("fs-restart-")
            .tempdir_in("/var/tmp")?;
        let inst = Self {
            script: node.instance_script.clone(),
            dir: tmp.path().join("containerd"),
            _tmp: tmp,
        };
        inst.run("start")?;
        Ok(inst)
    }

    fn run(&self, cmd: &str) -> anyhow::Result<()> {
        let out = Command::new("bash")
            .arg(&self.script)
            .arg(cmd)
            .arg(&self.dir)
            .output()
            .with_context(|| format!("running {}", self.script.display()))?;
        ensure!(
            out.status.success(),
            "containerd-instance.sh {cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.dir.join("containerd.sock").display())
    }

    fn pid(&self) -> anyhow::Result<Pid> {
        let raw = std::fs::read_to_string(self.dir.join("containerd.pid"))?;
        Ok(Pid::from_raw(raw.trim().parse().context("containerd.pid")?))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .args(["stop"])
            .arg(&self.dir)
            .arg("--purge")
            .status();
    }
}

fn alive(pid: Pid) -> bool {
    signal::kill(pid, None).is_ok() && !is_zombie(pid)
}

fn is_zombie(pid: Pid) -> bool {
    std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn shim_survives_upstream_kill_and_reconnects() {
    let Some(node) = DevNode::require("shim_survives_upstream_kill_and_reconnects") else {
        return;
    };
    let instance = Instance::start(&node).expect("second containerd instance");
    let shim = InProcessShim::start(&instance.endpoint())
        .await
        .expect("shim");
    let mut cri = shim.cri().expect("client");
    cri.runtime
        .version(VersionRequest::default())
        .await
        .expect("serving before the kill");

    // Keep kubelet-like traffic going across the kill: every failure must be
    // `Unavailable`, never another code and never a shim crash.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU32::new(0));
    let unavailable = Arc::new(AtomicU32::new(0));
    let traffic = {
        let (stop, ok, unavailable) = (stop.clone(), ok.clone(), unavailable.clone());
        let mut c = cri.clone();
        tokio::spawn(async move {
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c
                    .runtime
                    .list_pod_sandbox(ListPodSandboxRequest::default())
                    .await
                {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(s) if s.code() == tonic::Code::Unavailable => {
                        unavailable.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(s) => return Err(s),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        })
    };
    let count = |n: &Arc<AtomicU32>| n.load(Ordering::Relaxed);
    wait_for(
        "traffic before the kill",
        Duration::from_secs(10),
        || async { (count(&ok) > 0).then_some(()) },
    )
    .await
    .expect("traffic flows");

    let pid = instance.pid().expect("pid");
    signal::kill(pid, signal::Signal::SIGKILL).expect("kill -9 containerd");
    wait_for("containerd to die", Duration::from_secs(10), || async {
        (!alive(pid)).then_some(())
    })
    .await
    .expect("containerd died");

    let err = cri
        .runtime
        .version(VersionRequest::default())
        .await
        .expect_err("containerd is down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        shim.is_running(),
        "the shim keeps running without its upstream"
    );

    wait_for(
        "traffic to see the outage",
        Duration::from_secs(10),
        || async { (count(&unavailable) > 0).then_some(()) },
    )
    .await
    .expect("the outage is reported as Unavailable");

    instance
        .run("start")
        .expect("containerd restarts on the same state");
    let ok_while_down = count(&ok);
    wait_for(
        "the shim to serve again",
        Duration::from_secs(30),
        || async { (count(&ok) > ok_while_down).then_some(()) },
    )
    .await
    .expect("the shim reconnected by itself");
    cri.runtime
        .version(VersionRequest::default())
        .await
        .expect("answers again");

    stop.store(true, Ordering::Relaxed);
    traffic
        .await
        .expect("traffic task")
        .expect("every failure while containerd was down was Unavailable");
    shim.stop().await.expect("clean stop");
}
