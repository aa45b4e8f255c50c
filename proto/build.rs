//! Generates the NodeAgent client and server from `proto/nodeagent.proto`.
//! Needs `protoc` (Debian's protobuf-compiler; hack/test.sh installs it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/nodeagent.proto");
    tonic_prost_build::configure().compile_protos(&["proto/nodeagent.proto"], &["proto"])?;
    Ok(())
}
