//! The HTTPS side port. Without a client certificate: JWKS and RFC 8414
//! metadata (also as `/.well-known/openid-configuration`) so stock JWT and
//! OAuth libraries find and validate tokens, the CRL, the Token Status
//! Lists, health probes and metrics. With one (`tls_client_auth`) or a workload token as a client
//! assertion (`private_key_jwt`): the OAuth endpoints.
//!
//! - `token.rs`: `POST /oauth2/token`; `revoke.rs`: `POST /oauth2/revoke`;
//!   `introspect.rs`: `POST /introspect`;
//! - `client.rs`: client authentication; `form.rs`: reading a form body as
//!   RFC 6749 asks; `errors.rs`: OAuth errors and the one mapping from
//!   `BrokerError` to them.

mod client;
mod errors;
mod form;
mod introspect;
mod revoke;
pub(crate) mod ssf;
mod token;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use mayfly_core::dpop::{ALGORITHMS as DPOP_ALGORITHMS, ReplayCache};
use mayfly_core::limits::MAX_FORM_BYTES;
use mayfly_core::status_list::STATUS_LIST_MEDIA_TYPE;

use crate::crl::CrlPublisher;
use crate::federation::Federation;
use crate::issuer::JwtSigner;
use crate::service::Service;
use crate::status::{StatusListError, StatusLists};

/// DPoP proofs the token endpoint remembers (each for a minute); beyond
/// that it refuses new proofs rather than forget one.
const DPOP_PROOFS_REMEMBERED: usize = 100_000;

/// How long a readiness probe waits for the store.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub(super) struct HttpState {
    /// Serves `/.well-known/jwks.json` as the key ring stands.
    signer: Arc<JwtSigner>,
    /// Serialised once at start: `/.well-known/oauth-authorization-server`.
    metadata: Arc<str>,
    /// Answers `/introspect`; its store is probed by `/readyz`.
    service: Arc<Service>,
    /// The token endpoint's URL, which a DPoP proof must name (`htu`).
    token_url: Arc<str>,
    /// DPoP proofs already used at the token endpoint.
    dpop_seen: Arc<ReplayCache>,
    /// Serves `/crl` when an issuing CA is configured.
    crl: Option<Arc<CrlPublisher>>,
    /// Serves `/statuslists`.
    status_lists: Arc<StatusLists>,
    /// Workload-token issuers, for `client_assertion`.
    federation: Option<Arc<Federation>>,
    /// The Shared Signals transmitter, when it runs.
    ssf: Option<Arc<ssf::SsfState>>,
}

/// The RFC 8414 metadata document for `issuer`; with `workload_tokens`,
/// the token, revocation and introspection endpoints also take RFC 7523
/// client assertions.
pub fn metadata(issuer: &str, algs: &[&str], workload_tokens: bool) -> serde_json::Value {
    let token_auth: &[&str] = if workload_tokens {
        &["tls_client_auth", "private_key_jwt"]
    } else {
        &["tls_client_auth"]
    };
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "token_endpoint": format!("{issuer}/oauth2/token"),
        // Named because strict clients (the MCP SDK among them) require
        // it; it refuses every request, see `authorize`.
        "authorization_endpoint": format!("{issuer}/oauth2/authorize"),
        "token_endpoint_auth_methods_supported": token_auth,
        "grant_types_supported": [token::CLIENT_CREDENTIALS, token::TOKEN_EXCHANGE],
        // No authorization endpoint: agents prove who they are with their
        // workload identity, not a browser.
        "response_types_supported": [],
        "tls_client_certificate_bound_access_tokens": true,
        "dpop_signing_alg_values_supported": DPOP_ALGORITHMS,
        "revocation_endpoint": format!("{issuer}/oauth2/revoke"),
        "revocation_endpoint_auth_methods_supported": token_auth,
        "introspection_endpoint": format!("{issuer}/introspect"),
        "introspection_endpoint_auth_methods_supported": token_auth,
        "access_token_signing_alg_values_supported": algs,
        // draft-ietf-oauth-status-list: where every list is named.
        "status_list_aggregation_endpoint": format!("{issuer}/statuslists"),
    })
}

/// What the side port publishes besides the service's own endpoints.
pub struct Published {
    /// The CRLs, when an issuing CA is configured.
    pub crl: Option<Arc<CrlPublisher>>,
    /// The Token Status Lists.
    pub status_lists: Arc<StatusLists>,
    /// Workload-token issuers, for `client_assertion`.
    pub federation: Option<Arc<Federation>>,
    /// The Shared Signals transmitter.
    pub ssf: Option<Arc<ssf::SsfState>>,
}

/// The router for the side port.
pub fn router(
    issuer: &str,
    signer: Arc<JwtSigner>,
    metadata: &serde_json::Value,
    service: Arc<Service>,
    published: Published,
) -> Router {
    let state = HttpState {
        signer,
        metadata: metadata.to_string().into(),
        service,
        token_url: format!("{issuer}/oauth2/token").into(),
        dpop_seen: Arc::new(ReplayCache::new(DPOP_PROOFS_REMEMBERED)),
        crl: published.crl,
        status_lists: published.status_lists,
        federation: published.federation,
        ssf: published.ssf,
    };
    Router::new()
        .route("/crl", get(crl_handler))
        .route("/crl/{ca}", get(crl_of_handler))
        .route("/statuslists", get(status_lists_handler))
        .route("/statuslists/{n}", get(status_list_handler))
        .route("/.well-known/ssf-configuration", get(ssf::configuration))
        .route(
            "/ssf/streams",
            post(ssf::create)
                .get(ssf::read)
                .patch(ssf::update)
                .put(ssf::replace)
                .delete(ssf::delete),
        )
        .route("/ssf/status", get(ssf::status).post(ssf::set_status))
        .route("/ssf/subjects:add", post(ssf::add_subject))
        .route("/ssf/subjects:remove", post(ssf::remove_subject))
        .route("/ssf/verify", post(ssf::verify))
        .route("/ssf/poll/{stream_id}", post(ssf::poll))
        .route("/introspect", post(introspect::introspect))
        .route("/oauth2/token", post(token::token))
        .route("/oauth2/revoke", post(revoke::revoke))
        .route("/oauth2/authorize", get(authorize).post(authorize))
        .route("/.well-known/jwks.json", get(jwks_handler))
        .route(
            "/.well-known/oauth-authorization-server",
            get(metadata_handler),
        )
        // The same document, for clients that only look there.
        .route("/.well-known/openid-configuration", get(metadata_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_handler))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM_BYTES))
        .with_state(state)
}

fn json_response(body: &Arc<str>, cache: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, cache),
        ],
        body.to_string(),
    )
        .into_response()
}

/// The authorization endpoint (RFC 6749 §3.1), for clients whose
/// metadata parsers require one: agents prove who they are with their
/// workload identity at the token endpoint, never through a browser, so
/// every request is refused (no redirect: no redirect URI is registered).
async fn authorize() -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(json!({
            "error": "unsupported_response_type",
            "error_description": "Mayfly has no browser authorization flow: a workload gets \
                tokens at the token endpoint with client_credentials (inside a task) or \
                token exchange, authenticating with its X.509-SVID",
        })),
    )
        .into_response()
}

async fn jwks_handler(State(s): State<HttpState>) -> Response {
    // Short caching: validators refetch on an unknown `kid` anyway, and a
    // new key is published well before it signs (`mayfly keys rotate`).
    json_response(&s.signer.jwks_json(), "public, max-age=300")
}

async fn metadata_handler(State(s): State<HttpState>) -> Response {
    json_response(&s.metadata, "public, max-age=3600")
}

async fn crl_handler(State(s): State<HttpState>) -> Response {
    let Some(crl) = s.crl else {
        return no_ca();
    };
    crl_response(crl.current().await.map(Some))
}

async fn crl_of_handler(State(s): State<HttpState>, Path(id): Path<String>) -> Response {
    let Some(crl) = s.crl else {
        return no_ca();
    };
    crl_response(crl.of(&id).await)
}

fn no_ca() -> Response {
    (StatusCode::NOT_FOUND, "no issuing CA is configured\n").into_response()
}

/// The aggregation endpoint: the URI of every list.
async fn status_lists_handler(State(s): State<HttpState>) -> Response {
    match s.status_lists.uris().await {
        Ok(uris) => (
            [(header::CACHE_CONTROL, "no-cache")],
            axum::Json(json!({ "status_lists": uris })),
        )
            .into_response(),
        Err(e) => status_list_unavailable(&e),
    }
}

/// List `n` as a Status List Token; 404 for a list no token names.
async fn status_list_handler(State(s): State<HttpState>, Path(n): Path<String>) -> Response {
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            format!("no status list {n}: no token names it\n"),
        )
            .into_response()
    };
    // Digits only: no sign, no leading zeros beyond "0".
    let Some(n) = n.parse::<u64>().ok().filter(|v| v.to_string() == n) else {
        return not_found();
    };
    match s.status_lists.token(n).await {
        Ok(Some(jwt)) => (
            [
                (header::CONTENT_TYPE, STATUS_LIST_MEDIA_TYPE.to_owned()),
                (
                    header::CACHE_CONTROL,
                    format!("max-age={}", s.status_lists.ttl().as_secs()),
                ),
            ],
            jwt.to_string(),
        )
            .into_response(),
        Ok(None) => not_found(),
        Err(e) => status_list_unavailable(&e),
    }
}

fn status_list_unavailable(e: &StatusListError) -> Response {
    tracing::warn!(error = %e, "status list unavailable");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "1")],
        "status lists unavailable: the store cannot be read\n",
    )
        .into_response()
}

fn crl_response(crl: Result<Option<Arc<[u8]>>, crate::crl::CrlError>) -> Response {
    match crl {
        Ok(Some(der)) => (
            [
                (header::CONTENT_TYPE, "application/pkix-crl"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            der.to_vec(),
        )
            .into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no issuing CA has this id\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the CRL");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "CRL unavailable: lease store unavailable\n",
            )
                .into_response()
        }
    }
}

/// Prometheus metrics: OpenMetrics text, or the Prometheus text format
/// (0.0.4) for a scraper whose `Accept` names `text/plain` and not
/// OpenMetrics. The live-lease gauge is read from the store now; if the
/// store does not answer, it keeps its last value and the rest is served
/// anyway.
async fn metrics_handler(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let metrics = s.service.metrics();
    if let Ok(Ok(n)) = tokio::time::timeout(READY_TIMEOUT, s.service.store().active_count()).await {
        metrics
            .active_leases
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains("text/plain") && !accept.contains("application/openmetrics-text") {
        return (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::classic::from_openmetrics(&metrics.encode()),
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
        .into_response()
}

async fn ready(State(s): State<HttpState>) -> Response {
    match tokio::time::timeout(READY_TIMEOUT, s.service.store().check()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => {
            // The detail (paths, addresses) is for the log, not the world.
            tracing::warn!(error = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: lease store unavailable\n",
            )
                .into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: store check timed out\n",
        )
            .into_response(),
    }
}
