//! Adoption of the free slots a previous run left (issue 11): a slot is
//! taken back into its pool, instead of being destroyed and rebuilt, when
//! it carries this node's token (listed by it), is ready with its pause
//! alive, and was built for a pool configured now: the same pool name,
//! upstream handler and [`POOL_KEY_LABEL`] (a digest of the full
//! [`PoolKey`]; a slot of a release before that label is matched by the
//! security context containerd stored for it), so a slot is never served
//! for a shape it was not built for. Anything else is removed.

use fast_sandbox_proto::cri::{PodSandbox, PodSandboxState};
use fast_sandbox_shim::slots::{PoolKey, POOL_LABEL};

use super::PoolManager;
use crate::{blocking::chain, fixup::SlotFacts};

/// Label on every placeholder: a digest of the [`PoolKey`] it was built
/// with ([`key_digest`]).
pub const POOL_KEY_LABEL: &str = "fast-sandbox.io/pool-key";

/// A stable digest of everything in `key` (16 hex digits of SHA-256 over
/// its `Debug` form): equal keys, equal digests, across restarts.
pub fn key_digest(key: &PoolKey) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{key:?}"));
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Why a free slot of a previous run is not adopted.
#[derive(Debug, thiserror::Error)]
enum NotAdopted {
    #[error("not ready")]
    NotReady,
    #[error("pool {0:?} is not configured")]
    NoPool(String),
    #[error("built for upstream handler {found:?}, pool wants {wanted:?}")]
    Handler { found: String, wanted: String },
    #[error("built for another shape of the pool")]
    Shape,
    #[error("its pause process {0} is gone")]
    PauseGone(i32),
    #[error("containerd reports no cgroup parent")]
    NoCgroupParent,
    #[error(transparent)]
    Pool(#[from] super::PoolError),
}

impl PoolManager {
    /// Adopts the candidates that qualify, removes the others; returns how
    /// many were adopted.
    pub(super) async fn adopt_all(&self, candidates: Vec<PodSandbox>) -> usize {
        let mut adopted = 0;
        for sb in candidates {
            match self.adoptable(&sb).await {
                Ok((i, facts)) => {
                    tracing::debug!(sandbox = %sb.id, pool = %self.specs[i].name, "adopted a free slot of the previous run");
                    self.table().add_free(i, facts);
                    adopted += 1;
                }
                Err(why) => {
                    tracing::info!(sandbox = %sb.id, reason = %chain(&why),
                        "removing a free slot of the previous run: not adopted");
                    self.destroy_slot(&self.orphan_facts(&sb)).await;
                }
            }
        }
        if adopted > 0 {
            self.changed();
            self.refill.notify_one();
        }
        adopted
    }

    /// The pool index and facts of `sb` if it may serve claims again.
    async fn adoptable(&self, sb: &PodSandbox) -> Result<(usize, SlotFacts), NotAdopted> {
        if sb.state != PodSandboxState::SandboxReady as i32 {
            return Err(NotAdopted::NotReady);
        }
        let pool = sb.labels.get(POOL_LABEL).cloned().unwrap_or_default();
        let i = self
            .specs
            .iter()
            .position(|s| s.name == pool)
            .ok_or(NotAdopted::NoPool(pool))?;
        let spec = &self.specs[i];
        if sb.runtime_handler != spec.key.upstream_handler {
            return Err(NotAdopted::Handler {
                found: sb.runtime_handler.clone(),
                wanted: spec.key.upstream_handler.clone(),
            });
        }
        let (pid, info) = self.sandbox_info(&sb.id).await?;
        if !shape_matches(sb, &spec.key, &info) {
            return Err(NotAdopted::Shape);
        }
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(NotAdopted::PauseGone(pid));
        }
        // The cgroup parent it was made under, which may be another root
        // than today's (an upgrade from a release with a shared root).
        let parent = info
            .pointer("/config/linux/cgroup_parent")
            .and_then(serde_json::Value::as_str)
            .filter(|p| !p.is_empty())
            .ok_or(NotAdopted::NoCgroupParent)?;
        let facts = SlotFacts {
            sandbox_id: sb.id.clone(),
            pause_pid: pid,
            placeholder_cgroup_parent: parent.to_owned(),
            upstream_handler: spec.key.upstream_handler.clone(),
        };
        if self.fixup.settles(&facts) {
            let uid = sb.metadata.as_ref().map(|m| m.uid.as_str()).unwrap_or("");
            let mut config = self.placeholder(i, uid);
            config.metadata.clone_from(&sb.metadata);
            config.hostname = sb
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default();
            self.fixup
                .prepare(&facts, &config)
                .await
                .map_err(|source| super::PoolError::Prepare {
                    id: sb.id.clone(),
                    source,
                })?;
        }
        Ok((i, facts))
    }
}

/// Whether slot `sb` was built for `key`: by its [`POOL_KEY_LABEL`], or,
/// for a slot of a release before that label, by the security context
/// containerd stored for it (the verbose info's `config`, Go's JSON of the
/// same CRI message) against the one a slot of `key` is created with.
fn shape_matches(sb: &PodSandbox, key: &PoolKey, info: &serde_json::Value) -> bool {
    if let Some(digest) = sb.labels.get(POOL_KEY_LABEL) {
        return *digest == key_digest(key);
    }
    let Some(stored) = info.pointer("/config/linux/security_context") else {
        return false;
    };
    let wanted = serde_json::to_value(key.shape.placeholder_security_context()).ok();
    wanted.and_then(without_zero_values) == without_zero_values(stored.clone())
}

/// `value` as Go's `omitempty` would write it: without null, false, zero,
/// empty-string and empty-list fields. An empty object stays: a message
/// that is set but all default (seccomp `RuntimeDefault`) is not an unset
/// one (no seccomp).
fn without_zero_values(value: serde_json::Value) -> Option<serde_json::Value> {
    use serde_json::Value;
    match value {
        Value::Null | Value::Bool(false) => None,
        Value::Number(n) if n.as_f64() == Some(0.0) => None,
        Value::String(s) if s.is_empty() => None,
        Value::Array(a) if a.is_empty() => None,
        Value::Object(fields) => Some(Value::Object(
            fields
                .into_iter()
                .filter_map(|(k, v)| without_zero_values(v).map(|v| (k, v)))
                .collect(),
        )),
        other => Some(other),
    }
}

#[cfg(test)]
mod tests {
    use fast_sandbox_shim::slots::{SeccompShape, Shape};

    use super::*;

    fn key(seccomp: SeccompShape, uid: Option<i64>) -> PoolKey {
        PoolKey {
            upstream_handler: "runc".into(),
            shape: Shape {
                seccomp,
                run_as_user: uid,
                ..Shape::default()
            },
        }
    }

    fn unlabelled() -> PodSandbox {
        PodSandbox::default()
    }

    /// A slot of the release before the pool-key label, as containerd 1.6
    /// stores its config (Go's JSON: `omitempty`, enums as numbers): the
    /// security context of a `RuntimeDefault` pool, run as root.
    fn stored(security_context: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "pid": 42,
            "config": {
                "metadata": { "name": "slot-p-0123", "uid": "0123", "namespace": "fast-sandbox-slots" },
                "linux": {
                    "cgroup_parent": "/fast-sandbox-slots/0123",
                    "security_context": security_context
                }
            }
        })
    }

    #[test]
    fn unlabelled_slots_are_matched_by_their_stored_security_context() {
        let runtime_default = stored(serde_json::json!({
            "namespace_options": { "pid": 1 },
            "seccomp": {}
        }));
        let default = key(SeccompShape::RuntimeDefault, None);
        assert!(shape_matches(&unlabelled(), &default, &runtime_default));
        // Unset seccomp (an unconfined pool) is not RuntimeDefault.
        let unconfined = stored(serde_json::json!({ "namespace_options": { "pid": 1 } }));
        assert!(!shape_matches(&unlabelled(), &default, &unconfined));
        assert!(shape_matches(
            &unlabelled(),
            &key(SeccompShape::Unconfined, None),
            &unconfined
        ));
        // run_as_user 0 is written `{}` by Go, and is not "unset".
        let as_root = stored(serde_json::json!({
            "namespace_options": { "pid": 1 },
            "run_as_user": {},
            "seccomp": {}
        }));
        assert!(shape_matches(
            &unlabelled(),
            &key(SeccompShape::RuntimeDefault, Some(0)),
            &as_root
        ));
        assert!(!shape_matches(&unlabelled(), &default, &as_root));
        assert!(!shape_matches(
            &unlabelled(),
            &default,
            &serde_json::json!({})
        ));
    }

    #[test]
    fn a_label_decides_over_the_stored_config() {
        let mut sb = unlabelled();
        let default = key(SeccompShape::RuntimeDefault, None);
        sb.labels
            .insert(POOL_KEY_LABEL.to_owned(), key_digest(&default));
        assert!(shape_matches(&sb, &default, &serde_json::json!({})));
        assert!(!shape_matches(
            &sb,
            &key(SeccompShape::Unconfined, None),
            &serde_json::json!({})
        ));
    }

    #[test]
    fn key_digests_tell_shapes_apart_and_are_stable() {
        let a = key_digest(&key(SeccompShape::RuntimeDefault, None));
        assert_eq!(a, key_digest(&key(SeccompShape::RuntimeDefault, None)));
        assert_eq!(a.len(), 16);
        assert_ne!(a, key_digest(&key(SeccompShape::Unconfined, None)));
        assert_ne!(a, key_digest(&key(SeccompShape::RuntimeDefault, Some(0))));
    }
}
