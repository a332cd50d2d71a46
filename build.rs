//! Compiles the gRPC contract in `proto/` with a vendored `protoc`, so a fresh
//! machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Messages that carry a full key get a redacting Debug (src/proto.rs).
        .skip_debug([
            "keystile.v1.VerifyRequest",
            "keystile.v1.CreateKeyResponse",
            "keystile.v1.RotateKeyResponse",
            "keystile.v1.ExchangeRequest",
            "keystile.v1.ExchangeResponse",
        ])
        .file_descriptor_set_path(out_dir.join("keystile_descriptor.bin"))
        .compile_protos(
            &["proto/keystile/v1/verifier.proto", "proto/keystile/v1/admin.proto", "proto/keystile/v1/exchange.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
