//! A `Sandbox`'s spec checked and resolved against the pools and the
//! fast classes: a [`Target`] to place, or the field that is wrong.

use std::sync::Arc;

use k8s_openapi::api::core::v1::EnvVar;
use kube::ResourceExt;

use crate::crd::{Sandbox, SandboxPool};
use crate::nodes::SandboxShape;
use crate::reconcile::Context;

use super::scope::MAX_LABEL_VALUE;

/// A `Sandbox` resolved against the pools and the fast classes.
#[derive(Debug)]
pub(super) struct Target {
    pub(super) runtime_class: String,
    pub(super) handler: String,
    pub(super) shape: SandboxShape,
    pub(super) shape_key: String,
    pub(super) pool: Option<Arc<SandboxPool>>,
}

/// Why a `Sandbox` cannot be placed as written.
#[derive(Debug)]
pub(super) enum SpecProblem {
    /// A field is wrong: the message names it. Retried when the spec changes.
    Invalid(String),
    /// `spec.pool` names no pool (yet). Retried after a while.
    NoSuchPool(String),
    /// The spec asks for something its creator might not be allowed (a
    /// Secret's key in `env`): (reason, message naming the field). Retried
    /// when the spec changes.
    Refused(&'static str, String),
}

/// The `valueFrom` source named in `var`, for the refusal's message.
pub(super) fn value_from_source(var: &EnvVar) -> Option<&'static str> {
    let from = var.value_from.as_ref()?;
    Some(if from.secret_key_ref.is_some() {
        "secretKeyRef"
    } else if from.config_map_key_ref.is_some() {
        "configMapKeyRef"
    } else if from.field_ref.is_some() {
        "fieldRef"
    } else if from.resource_field_ref.is_some() {
        "resourceFieldRef"
    } else {
        "valueFrom"
    })
}

/// The first `env` entry that is not a literal value, as a refusal. The
/// pod is created with the controller's rights, so a `secretKeyRef` would
/// hand the `Sandbox`'s creator a Secret they may not read; the creator is
/// not recorded on the object, so a SubjectAccessReview for them cannot be
/// made, and only literal values are allowed.
pub(super) fn non_literal_env(spec: &crate::crd::SandboxSpec) -> Option<SpecProblem> {
    let (i, source) = spec
        .env
        .iter()
        .enumerate()
        .find_map(|(i, var)| value_from_source(var).map(|source| (i, source)))?;
    let field = match source {
        "valueFrom" => format!("spec.env[{i}].valueFrom"),
        source => format!("spec.env[{i}].valueFrom.{source}"),
    };
    Some(SpecProblem::Refused(
        "EnvValueFromRefused",
        format!(
            "{field}: refused: a Sandbox's environment takes literal values only (the \
             controller creates the pod, so a reference would read with its rights, not \
             its creator's)"
        ),
    ))
}

pub(super) fn resolve(sandbox: &Sandbox, ctx: &Context) -> Result<Target, SpecProblem> {
    let spec = &sandbox.spec;
    let invalid = |m: String| Err(SpecProblem::Invalid(m));
    let name = sandbox.name_any();
    if name.len() > MAX_LABEL_VALUE {
        return invalid(format!(
            "metadata.name: {} characters, more than the {MAX_LABEL_VALUE} a pod label value allows",
            name.len()
        ));
    }
    if spec.image.trim().is_empty() {
        return invalid("spec.image: must not be empty".into());
    }
    if let Some(i) = spec.env.iter().position(|e| e.name.is_empty()) {
        return invalid(format!("spec.env[{i}].name: must not be empty"));
    }
    if let Some(refused) = non_literal_env(spec) {
        return Err(refused);
    }
    let pool = match &spec.pool {
        Some(pool) if pool.len() > MAX_LABEL_VALUE => {
            return invalid(format!(
                "spec.pool: {} characters, more than the {MAX_LABEL_VALUE} a label value allows",
                pool.len()
            ))
        }
        Some(pool) => Some(
            ctx.pools
                .get(&kube::runtime::reflector::ObjectRef::new(pool))
                .ok_or_else(|| SpecProblem::NoSuchPool(pool.clone()))?,
        ),
        None => None,
    };
    let runtime_class = match (&spec.runtime_class_name, &pool) {
        (Some(class), Some(pool)) if *class != pool.spec.runtime_class_name => {
            return invalid(format!(
                "spec.runtimeClassName: {class:?} differs from pool {:?}'s {:?}",
                pool.name_any(),
                pool.spec.runtime_class_name
            ))
        }
        (Some(class), _) => class.clone(),
        (None, Some(pool)) => pool.spec.runtime_class_name.clone(),
        (None, None) => {
            return invalid("spec.runtimeClassName: required when spec.pool is not set".into())
        }
    };
    let Some(handler) = ctx.config.fast_classes.get(&runtime_class) else {
        return invalid(format!(
            "spec.runtimeClassName: {runtime_class:?} is not a fast RuntimeClass ({})",
            ctx.config.class_list()
        ));
    };
    let shape = pool
        .as_ref()
        .map(|p| p.spec.shape.clone())
        .unwrap_or_default();
    Ok(Target {
        shape_key: shape.key(&ctx.config.default_seccomp),
        runtime_class,
        handler: handler.clone(),
        shape,
        pool,
    })
}
