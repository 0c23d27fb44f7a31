//! Generated gRPC code for the CSI v1.12 contract (`csi.v1`) and our admin API
//! (`pmem.admin.v1`). The generated code lives in `OUT_DIR` only.

/// CSI v1.12.0 (`csi.v1`).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations
)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// pmem-agent's allocator/admin API (`pmem.admin.v1`).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations
)]
pub mod admin {
    tonic::include_proto!("pmem.admin.v1");
}
