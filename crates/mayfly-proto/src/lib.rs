//! Generated code for the `mayfly.v1` API (`proto/mayfly/v1`). Nothing here
//! is written by hand but the `Debug` of the messages that carry a secret
//! (`IssuedToken`, whose token is a bearer credential, and `X509svid`,
//! whose private key is the workload's); the domain
//! types live in `mayfly-core` and the conversions at the gRPC edge in
//! `mayfly-broker` and `mayfly-client`.

#![forbid(unsafe_code)]

/// The `mayfly.v1` package.
pub mod v1 {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("mayfly.v1");

    impl std::fmt::Debug for IssuedToken {
        /// Everything but the token: a response logged or printed in a
        /// panic must not hand the bearer credential to whoever reads it.
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let token = match self.token.is_empty() {
                true => "",
                false => "<redacted>",
            };
            f.debug_struct("IssuedToken")
                .field("token", &token)
                .field("lease_id", &self.lease_id)
                .field("expires_at", &self.expires_at)
                .field("token_type", &self.token_type)
                .field("scopes", &self.scopes)
                .field("audience", &self.audience)
                .field("approval", &self.approval)
                .finish()
        }
    }
}

/// The SPIFFE Workload API's server side (`proto/spiffe/workload.proto`,
/// as the SPIFFE project publishes it), for serving it in tests; clients
/// use the `spiffe` crate.
pub mod spiffe_workload {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("_");

    impl std::fmt::Debug for X509svid {
        /// Everything but the private key.
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("X509SVID")
                .field("spiffe_id", &self.spiffe_id)
                .field("x509_svid", &self.x509_svid.len())
                .field("x509_svid_key", &"<redacted>")
                .field("bundle", &self.bundle.len())
                .field("hint", &self.hint)
                .finish()
        }
    }
}

pub use prost_types::Timestamp;

/// The encoded `FileDescriptorSet` of the API and what it imports, for
/// gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mayfly_descriptor.bin"));

#[cfg(test)]
mod tests {
    #[test]
    fn an_issued_token_debugs_without_its_token() {
        let t = super::v1::IssuedToken {
            token: "eyJhbGciOiJFUzI1NiJ9.e30.c2ln".into(),
            lease_id: "lease-1".into(),
            ..Default::default()
        };
        let shown = format!("{t:?}");
        assert!(!shown.contains("eyJ") && !shown.contains("c2ln"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("lease-1"),
            "{shown}"
        );
    }
}
