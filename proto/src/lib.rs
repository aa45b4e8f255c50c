//! Generated gRPC code, and the NodeAgent API's token rule ([`token`]) and
//! pool shape key ([`shape`]).
//! Conversions to domain types live at the edges (the `shim`,
//! `node-plugin` and `controller` crates), not here.

pub mod shape;
pub mod token;

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
