//! [`CgroupLeaf`]: a cgroup named the same way in every hierarchy.

use std::{fmt, path::Path};

/// A cgroup path that is not acceptable, with the input field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {path:?}: {reason}")]
pub struct LeafError {
    /// How the caller names the input (`linux.cgroup_parent`, …).
    pub field: &'static str,
    pub path: String,
    pub reason: &'static str,
}

/// A cgroup as a path relative to the root of every hierarchy
/// (`/kubepods/besteffort/pod<uid>/<id>`). Always absolute and normalised,
/// with no `.` or `..` component, and never a hierarchy root: joined onto a
/// mount point it stays under it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CgroupLeaf(String);

impl CgroupLeaf {
    /// Validates and normalises `path` (repeated and trailing `/` dropped);
    /// `field` names the input in the error.
    pub fn parse(path: &str, field: &'static str) -> Result<Self, LeafError> {
        let bad = |reason| LeafError {
            field,
            path: path.to_owned(),
            reason,
        };
        if path.contains('\0') || !path.starts_with('/') {
            return Err(bad("must be an absolute path"));
        }
        let mut out = String::new();
        for component in path.split('/').filter(|c| !c.is_empty()) {
            if component == "." || component == ".." {
                return Err(bad("must not contain . or .. components"));
            }
            out.push('/');
            out.push_str(component);
        }
        if out.is_empty() {
            return Err(bad("must not be a hierarchy root"));
        }
        Ok(Self(out))
    }

    /// The path relative to a hierarchy root, with its leading `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path to join onto a hierarchy's mount point.
    pub fn relative(&self) -> &Path {
        Path::new(self.0.trim_start_matches('/'))
    }
}

impl fmt::Display for CgroupLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_absolute_normalised_and_below_the_root() {
        let leaf = CgroupLeaf::parse("//kubepods//pod1/abc/", "f").unwrap();
        assert_eq!(leaf.as_str(), "/kubepods/pod1/abc");
        assert_eq!(leaf.relative(), Path::new("kubepods/pod1/abc"));
        for (bad, reason) in [
            ("kubepods/x", "must be an absolute path"),
            (
                "kubepods.slice:cri-containerd:abc",
                "must be an absolute path",
            ),
            ("/a\0b", "must be an absolute path"),
            ("/kubepods/../etc", "must not contain . or .. components"),
            ("/./x", "must not contain . or .. components"),
            ("/", "must not be a hierarchy root"),
            ("//", "must not be a hierarchy root"),
        ] {
            let err = CgroupLeaf::parse(bad, "linux.cgroupsPath").unwrap_err();
            assert_eq!(err.reason, reason, "{bad:?}");
            assert_eq!(err.field, "linux.cgroupsPath");
            assert!(err.to_string().starts_with("linux.cgroupsPath "), "{err}");
        }
    }
}
