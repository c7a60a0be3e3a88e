//! A tonic interceptor: verifies the `authorization: Bearer …` metadata and
//! puts the [`VerifiedToken`](crate::VerifiedToken) in the request's
//! extensions. Interceptors cannot wait, so it uses cached keys; a token
//! signed with a key not yet cached is refused once while the JWKS is
//! refetched in the background (clients retry on `UNAUTHENTICATED`).

use tonic::{Request, Status};

use crate::{Verifier, VerifyError};

/// An interceptor for `Server::builder().add_service(InterceptedService::new(svc, interceptor(v)))`.
pub fn interceptor(
    verifier: Verifier,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut req: Request<()>| {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim().to_owned())
            .ok_or_else(|| Status::unauthenticated("bearer token required"))?;
        let peer = req
            .peer_certs()
            .and_then(|c| c.first().map(|d| d.as_ref().to_vec()));
        match verifier.verify_cached(&token, peer.as_deref()) {
            Ok(t) => {
                req.extensions_mut().insert(t);
                Ok(req)
            }
            Err(e @ VerifyError::UnknownKey(Some(_))) => {
                verifier.refresh_keys_in_background();
                Err(Status::unauthenticated(format!("{e}; retry")))
            }
            Err(e) if e.is_unavailable() => Err(Status::unavailable(e.to_string())),
            Err(e) => Err(Status::unauthenticated(format!("invalid token: {e}"))),
        }
    }
}
