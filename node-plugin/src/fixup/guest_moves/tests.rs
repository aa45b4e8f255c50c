//! The move rounds against a scripted [`RecordingGuestOps`], on paused
//! time: backoffs advance the clock without real sleeps.

use super::*;
use crate::fixup::{
    guest_ops::{GuestCall, RecordingGuestOps},
    plan::SandboxId,
};

const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const DEADLINE: Duration = Duration::from_secs(5);

fn cgroup() -> CgroupMove {
    let id = SandboxId::parse(ID).expect("id");
    CgroupMove::new(&id, "/fast-sandbox-slots/u1", "/kubepods/pod1").expect("move")
}

/// The pids moved, in order.
fn moves(guest: &RecordingGuestOps) -> Vec<i32> {
    guest
        .calls()
        .into_iter()
        .filter_map(|call| match call {
            GuestCall::Move { pid, .. } => Some(pid),
            _ => None,
        })
        .collect()
}

async fn run(guest: &Arc<RecordingGuestOps>) -> (Result<(), GuestError>, Duration) {
    let started = Instant::now();
    let ops: Arc<dyn GuestOps> = Arc::clone(guest) as _;
    let result = move_all(ops, cgroup(), DEADLINE).await;
    (result, started.elapsed())
}

#[tokio::test(start_paused = true)]
async fn a_zombie_or_a_gone_pid_is_not_left_behind() {
    // The sentry moves; an exited child (zombie 66) and a pid reaped after
    // the listing (77) stay listed longer than the move has rounds.
    let mut script = vec![vec![10, 66, 77]];
    script.extend(vec![vec![66, 77]; MOVE_ROUNDS + 2]);
    let guest = Arc::new(
        RecordingGuestOps::with_procs(script)
            .with_state(66, Some('Z'))
            .with_state(77, None),
    );
    let (result, elapsed) = run(&guest).await;
    result.expect("only dead pids are left");
    assert_eq!(moves(&guest), vec![10], "a dead pid is never moved");
    assert_eq!(elapsed, Duration::ZERO, "nothing to wait for");
}

#[tokio::test(start_paused = true)]
async fn a_process_in_its_exit_listed_through_every_round_is_not_left_behind() {
    // What the dev node showed: a killed process stays listed, state R
    // with PF_EXITING, for ~300 ms while every move of it "succeeds".
    let guest = Arc::new(
        RecordingGuestOps::with_procs(vec![vec![10, 42]; 100])
            .with_state(42, Some('R'))
            .with_exiting(42),
    );
    let (result, elapsed) = run(&guest).await;
    // 10 is listed again after its moves: bounded rounds, then the error
    // names it and not the exiting 42.
    let err = result.expect_err("10 never leaves");
    assert!(
        err.to_string().contains("[10 (fake) state S parent 1]"),
        "{err}"
    );
    assert!(!moves(&guest).contains(&42), "an exiting pid is not moved");
    assert!(elapsed <= MOVE_BUDGET, "{elapsed:?}");

    let guest = Arc::new(
        RecordingGuestOps::with_procs(vec![vec![42]; 100])
            .with_state(42, Some('R'))
            .with_exiting(42),
    );
    let (result, elapsed) = run(&guest).await;
    result.expect("only an exiting process is listed");
    assert_eq!(moves(&guest), Vec::<i32>::new());
    assert_eq!(elapsed, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_live_process_still_listed_is_waited_for_with_a_backoff() {
    // Listed six times after "successful" moves, its exit not yet flagged,
    // then gone: more than the five rounds old code had.
    let guest = Arc::new(RecordingGuestOps::with_procs(vec![vec![7]; 6]));
    let (result, elapsed) = run(&guest).await;
    result.expect("the leaf empties once the exit ends");
    assert_eq!(moves(&guest), vec![7; 6]);
    // Rounds 2..=6 each waited first: 1 + 2 + 4 + 8 + 16 ms.
    assert_eq!(elapsed, Duration::from_millis(31));
}

#[tokio::test(start_paused = true)]
async fn a_child_forked_during_the_move_is_caught_by_the_next_round_at_once() {
    let guest = Arc::new(RecordingGuestOps::with_procs(vec![
        vec![10, 11],
        vec![12],
        vec![13],
    ]));
    let (result, elapsed) = run(&guest).await;
    result.expect("every new pid moved");
    assert_eq!(moves(&guest), vec![10, 11, 12, 13]);
    assert_eq!(elapsed, Duration::ZERO, "new pids are no reason to wait");
}

#[tokio::test(start_paused = true)]
async fn a_process_that_never_leaves_fails_within_the_bounds_naming_it() {
    let guest =
        Arc::new(RecordingGuestOps::with_procs(vec![vec![7]; 100]).with_state(7, Some('D')));
    let (result, elapsed) = run(&guest).await;
    let err = result.expect_err("never empties");
    let GuestError::LeafNotEmpty {
        rounds, ref left, ..
    } = err
    else {
        panic!("{err}");
    };
    assert!(rounds <= MOVE_ROUNDS, "{rounds} rounds");
    assert_eq!(moves(&guest).len(), rounds);
    assert!(elapsed <= MOVE_BUDGET, "{elapsed:?}");
    assert_eq!(
        left,
        &vec![ProcFacts {
            pid: 7,
            state: 'D',
            comm: "fake".to_owned(),
            ppid: 1,
            exiting: false,
        }]
    );
    assert!(
        err.to_string().contains("[7 (fake) state D parent 1]"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_noop_move_lists_nothing() {
    let guest = Arc::new(RecordingGuestOps::with_procs(vec![vec![7]]));
    let id = SandboxId::parse(ID).expect("id");
    let same = CgroupMove::new(&id, "/kubepods/pod1", "/kubepods/pod1").expect("move");
    let ops: Arc<dyn GuestOps> = Arc::clone(&guest) as _;
    move_all(ops, same, DEADLINE).await.expect("noop");
    assert!(guest.calls().is_empty());
}
