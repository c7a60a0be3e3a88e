//! Client authentication on the HTTPS endpoints: `tls_client_auth` (RFC
//! 8705). The client is the SPIFFE ID of the X.509-SVID it presented in
//! the TLS handshake, checked at the edge like a gRPC caller's (a task
//! certificate is never a client). A `client_id` parameter, where given,
//! must name that same ID.
//!
//! A client without a certificate may instead authenticate with a
//! workload token as an RFC 7523 `client_assertion`
//! (`urn:ietf:params:oauth:client-assertion-type:jwt-bearer`), checked as
//! the gRPC edge checks one (`[[federation]]`, `auth::prove`); its `jti`
//! is used once.

use mayfly_core::Timestamp;

use super::HttpState;
use super::errors::{Code, OAuthError};
use super::form::Params;
use crate::auth::{caller_of, prove};
use crate::connections::PeerInfo;
use crate::identity::{AuthError, Caller};

/// The authenticated client, or `invalid_client` saying why not.
fn authenticate(peer: &PeerInfo) -> Result<Caller, OAuthError> {
    caller_of(peer, Timestamp::now())
        .map_err(|e| OAuthError::new(Code::InvalidClient, e.to_string()))
}

/// RFC 7523 §2.2: a JWT as client authentication.
pub(super) const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The client of a token, revocation or introspection request: the
/// certificate's, or the one a workload token in `client_assertion`
/// proves (never both: RFC 6749 §2.3 allows one method per request).
pub(super) async fn authenticate_client(
    s: &HttpState,
    peer: &PeerInfo,
    params: &Params,
) -> Result<Caller, OAuthError> {
    let assertion = match (
        params.get("client_assertion_type"),
        params.get("client_assertion"),
    ) {
        (None, None) => return authenticate(peer),
        (Some(JWT_BEARER), Some(a)) => a,
        (Some(JWT_BEARER), None) => {
            return Err(OAuthError::new(
                Code::InvalidRequest,
                "client_assertion_type without client_assertion",
            ));
        }
        (Some(other), _) => {
            return Err(OAuthError::new(
                Code::InvalidClient,
                format!("client_assertion_type {other:?} is not supported; use {JWT_BEARER}"),
            ));
        }
        (None, Some(_)) => {
            return Err(OAuthError::new(
                Code::InvalidRequest,
                format!("client_assertion without client_assertion_type {JWT_BEARER}"),
            ));
        }
    };
    // As on gRPC, a token proves only a peer that presented no certificate
    // at all (a refused one included).
    if !matches!(peer.identity.as_ref(), Err(AuthError::NoCertificate)) {
        return Err(OAuthError::new(
            Code::InvalidRequest,
            "a client certificate and a client_assertion: use one client authentication method",
        ));
    }
    let Some(federation) = s.federation.as_deref() else {
        return Err(OAuthError::new(
            Code::InvalidClient,
            "this server trusts no workload token issuers ([[federation]])",
        ));
    };
    let store = s.service.store();
    let outcome = prove(assertion, federation, store.as_ref(), Timestamp::now()).await;
    peer.token_outcome(&outcome);
    outcome.map_err(|e| {
        let code = if e.is_unavailable() {
            Code::TemporarilyUnavailable
        } else {
            Code::InvalidClient
        };
        OAuthError::new(code, e.to_string())
    })
}

/// Refuses a `client_id` other than the client's SPIFFE ID.
pub(super) fn check_client_id(caller: &Caller, params: &Params) -> Result<(), OAuthError> {
    match params.get("client_id") {
        Some(id) if id != caller.id.as_str() => Err(OAuthError::new(
            Code::InvalidClient,
            format!(
                "client_id {id:?} is not the authenticated client's SPIFFE ID {}",
                caller.id
            ),
        )),
        _ => Ok(()),
    }
}
