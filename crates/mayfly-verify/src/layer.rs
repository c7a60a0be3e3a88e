//! A tower [`Layer`](tower::Layer) for HTTP services (axum, hyper): takes
//! the bearer token, verifies it, and either puts the [`VerifiedToken`] in
//! the request's extensions or answers 401 with an RFC 6750
//! `WWW-Authenticate` header (503 when the verifier itself cannot decide:
//! feed silent, JWKS unreachable).
//!
//! For bound tokens the layer needs the client certificate: have your TLS
//! acceptor insert a [`PeerCertificate`] into each request's extensions.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, StatusCode, header};

use crate::{VerifiedToken, Verifier, VerifyError};

/// The DER client certificate a request arrived with.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Vec<u8>);

/// Verifies every request's bearer token.
#[derive(Debug, Clone)]
pub struct VerifyLayer {
    verifier: Verifier,
}

impl VerifyLayer {
    /// A layer using `verifier`.
    pub fn new(verifier: Verifier) -> Self {
        Self { verifier }
    }
}

impl<S> tower::Layer<S> for VerifyLayer {
    type Service = VerifyService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        VerifyService {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

/// The service [`VerifyLayer`] wraps around yours.
#[derive(Debug, Clone)]
pub struct VerifyService<S> {
    inner: S,
    verifier: Verifier,
}

/// The bearer token of a request, if it has one (RFC 6750 section 2.1).
pub fn bearer_token<B>(req: &Request<B>) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// RFC 6750 quoted-string: no `"` or `\`, printable ASCII only.
fn quoted(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '?',
        })
        .collect()
}

fn challenge<B: From<String>>(status: StatusCode, params: &str, body: String) -> Response<B> {
    let mut resp = Response::new(B::from(body));
    *resp.status_mut() = status;
    let value = format!("Bearer realm=\"mayfly\"{params}");
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// The answer to a request whose token failed `error` (or had none).
pub fn unauthorized<B: From<String>>(error: Option<&VerifyError>) -> Response<B> {
    match error {
        None => challenge(
            StatusCode::UNAUTHORIZED,
            "",
            "bearer token required\n".into(),
        ),
        Some(e) if e.is_unavailable() => {
            let mut resp = Response::new(B::from(format!("cannot verify tokens now: {e}\n")));
            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        Some(e) => challenge(
            StatusCode::UNAUTHORIZED,
            &format!(
                ", error=\"invalid_token\", error_description=\"{}\"",
                quoted(&e.to_string())
            ),
            format!("invalid token: {e}\n"),
        ),
    }
}

/// 403 for a valid token that lacks `scope` (RFC 6750 section 3.1).
pub fn insufficient_scope<B: From<String>>(scope: &str) -> Response<B> {
    challenge(
        StatusCode::FORBIDDEN,
        &format!(
            ", error=\"insufficient_scope\", scope=\"{}\"",
            quoted(scope)
        ),
        format!("this call needs scope {scope}\n"),
    )
}

/// `Ok` if `token` grants `scope`, else the 403 to send.
pub fn require_scope<B: From<String>>(
    token: &VerifiedToken,
    scope: &str,
) -> Result<(), Response<B>> {
    if token.has_scope(scope) {
        Ok(())
    } else {
        Err(insufficient_scope(scope))
    }
}

impl<S, B, R> tower::Service<Request<B>> for VerifyService<S>
where
    S: tower::Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
    R: From<String>,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // The clone that was polled ready serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        Box::pin(async move {
            let Some(token) = bearer_token(&req).map(str::to_owned) else {
                return Ok(unauthorized(None));
            };
            let peer = req
                .extensions()
                .get::<PeerCertificate>()
                .map(|c| c.0.clone());
            match verifier.verify(&token, peer.as_deref()).await {
                Ok(verified) => {
                    req.extensions_mut().insert(verified);
                    inner.call(req).await
                }
                Err(e) => {
                    tracing::debug!(error = %e, "refused a bearer token");
                    Ok(unauthorized(Some(&e)))
                }
            }
        })
    }
}
