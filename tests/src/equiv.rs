//! Transcripts of CRI calls, normalized so two runs of the same pod spec
//! (direct to containerd, and through the shim) can be compared exactly:
//! ids, timestamps, IPs and usage counters differ between any two runs and
//! are masked; everything else must be equal.

use serde::Serialize;
use serde_json::Value;

/// Keys whose values are wall-clock times.
const TIME_KEYS: &[&str] = &["created_at", "started_at", "finished_at", "timestamp"];

/// Keys of usage counters in stats responses, which differ run to run.
const USAGE_KEYS: &[&str] = &["value"];

/// One recorded call: its name and a normalizable outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub call: String,
    pub outcome: Value,
}

/// The ordered record of a call sequence.
#[derive(Debug, Default)]
pub struct Transcript {
    entries: Vec<Entry>,
    aliases: Vec<(String, String)>,
}

impl Transcript {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the outcome of `call`: the response message as JSON, or the
    /// status code and message.
    pub fn record<T: Serialize>(
        &mut self,
        call: &str,
        result: &Result<tonic::Response<T>, tonic::Status>,
    ) {
        let outcome = match result {
            Ok(resp) => serde_json::json!({ "ok": to_json(resp.get_ref()) }),
            Err(status) => serde_json::json!({
                "code": format!("{:?}", status.code()),
                "message": status.message(),
            }),
        };
        self.entries.push(Entry {
            call: call.to_owned(),
            outcome,
        });
    }

    /// Records an observation that is not a CRI answer (something seen from
    /// the host or inside the pod).
    pub fn note(&mut self, what: &str, value: impl Into<Value>) {
        self.entries.push(Entry {
            call: what.to_owned(),
            outcome: serde_json::json!({ "observed": value.into() }),
        });
    }

    /// Replaces every occurrence of `value` (an id, an IP) by `<name>` when
    /// normalizing.
    pub fn alias(&mut self, value: &str, name: &str) {
        if !value.is_empty() {
            self.aliases.push((value.to_owned(), format!("<{name}>")));
        }
    }

    /// The transcript with volatile values masked.
    pub fn normalized(&self) -> Vec<Entry> {
        self.entries
            .iter()
            .map(|e| {
                let mut v = e.outcome.clone();
                normalize(&mut v, &self.aliases, e.call.contains("Stats"));
                Entry {
                    call: e.call.clone(),
                    outcome: v,
                }
            })
            .collect()
    }

    /// Asserts two transcripts are equal after normalization, naming the
    /// first call that differs.
    ///
    /// # Panics
    /// When they differ.
    pub fn assert_equivalent(&self, other: &Transcript, left: &str, right: &str) {
        let (a, b) = (self.normalized(), other.normalized());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.call, y.call, "call sequences diverge");
            assert!(
                x.outcome == y.outcome,
                "{} differs:\n--- {left}\n{}\n--- {right}\n{}",
                x.call,
                pretty(&x.outcome),
                pretty(&y.outcome)
            );
        }
        assert_eq!(
            a.len(),
            b.len(),
            "{left} and {right} made a different number of calls"
        );
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("<unprintable: {e}>"))
}

fn to_json<T: Serialize>(msg: &T) -> Value {
    serde_json::to_value(msg).unwrap_or_else(|e| Value::String(format!("<unserializable: {e}>")))
}

fn normalize(v: &mut Value, aliases: &[(String, String)], stats: bool) {
    match v {
        Value::String(s) => {
            for (from, to) in aliases {
                if s.contains(from.as_str()) {
                    *s = s.replace(from.as_str(), to);
                }
            }
        }
        Value::Array(items) => {
            for i in items {
                normalize(i, aliases, stats);
            }
        }
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                let volatile =
                    TIME_KEYS.contains(&k.as_str()) || (stats && USAGE_KEYS.contains(&k.as_str()));
                if volatile && val.is_number() {
                    *val = Value::from(0);
                } else if (k == "stdout" || k == "stderr") && val.is_array() {
                    let bytes: Vec<u8> = val
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                        .collect();
                    *val = Value::String(String::from_utf8_lossy(&bytes).into_owned());
                    normalize(val, aliases, stats);
                } else if k == "info" && val.is_object() {
                    // Verbose info is containerd's debug JSON (pids, paths):
                    // compare which documents and top-level keys it has.
                    if let Some(info) = val.as_object_mut() {
                        for doc in info.values_mut() {
                            let keys: Vec<Value> = doc
                                .as_str()
                                .and_then(|s| serde_json::from_str::<Value>(s).ok())
                                .and_then(|d| {
                                    d.as_object()
                                        .map(|o| o.keys().cloned().collect::<Vec<String>>())
                                })
                                .unwrap_or_default()
                                .into_iter()
                                .map(Value::String)
                                .collect();
                            *doc = Value::Array(keys);
                        }
                    }
                } else {
                    normalize(val, aliases, stats);
                }
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fast_sandbox_proto::cri::{PodSandbox, PodSandboxStatsResponse};

    #[test]
    fn ids_and_times_are_masked_but_names_are_not() {
        let mut a = Transcript::new();
        let mut b = Transcript::new();
        for (t, id, name) in [(&mut a, "aaaa", "web"), (&mut b, "bbbb", "web")] {
            let pod = PodSandbox {
                id: id.into(),
                created_at: if id == "aaaa" { 1 } else { 2 },
                metadata: Some(fast_sandbox_proto::cri::PodSandboxMetadata {
                    name: name.into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            t.record("ListPodSandbox", &Ok(tonic::Response::new(pod)));
            t.alias(id, "sandbox");
        }
        a.assert_equivalent(&b, "a", "b");
    }

    #[test]
    #[should_panic(expected = "ListPodSandbox differs")]
    fn a_different_name_is_a_difference() {
        let mut a = Transcript::new();
        let mut b = Transcript::new();
        for (t, name) in [(&mut a, "web"), (&mut b, "placeholder")] {
            let pod = PodSandbox {
                metadata: Some(fast_sandbox_proto::cri::PodSandboxMetadata {
                    name: name.into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            t.record("ListPodSandbox", &Ok(tonic::Response::new(pod)));
        }
        a.assert_equivalent(&b, "a", "b");
    }

    #[test]
    #[should_panic(expected = "differs")]
    fn a_different_error_code_is_a_difference() {
        let mut a = Transcript::new();
        let mut b = Transcript::new();
        a.record::<PodSandboxStatsResponse>("PodSandboxStats", &Err(tonic::Status::not_found("x")));
        b.record::<PodSandboxStatsResponse>("PodSandboxStats", &Err(tonic::Status::unknown("x")));
        a.assert_equivalent(&b, "a", "b");
    }
}
