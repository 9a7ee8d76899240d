//! Compiles `proto/` into Rust with tonic's code generator. protoc comes from
//! the `protoc-bin-vendored` crate so that a fresh machine needs no system
//! packages.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Tests that generate code for other languages (the conformance suite)
    // use the same protoc; see `clutch::VENDORED_PROTOC`.
    println!(
        "cargo:rustc-env=CLUTCH_VENDORED_PROTOC={}",
        protoc.display()
    );
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Served by gRPC reflection, so grpcurl needs no copy of the protos.
        .file_descriptor_set_path(out_dir.join("clutch_descriptor.bin"))
        // `bytes` fields decode as `bytes::Bytes` that point into tonic's
        // receive buffer: the master forwards payloads without copying them.
        .bytes(".")
        .compile_protos(
            &[
                "proto/clutch/v1/messenger.proto",
                "proto/clutch/v1/admin.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
