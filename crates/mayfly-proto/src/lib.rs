//! Generated code for the `mayfly.v1` API (`proto/mayfly/v1`). Nothing here
//! is written by hand; the domain types live in `mayfly-core` and the
//! conversions at the gRPC edge in `mayfly-broker` and `mayfly-client`.

#![forbid(unsafe_code)]

/// The `mayfly.v1` package.
pub mod v1 {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("mayfly.v1");
}

pub use prost_types::Timestamp;

/// The encoded `FileDescriptorSet` of the API and what it imports, for
/// gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mayfly_descriptor.bin"));
