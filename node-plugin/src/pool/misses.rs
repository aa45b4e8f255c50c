//! Misses, counted per handler and reason, and explained: when a handler's
//! pods miss because no pool has their shape, say once which field of the
//! shape differed from what the handler's pools serve.

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    sync::Mutex,
};

use fast_sandbox_shim::slots::{MissReason, PoolKey, SeccompShape, Shape};

/// A field of [`Shape`] a request can differ in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShapeField {
    Seccomp,
    RunAsUser,
    RunAsGroup,
    SupplementalGroups,
    SeLinux,
    /// Each field alone is served by some pool, but no pool has all of
    /// them together.
    Combination,
}

impl ShapeField {
    const FIELDS: [ShapeField; 5] = [
        ShapeField::Seccomp,
        ShapeField::RunAsUser,
        ShapeField::RunAsGroup,
        ShapeField::SupplementalGroups,
        ShapeField::SeLinux,
    ];

    /// The name used in logs (the CRI field the pod sandbox asks for).
    pub fn name(self) -> &'static str {
        match self {
            ShapeField::Seccomp => "seccomp",
            ShapeField::RunAsUser => "run_as_user",
            ShapeField::RunAsGroup => "run_as_group",
            ShapeField::SupplementalGroups => "supplemental_groups",
            ShapeField::SeLinux => "selinux_options",
            ShapeField::Combination => "shape",
        }
    }

    fn show(self, shape: &Shape) -> String {
        let opt = |v: Option<i64>| v.map_or_else(|| "unset".to_owned(), |v| v.to_string());
        match self {
            ShapeField::Seccomp => match &shape.seccomp {
                SeccompShape::Unconfined => "Unconfined".to_owned(),
                SeccompShape::RuntimeDefault => "RuntimeDefault".to_owned(),
                SeccompShape::Localhost(p) => format!("Localhost {p}"),
            },
            ShapeField::RunAsUser => opt(shape.run_as_user),
            ShapeField::RunAsGroup => opt(shape.run_as_group),
            ShapeField::SupplementalGroups => format!("{:?}", shape.supplemental_groups),
            ShapeField::SeLinux => shape.selinux.as_ref().map_or_else(
                || "unset".to_owned(),
                |s| format!("{}:{}:{}:{}", s.user, s.role, s.r#type, s.level),
            ),
            ShapeField::Combination => ShapeField::FIELDS
                .iter()
                .map(|f| format!("{} {}", f.name(), f.show(shape)))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    fn same(self, a: &Shape, b: &Shape) -> bool {
        match self {
            ShapeField::Seccomp => a.seccomp == b.seccomp,
            ShapeField::RunAsUser => a.run_as_user == b.run_as_user,
            ShapeField::RunAsGroup => a.run_as_group == b.run_as_group,
            ShapeField::SupplementalGroups => a.supplemental_groups == b.supplemental_groups,
            ShapeField::SeLinux => a.selinux == b.selinux,
            ShapeField::Combination => a == b,
        }
    }
}

/// Why a request of shape `asked` found no pool among `served` (the shapes
/// of the handler's pools): each field whose asked value no pool serves,
/// with a message naming what the pools serve instead; or, when every
/// field alone is served, [`ShapeField::Combination`]. Empty when a pool
/// has exactly `asked` (or the handler has no pool).
pub fn explain(handler: &str, asked: &Shape, served: &[&Shape]) -> Vec<(ShapeField, String)> {
    if served.is_empty() || served.contains(&asked) {
        return Vec::new();
    }
    let message = |field: ShapeField| {
        let mut values: Vec<String> = served.iter().map(|s| field.show(s)).collect();
        values.sort();
        values.dedup();
        let mut m = String::new();
        let _ = write!(
            m,
            "pod sandbox asks {} {}; pools for {handler} serve {}",
            field.name(),
            field.show(asked),
            values.join(" or ")
        );
        m
    };
    let differing: Vec<(ShapeField, String)> = ShapeField::FIELDS
        .into_iter()
        .filter(|f| !served.iter().any(|s| f.same(asked, s)))
        .map(|f| (f, message(f)))
        .collect();
    if differing.is_empty() {
        vec![(ShapeField::Combination, message(ShapeField::Combination))]
    } else {
        differing
    }
}

/// Misses by handler and reason, and which (handler, field) differences
/// were already logged.
#[derive(Debug, Default)]
pub struct MissBook {
    counts: Mutex<BTreeMap<String, BTreeMap<&'static str, u64>>>,
    logged: Mutex<HashSet<(String, ShapeField)>>,
}

impl MissBook {
    /// Counts a miss of `handler` for `reason`.
    pub fn count(&self, handler: &str, reason: MissReason) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts
            .entry(handler.to_owned())
            .or_default()
            .entry(reason.as_str())
            .or_default() += 1;
    }

    /// The misses of `handler` so far, by reason.
    pub fn of(&self, handler: &str) -> BTreeMap<String, u64> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .get(handler)
            .map(|m| m.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect())
            .unwrap_or_default()
    }

    /// The explanations of a `no_pool` miss not logged yet for their
    /// (handler, field), marking them logged.
    pub fn first_explanations(
        &self,
        handler: &str,
        asked: &PoolKey,
        served: &[&PoolKey],
    ) -> Vec<String> {
        let shapes: Vec<&Shape> = served
            .iter()
            .filter(|k| k.upstream_handler == asked.upstream_handler)
            .map(|k| &k.shape)
            .collect();
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        explain(handler, &asked.shape, &shapes)
            .into_iter()
            .filter(|(field, _)| logged.insert((handler.to_owned(), *field)))
            .map(|(_, message)| message)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(seccomp: SeccompShape, uid: Option<i64>) -> Shape {
        Shape {
            seccomp,
            run_as_user: uid,
            ..Shape::default()
        }
    }

    #[test]
    fn the_differing_field_is_named_with_what_the_pools_serve() {
        let served = shape(SeccompShape::Unconfined, None);
        let asked = shape(SeccompShape::RuntimeDefault, None);
        assert_eq!(
            explain("fast-runc", &asked, &[&served]),
            vec![(
                ShapeField::Seccomp,
                "pod sandbox asks seccomp RuntimeDefault; pools for fast-runc serve Unconfined"
                    .to_owned()
            )]
        );
        let asked = shape(SeccompShape::Unconfined, Some(1000));
        let explained = explain("fast-runc", &asked, &[&served]);
        assert_eq!(explained.len(), 1);
        assert_eq!(explained[0].0, ShapeField::RunAsUser);
        assert!(
            explained[0].1.contains("asks run_as_user 1000")
                && explained[0].1.contains("serve unset"),
            "{explained:?}"
        );
    }

    #[test]
    fn a_served_shape_or_no_pool_explains_nothing_and_a_combination_is_named() {
        let a = shape(SeccompShape::RuntimeDefault, None);
        let b = shape(SeccompShape::Unconfined, Some(1000));
        assert!(explain("h", &a, &[&a, &b]).is_empty());
        assert!(explain("h", &a, &[]).is_empty());
        let asked = shape(SeccompShape::RuntimeDefault, Some(1000));
        let explained = explain("h", &asked, &[&a, &b]);
        assert_eq!(explained.len(), 1, "{explained:?}");
        assert_eq!(explained[0].0, ShapeField::Combination);
    }

    #[test]
    fn each_handler_and_field_is_explained_once_and_misses_are_counted() {
        let book = MissBook::default();
        let key = |shape| PoolKey {
            upstream_handler: "runc".into(),
            shape,
        };
        let served = key(shape(SeccompShape::Unconfined, None));
        let asked = key(shape(SeccompShape::RuntimeDefault, None));
        assert_eq!(
            book.first_explanations("fast-runc", &asked, &[&served])
                .len(),
            1
        );
        assert!(book
            .first_explanations("fast-runc", &asked, &[&served])
            .is_empty());
        assert_eq!(
            book.first_explanations("other", &asked, &[&served]).len(),
            1,
            "another handler is explained on its own"
        );
        let uid = key(shape(SeccompShape::RuntimeDefault, Some(7)));
        let again = book.first_explanations("fast-runc", &uid, &[&served]);
        assert_eq!(again.len(), 1, "only the new field: {again:?}");
        assert!(again[0].contains("run_as_user 7"), "{again:?}");

        book.count("fast-runc", MissReason::NoPool);
        book.count("fast-runc", MissReason::NoPool);
        book.count("fast-runc", MissReason::PoolEmpty);
        let of = book.of("fast-runc");
        assert_eq!(of.get("no_pool"), Some(&2));
        assert_eq!(of.get("pool_empty"), Some(&1));
        assert!(book.of("fast-crun").is_empty());
    }
}
