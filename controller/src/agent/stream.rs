//! One task per node keeps its agent's status stream open: reconnects
//! with exponential backoff and jitter, re-reads a refused token.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use fast_sandbox_proto::nodeagent::{node_agent_client::NodeAgentClient, WatchNodeStatusRequest};
use tonic::transport::Channel;

use super::state::{millis, AgentError, Inner, MAX_MESSAGE_BYTES};
use crate::synth::Rng;

/// Exponential backoff with jitter: each delay is drawn from the upper half
/// of `initial × 2ⁿ`, capped at `max`.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    rng: Rng,
}

impl Backoff {
    fn new(initial: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
            rng: Rng::new(seed),
        }
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }

    fn delay(&mut self) -> Duration {
        let base = self.next.min(self.max);
        self.next = base.saturating_mul(2).min(self.max);
        base.mul_f64(0.5 + 0.5 * self.rng.unit())
    }
}

/// Keeps `node`'s status stream open until the task is aborted.
pub(super) async fn follow(inner: Arc<Inner>, node: String, epoch: u64, channel: Channel) {
    let config = &inner.config;
    let seed = inner.seeds.hash_one((&node, epoch));
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max, seed);
    loop {
        let (delivered, error) = watch_once(&inner, &node, epoch, channel.clone()).await;
        if delivered {
            backoff.reset();
        }
        let refused = matches!(error, AgentError::Unauthenticated { .. });
        inner.disconnected(&node, epoch, error);
        if refused {
            inner.reload_token();
        }
        tokio::time::sleep(backoff.delay()).await;
    }
}

/// One status stream: whether it delivered a report, and why it ended.
async fn watch_once(inner: &Inner, node: &str, epoch: u64, channel: Channel) -> (bool, AgentError) {
    let mut client = NodeAgentClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let request = inner.request(WatchNodeStatusRequest {});
    let timeout = inner.config.call_timeout;
    let mut stream = match tokio::time::timeout(timeout, client.watch_node_status(request)).await {
        Err(_) => {
            return (
                false,
                AgentError::Timeout {
                    timeout_ms: millis(timeout),
                },
            )
        }
        Ok(Err(status)) => return (false, AgentError::from_status(&status)),
        Ok(Ok(response)) => response.into_inner(),
    };
    let mut delivered = false;
    loop {
        match stream.message().await {
            Ok(Some(status)) => {
                if let Err(error) = inner.report(node, epoch, &status) {
                    return (delivered, error);
                }
                delivered = true;
            }
            Ok(None) => return (delivered, AgentError::StreamEnded),
            Err(status) => return (delivered, AgentError::from_status(&status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_bounded() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 7);
        let delays: Vec<Duration> = (0..8).map(|_| b.delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = Duration::from_millis(100 * (1 << i.min(10))).min(Duration::from_secs(1));
            assert!(*d >= base / 2 && *d <= base, "delay {i}: {d:?} vs {base:?}");
        }
        b.reset();
        assert!(b.delay() <= Duration::from_millis(100));
    }
}
