//! Blocking work (file, cgroup and namespace syscalls) kept off the async
//! threads: run on tokio's blocking pool with a deadline, like containerd
//! rust-extensions' `asyncify`. A leaf module.

use std::time::Duration;

/// Blocking work that did not give a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlockingError {
    /// The thread may still be running: whatever it changes must be
    /// treated as unknown.
    #[error("did not finish within {0:?}")]
    Timeout(Duration),
    #[error("panicked")]
    Panicked,
}

/// Runs `f` on a blocking thread and waits at most `deadline` for it.
pub async fn asyncify<T, F>(deadline: Duration, f: F) -> Result<T, BlockingError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match tokio::time::timeout(deadline, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_join)) => Err(BlockingError::Panicked),
        Err(_elapsed) => Err(BlockingError::Timeout(deadline)),
    }
}

/// Runs blocking `f` from synchronous code called on an async thread (a
/// trait method that cannot be async), without stalling the runtime's
/// other tasks: on a multi-thread runtime the calling worker hands its
/// tasks to another thread (`block_in_place`) and waits at most `deadline`
/// for `f` on the blocking pool. Outside a runtime, or on a current-thread
/// runtime (which has no other thread to hand its tasks to: tests), `f`
/// runs inline.
pub fn wait_in_place<T, F>(deadline: Duration, f: F) -> Result<T, BlockingError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(asyncify(deadline, f)))
        }
        _ => Ok(f()),
    }
}

/// `error` and its sources, each once: `a: b: c`.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slow_call_times_out_and_a_panic_is_reported() {
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let slow = asyncify(Duration::from_millis(10), move || hold.recv().is_ok()).await;
        assert_eq!(slow, Err(BlockingError::Timeout(Duration::from_millis(10))));
        drop(release);
        let panicked = asyncify(Duration::from_secs(5), || -> u8 { panic!("boom") }).await;
        assert_eq!(panicked, Err(BlockingError::Panicked));
        assert_eq!(asyncify(Duration::from_secs(5), || 7).await, Ok(7));
    }

    #[test]
    fn a_chain_names_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }
}
