//! The in-memory table of slots: what the manager knows about each one,
//! under one `std` mutex that is never held across an await.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Instant,
};

use fast_sandbox_shim::slots::ClaimedPod;
use tokio::sync::{watch, Notify};

use crate::fixup::SlotFacts;

#[derive(Debug)]
pub(super) enum Status {
    Free,
    Claiming,
    Claimed(Arc<ClaimedPod>),
}

#[derive(Debug)]
pub(super) struct Slot {
    pub(super) pool: usize,
    pub(super) facts: SlotFacts,
    pub(super) status: Status,
    /// The deferred part of a claim's fix-up, while it may still run.
    pub(super) completion: Option<Completion>,
    /// Where the claim's `Fixup::settle` stands; `None`: nothing to wait
    /// for (an unclaimed slot, or a mechanism without that step).
    pub(super) identity: Option<watch::Receiver<Identity>>,
}

impl Slot {
    /// A slot with nothing deferred.
    pub(super) fn new(pool: usize, facts: SlotFacts, status: Status) -> Self {
        Self {
            pool,
            facts,
            status,
            completion: None,
            identity: None,
        }
    }
}

/// The state of a claimed slot's `Fixup::settle` step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Identity {
    Pending,
    Settled,
    /// Failed twice: no container may be created in the sandbox.
    Failed(String),
}

/// A scheduled `Fixup::complete`: cancellable while it waits.
#[derive(Debug)]
pub(super) struct Completion {
    pub(super) cancel: Arc<Notify>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
pub(super) struct Table {
    pub(super) slots: HashMap<String, Slot>,
    /// Free slot ids per pool index, oldest first.
    pub(super) free: Vec<VecDeque<String>>,
    /// Desired free slots per pool index.
    pub(super) desired: Vec<usize>,
    /// Per pool index: no refill before this instant (set by claims).
    pub(super) hold_until: Vec<Option<Instant>>,
}

impl Table {
    /// Empty, for pools of these desired sizes.
    pub(super) fn new(sizes: impl Iterator<Item = usize>) -> Self {
        let desired: Vec<usize> = sizes.collect();
        Self {
            slots: HashMap::new(),
            free: vec![VecDeque::new(); desired.len()],
            hold_until: vec![None; desired.len()],
            desired,
        }
    }

    /// Claimed slots of pool `i`.
    pub(super) fn claimed(&self, i: usize) -> usize {
        self.slots
            .values()
            .filter(|sl| sl.pool == i && matches!(sl.status, Status::Claimed(_)))
            .count()
    }

    /// Adds a free slot at the back of pool `i`'s queue.
    pub(super) fn add_free(&mut self, i: usize, facts: SlotFacts) {
        let id = facts.sandbox_id.clone();
        self.slots
            .insert(id.clone(), Slot::new(i, facts, Status::Free));
        self.free[i].push_back(id);
    }

    /// Removes slot `id` if it is free (a health check failed).
    pub(super) fn remove_free(&mut self, id: &str) -> Option<SlotFacts> {
        if !matches!(self.slots.get(id).map(|s| &s.status), Some(Status::Free)) {
            return None;
        }
        for q in &mut self.free {
            q.retain(|x| x != id);
        }
        self.slots.remove(id).map(|s| s.facts)
    }
}

/// Counters for metrics and the CLI.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PoolStats {
    pub name: String,
    pub exposed_handler: String,
    pub upstream_handler: String,
    pub desired: usize,
    pub free: usize,
    pub claimed: usize,
    /// Cold starts of this pool's exposed handler, by reason (`no_pool`,
    /// `pool_empty`, `host_network`, ...): per handler, so pools sharing a
    /// handler show the same counts.
    pub misses: std::collections::BTreeMap<String, u64>,
}

/// One claimed slot, for the CLI.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClaimInfo {
    pub sandbox_id: String,
    pub pool: String,
    pub exposed_handler: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub claimed_at_ns: i64,
}
