//! Per-call deadlines: the caller's `grpc-timeout`, or a default per kind of call.
//!
//! The caller's deadline is taken when the request *arrives* (server.rs
//! records it before anything else runs), not when the handler starts.

use std::time::Duration;

use tokio::time::Instant;
use tonic::codegen::http;

use crate::error::DeadlineSource;

/// The header carrying the caller's timeout (gRPC over HTTP/2 spec).
pub(crate) const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Largest timeout we send upstream: tonic's encoder panics on absurd values,
/// and nothing useful lies beyond ~3 years.
const MAX_WIRE_TIMEOUT: Duration = Duration::from_secs(99_999_999);

/// How long the upstream may take when the caller did not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Budget {
    /// The configured default for unary calls (kubelet's runtime-request-timeout).
    Call,
    /// The configured default for `PullImage`.
    PullImage,
    /// The default for unary calls plus time the request itself asks for
    /// (`StopContainer`'s grace period, `ExecSync`'s timeout), as kubelet does.
    CallPlus(Duration),
    /// No shim-imposed limit: long-lived streams, and `ExecSync` without a
    /// timeout (kubelet sets none either, e.g. for lifecycle hooks).
    Unbounded,
}

/// Configured defaults for [`Budget`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) call: Duration,
    pub(crate) pull_image: Duration,
}

impl Timeouts {
    fn resolve(&self, budget: Budget) -> Option<Duration> {
        match budget {
            Budget::Call => Some(self.call),
            Budget::PullImage => Some(self.pull_image),
            Budget::CallPlus(extra) => self.call.checked_add(extra),
            Budget::Unbounded => None,
        }
    }
}

/// The deadline that applies to one forwarded call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    /// The whole allowance, for error messages.
    pub(crate) total: Duration,
    pub(crate) source: DeadlineSource,
}

impl Deadline {
    /// The caller's deadline if it gave one, else the default for `budget`
    /// counted from `now`. `None` when neither applies.
    pub(crate) fn choose(
        caller: Option<CallerDeadline>,
        budget: Budget,
        timeouts: &Timeouts,
        now: Instant,
    ) -> Option<Deadline> {
        if let Some(caller) = caller {
            return Some(Deadline {
                at: caller.at,
                total: caller.timeout,
                source: DeadlineSource::Caller,
            });
        }
        let total = timeouts.resolve(budget)?;
        let at = now.checked_add(total)?;
        Some(Deadline {
            at,
            total,
            source: DeadlineSource::ShimDefault,
        })
    }

    /// What to send upstream as its `grpc-timeout`; `None` if already expired.
    pub(crate) fn remaining(&self, now: Instant) -> Option<Duration> {
        let left = self.at.checked_duration_since(now)?;
        (!left.is_zero()).then_some(left.min(MAX_WIRE_TIMEOUT))
    }
}

/// The caller's deadline, stored in the request's extensions on arrival.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallerDeadline {
    pub(crate) at: Instant,
    pub(crate) timeout: Duration,
}

impl CallerDeadline {
    /// Parses `grpc-timeout`, counting from `now`. A missing, malformed or
    /// unrepresentable value means "no caller deadline" (tonic does the same).
    pub(crate) fn from_header(value: Option<&http::HeaderValue>, now: Instant) -> Option<Self> {
        let timeout = parse_grpc_timeout(value?.as_bytes())?;
        let at = now.checked_add(timeout)?;
        Some(CallerDeadline { at, timeout })
    }
}

/// `TimeoutValue TimeoutUnit`: at most 8 ASCII digits and one of `HMSmun`.
fn parse_grpc_timeout(raw: &[u8]) -> Option<Duration> {
    let (unit, digits) = raw.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = digits
        .iter()
        .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(value * 3600),
        b'M' => Duration::from_secs(value * 60),
        b'S' => Duration::from_secs(value),
        b'm' => Duration::from_millis(value),
        b'u' => Duration::from_micros(value),
        b'n' => Duration::from_nanos(value),
        _ => return None,
    })
}

/// `duration` as a `grpc-timeout` value: the finest unit whose value fits
/// in 8 digits (as gRPC libraries send it), rounded down.
pub(crate) fn encode_timeout(duration: Duration) -> http::HeaderValue {
    let nanos = duration.min(MAX_WIRE_TIMEOUT).as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let (value, unit) = units
        .iter()
        .map(|(per, unit)| (nanos / per, *unit))
        .find(|(value, _)| *value < 100_000_000)
        .unwrap_or((99_999_999, 'H'));
    http::HeaderValue::from_str(&format!("{value}{unit}"))
        .unwrap_or_else(|_| http::HeaderValue::from_static("99999999H"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_timeouts_parse_back_within_a_unit() {
        for d in [
            Duration::from_nanos(7),
            Duration::from_millis(250),
            Duration::from_secs(120),
            Duration::from_secs(30 * 60),
            Duration::from_secs(5 * 86_400),
        ] {
            let encoded = encode_timeout(d);
            let back = parse_grpc_timeout(encoded.as_bytes()).unwrap_or_default();
            assert!(
                back <= d && d - back < d / 1_000_000 + Duration::from_secs(1),
                "{d:?} -> {encoded:?}"
            );
        }
    }

    #[test]
    fn parses_every_unit() {
        let cases: &[(&[u8], Duration)] = &[
            (b"2H", Duration::from_secs(7200)),
            (b"3M", Duration::from_secs(180)),
            (b"120S", Duration::from_secs(120)),
            (b"250m", Duration::from_millis(250)),
            (b"99999999u", Duration::from_micros(99_999_999)),
            (b"7n", Duration::from_nanos(7)),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_grpc_timeout(raw), Some(*want), "{raw:?}");
        }
    }

    #[test]
    fn rejects_malformed() {
        for raw in [
            &b""[..],
            b"S",
            b"10",
            b"10x",
            b"123456789S",
            b"-1S",
            b"1.5S",
            b"\xffS",
        ] {
            assert_eq!(parse_grpc_timeout(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn largest_header_value_does_not_overflow() {
        let now = Instant::now();
        let v = http::HeaderValue::from_static("99999999H");
        let d = CallerDeadline::from_header(Some(&v), now).expect("representable");
        assert_eq!(d.timeout, Duration::from_secs(99_999_999 * 3600));
    }

    #[test]
    fn caller_deadline_wins_over_default() {
        let now = Instant::now();
        let timeouts = Timeouts {
            call: Duration::from_secs(120),
            pull_image: Duration::from_secs(1800),
        };
        let caller = CallerDeadline {
            at: now + Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        };
        let d = Deadline::choose(Some(caller), Budget::Call, &timeouts, now).expect("deadline");
        assert_eq!(d.source, DeadlineSource::Caller);
        assert_eq!(d.at, caller.at);

        let d = Deadline::choose(None, Budget::PullImage, &timeouts, now).expect("deadline");
        assert_eq!(d.source, DeadlineSource::ShimDefault);
        assert_eq!(d.total, Duration::from_secs(1800));

        let plus = Budget::CallPlus(Duration::from_secs(30));
        let d = Deadline::choose(None, plus, &timeouts, now).expect("deadline");
        assert_eq!(d.total, Duration::from_secs(150));

        assert!(Deadline::choose(None, Budget::Unbounded, &timeouts, now).is_none());
        let huge = Budget::CallPlus(Duration::MAX);
        assert!(Deadline::choose(None, huge, &timeouts, now).is_none());
    }

    #[test]
    fn remaining_is_capped_and_none_when_expired() {
        let now = Instant::now();
        let far = Deadline {
            at: now + Duration::from_secs(10 * MAX_WIRE_TIMEOUT.as_secs()),
            total: Duration::ZERO,
            source: DeadlineSource::Caller,
        };
        assert_eq!(far.remaining(now), Some(MAX_WIRE_TIMEOUT));
        let past = Deadline { at: now, ..far };
        assert_eq!(past.remaining(now), None);
    }
}
