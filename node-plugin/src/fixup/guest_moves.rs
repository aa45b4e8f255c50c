//! The deferred move of a claimed gVisor/Kata sandbox's host processes
//! from the placeholder leaf to the pod's cgroup, in rounds: each round
//! lists the leaf and moves every live process in it.
//!
//! What a round can meet besides a live process:
//! - a process in its exit (`PF_EXITING`): the kernel skips it silently
//!   when its pid is written (the write "succeeds") and lists it in the
//!   leaf until the exit ends. Measured on the dev node's cgroup v2 mount:
//!   a 3 GiB process killed with SIGKILL stayed listed, state `R`, for
//!   280-310 ms while about 3,700 moves of it all "succeeded" (this is what
//!   five back-to-back rounds met). It is going away with its memory:
//!   skipped, as are a zombie (listed briefly at the end of an exit) and a
//!   pid gone since the listing;
//! - a process that forked while the previous round moved it: its child
//!   shows in the next listing, which follows at once;
//! - a live pid listed again after its move (a race the flags did not
//!   show yet): the round first waits a short, doubling backoff.
//!
//! Rounds are bounded in count ([`MOVE_ROUNDS`]) and time
//! ([`MOVE_BUDGET`]); the error names, for each live process still listed,
//! its state, name and parent, read when the move gave up.

use std::{collections::HashSet, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{
    guest_ops::{GuestError, GuestOps, ProcFacts},
    plan::CgroupMove,
};
use crate::blocking::asyncify;

/// The most rounds of list-and-move before the move gives up.
pub(super) const MOVE_ROUNDS: usize = 8;

/// The longest the rounds may take, backoffs included.
pub(super) const MOVE_BUDGET: Duration = Duration::from_millis(250);

/// The wait before a round that sees a pid moved before; it doubles
/// (1, 2, 4, ... 64 ms: 127 ms over [`MOVE_ROUNDS`]).
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(1);

/// Moves every live process of `cgroup.from` to `cgroup.to`, each blocking
/// step within `deadline`. The emptied placeholder leaf is kept until the
/// sandbox is removed ([`super::Fixup::after_remove`]): runsc records it as
/// the sandbox's cgroup and `runsc start` of every later container joins it
/// to spawn that container's gofer (which the adapter then moves to the
/// container's cgroup); with the leaf gone, `runsc start` fails.
pub(super) async fn move_all(
    guest: Arc<dyn GuestOps>,
    cgroup: CgroupMove,
    deadline: Duration,
) -> Result<(), GuestError> {
    if cgroup.is_noop() {
        return Ok(());
    }
    let started = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut moved = HashSet::new();
    let mut rounds = 0;
    while rounds < MOVE_ROUNDS {
        let live = live_in_leaf(&guest, &cgroup, deadline).await?;
        if live.is_empty() {
            return Ok(());
        }
        if live.iter().any(|p| moved.contains(&p.pid)) {
            if started.elapsed() + backoff > MOVE_BUDGET {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
        let pids: Vec<i32> = live.iter().map(|p| p.pid).collect();
        moved.extend(pids.iter().copied());
        rounds += 1;
        move_each(&guest, &cgroup, pids, deadline).await?;
    }
    let left = live_in_leaf(&guest, &cgroup, deadline).await?;
    if left.is_empty() {
        return Ok(());
    }
    Err(GuestError::LeafNotEmpty {
        leaf: cgroup.from.as_str().to_owned(),
        rounds,
        elapsed: started.elapsed(),
        left,
    })
}

/// The live processes listed in the leaf, with their facts (exiting and
/// zombie processes, and pids gone since the listing, left out).
async fn live_in_leaf(
    guest: &Arc<dyn GuestOps>,
    cgroup: &CgroupMove,
    deadline: Duration,
) -> Result<Vec<ProcFacts>, GuestError> {
    let guest = Arc::clone(guest);
    let leaf = cgroup.from.clone();
    asyncify(deadline, move || {
        let pids = guest.cgroup_procs(&leaf)?;
        let (leaving, live): (Vec<ProcFacts>, Vec<ProcFacts>) = pids
            .into_iter()
            .filter_map(|pid| guest.process(pid))
            .partition(ProcFacts::is_leaving);
        if !leaving.is_empty() {
            tracing::debug!(%leaf, "not moved, leaving: {}", ProcFacts::list(&leaving));
        }
        Ok(live)
    })
    .await?
}

async fn move_each(
    guest: &Arc<dyn GuestOps>,
    cgroup: &CgroupMove,
    pids: Vec<i32>,
    deadline: Duration,
) -> Result<(), GuestError> {
    let guest = Arc::clone(guest);
    let (from, to) = (cgroup.from.clone(), cgroup.to.clone());
    asyncify(deadline, move || {
        pids.into_iter()
            .try_for_each(|pid| guest.move_process(pid, &from, &to))
    })
    .await?
}

#[cfg(test)]
mod tests;
