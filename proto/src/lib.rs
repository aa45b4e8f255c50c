//! Generated gRPC code only. Conversions to domain types live at the edges
//! (the `shim` and `node-plugin` crates), not here.

/// CRI v1, the API kubelet speaks (v1.26+ speaks nothing else).
pub mod cri {
    pub use k8s_cri::v1::*;
}
