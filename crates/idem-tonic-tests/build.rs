//! Generates the `payments.v1` client and server from proto/payments.proto
//! with the `protoc` that protoc-bin-vendored ships (no system protoc).

use std::io;

fn main() -> io::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path().map_err(io::Error::other)?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/payments.proto"],
        &["proto"],
    )
}
