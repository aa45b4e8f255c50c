//! Fix-ups for runtimes whose pause is not a host process: gVisor (the
//! sentry has its own UTS namespace, not a host one to `setns` into) and
//! Kata (a guest kernel). Chosen per upstream handler by [`super::ByRuntime`]
//! (`fixup = "setns" | "guest-exec"` in a `[[pool]]`).
//!
//! `guest-exec`, measured on runsc release-20221219.0 with the
//! `fast-sandbox-runsc` adapter (docs/runtimes.md):
//! - containerd's per-sandbox `hostname` and `resolv.conf` are rewritten in
//!   place on the host, as for runc. runsc serves file bind mounts through
//!   the gofer with `cache=remote_revalidating`, so the new content is what
//!   the pause and every later container read;
//! - the UTS hostname is set through the pause's hostname channel when the
//!   sandbox has one (`guest_channel.rs`: two FIFOs the runsc adapter gives
//!   our pause, about 1 ms), else by a configured command run inside the
//!   sandbox: by default `runsc exec --cap CAP_SYS_ADMIN <id> /pause
//!   --set-hostname <name>` (our pause image has that mode). Containers of
//!   the pod share the sandbox's UTS namespace, so they see it. Nothing
//!   can read it before the pod's first container exists, so it runs right
//!   after the claim is answered ([`Fixup::settle`]) and the shim holds the
//!   pod's `CreateContainer` until it has finished; every new slot runs it
//!   once with its own name first ([`Fixup::prepare`]), so a mechanism that
//!   cannot work fails refills (pods start cold), not pods;
//! - sysctls: runsc does not apply a spec's sysctls (the sentry has no
//!   `/proc/sys/net/ipv4/ip_unprivileged_port_start` at all, cold or warm),
//!   so `guest_sysctls = "ignore"`; a runtime that applies them in the guest
//!   (Kata) uses `"refuse"`: a pod with sysctls then starts cold;
//! - every process in the placeholder's leaf cgroup (sentry, gofer, the
//!   adapter's waiter and its `runsc wait`; a VMM and virtiofsd for Kata)
//!   moves to `<pod cgroup_parent>/<id>`, in the hierarchies where it is,
//!   after the claim is answered, like the runc pause move, in bounded
//!   rounds that skip zombies and wait out exiting processes
//!   (`guest_moves.rs`); the emptied
//!   placeholder leaf stays until the sandbox is removed (runsc spawns each
//!   later container's gofer in it).

use std::{path::PathBuf, sync::Arc, time::Duration};

use fast_sandbox_proto::cri::PodSandboxConfig;

use super::{
    guest_channel::{ChannelError, ChannelTemplate},
    guest_moves::move_all,
    guest_ops::{GuestError, GuestOps},
    ops::NodeOps,
    plan::FixupPlan,
    setns, Fixup, FixupFailed, GuestStep, SlotFacts,
};
use crate::blocking::asyncify;

/// The argument of a guest command replaced by the sandbox id.
pub const SANDBOX_ID_ARG: &str = "{sandbox_id}";
/// The argument replaced by the pod's hostname.
pub const HOSTNAME_ARG: &str = "{hostname}";
/// The argument replaced by a fresh exec id (`fsb-hostname-<hex>`), for
/// clients such as `ctr task exec` that need one.
pub const EXEC_ID_ARG: &str = "{exec_id}";

/// The command that sets the hostname inside a sandbox. Arguments equal to
/// [`SANDBOX_ID_ARG`], [`HOSTNAME_ARG`] or [`EXEC_ID_ARG`] are replaced
/// (whole arguments only: nothing is ever spliced into a string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecTemplate(Vec<String>);

/// A guest command template that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("must not be empty")]
    Empty,
    #[error("the program {0:?} must be an absolute path")]
    RelativeProgram(String),
    #[error("must contain the argument {0:?}")]
    Missing(&'static str),
}

impl ExecTemplate {
    pub fn new(argv: Vec<String>) -> Result<Self, TemplateError> {
        let program = argv.first().ok_or(TemplateError::Empty)?;
        if !program.starts_with('/') {
            return Err(TemplateError::RelativeProgram(program.clone()));
        }
        for needed in [SANDBOX_ID_ARG, HOSTNAME_ARG] {
            if !argv.iter().any(|a| a == needed) {
                return Err(TemplateError::Missing(needed));
            }
        }
        Ok(Self(argv))
    }

    /// The default for gVisor through containerd's runc v2 shim: runsc's
    /// state lives in the shim's `--root`, containerd's default
    /// `/run/containerd/runc/<namespace>` unless the runtime's `Root`
    /// option says otherwise.
    pub fn runsc(runsc: &str, root: &str) -> Self {
        Self(
            [
                runsc,
                "--root",
                root,
                "exec",
                "--cap",
                "CAP_SYS_ADMIN",
                SANDBOX_ID_ARG,
                "/pause",
                "--set-hostname",
                HOSTNAME_ARG,
            ]
            .map(str::to_owned)
            .to_vec(),
        )
    }

    /// The command for one sandbox.
    pub fn render(&self, sandbox_id: &str, hostname: &str, exec_id: &str) -> Vec<String> {
        self.0
            .iter()
            .map(|a| match a.as_str() {
                SANDBOX_ID_ARG => sandbox_id.to_owned(),
                HOSTNAME_ARG => hostname.to_owned(),
                EXEC_ID_ARG => exec_id.to_owned(),
                _ => a.clone(),
            })
            .collect()
    }

    pub fn argv(&self) -> &[String] {
        &self.0
    }
}

/// What a `guest-exec` fix-up does with a pod's sysctls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlPolicy {
    /// The runtime does not apply spec sysctls (runsc): nothing to do, a
    /// cold start would not apply them either.
    Ignore,
    /// The runtime applies them inside the guest at sandbox start (Kata):
    /// a slot cannot get them afterwards, so such a claim fails and the pod
    /// starts cold.
    Refuse,
}

/// Settings of one `guest-exec` mechanism.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestExecSettings {
    pub command: ExecTemplate,
    pub sysctls: SysctlPolicy,
    /// Where a sandbox's hostname channel is, if the runtime may give one;
    /// the command is the fallback.
    pub channel: Option<ChannelTemplate>,
}

/// [`Fixup`] for sandboxes whose pause is not a host process.
#[derive(Debug)]
pub struct GuestExecFixup {
    node: Arc<dyn NodeOps>,
    guest: Arc<dyn GuestOps>,
    containerd_root: PathBuf,
    settings: GuestExecSettings,
    deadline: Duration,
}

/// The longest wait for the pause's answer on the hostname channel before
/// falling back to the command (it answers in about a millisecond; the
/// command then still has the fix-up deadline).
const CHANNEL_DEADLINE: Duration = Duration::from_millis(500);

impl GuestExecFixup {
    pub fn new(
        node: Arc<dyn NodeOps>,
        guest: Arc<dyn GuestOps>,
        containerd_root: PathBuf,
        settings: GuestExecSettings,
        deadline: Duration,
    ) -> Self {
        Self {
            node,
            guest,
            containerd_root,
            settings,
            deadline,
        }
    }

    /// Sets `hostname` inside the sandbox: through its hostname channel
    /// when it has one, else (or when the channel fails) by the configured
    /// command.
    async fn set_hostname(&self, slot: &SlotFacts, hostname: &str) -> Result<(), FixupFailed> {
        if hostname.is_empty() {
            return Err(FixupFailed::NoHostname);
        }
        if self.set_hostname_by_channel(slot, hostname).await {
            return Ok(());
        }
        let run = async {
            let argv = self
                .settings
                .command
                .render(&slot.sandbox_id, hostname, &exec_id()?);
            self.guest.run(&argv, self.deadline).await
        };
        run.await.map_err(|source| FixupFailed::Guest {
            step: GuestStep::Hostname,
            source,
        })
    }

    /// `true` once the pause answered that it set `hostname`; any failure
    /// is logged (an absent channel at debug level: old slots and pauses
    /// have none) and left to the command.
    async fn set_hostname_by_channel(&self, slot: &SlotFacts, hostname: &str) -> bool {
        let Some(channel) = &self.settings.channel else {
            return false;
        };
        let dir = channel.render(&slot.sandbox_id);
        let deadline = CHANNEL_DEADLINE.min(self.deadline);
        match self.guest.channel_hostname(dir, hostname, deadline).await {
            Ok(()) => true,
            Err(e @ ChannelError::Absent(_)) => {
                tracing::debug!(sandbox = %slot.sandbox_id, "{e}; running the guest command");
                false
            }
            Err(e) => {
                tracing::warn!(
                    sandbox = %slot.sandbox_id,
                    "hostname channel: {e}; running the guest command instead"
                );
                false
            }
        }
    }

    fn plan(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<FixupPlan, FixupFailed> {
        super::plan(slot, &self.containerd_root, real)
    }

    /// `hostname` and `resolv.conf` in the sandbox's directory, exactly as
    /// for runc (no UTS step, no sysctls), on a blocking thread.
    async fn write_sandbox_files(&self, plan: &FixupPlan) -> Result<(), GuestError> {
        let node = Arc::clone(&self.node);
        let dir = plan.sandbox_root_dir().to_owned();
        let hostname = format!("{}\n", plan.hostname());
        let resolv = plan.resolv_conf().map(str::to_owned);
        asyncify(self.deadline, move || {
            node.write_file_in_place(&dir, "hostname", hostname.as_bytes())?;
            let contents = match resolv {
                Some(text) => text.into_bytes(),
                None => node.node_resolv_conf()?,
            };
            node.write_file_in_place(&dir, "resolv.conf", &contents)
        })
        .await??;
        Ok(())
    }
}

fn exec_id() -> Result<String, GuestError> {
    Ok(format!("fsb-hostname-{}", crate::random::hex(6)?))
}

#[tonic::async_trait]
impl Fixup for GuestExecFixup {
    fn check(&self, _upstream_handler: &str, real: &PodSandboxConfig) -> Result<(), FixupFailed> {
        super::plan::check_pod(real).map_err(FixupFailed::Plan)?;
        if real.hostname.is_empty() {
            // What the sentry or guest names itself without one is the
            // runtime's choice: do not guess, start cold.
            return Err(FixupFailed::NoHostname);
        }
        // Every sysctl the plan accepts lives in the pod's net, IPC or
        // UTS namespace.
        let has_sysctls = real.linux.as_ref().is_some_and(|l| !l.sysctls.is_empty());
        if has_sysctls && self.settings.sysctls == SysctlPolicy::Refuse {
            return Err(FixupFailed::SysctlsAtStartOnly);
        }
        Ok(())
    }

    async fn apply(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<(), FixupFailed> {
        // The claim asked this before it took the slot; recovery did not.
        self.check(&slot.upstream_handler, real)?;
        let plan = self.plan(slot, real)?;
        self.write_sandbox_files(&plan)
            .await
            .map_err(|source| FixupFailed::Guest {
                step: GuestStep::SandboxFiles,
                source,
            })
    }

    /// The hostname inside the sandbox is [`Fixup::settle`]'s: the command
    /// takes 20–50 ms (runsc's start-up and an exec in the sentry), and
    /// nothing can read the UTS hostname before the pod's first container.
    fn settles(&self, _slot: &SlotFacts) -> bool {
        true
    }

    async fn settle(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<(), FixupFailed> {
        let plan = self.plan(slot, real)?;
        self.set_hostname(slot, plan.hostname()).await?;
        tracing::debug!(sandbox = %slot.sandbox_id, "hostname set inside the sandbox");
        Ok(())
    }

    /// Sets the placeholder's own hostname (what it already is): a pause
    /// without `--set-hostname`, a wrong runsc root or a missing
    /// capability fails here, at refill, so pods start cold instead of
    /// failing their first container.
    async fn prepare(
        &self,
        slot: &SlotFacts,
        placeholder: &PodSandboxConfig,
    ) -> Result<(), FixupFailed> {
        self.set_hostname(slot, &placeholder.hostname).await
    }

    async fn complete(&self, slot: &SlotFacts, real: &PodSandboxConfig) -> Result<(), FixupFailed> {
        let plan = self.plan(slot, real)?;
        let cgroup = plan.cgroup().clone();
        let guest = Arc::clone(&self.guest);
        move_all(guest, cgroup, self.deadline)
            .await
            .map_err(|source| FixupFailed::Guest {
                step: GuestStep::MoveProcesses,
                source,
            })
    }

    async fn after_remove(&self, slot: &SlotFacts, real: &PodSandboxConfig) {
        setns::cleanup_claimed_cgroup(&self.node, self.deadline, slot, real).await;
    }

    async fn discard(&self, slot: &SlotFacts) {
        setns::remove_placeholder_parent(&self.node, self.deadline, slot).await;
    }
}

#[cfg(test)]
mod tests;
