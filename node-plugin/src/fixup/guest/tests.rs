//! The `guest-exec` fix-up and the per-runtime dispatch, with recording
//! fakes (no root, no runsc).

use std::collections::HashMap;

use fast_sandbox_proto::cri::{DnsConfig, LinuxPodSandboxConfig, PodSandboxConfig};

use super::*;
use crate::fixup::{
    ByRuntime, Call, ChannelTemplate, FakeChannel, GuestCall, Mechanism, RecordingGuestOps,
    RecordingOps,
};

const ID: &str = "a7383993ee782e34155b70d1d3208393ffc7c82e0b4145ba9e4ea1adcb8906fd";
const ROOT: &str = "/var/lib/containerd";

fn facts(upstream: &str) -> SlotFacts {
    SlotFacts {
        sandbox_id: ID.to_owned(),
        pause_pid: 4242,
        placeholder_cgroup_parent: "/fast-sandbox-slots/u1".to_owned(),
        upstream_handler: upstream.to_owned(),
    }
}

fn real(sysctls: &[(&str, &str)]) -> PodSandboxConfig {
    PodSandboxConfig {
        hostname: "web-0".to_owned(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.0.0.10".to_owned()],
            searches: vec!["ns.svc".to_owned()],
            options: vec![],
        }),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: "/kubepods/pod1".to_owned(),
            sysctls: sysctls
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn settings(sysctls: SysctlPolicy) -> GuestExecSettings {
    GuestExecSettings {
        command: ExecTemplate::runsc("/usr/bin/runsc", "/run/containerd/runc/k8s.io"),
        sysctls,
        channel: None,
    }
}

fn fixup(
    node: &Arc<RecordingOps>,
    guest: &Arc<RecordingGuestOps>,
    policy: SysctlPolicy,
) -> GuestExecFixup {
    GuestExecFixup::new(
        Arc::clone(node) as Arc<dyn NodeOps>,
        Arc::clone(guest) as Arc<dyn GuestOps>,
        ROOT.into(),
        settings(policy),
        Duration::from_secs(5),
    )
}

fn sandbox_dir() -> PathBuf {
    PathBuf::from(ROOT).join(format!("io.containerd.grpc.v1.cri/sandboxes/{ID}"))
}

fn set_hostname(name: &str) -> GuestCall {
    GuestCall::Run(
        [
            "/usr/bin/runsc",
            "--root",
            "/run/containerd/runc/k8s.io",
            "exec",
            "--cap",
            "CAP_SYS_ADMIN",
            ID,
            "/pause",
            "--set-hostname",
            name,
        ]
        .map(str::to_owned)
        .to_vec(),
    )
}

#[tokio::test]
async fn apply_rewrites_the_files_and_settle_sets_the_hostname_inside() {
    let node = Arc::new(RecordingOps::new());
    let guest = Arc::new(RecordingGuestOps::default());
    let fixup = fixup(&node, &guest, SysctlPolicy::Ignore);
    fixup
        .apply(&facts("runsc"), &real(&[]))
        .await
        .expect("apply");
    assert_eq!(
        node.calls(),
        vec![
            Call::WriteFile {
                dir: sandbox_dir(),
                name: "hostname".into(),
                contents: b"web-0\n".to_vec(),
            },
            Call::WriteFile {
                dir: sandbox_dir(),
                name: "resolv.conf".into(),
                contents: b"search ns.svc\nnameserver 10.0.0.10\n".to_vec(),
            },
        ],
        "no setns, no sysctl writes"
    );
    assert!(
        guest.calls().is_empty(),
        "the claim's answer does not wait for the exec inside the sandbox"
    );
    assert!(fixup.settles(&facts("runsc")));
    fixup
        .settle(&facts("runsc"), &real(&[]))
        .await
        .expect("settle");
    assert_eq!(guest.calls(), vec![set_hostname("web-0")]);
    assert_eq!(node.calls().len(), 2, "settle writes no files");
}

fn channel_fixup(node: &Arc<RecordingOps>, guest: &Arc<RecordingGuestOps>) -> GuestExecFixup {
    let mut settings = settings(SysctlPolicy::Ignore);
    settings.channel = Some(ChannelTemplate::runsc_adapter(
        "/run/containerd/runc/k8s.io",
    ));
    GuestExecFixup::new(
        Arc::clone(node) as Arc<dyn NodeOps>,
        Arc::clone(guest) as Arc<dyn GuestOps>,
        ROOT.into(),
        settings,
        Duration::from_secs(5),
    )
}

fn channel_call(name: &str) -> GuestCall {
    GuestCall::Channel {
        dir: format!("/run/containerd/runc/k8s.io.adapter/{ID}").into(),
        hostname: name.to_owned(),
    }
}

#[tokio::test]
async fn the_hostname_channel_replaces_the_exec_when_the_pause_answers() {
    let node = Arc::new(RecordingOps::new());
    let guest = Arc::new(RecordingGuestOps::default().with_channel(FakeChannel::Answers));
    let fixup = channel_fixup(&node, &guest);
    fixup
        .settle(&facts("runsc"), &real(&[]))
        .await
        .expect("settle");
    assert_eq!(guest.calls(), vec![channel_call("web-0")], "no exec");
    let placeholder = PodSandboxConfig {
        hostname: "slot-0".to_owned(),
        ..Default::default()
    };
    fixup
        .prepare(&facts("runsc"), &placeholder)
        .await
        .expect("prepare");
    assert_eq!(
        guest.calls()[1],
        channel_call("slot-0"),
        "prepare checks the channel too"
    );
}

#[tokio::test]
async fn without_a_channel_or_when_the_pause_refuses_the_exec_still_sets_it() {
    for channel in [FakeChannel::Absent, FakeChannel::Refuses] {
        let node = Arc::new(RecordingOps::new());
        let guest = Arc::new(RecordingGuestOps::default().with_channel(channel));
        channel_fixup(&node, &guest)
            .settle(&facts("runsc"), &real(&[]))
            .await
            .expect("settle");
        assert_eq!(
            guest.calls(),
            vec![channel_call("web-0"), set_hostname("web-0")],
            "{channel:?}"
        );
    }
    // Both failing: the exec's error is the step's.
    let node = Arc::new(RecordingOps::new());
    let guest = Arc::new(RecordingGuestOps::failing_run().with_channel(FakeChannel::Refuses));
    let err = channel_fixup(&node, &guest)
        .settle(&facts("runsc"), &real(&[]))
        .await
        .expect_err("both failed");
    assert!(
        crate::blocking::chain(&err).contains("fake failure"),
        "{err}"
    );
}

#[tokio::test]
async fn prepare_sets_the_placeholders_own_hostname() {
    let node = Arc::new(RecordingOps::new());
    let guest = Arc::new(RecordingGuestOps::default());
    let placeholder = PodSandboxConfig {
        hostname: "slot-fast-gvisor-0123456789ab".to_owned(),
        ..Default::default()
    };
    fixup(&node, &guest, SysctlPolicy::Ignore)
        .prepare(&facts("runsc"), &placeholder)
        .await
        .expect("prepare");
    assert_eq!(
        guest.calls(),
        vec![set_hostname("slot-fast-gvisor-0123456789ab")]
    );
    assert!(node.calls().is_empty());

    let guest = Arc::new(RecordingGuestOps::failing_run());
    let err = fixup(&node, &guest, SysctlPolicy::Ignore)
        .prepare(&facts("runsc"), &placeholder)
        .await
        .expect_err("a pause without --set-hostname fails the slot");
    assert!(
        crate::blocking::chain(&err).contains("fake failure"),
        "{err}"
    );
}

#[tokio::test]
async fn sysctls_are_ignored_or_refused_as_configured() {
    let pod = real(&[("net.core.somaxconn", "1024")]);
    let node = Arc::new(RecordingOps::new());
    let guest = Arc::new(RecordingGuestOps::default());
    fixup(&node, &guest, SysctlPolicy::Ignore)
        .apply(&facts("runsc"), &pod)
        .await
        .expect("runsc ignores sysctls, cold and warm");

    let node = Arc::new(RecordingOps::new());
    let guest = Arc::new(RecordingGuestOps::default());
    let err = fixup(&node, &guest, SysctlPolicy::Refuse)
        .apply(&facts("kata"), &pod)
        .await
        .expect_err("a VM applies sysctls at boot only");
    assert!(
        crate::blocking::chain(&err).contains("linux.sysctls"),
        "{err}"
    );
    assert!(
        node.calls().is_empty() && guest.calls().is_empty(),
        "nothing touched"
    );
}

#[tokio::test]
async fn an_empty_hostname_fails_the_claim_and_a_failed_exec_the_settle() {
    let node = Arc::new(RecordingOps::new());
    let guest = Arc::new(RecordingGuestOps::default());
    let mut pod = real(&[]);
    pod.hostname.clear();
    let err = fixup(&node, &guest, SysctlPolicy::Ignore)
        .apply(&facts("runsc"), &pod)
        .await
        .expect_err("empty hostname");
    assert!(crate::blocking::chain(&err).contains("hostname"), "{err}");
    assert!(guest.calls().is_empty());
    assert!(node.calls().is_empty(), "nothing touched");

    let guest = Arc::new(RecordingGuestOps::failing_run());
    let err = fixup(&node, &guest, SysctlPolicy::Ignore)
        .settle(&facts("runsc"), &real(&[]))
        .await
        .expect_err("exec failed");
    assert!(
        crate::blocking::chain(&err).contains("fake failure"),
        "{err}"
    );
}

#[tokio::test]
async fn complete_moves_every_process_until_the_leaf_is_empty() {
    let node = Arc::new(RecordingOps::new());
    // Sentry, gofer, waiter; then a straggler forked during the first round.
    let guest = Arc::new(RecordingGuestOps::with_procs(vec![
        vec![10, 11, 12],
        vec![13],
    ]));
    fixup(&node, &guest, SysctlPolicy::Ignore)
        .complete(&facts("runsc"), &real(&[]))
        .await
        .expect("complete");
    let from = format!("/fast-sandbox-slots/u1/{ID}");
    let to = format!("/kubepods/pod1/{ID}");
    let mv = |pid| GuestCall::Move {
        pid,
        from: from.clone(),
        to: to.clone(),
    };
    assert_eq!(
        guest.calls(),
        vec![
            GuestCall::CgroupProcs(from.clone()),
            mv(10),
            mv(11),
            mv(12),
            GuestCall::CgroupProcs(from.clone()),
            mv(13),
            GuestCall::CgroupProcs(from.clone()),
        ]
    );
    assert!(
        node.calls().is_empty(),
        "the placeholder leaf stays: runsc spawns later gofers in it"
    );
}

#[tokio::test(start_paused = true)]
async fn complete_gives_up_on_a_leaf_that_never_empties() {
    let node = Arc::new(RecordingOps::new());
    let guest = Arc::new(RecordingGuestOps::with_procs(vec![vec![7]; 100]));
    let err = fixup(&node, &guest, SysctlPolicy::Ignore)
        .complete(&facts("runsc"), &real(&[]))
        .await
        .expect_err("never empty");
    assert!(
        crate::blocking::chain(&err).contains("[7 (fake) state S parent 1]"),
        "{err}"
    );
}

#[test]
fn templates_are_checked_and_rendered_whole_arguments_only() {
    let argv = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(ExecTemplate::new(vec![]), Err(TemplateError::Empty));
    assert_eq!(
        ExecTemplate::new(argv(&["runsc", "{sandbox_id}", "{hostname}"])),
        Err(TemplateError::RelativeProgram("runsc".into()))
    );
    assert_eq!(
        ExecTemplate::new(argv(&["/bin/x", "{sandbox_id}"])),
        Err(TemplateError::Missing(HOSTNAME_ARG))
    );
    let t = ExecTemplate::new(argv(&[
        "/usr/bin/ctr",
        "task",
        "exec",
        "--exec-id",
        "{exec_id}",
        "{sandbox_id}",
        "/pause",
        "--set-hostname",
        "{hostname}",
        "x{hostname}",
    ]))
    .expect("valid");
    assert_eq!(
        t.render("sb", "web-0", "e1"),
        argv(&[
            "/usr/bin/ctr",
            "task",
            "exec",
            "--exec-id",
            "e1",
            "sb",
            "/pause",
            "--set-hostname",
            "web-0",
            "x{hostname}",
        ])
    );
}

/// Records which slots reached it.
#[derive(Debug, Default)]
struct Tag(std::sync::Mutex<Vec<String>>);

#[tonic::async_trait]
impl Fixup for Tag {
    async fn apply(&self, slot: &SlotFacts, _: &PodSandboxConfig) -> Result<(), FixupFailed> {
        self.0
            .lock()
            .expect("lock")
            .push(format!("apply {}", slot.upstream_handler));
        Ok(())
    }
    fn settles(&self, slot: &SlotFacts) -> bool {
        slot.upstream_handler == "runsc"
    }
    async fn settle(&self, slot: &SlotFacts, _: &PodSandboxConfig) -> Result<(), FixupFailed> {
        self.0
            .lock()
            .expect("lock")
            .push(format!("settle {}", slot.upstream_handler));
        Ok(())
    }
    async fn prepare(&self, slot: &SlotFacts, _: &PodSandboxConfig) -> Result<(), FixupFailed> {
        self.0
            .lock()
            .expect("lock")
            .push(format!("prepare {}", slot.upstream_handler));
        Ok(())
    }
    async fn complete(&self, slot: &SlotFacts, _: &PodSandboxConfig) -> Result<(), FixupFailed> {
        self.0
            .lock()
            .expect("lock")
            .push(format!("complete {}", slot.upstream_handler));
        Ok(())
    }
    async fn after_remove(&self, slot: &SlotFacts, _: &PodSandboxConfig) {
        self.0
            .lock()
            .expect("lock")
            .push(format!("after_remove {}", slot.upstream_handler));
    }
    async fn discard(&self, slot: &SlotFacts) {
        self.0
            .lock()
            .expect("lock")
            .push(format!("discard {}", slot.upstream_handler));
    }
}

#[tokio::test]
async fn by_runtime_dispatches_on_the_slot_upstream_handler() {
    let setns = Arc::new(Tag::default());
    let guest = Arc::new(Tag::default());
    let by = ByRuntime::new(Arc::clone(&setns) as Arc<dyn Fixup>)
        .with("runsc", Arc::clone(&guest) as Arc<dyn Fixup>);
    let pod = real(&[]);
    by.apply(&facts("runsc"), &pod).await.expect("apply");
    by.settle(&facts("runsc"), &pod).await.expect("settle");
    by.prepare(&facts("crun"), &pod).await.expect("prepare");
    by.complete(&facts("runc"), &pod).await.expect("complete");
    by.after_remove(&facts("runsc"), &pod).await;
    by.discard(&facts("crun")).await;
    assert!(by.settles(&facts("runsc")));
    assert!(!by.settles(&facts("runc")));
    assert_eq!(
        *guest.0.lock().expect("lock"),
        vec!["apply runsc", "settle runsc", "after_remove runsc"]
    );
    assert_eq!(
        *setns.0.lock().expect("lock"),
        vec!["prepare crun", "complete runc", "discard crun"]
    );
}

#[test]
fn real_builds_one_guest_fixup_per_guest_runtime() {
    let choices = HashMap::from([
        (
            "runsc".to_owned(),
            Mechanism::GuestExec(settings(SysctlPolicy::Ignore)),
        ),
        ("runc".to_owned(), Mechanism::Setns),
    ]);
    let by = ByRuntime::real(
        Arc::new(RecordingOps::new()),
        Arc::new(RecordingGuestOps::default()),
        ROOT.into(),
        &choices,
        Duration::from_secs(1),
    );
    assert!(format!("{:?}", by.pick(&facts("runsc"))).starts_with("GuestExecFixup"));
    assert!(format!("{:?}", by.pick(&facts("runc"))).starts_with("SetnsFixup"));
    assert!(format!("{:?}", by.pick(&facts("other"))).starts_with("SetnsFixup"));
}

/// Issue 12 item 4: every reason a guest-exec pool cannot serve a pod is
/// known from the pod's config alone, before a slot is taken, and names its
/// miss reason; a pod it can serve passes.
#[test]
fn check_refuses_what_apply_would_refuse_without_a_slot() {
    use fast_sandbox_shim::slots::MissReason;
    let node = Arc::new(RecordingOps::new());
    let guest = Arc::new(RecordingGuestOps::default());
    let ignore = fixup(&node, &guest, SysctlPolicy::Ignore);
    let refuse = fixup(&node, &guest, SysctlPolicy::Refuse);
    ignore.check("runsc", &real(&[])).expect("an ordinary pod");
    let mut unnamed = real(&[]);
    unnamed.hostname.clear();
    let reason = |r: Result<(), FixupFailed>| r.expect_err("refused").miss_reason();
    assert_eq!(
        reason(ignore.check("runsc", &unnamed)),
        MissReason::NoHostname
    );
    let sysctls = real(&[("net.core.somaxconn", "1024")]);
    ignore.check("runsc", &sysctls).expect("ignored sysctls");
    assert_eq!(
        reason(refuse.check("kata", &sysctls)),
        MissReason::SysctlsAtStartOnly
    );
    let mut relative = real(&[]);
    relative.linux.as_mut().expect("linux").cgroup_parent = "kubepods/pod1".into();
    assert_eq!(
        reason(ignore.check("runsc", &relative)),
        MissReason::UnsupportedConfig
    );
    assert!(node.calls().is_empty() && guest.calls().is_empty());
}
