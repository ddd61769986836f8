//! Compiles our ext_authz proto subset with protox, so no system `protoc` is needed.

use std::path::Path;

const PROTO_ROOT: &str = "proto";
const PROTOS: &[&str] = &["envoy/service/auth/v3/external_auth.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // compile_fds emits no rerun-if-changed lines of its own: list every file under proto/.
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    rerun_for_dir(Path::new(PROTO_ROOT))?;

    let descriptors = protox::compile(PROTOS, [PROTO_ROOT])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .include_file("pb.rs")
        .compile_fds(descriptors)?;
    Ok(())
}

fn rerun_for_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            rerun_for_dir(&path)?;
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Ok(())
}
