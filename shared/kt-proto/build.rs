//! Compiles `proto/kt/v1/*.proto` with protox (a Rust protobuf compiler, so no system `protoc`
//! is needed) and generates prost messages and tonic clients/servers from the descriptors.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files =
        ["kt/v1/tensor.proto", "kt/v1/health.proto", "kt/v1/expert.proto", "kt/v1/worker.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
