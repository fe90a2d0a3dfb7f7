//! Compiles `deepmad/v1/*.proto` with protox (pure Rust, no system `protoc`) and generates the
//! prost messages and tonic clients and servers. Also writes the encoded file descriptor set
//! that the coordinator's server reflection serves.

use std::path::PathBuf;

const PROTOS: [&str; 5] = [
    "deepmad/v1/common.proto",
    "deepmad/v1/design.proto",
    "deepmad/v1/sweep.proto",
    "deepmad/v1/work.proto",
    "deepmad/v1/result.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let files: Vec<PathBuf> = PROTOS.iter().map(|path| manifest_dir.join(path)).collect();

    let mut compiler = protox::Compiler::new([&manifest_dir])?;
    // Imports (google/protobuf/timestamp.proto) go into the set so reflection clients can
    // resolve every type; source info carries the comments into `grpcurl describe`.
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(&files)?;
    std::fs::write(
        out_dir.join("deepmad_v1_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;

    println!("cargo:rerun-if-changed=deepmad");
    Ok(())
}
