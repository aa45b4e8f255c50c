//! The steps of the `setns` fix-up (runc, crun: the pause is a host
//! process), run in order through a [`NodeOps`]. The claim-time contract
//! is in the parent module; the state involved is listed in
//! `docs/containerd-1.6-sandbox-state.md`.//!
//! [`FixupPlan::from_config`] validates the real config once and decides
//! everything; [`apply`] executes the plan through a [`NodeOps`] on a
//! blocking thread with a deadline, step by step:
//!
//! 1. `hostname` in the sandbox's root dir: `<hostname>\n` (the node's
//!    hostname when the pod's is empty), rewritten in place;
//! 2. `resolv.conf` there: the pod's `dns_config` rendered like containerd
//!    ([`super::render_resolv_conf`]) or a copy of the node's, in place, so the
//!    pause's existing bind mount (same inode) sees it too;
//! 3. the UTS hostname, from a thread that `setns`'d into the pause's UTS
//!    namespace;
//! 4. the pod's sysctls, from a thread in the pause's net, IPC or UTS
//!    namespace (`/proc/sys` resolves against the namespaces of the task
//!    that looks the file up, so a `setns`'d thread is enough; the root test
//!    reads the values back from inside a container);
//! 5. the pause moves from `<placeholder parent>/<id>` to
//!    `<pod cgroup_parent>/<id>` in every hierarchy (cgroup v1, v2, hybrid),
//!    with what runc had set on its leaf (`cpu.shares` 2, the device list,
//!    cpuset);
//! 6. the placeholder leaf, now empty, is removed.
//!
//! A failed step leaves the earlier ones done ([`ApplyError::completed`]):
//! such a slot is half-changed and must be destroyed, never served or put
//! back; the claim takes the cold path.
//!
//! # Cgroups after a move (measured: containerd 1.6.20, runc 1.1.5, crun 1.8.1, v1 hybrid)
//!
//! runc placed the pause at `<placeholder parent>/<id>` in all ten v1
//! hierarchies *and* the unified v2 one (hybrid mode); crun does the same.
//! runc's `state.json` keeps those placeholder paths (`cgroup_paths`,
//! `config.cgroups.path`) after the move. At `StopPodSandbox`, `runc delete`
//! / `crun delete` remove the recorded paths (gone already after step 6: no
//! error; without step 6 they remove the old leaf themselves) and nothing
//! touches the new leaf: **`<pod cgroup_parent>/<id>` stays behind, empty,
//! in all eleven hierarchies**, after `RemovePodSandbox` too. The app
//! containers' cgroups come from the `CreateContainer` request and are
//! removed normally. So the pool manager must call [`cleanup_after_remove`]
//! once the sandbox is stopped (after `StopPodSandbox` or
//! `RemovePodSandbox`, also for a claimed slot found at restart): it
//! removes the new leaf, and the placeholder leaf in case a claim failed
//! between the move and step 6. (Kubelet removes a pod's cgroup
//! recursively when the pod goes away — runc's `RemovePath`, which kubelet
//! vendors — so a leaf left by a crash goes with the pod; without the
//! cleanup a pod whose sandbox is recreated would collect one per
//! sandbox.) `fixup_root.rs` asserts both the leftover and the cleanup.
//!
//! The placeholder *parent* is the pool manager's: shared by its slots,
//! created by runc on the first slot, never removed here.
//!
//! Left as they were, not observable by the pod: memory already charged to
//! the pause stays with the placeholder parent (v1 does not move charges;
//! a few pages); the shim's OOM eventfd for the pause watches the old
//! memory cgroup (no `TaskOOM` appeared in containerd's log after the old
//! leaf was removed).
//!
//! On a pure cgroup v2 host the move copies `cpu.weight` but not runc's
//! eBPF device filter (see `copy_settings` in `cgroup/src/host.rs`):
//! **unverified**, no v2 host here.
//!
//! Systemd-style parents (`….slice`) are converted as runc's systemd driver
//! would place the pause (`/kubepods.slice/…/cri-containerd-<id>.scope`) and
//! moved with cgroupfs writes. On a host where systemd manages those slices
//! this should go through systemd instead (a transient scope with the pause
//! pid, as runc does): **unverified**, there is no systemd on these
//! machines.
//!
//! # Cost (release build, 2 vCPUs, 30 claims one at a time, runc and crun)
//!
//! `apply` took 2.1-2.3 ms p50 (p90 2.7-9 ms) with other builds keeping the
//! load average near 3, and 5-15 ms p50 near 4.5. Nearly all of the spread
//! is the cgroup move (1.3 ms p50 at load 3, 1.7-11.7 ms at 4.5): the first
//! write to a `cgroup.procs` waits for an RCU grace period (the kernel's
//! `cgroup_threadgroup_rwsem`; strace showed 16 ms for the first write and
//! ~15 µs for each of the other ten), which grows with load; runc takes the
//! same lock whenever it starts a container. The rest is steady: removing
//! the placeholder leaf 0.35-0.4 ms (eleven `rmdir`s; could be left to
//! `runc delete`, which removes it too), each namespace step 0.1-0.2 ms (a
//! thread each, with 2-4 ms outliers from scheduling under load), the two
//! files 0.03-0.15 ms. The files are not fsync'd (containerd does not
//! either; it cost 0.15-0.6 ms per file).
//!
//! # Requirements
//!
//! Root; the host's `/proc`, `/sys/fs/cgroup` (hierarchies mounted at their
//! roots) and cgroup namespace; the host UTS namespace (the node hostname
//! is read from this process); the node's `resolv.conf` (see
//! [`super::RealOps::with_node_resolv_conf`]). The placeholder config must set no
//! sysctls and must not use host namespaces.

use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::{
    kernel::Namespace,
    ops::NodeOps,
    plan::{CgroupMove, FixupPlan},
    FixupError,
};

/// The sandbox files a fix-up rewrites, in the sandbox's root directory.
const HOSTNAME_FILE: &str = "hostname";
const RESOLV_CONF_FILE: &str = "resolv.conf";

/// One step of [`apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    HostnameFile,
    ResolvConf,
    UtsHostname,
    Sysctls(Namespace),
    MoveCgroup,
    RemovePlaceholderCgroup,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HostnameFile => f.write_str("hostname file"),
            Self::ResolvConf => f.write_str("resolv.conf"),
            Self::UtsHostname => f.write_str("UTS hostname"),
            Self::Sysctls(ns) => write!(f, "{ns} sysctls"),
            Self::MoveCgroup => f.write_str("cgroup move"),
            Self::RemovePlaceholderCgroup => f.write_str("placeholder cgroup removal"),
        }
    }
}

/// A completed step and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepTiming {
    pub step: Step,
    pub elapsed: Duration,
}

/// What [`apply`] did.
#[derive(Debug, Clone)]
pub struct FixupReport {
    pub sandbox_id: String,
    /// In the order they ran.
    pub steps: Vec<StepTiming>,
    /// From the call to the result, including the wait for a blocking
    /// thread.
    pub total: Duration,
}

/// [`apply`] failed: `step` did not complete, the `completed` ones did.
#[derive(Debug, thiserror::Error)]
#[error(
    "fix-up of sandbox {sandbox_id} failed at {} after {} completed step(s)",
    step.map_or_else(|| "start".to_owned(), |s| s.to_string()),
    completed.len()
)]
pub struct ApplyError {
    pub sandbox_id: String,
    /// `None` when the deadline passed before the first step started.
    pub step: Option<Step>,
    pub completed: Vec<StepTiming>,
    #[source]
    pub source: FixupError,
}

#[derive(Debug, Default)]
struct Progress {
    current: Option<Step>,
    completed: Vec<StepTiming>,
}

type SharedProgress = Arc<Mutex<Progress>>;

fn lock(p: &SharedProgress) -> std::sync::MutexGuard<'_, Progress> {
    p.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which steps of a plan to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Everything the pod can observe from inside: the sandbox files, the
    /// UTS hostname and the sysctls. Must complete before the claim is
    /// answered (before the first `CreateContainer`).
    Identity,
    /// The pause's cgroup: accounting only, nothing in the pod depends on
    /// it, and its first `cgroup.procs` write waits for an RCU grace period
    /// (~1–17 ms here), so the pool runs it right after answering.
    Cgroup,
    /// Both, in order.
    All,
}

/// Applies all of `plan` on a blocking thread and waits at most `deadline`.
///
/// On timeout the blocking thread cannot be stopped and may still finish
/// the step it is in: the slot must be destroyed, as after any failure.
pub async fn apply(
    ops: Arc<dyn NodeOps>,
    plan: FixupPlan,
    deadline: Duration,
) -> Result<FixupReport, ApplyError> {
    apply_phase(ops, plan, Phase::All, deadline).await
}

/// Applies the steps of `phase` of `plan`, like [`apply`].
pub async fn apply_phase(
    ops: Arc<dyn NodeOps>,
    plan: FixupPlan,
    phase: Phase,
    deadline: Duration,
) -> Result<FixupReport, ApplyError> {
    let start = Instant::now();
    let sandbox_id = plan.sandbox_id().to_string();
    let progress = SharedProgress::default();
    let span = tracing::debug_span!("fixup", sandbox_id = %sandbox_id, pid = plan.pause_pid());
    let task = {
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || span.in_scope(|| run(&*ops, &plan, phase, &progress)))
    };
    let source = match tokio::time::timeout(deadline, task).await {
        Ok(Ok(Ok(()))) => {
            let steps = std::mem::take(&mut lock(&progress).completed);
            return Ok(FixupReport {
                sandbox_id,
                steps,
                total: start.elapsed(),
            });
        }
        Ok(Ok(Err(e))) => e,
        Ok(Err(_join)) => FixupError::Panicked {
            sandbox_id: sandbox_id.clone(),
        },
        Err(_elapsed) => FixupError::Timeout {
            sandbox_id: sandbox_id.clone(),
            deadline,
        },
    };
    let p = lock(&progress);
    Err(ApplyError {
        sandbox_id,
        step: p.current,
        completed: p.completed.clone(),
        source,
    })
}

/// Runs the steps of `phase` of `plan` in order on the calling thread.
fn run(
    ops: &dyn NodeOps,
    plan: &FixupPlan,
    phase: Phase,
    progress: &SharedProgress,
) -> Result<(), FixupError> {
    if phase != Phase::Cgroup {
        run_identity(ops, plan, progress)?;
    }
    if phase != Phase::Identity {
        run_cgroup(plan, ops, progress)?;
    }
    Ok(())
}

fn run_identity(
    ops: &dyn NodeOps,
    plan: &FixupPlan,
    progress: &SharedProgress,
) -> Result<(), FixupError> {
    let pid = plan.pause_pid();
    let dir = plan.sandbox_root_dir();
    let mut hostname = plan.hostname().to_owned();

    step(progress, Step::HostnameFile, || {
        if hostname.is_empty() {
            hostname = ops.node_hostname()?;
        }
        ops.write_file_in_place(dir, HOSTNAME_FILE, format!("{hostname}\n").as_bytes())
    })?;
    step(progress, Step::ResolvConf, || {
        let contents = match plan.resolv_conf() {
            Some(text) => text.as_bytes().to_vec(),
            None => ops.node_resolv_conf()?,
        };
        ops.write_file_in_place(dir, RESOLV_CONF_FILE, &contents)
    })?;
    step(progress, Step::UtsHostname, || {
        ops.set_hostname_in_uts_ns(pid, &hostname)
    })?;
    for ns in [Namespace::Net, Namespace::Ipc, Namespace::Uts] {
        let sysctls = plan.sysctls_in(ns);
        if !sysctls.is_empty() {
            step(progress, Step::Sysctls(ns), || {
                ops.write_sysctls_in_ns(pid, ns, sysctls)
            })?;
        }
    }
    Ok(())
}

fn run_cgroup(
    plan: &FixupPlan,
    ops: &dyn NodeOps,
    progress: &SharedProgress,
) -> Result<(), FixupError> {
    let pid = plan.pause_pid();
    let cgroup = plan.cgroup();
    if !cgroup.is_noop() {
        step(progress, Step::MoveCgroup, || {
            ops.move_to_cgroup(pid, &cgroup.from, &cgroup.to)
        })?;
        step(progress, Step::RemovePlaceholderCgroup, || {
            ops.remove_cgroup(&cgroup.from)
        })?;
    }
    Ok(())
}

fn step(
    progress: &SharedProgress,
    step: Step,
    f: impl FnOnce() -> Result<(), FixupError>,
) -> Result<(), FixupError> {
    lock(progress).current = Some(step);
    let start = Instant::now();
    f()?;
    let elapsed = start.elapsed();
    tracing::debug!(%step, ?elapsed, "fix-up step done");
    let mut p = lock(progress);
    p.completed.push(StepTiming { step, elapsed });
    p.current = None;
    Ok(())
}

/// Removes what a claim's cgroup move leaves behind once the sandbox's pause
/// has exited: the leaf in the pod's parent (runc never learns about it)
/// and, in case the claim failed half-way, the placeholder leaf. Call it
/// after `StopPodSandbox` or `RemovePodSandbox` of a claimed slot. Missing
/// leaves are fine; a leaf that still has a process is an error.
pub async fn cleanup_after_remove(
    ops: Arc<dyn NodeOps>,
    cgroup: CgroupMove,
    deadline: Duration,
) -> Result<(), FixupError> {
    let sandbox_id = cgroup.sandbox_id.to_string();
    let task = tokio::task::spawn_blocking(move || {
        ops.remove_cgroup(&cgroup.to)?;
        if !cgroup.is_noop() {
            ops.remove_cgroup(&cgroup.from)?;
        }
        Ok(())
    });
    match tokio::time::timeout(deadline, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(_join)) => Err(FixupError::Panicked { sandbox_id }),
        Err(_elapsed) => Err(FixupError::Timeout {
            sandbox_id,
            deadline,
        }),
    }
}

#[cfg(test)]
mod tests;
