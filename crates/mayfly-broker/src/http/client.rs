//! Client authentication on the HTTPS endpoints: `tls_client_auth` (RFC
//! 8705). The client is the SPIFFE ID of the X.509-SVID it presented in
//! the TLS handshake, checked at the edge like a gRPC caller's (a task
//! certificate is never a client). A `client_id` parameter, where given,
//! must name that same ID.

use mayfly_core::Timestamp;

use super::errors::{Code, OAuthError};
use super::form::Params;
use crate::connections::PeerInfo;
use crate::identity::Caller;

/// The authenticated client, or `invalid_client` saying why not.
pub(super) fn authenticate(peer: &PeerInfo) -> Result<Caller, OAuthError> {
    match peer.identity.as_ref() {
        Ok(c) if Timestamp::now() < c.not_after => Ok(c.clone()),
        Ok(_) => Err(OAuthError::new(
            Code::InvalidClient,
            "client certificate has expired",
        )),
        Err(e) => Err(OAuthError::new(Code::InvalidClient, e.to_string())),
    }
}

/// Refuses a `client_id` other than the certificate's SPIFFE ID.
pub(super) fn check_client_id(caller: &Caller, params: &Params) -> Result<(), OAuthError> {
    match params.get("client_id") {
        Some(id) if id != caller.id.as_str() => Err(OAuthError::new(
            Code::InvalidClient,
            format!(
                "client_id {id:?} is not the client certificate's SPIFFE ID {}",
                caller.id
            ),
        )),
        _ => Ok(()),
    }
}
