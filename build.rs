//! Compiles the shim's own admin API (proto/sidecarshim/v1/admin.proto) into
//! Rust with tonic-prost-build. protoc comes from the system (Debian's
//! protobuf-compiler, installed by hack/install-deps; k8s-cri needs it too).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Without these cargo reruns the build script, and so rebuilds the whole
    // crate, whenever any file of the package changes (a script under hack/,
    // a test): tonic-prost-build emits no rerun-if-changed of its own.
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/sidecarshim/v1/admin.proto"], &["proto"])?;
    Ok(())
}
