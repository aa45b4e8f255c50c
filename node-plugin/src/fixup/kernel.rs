//! The kernel names a fix-up works with: the pause's namespaces and the
//! namespaced sysctls written inside them. A leaf: every other fix-up
//! module may use it.

use std::fmt;

/// A namespace of the pause process that a fix-up enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Namespace {
    /// Hostname and `kernel.domainname`.
    Uts,
    /// `net.*` sysctls.
    Net,
    /// `kernel.shm*`, `kernel.msg*`, `kernel.sem`, `fs.mqueue.*` sysctls.
    Ipc,
}

impl Namespace {
    /// The file name under `/proc/<pid>/ns/`.
    pub fn proc_name(self) -> &'static str {
        match self {
            Self::Uts => "uts",
            Self::Net => "net",
            Self::Ipc => "ipc",
        }
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.proc_name())
    }
}

/// One namespaced sysctl, validated: `name` is dotted as in the CRI request
/// and maps to `/proc/sys/<name with . replaced by />` (as runc writes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctl {
    pub name: String,
    pub value: String,
}
