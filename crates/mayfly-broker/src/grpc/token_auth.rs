//! Callers without a client certificate: on a connection whose peer
//! presented none, a request's `authorization: Bearer <workload token>`
//! proves the caller instead, if a `[[federation]]` issuer vouches for it
//! ([`Federation::verify`]). The outcome replaces the connection's
//! [`PeerInfo`] for that request only, so [`super::caller`] and the
//! interceptors see a token caller as they see a certificate one, and a
//! refused token as `UNAUTHENTICATED` naming the failed check. A peer with
//! a certificate is that certificate's caller; a header beside it is
//! ignored.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;

use crate::connections::PeerInfo;
use crate::federation::Federation;
use crate::identity::{AuthError, Caller, Proof};

/// Adds [`TokenAuth`].
#[derive(Debug, Clone)]
pub struct TokenAuthLayer(pub Arc<Federation>);

impl<S> tower::Layer<S> for TokenAuthLayer {
    type Service = TokenAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TokenAuth {
            inner,
            federation: self.0.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct TokenAuth<S> {
    inner: S,
    federation: Arc<Federation>,
}

/// The token of an `authorization: Bearer …` header.
fn bearer(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

impl<S, B> tower::Service<http::Request<B>> for TokenAuth<S>
where
    S: tower::Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let without_certificate = req
            .extensions()
            .get::<PeerInfo>()
            .is_some_and(|p| matches!(p.identity.as_ref(), Err(AuthError::NoCertificate)));
        let token = bearer(req.headers()).filter(|_| without_certificate);
        let Some(token) = token else {
            return Box::pin(self.inner.call(req));
        };
        // The instance that was polled ready serves this request.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let federation = self.federation.clone();
        Box::pin(async move {
            let identity = match federation.verify(&token).await {
                Ok(t) => {
                    tracing::debug!(id = %t.id, issuer = %t.issuer, "caller proven by a workload token");
                    Ok(Caller {
                        id: t.id,
                        proof: Proof::Token { issuer: t.issuer },
                        not_after: t.expires_at,
                    })
                }
                Err(e) => Err(AuthError::Token(e)),
            };
            req.extensions_mut().insert(PeerInfo {
                identity: Arc::new(identity),
            });
            inner.call(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_a_bearer_authorization() {
        let h = |v: &'static str| {
            let mut m = http::HeaderMap::new();
            m.insert("authorization", http::HeaderValue::from_static(v));
            m
        };
        assert_eq!(bearer(&h("Bearer abc")).as_deref(), Some("abc"));
        assert_eq!(bearer(&h("bearer  abc ")).as_deref(), Some("abc"));
        assert_eq!(bearer(&h("Basic abc")), None);
        assert_eq!(bearer(&h("Bearer")), None);
        assert_eq!(bearer(&http::HeaderMap::new()), None);
    }
}
