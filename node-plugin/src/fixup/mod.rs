//! Claim-time fix-ups: make a slot created from a placeholder
//! `PodSandboxConfig` indistinguishable, from inside the pod and for
//! kubelet's accounting, from a sandbox cold-started with the real one
//! (docs/design.md, "Fix-ups"; the state involved is listed in
//! `docs/containerd-1.6-sandbox-state.md`).
//!
//! The pool sees one trait, [`Fixup`]; each upstream runtime gets a
//! mechanism, picked per slot by [`ByRuntime`]:
//!
//! | file | what it holds |
//! |---|---|
//! | `setns.rs` | [`SetnsFixup`], runc/crun: the pause is a host process |
//! | `steps.rs` | the ordered steps of `setns` and their timings ([`apply`]) |
//! | `guest.rs` | [`GuestExecFixup`], gVisor/Kata: a command inside the sandbox |
//! | `by_runtime.rs` | [`ByRuntime`], the per-upstream-handler dispatch |
//! | `plan.rs` | [`FixupPlan`]: the real config validated once |
//! | `ops.rs`, `real.rs`, `fake.rs` | [`NodeOps`], the privileged calls, real and recording (cgroups through the `fast-sandbox-cgroup` layer) |
//! | `guest_ops.rs` | [`GuestOps`], the same for `guest-exec` |
//! | `kernel.rs`, `resolv.rs`, `error.rs` | namespaces and sysctls, `resolv.conf`, [`FixupError`] |
//!
//! A new runtime that needs another mechanism gets a file here with its
//! `impl Fixup`, a [`Mechanism`] variant and a line in
//! [`ByRuntime::real`]; its privileged calls go behind a trait like
//! [`NodeOps`] so the sequencing is tested with a recording fake.

mod by_runtime;
mod error;
mod fake;
mod guest;
mod guest_channel;
mod guest_moves;
mod guest_ops;
mod kernel;
mod ops;
mod plan;
mod real;
mod resolv;
mod setns;
mod steps;

use std::fmt;

use fast_sandbox_proto::cri::PodSandboxConfig;

pub use by_runtime::{ByRuntime, Mechanism};
pub use error::FixupError;
pub use fake::{Call, RecordingOps};
pub use guest::{
    ExecTemplate, GuestExecFixup, GuestExecSettings, SysctlPolicy, TemplateError, EXEC_ID_ARG,
    HOSTNAME_ARG, SANDBOX_ID_ARG,
};
pub use guest_channel::{ChannelError, ChannelTemplate};
pub use guest_ops::{
    FakeChannel, GuestCall, GuestError, GuestOps, ProcFacts, RealGuestOps, RecordingGuestOps,
};
pub use kernel::{Namespace, Sysctl};
pub use ops::NodeOps;
pub use plan::{CgroupLeaf, CgroupMove, ContainerdCgroup, FixupPlan, SandboxId};
pub use real::RealOps;
pub use resolv::render_resolv_conf;
pub use setns::SetnsFixup;
pub use steps::{
    apply, apply_phase, cleanup_after_remove, ApplyError, FixupReport, Phase, Step, StepTiming,
};

/// What is known about a running slot, for fix-ups.
#[derive(Debug, Clone)]
pub struct SlotFacts {
    pub sandbox_id: String,
    /// PID of the pause (or sentry) process on the host.
    pub pause_pid: i32,
    /// The placeholder's cgroup parent, where runc put the pause.
    pub placeholder_cgroup_parent: String,
    /// containerd's handler the slot was created with: picks the fix-up
    /// mechanism ([`ByRuntime`]).
    pub upstream_handler: String,
}

/// A step of the `guest-exec` fix-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStep {
    /// Rewriting `hostname` and `resolv.conf` in containerd's sandbox dir.
    SandboxFiles,
    /// The command that sets the hostname inside the sandbox.
    Hostname,
    /// Moving the sandbox's processes to the pod's cgroup.
    MoveProcesses,
}

impl fmt::Display for GuestStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SandboxFiles => "rewriting the sandbox files",
            Self::Hostname => "setting the hostname inside the sandbox",
            Self::MoveProcesses => "moving the sandbox's processes to the pod's cgroup",
        })
    }
}

/// A fix-up that failed, and where; the slot is destroyed and the pod
/// starts cold.
#[derive(Debug, thiserror::Error)]
pub enum FixupFailed {
    /// The pod's config, or the slot's record, cannot be served by a slot.
    #[error("planning the fix-up")]
    Plan(#[source] FixupError),
    /// A `setns` step failed; the error names the step and what was done.
    #[error(transparent)]
    Setns(Box<ApplyError>),
    /// What a sentry or guest names itself without a hostname is the
    /// runtime's choice: not guessed.
    #[error("PodSandboxConfig field hostname: empty; a guest-exec slot needs one")]
    NoHostname,
    #[error(
        "PodSandboxConfig field linux.sysctls: this runtime applies them only at sandbox start"
    )]
    SysctlsAtStartOnly,
    #[error("guest-exec fix-up: {step}")]
    Guest {
        step: GuestStep,
        #[source]
        source: GuestError,
    },
}

impl From<ApplyError> for FixupFailed {
    fn from(e: ApplyError) -> Self {
        Self::Setns(Box::new(e))
    }
}

impl FixupFailed {
    /// The miss a pod that [`Fixup::check`] refuses is counted under.
    pub fn miss_reason(&self) -> fast_sandbox_shim::slots::MissReason {
        use fast_sandbox_shim::slots::MissReason;
        match self {
            Self::NoHostname => MissReason::NoHostname,
            Self::SysctlsAtStartOnly => MissReason::SysctlsAtStartOnly,
            Self::Plan(_) | Self::Setns(_) | Self::Guest { .. } => MissReason::UnsupportedConfig,
        }
    }

    /// Whether it failed only because the pause process no longer exists
    /// (its `/proc/<pid>/cgroup` is gone, or the kernel says no such
    /// process): the pod was stopped meanwhile, which is not a failure.
    pub fn process_gone(&self) -> bool {
        let Self::Setns(apply) = self else {
            return false;
        };
        match &apply.source {
            FixupError::Cgroup(e) => e.process_gone(),
            _ => false,
        }
    }
}

/// How a claimed slot is made to look like the pod's own sandbox: one
/// mechanism per upstream runtime type (setns for runc/crun; gVisor and
/// Kata need others), behind this trait so the pool can be tested with a
/// fake.
#[tonic::async_trait]
pub trait Fixup: fmt::Debug + Send + Sync + 'static {
    /// Whether a slot created with `upstream_handler` can be fixed up for
    /// `real` at all. Asked before a slot is taken, so every reason a pod
    /// cannot be served belongs here, not in [`Fixup::apply`] (which would
    /// cost the slot). No I/O: asked on every claim. By default, the
    /// fix-up plan's own checks.
    fn check(&self, _upstream_handler: &str, real: &PodSandboxConfig) -> Result<(), FixupFailed> {
        plan::check_pod(real).map_err(FixupFailed::Plan)
    }
    /// Makes the slot look like a cold sandbox of `real` from inside: runs
    /// before the claim is answered.
    async fn apply(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<(), FixupFailed>;
    /// Whether claims of `slot` have a [`Fixup::settle`] step. No I/O: asked
    /// on every claim.
    fn settles(&self, _slot: &SlotFacts) -> bool {
        false
    }
    /// The part of the identity nothing in the pod can observe before its
    /// first container exists (a gVisor sentry's UTS hostname, set by a
    /// command inside the sandbox): runs at once after the claim is
    /// answered, and the pod's `CreateContainer` waits for it
    /// (`SlotSource::ready_for_containers`). Retried once on failure; run
    /// again for every claimed slot found at start-up, so it must be
    /// idempotent. Only called when [`Fixup::settles`].
    async fn settle(&self, _slot: &SlotFacts, _real: &PodSandboxConfig) -> Result<(), FixupFailed> {
        Ok(())
    }
    /// Checks a new, unclaimed slot whose claims will settle (runs the
    /// settle mechanism with the placeholder's own identity), so a
    /// mechanism that cannot work there fails the slot's creation — the
    /// pod then starts cold — rather than its claim's first container.
    async fn prepare(
        &self,
        _slot: &SlotFacts,
        _placeholder: &PodSandboxConfig,
    ) -> Result<(), FixupFailed> {
        Ok(())
    }
    /// The rest, which nothing in the pod waits for (the pause's cgroup):
    /// runs right after the claim is answered, and again for every claimed
    /// slot found at start-up, so it must be idempotent.
    async fn complete(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<(), FixupFailed>;
    /// Cleans up what `apply` created outside containerd's knowledge, once
    /// upstream has removed the sandbox.
    async fn after_remove(&self, slot: &SlotFacts, real: &PodSandboxConfig);
    /// The slot's sandbox is gone upstream (claimed or not): remove what the
    /// pool created for it (its placeholder cgroup parent).
    async fn discard(&self, slot: &SlotFacts);
}

/// The plan of a claim of `slot` by `real`, for the mechanisms here.
fn plan(
    slot: &SlotFacts,
    containerd_root: &std::path::Path,
    real: &PodSandboxConfig,
) -> Result<FixupPlan, FixupFailed> {
    FixupPlan::from_config(
        &slot.sandbox_id,
        slot.pause_pid,
        containerd_root,
        &slot.placeholder_cgroup_parent,
        real,
    )
    .map_err(FixupFailed::Plan)
}

#[cfg(test)]
mod gone_tests {
    use std::io;

    use fast_sandbox_cgroup::CgroupError;

    use super::*;

    fn failed(source: impl Into<FixupError>) -> FixupFailed {
        FixupFailed::from(ApplyError {
            sandbox_id: "a".repeat(64),
            step: None,
            completed: Vec::new(),
            source: source.into(),
        })
    }

    /// Issue 11, item 8: a pod stopped right after its claim is not an
    /// error of the deferred fix-up; anything else still is.
    #[test]
    fn only_a_vanished_pause_counts_as_gone() {
        let enoent = || io::Error::from(io::ErrorKind::NotFound);
        let errno = io::Error::from_raw_os_error;
        let gone = failed(CgroupError::ProcessCgroups {
            pid: 7,
            source: enoent(),
        });
        assert!(gone.process_gone(), "{}", crate::blocking::chain(&gone));
        let esrch = failed(CgroupError::Write {
            path: "/sys/fs/cgroup/cpu/x/cgroup.procs".into(),
            value: "7".into(),
            source: errno(nix::libc::ESRCH),
        });
        assert!(esrch.process_gone());
        for real in [
            failed(CgroupError::ProcessCgroups {
                pid: 7,
                source: errno(nix::libc::EIO),
            }),
            failed(CgroupError::Write {
                path: "/sys/fs/cgroup/cpu/x/cgroup.procs".into(),
                value: "7".into(),
                source: errno(nix::libc::EACCES),
            }),
            failed(CgroupError::Mounts { source: enoent() }),
            FixupFailed::NoHostname,
        ] {
            assert!(!real.process_gone(), "{}", crate::blocking::chain(&real));
        }
    }
}
