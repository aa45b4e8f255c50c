//! [`apply`] and [`cleanup_after_remove`] against the recording fake: the
//! order of operations, what a failure at each of them leaves behind, the
//! deadline.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::mpsc,
};

use fast_sandbox_proto::cri::{DnsConfig, LinuxPodSandboxConfig, PodSandboxConfig};

use super::*;
use crate::fixup::{Call, CgroupLeaf, FixupError, RecordingOps, SandboxId, Sysctl};

const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const PID: i32 = 4242;
const PLACEHOLDER_PARENT: &str = "/fast-sandbox-slots";
const DEADLINE: Duration = Duration::from_secs(5);

fn sandbox_dir() -> PathBuf {
    PathBuf::from(format!(
        "/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/{ID}"
    ))
}

fn real_config() -> PodSandboxConfig {
    PodSandboxConfig {
        hostname: "web-0".into(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.209.0.10".into()],
            searches: vec!["ns.svc.cluster.local".into(), "cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: "/kubepods/besteffort/pod1234".into(),
            sysctls: HashMap::from([
                ("net.ipv4.ip_unprivileged_port_start".into(), "0".into()),
                ("net.core.somaxconn".into(), "1024".into()),
                ("kernel.shm_rmid_forced".into(), "1".into()),
                ("kernel.domainname".into(), "example".into()),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn plan_for(config: &PodSandboxConfig) -> FixupPlan {
    FixupPlan::from_config(
        ID,
        PID,
        Path::new("/var/lib/containerd"),
        PLACEHOLDER_PARENT,
        config,
    )
    .unwrap()
}

fn write(name: &str, contents: &str) -> Call {
    Call::WriteFile {
        dir: sandbox_dir(),
        name: name.into(),
        contents: contents.as_bytes().to_vec(),
    }
}

fn sysctls(ns: Namespace, kv: &[(&str, &str)]) -> Call {
    Call::WriteSysctls {
        pid: PID,
        ns,
        sysctls: kv.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
    }
}

/// The calls a full plan makes, in order, with the step each belongs to.
fn full_sequence() -> Vec<(Call, Step)> {
    vec![
        (write("hostname", "web-0\n"), Step::HostnameFile),
        (
            write(
                "resolv.conf",
                "search ns.svc.cluster.local cluster.local\nnameserver 10.209.0.10\n\
                 options ndots:5\n",
            ),
            Step::ResolvConf,
        ),
        (
            Call::SetHostname {
                pid: PID,
                hostname: "web-0".into(),
            },
            Step::UtsHostname,
        ),
        (
            sysctls(
                Namespace::Net,
                &[
                    ("net.core.somaxconn", "1024"),
                    ("net.ipv4.ip_unprivileged_port_start", "0"),
                ],
            ),
            Step::Sysctls(Namespace::Net),
        ),
        (
            sysctls(Namespace::Ipc, &[("kernel.shm_rmid_forced", "1")]),
            Step::Sysctls(Namespace::Ipc),
        ),
        (
            sysctls(Namespace::Uts, &[("kernel.domainname", "example")]),
            Step::Sysctls(Namespace::Uts),
        ),
        (
            Call::MoveToCgroup {
                pid: PID,
                from: format!("{PLACEHOLDER_PARENT}/{ID}"),
                to: format!("/kubepods/besteffort/pod1234/{ID}"),
            },
            Step::MoveCgroup,
        ),
        (
            Call::RemoveCgroup {
                leaf: format!("{PLACEHOLDER_PARENT}/{ID}"),
            },
            Step::RemovePlaceholderCgroup,
        ),
    ]
}

fn steps(report: &[StepTiming]) -> Vec<Step> {
    report.iter().map(|t| t.step).collect()
}

#[tokio::test]
async fn full_plan_runs_every_step_in_order() {
    let ops = Arc::new(RecordingOps::new());
    let report = apply(ops.clone(), plan_for(&real_config()), DEADLINE)
        .await
        .unwrap();
    let expected = full_sequence();
    assert_eq!(
        ops.calls(),
        expected.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>()
    );
    assert_eq!(
        steps(&report.steps),
        expected.iter().map(|(_, s)| *s).collect::<Vec<_>>()
    );
    assert_eq!(report.sandbox_id, ID);
    assert!(report.total >= report.steps.iter().map(|s| s.elapsed).sum());
}

#[tokio::test]
async fn empty_hostname_and_dns_use_the_node_values() {
    let mut config = real_config();
    config.hostname.clear();
    config.dns_config = None;
    if let Some(l) = config.linux.as_mut() {
        l.sysctls.clear();
    }
    let ops = Arc::new(RecordingOps::new());
    apply(ops.clone(), plan_for(&config), DEADLINE)
        .await
        .unwrap();
    let calls = ops.calls();
    assert_eq!(
        calls[..5],
        [
            Call::NodeHostname,
            write("hostname", "node-1\n"),
            Call::NodeResolvConf,
            write("resolv.conf", RecordingOps::NODE_RESOLV_CONF),
            Call::SetHostname {
                pid: PID,
                hostname: RecordingOps::NODE_HOSTNAME.into(),
            },
        ]
    );
    // No sysctls: straight to the cgroup.
    assert!(matches!(calls[5], Call::MoveToCgroup { .. }), "{calls:?}");
    assert_eq!(calls.len(), 7);
}

#[tokio::test]
async fn same_parent_means_no_cgroup_move() {
    let mut config = real_config();
    if let Some(l) = config.linux.as_mut() {
        l.cgroup_parent = PLACEHOLDER_PARENT.into();
    }
    let ops = Arc::new(RecordingOps::new());
    let report = apply(ops.clone(), plan_for(&config), DEADLINE)
        .await
        .unwrap();
    assert!(!ops
        .calls()
        .iter()
        .any(|c| matches!(c, Call::MoveToCgroup { .. } | Call::RemoveCgroup { .. })));
    assert!(!steps(&report.steps).contains(&Step::MoveCgroup));
}

#[tokio::test]
async fn a_failure_at_each_call_stops_there_and_reports_what_was_done() {
    let expected = full_sequence();
    for n in 1..=expected.len() {
        let ops = Arc::new(RecordingOps::failing_at(n));
        let err = apply(ops.clone(), plan_for(&real_config()), DEADLINE)
            .await
            .unwrap_err();
        let (failed_call, failed_step) = &expected[n - 1];
        // Nothing after the failing call ran.
        assert_eq!(ops.calls().len(), n, "failing call {n}");
        assert_eq!(ops.calls().last(), Some(failed_call));
        assert_eq!(err.step, Some(*failed_step), "failing call {n}");
        assert_eq!(
            steps(&err.completed),
            expected[..n - 1]
                .iter()
                .map(|(_, s)| *s)
                .collect::<Vec<_>>(),
            "failing call {n}"
        );
        assert_eq!(err.sandbox_id, ID);
        let msg = err.to_string();
        assert!(
            msg.contains(ID) && msg.contains(&failed_step.to_string()),
            "{msg}"
        );
        // The cause names what it was about.
        let cause = err.source.to_string();
        let about = match failed_step {
            Step::HostnameFile => "hostname".to_owned(),
            Step::ResolvConf => "resolv.conf".to_owned(),
            Step::UtsHostname => PID.to_string(),
            Step::Sysctls(_) => PID.to_string(),
            Step::MoveCgroup => "cgroup.procs".to_owned(),
            Step::RemovePlaceholderCgroup => PLACEHOLDER_PARENT.to_owned(),
        };
        assert!(cause.contains(&about), "{cause}");
    }
}

#[tokio::test]
async fn node_read_failures_fail_their_step() {
    let mut config = real_config();
    config.hostname.clear();
    let ops = Arc::new(RecordingOps::failing_at(1));
    let err = apply(ops.clone(), plan_for(&config), DEADLINE)
        .await
        .unwrap_err();
    assert_eq!(ops.calls(), [Call::NodeHostname]);
    assert_eq!(err.step, Some(Step::HostnameFile));
    assert!(matches!(err.source, FixupError::NodeHostname { .. }));
}

/// A [`NodeOps`] whose UTS step blocks until the test lets it go.
#[derive(Debug)]
struct Blocking {
    inner: RecordingOps,
    release: Mutex<mpsc::Receiver<()>>,
}

impl NodeOps for Blocking {
    fn node_hostname(&self) -> Result<String, FixupError> {
        self.inner.node_hostname()
    }
    fn node_resolv_conf(&self) -> Result<Vec<u8>, FixupError> {
        self.inner.node_resolv_conf()
    }
    fn write_file_in_place(&self, d: &Path, n: &str, c: &[u8]) -> Result<(), FixupError> {
        self.inner.write_file_in_place(d, n, c)
    }
    fn set_hostname_in_uts_ns(&self, pid: i32, h: &str) -> Result<(), FixupError> {
        let _ = self.release.lock().unwrap().recv();
        self.inner.set_hostname_in_uts_ns(pid, h)
    }
    fn write_sysctls_in_ns(&self, p: i32, ns: Namespace, s: &[Sysctl]) -> Result<(), FixupError> {
        self.inner.write_sysctls_in_ns(p, ns, s)
    }
    fn move_to_cgroup(&self, p: i32, f: &CgroupLeaf, t: &CgroupLeaf) -> Result<(), FixupError> {
        self.inner.move_to_cgroup(p, f, t)
    }
    fn remove_cgroup(&self, l: &CgroupLeaf) -> Result<(), FixupError> {
        self.inner.remove_cgroup(l)
    }
}

#[tokio::test]
async fn deadline_reports_the_step_in_flight() {
    let (release, rx) = mpsc::channel();
    let ops = Arc::new(Blocking {
        inner: RecordingOps::new(),
        release: Mutex::new(rx),
    });
    let err = apply(
        ops.clone(),
        plan_for(&real_config()),
        Duration::from_millis(50),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err.source, FixupError::Timeout { ref sandbox_id, .. } if sandbox_id == ID),
        "{err}"
    );
    assert_eq!(err.step, Some(Step::UtsHostname));
    assert_eq!(
        steps(&err.completed),
        [Step::HostnameFile, Step::ResolvConf]
    );
    release.send(()).unwrap();
}

#[tokio::test]
async fn cleanup_removes_the_pod_leaf_then_the_placeholder_leaf() {
    let id = SandboxId::parse(ID).unwrap();
    let mv = CgroupMove::new(&id, PLACEHOLDER_PARENT, "/kubepods/besteffort/pod1234").unwrap();
    let ops = Arc::new(RecordingOps::new());
    cleanup_after_remove(ops.clone(), mv.clone(), DEADLINE)
        .await
        .unwrap();
    assert_eq!(
        ops.calls(),
        [
            Call::RemoveCgroup {
                leaf: format!("/kubepods/besteffort/pod1234/{ID}")
            },
            Call::RemoveCgroup {
                leaf: format!("{PLACEHOLDER_PARENT}/{ID}")
            },
        ]
    );
    let ops = Arc::new(RecordingOps::failing_at(1));
    let err = cleanup_after_remove(ops.clone(), mv, DEADLINE)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FixupError::Cgroup(fast_sandbox_cgroup::CgroupError::Remove { .. })
        ),
        "{err}"
    );
    assert_eq!(ops.calls().len(), 1);
}
