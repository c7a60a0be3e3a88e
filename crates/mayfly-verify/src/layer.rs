//! A tower [`Layer`](tower::Layer) for HTTP services (axum, hyper): takes
//! the bearer token, verifies it, and either puts the [`VerifiedToken`] in
//! the request's extensions or answers 401 with an RFC 6750
//! `WWW-Authenticate` header (503 when the verifier itself cannot decide:
//! feed silent, JWKS unreachable).
//!
//! It also serves the resource's RFC 9728 metadata
//! ([`ResourceMetadata`]) at its well-known address, without a token, and
//! names it in every challenge (`resource_metadata="…"`), so a client that
//! was refused can find the broker and get a token (the MCP authorization
//! flow). By default the metadata is the verifier's audience, served by
//! its issuer.
//!
//! For bound tokens the layer needs the client certificate: have your TLS
//! acceptor insert a [`PeerCertificate`] into each request's extensions.
//! DPoP-bound tokens (RFC 9449) come as `Authorization: DPoP …` with a
//! `DPoP` proof header, which must be for this request: its method, and
//! the URL the client addressed, the resource's origin (from its audience,
//! or [`VerifyLayer::with_origin`]) and the request's path. A DPoP-bound
//! token sent as a bearer token is refused, with a `DPoP` challenge.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};

use crate::{DpopRequest, ResourceMetadata, VerifiedToken, Verifier, VerifyError};

/// The DER client certificate a request arrived with.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Vec<u8>);

/// The route template a request matched (`/tickets/{id}`): put it in the
/// response's extensions and the request is reported under it rather
/// than its path, when the verifier reports requests
/// ([`crate::VerifierConfig::with_request_reports`]).
#[derive(Debug, Clone)]
pub struct Route(pub String);

/// Verifies every request's bearer token.
#[derive(Debug, Clone)]
pub struct VerifyLayer {
    verifier: Verifier,
    /// What the resource says about itself, and where (`None` when its
    /// audience is not an `https` URL).
    metadata: Option<Arc<Published>>,
    /// `scheme://host[:port]` clients address: with the request's path, the
    /// `htu` a DPoP proof must name.
    origin: Option<Arc<str>>,
}

/// `https://host[:port]` of an `https` URL.
fn origin_of(url: &str) -> Option<Arc<str>> {
    let rest = url.strip_prefix("https://")?;
    let host = rest
        .split(['/', '?', '#'])
        .next()
        .filter(|h| !h.is_empty())?;
    Some(format!("https://{host}").into())
}

/// RFC 9728 metadata as served: its path, URL and body, made once.
#[derive(Debug)]
struct Published {
    path: String,
    url: String,
    body: String,
}

impl Published {
    fn of(m: &ResourceMetadata) -> Option<Arc<Self>> {
        Some(Arc::new(Self {
            path: m.well_known_path()?,
            url: m.url()?,
            body: m.document().to_string(),
        }))
    }
}

impl VerifyLayer {
    /// A layer using `verifier`, publishing the verifier's audience as the
    /// resource and its issuer as the authorization server.
    pub fn new(verifier: Verifier) -> Self {
        let metadata = Published::of(&ResourceMetadata::new(
            verifier.audience(),
            verifier.issuer(),
        ));
        let origin = origin_of(verifier.audience());
        Self {
            verifier,
            metadata,
            origin,
        }
    }

    /// The same, for clients that address the resource at `origin`
    /// (`https://host[:port]`) rather than at its audience's.
    pub fn with_origin(mut self, origin: &str) -> Self {
        self.origin = Some(origin.trim_end_matches('/').into());
        self
    }

    /// The same, publishing `metadata` instead (scopes, a name).
    pub fn with_metadata(mut self, metadata: &ResourceMetadata) -> Self {
        self.metadata = Published::of(metadata);
        self
    }
}

impl<S> tower::Layer<S> for VerifyLayer {
    type Service = VerifyService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        VerifyService {
            inner,
            verifier: self.verifier.clone(),
            metadata: self.metadata.clone(),
            origin: self.origin.clone(),
        }
    }
}

/// The service [`VerifyLayer`] wraps around yours.
#[derive(Debug, Clone)]
pub struct VerifyService<S> {
    inner: S,
    verifier: Verifier,
    metadata: Option<Arc<Published>>,
    origin: Option<Arc<str>>,
}

/// How a request presents its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `Authorization: Bearer` (RFC 6750).
    Bearer,
    /// `Authorization: DPoP` with a `DPoP` proof (RFC 9449).
    Dpop,
}

/// The token of a request and how it came, if it has one.
pub fn credentials<B>(req: &Request<B>) -> Option<(Scheme, &str)> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let scheme = if scheme.eq_ignore_ascii_case("bearer") {
        Scheme::Bearer
    } else if scheme.eq_ignore_ascii_case("dpop") {
        Scheme::Dpop
    } else {
        return None;
    };
    Some((scheme, token.trim()))
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

/// `response`, its challenge naming the resource's metadata document.
fn with_metadata<B>(mut response: Response<B>, metadata: Option<&Published>) -> Response<B> {
    let Some(m) = metadata else {
        return response;
    };
    let Some(value) = response
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
    else {
        return response;
    };
    let value = value.replacen(
        "realm=\"mayfly\"",
        &format!("realm=\"mayfly\", resource_metadata=\"{}\"", quoted(&m.url)),
        1,
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    response
}

/// The answer to a DPoP request (or a DPoP-bound token sent as bearer)
/// that failed `error`: a `DPoP` challenge (RFC 9449 §7.1).
pub fn unauthorized_dpop<B: From<String>>(error: &VerifyError) -> Response<B> {
    if error.is_unavailable() {
        return unauthorized(Some(error));
    }
    let code = match error {
        VerifyError::Dpop(_) => "invalid_dpop_proof",
        _ => "invalid_token",
    };
    let mut resp = Response::new(B::from(format!("invalid token: {error}\n")));
    *resp.status_mut() = StatusCode::UNAUTHORIZED;
    let value = format!(
        "DPoP realm=\"mayfly\", algs=\"{}\", error=\"{code}\", error_description=\"{}\"",
        mayfly_core::dpop::ALGORITHMS.join(" "),
        quoted(&error.to_string())
    );
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
        let metadata = self.metadata.clone();
        let origin = self.origin.clone();
        Box::pin(async move {
            let metadata = metadata.as_deref();
            if let Some(m) = metadata
                && req.method() == Method::GET
                && req.uri().path() == m.path
            {
                return Ok(metadata_response(m));
            }
            let Some((scheme, token)) = credentials(&req).map(|(s, t)| (s, t.to_owned())) else {
                return Ok(with_metadata(unauthorized(None), metadata));
            };
            let peer = req
                .extensions()
                .get::<PeerCertificate>()
                .map(|c| c.0.clone());
            let verified = match scheme {
                Scheme::Bearer => verifier.verify(&token, peer.as_deref()).await,
                Scheme::Dpop => {
                    let mut proofs = req.headers().get_all("dpop").iter();
                    let proof = match (proofs.next().map(HeaderValue::to_str), proofs.next()) {
                        (Some(Ok(p)), None) => p,
                        _ => "",
                    };
                    let url = format!("{}{}", origin.as_deref().unwrap_or(""), req.uri().path());
                    let request = DpopRequest {
                        proof,
                        method: req.method().as_str(),
                        url: &url,
                    };
                    verifier.verify_dpop(&token, request, peer.as_deref()).await
                }
            };
            let started = std::time::Instant::now();
            let method = req.method().as_str().to_owned();
            let path = req.uri().path().to_owned();
            let report = |lease: &mayfly_core::LeaseId,
                          status: StatusCode,
                          route: Option<&Route>,
                          refused: Option<&VerifyError>| {
                if let Some(reports) = verifier.reports() {
                    reports.report(mayfly_proto::v1::ServedRequest {
                        lease_id: lease.to_string(),
                        method: method.clone(),
                        route: route.map_or_else(|| path.clone(), |r| r.0.clone()),
                        accepted: refused.is_none(),
                        refused_because: refused.map(|e| e.name().to_owned()).unwrap_or_default(),
                        status: u32::from(status.as_u16()),
                        latency_us: u64::try_from(started.elapsed().as_micros())
                            .unwrap_or(u64::MAX),
                    });
                }
            };
            match verified {
                Ok(verified) => {
                    let lease = verified.lease_id.clone();
                    req.extensions_mut().insert(verified);
                    let answered = inner.call(req).await;
                    if let Ok(resp) = &answered {
                        report(
                            &lease,
                            resp.status(),
                            resp.extensions().get::<Route>(),
                            None,
                        );
                    }
                    answered
                }
                Err(e) => {
                    tracing::debug!(error = %e, "refused a token");
                    let dpop = scheme == Scheme::Dpop || e == VerifyError::DpopRequired;
                    let resp = with_metadata(
                        if dpop {
                            unauthorized_dpop(&e)
                        } else {
                            unauthorized(Some(&e))
                        },
                        metadata,
                    );
                    if verifier.reports().is_some()
                        && let Some(lease) = verifier.refused_lease(&token)
                    {
                        report(&lease, resp.status(), None, Some(&e));
                    }
                    Ok(resp)
                }
            }
        })
    }
}

/// The RFC 9728 document.
fn metadata_response<B: From<String>>(m: &Published) -> Response<B> {
    let mut resp = Response::new(B::from(m.body.clone()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    resp
}
