//! Compiles `proto/mayfly/v1/*.proto` (and the SPIFFE Workload API's
//! `proto/spiffe/workload.proto`) with protox (pure Rust), so building
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let files = [
        "mayfly/v1/types.proto",
        "mayfly/v1/broker.proto",
        "mayfly/v1/admin.proto",
        "mayfly/v1/revocations.proto",
        "mayfly/v1/gateway.proto",
        "mayfly/v1/requests.proto",
    ]
    .map(|f| root.join(f));
    let fds = protox::compile(files, [&root])?;
    // For gRPC server reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("mayfly_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Its Debug is written by hand, without the bearer token.
        .skip_debug([".mayfly.v1.IssuedToken"])
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    // The SPIFFE Workload API (no package: module `_`), for the test
    // Workload API server.
    let workload = protox::compile([root.join("spiffe/workload.proto")], [&root])?;
    tonic_prost_build::configure()
        // Its Debug is written by hand, without the private key.
        .skip_debug([".X509SVID"])
        .build_server(true)
        .build_client(false)
        .compile_fds(workload)?;
    Ok(())
}
