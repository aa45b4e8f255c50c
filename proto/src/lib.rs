//! Generated gRPC code, and the NodeAgent API's token rule ([`token`]), mutual
//! TLS ([`tls`]) and
//! pool shape key ([`shape`]).
//! Conversions to domain types live at the edges (the `shim`,
//! `node-plugin` and `controller` crates), not here.

pub mod shape;
pub mod tls;
pub mod token;

#[doc(hidden)]
pub use git_version;

/// The `--version` of the binary that expands it: its crate's version and
/// the git revision it was built from (`-modified` when the tree had
/// uncommitted changes), e.g. `0.1.0 (git 54d8da9c1e2f)`. A macro so that
/// the revision is read when that binary is built, not this crate.
#[macro_export]
macro_rules! version {
    () => {
        $crate::git_version::git_version!(
            prefix = concat!(env!("CARGO_PKG_VERSION"), " (git "),
            suffix = ")",
            args = ["--always", "--abbrev=12", "--dirty=-modified"],
            fallback = concat!(env!("CARGO_PKG_VERSION"), " (git revision unknown)")
        )
    };
}

/// CRI v1, the API kubelet speaks (v1.26+ speaks nothing else).
pub mod cri {
    pub use k8s_cri::v1::*;

    /// The encoded `FileDescriptorSet` of `proto/cri/api.proto`: the schema
    /// of the types above, for code that must know a field's type without
    /// a Rust type for it (the shim keeps fields unknown to these types).
    pub const DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/cri_descriptor.bin"));
}

/// fast-sandbox's node API (`proto/nodeagent.proto`): node status with free
/// slots per pool and cached images, streamed on every change, and desired
/// pool sizes. Served by the node plugin, called by the controller.
pub mod nodeagent {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("fastsandbox.node.v1");
}
