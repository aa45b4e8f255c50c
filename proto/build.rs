//! Generates the NodeAgent client and server from `proto/nodeagent.proto`,
//! and the CRI v1 descriptor set from `proto/cri/api.proto` (the schema the
//! shim's field-preserving rewrite reads; the Rust CRI types come from
//! `k8s-cri`). Needs `protoc` (Debian's protobuf-compiler; hack/test.sh
//! installs it).

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/nodeagent.proto");
    println!("cargo:rerun-if-changed=proto/cri/api.proto");
    tonic_prost_build::configure().compile_protos(&["proto/nodeagent.proto"], &["proto"])?;

    // Only the descriptor set is used; the Rust it generates goes to a
    // directory of its own, unused.
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let unused = out.join("cri-unused");
    std::fs::create_dir_all(&unused)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .out_dir(&unused)
        .file_descriptor_set_path(out.join("cri_descriptor.bin"))
        .compile_protos(&["proto/cri/api.proto"], &["proto/cri"])?;
    Ok(())
}
