//! Tests of idem's gRPC support: a real tonic 0.14 server behind
//! `idem_tower::IdempotencyLayer` with `.grpc()`, and real tonic clients,
//! over loopback. The tests are in `tests/grpc.rs`; this library is the code
//! that `build.rs` generates from `proto/payments.proto` (with the `protoc`
//! of `protoc-bin-vendored`).

/// The `payments.v1` package: its messages, `payments_client` and
/// `payments_server`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod payments {
    tonic::include_proto!("payments.v1");
}
