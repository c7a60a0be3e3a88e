//! The HTTPS side port (no client certificate): JWKS and RFC 8414 metadata so
//! stock JWT libraries can validate tokens, and health probes.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use axum::extract::rejection::FormRejection;
use axum::{Extension, Form};
use mayfly_core::Timestamp;

use crate::connections::PeerInfo;
use crate::crl::CrlPublisher;
use crate::error::BrokerError;
use crate::service::Service;

/// How long a readiness probe waits for the store.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct HttpState {
    /// Serialised once at start: `/.well-known/jwks.json`.
    jwks: Arc<str>,
    /// Serialised once at start: `/.well-known/oauth-authorization-server`.
    metadata: Arc<str>,
    /// Answers `/introspect`; its store is probed by `/readyz`.
    service: Arc<Service>,
    /// Serves `/crl` when an issuing CA is configured.
    crl: Option<Arc<CrlPublisher>>,
}

/// The RFC 8414 metadata document for `issuer`.
pub fn metadata(issuer: &str, algs: &[&str]) -> serde_json::Value {
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        // Tokens are issued over the gRPC Broker API, not an OAuth endpoint.
        "response_types_supported": [],
        "grant_types_supported": [],
        "token_endpoint_auth_methods_supported": ["tls_client_auth"],
        "tls_client_certificate_bound_access_tokens": true,
        "introspection_endpoint": format!("{issuer}/introspect"),
        "introspection_endpoint_auth_methods_supported": ["tls_client_auth"],
        "access_token_signing_alg_values_supported": algs,
    })
}

/// The router for the side port.
pub fn router(
    jwks: &serde_json::Value,
    metadata: &serde_json::Value,
    service: Arc<Service>,
    crl: Option<Arc<CrlPublisher>>,
) -> Router {
    let state = HttpState {
        jwks: jwks.to_string().into(),
        metadata: metadata.to_string().into(),
        service,
        crl,
    };
    Router::new()
        .route("/crl", get(crl_handler))
        .route("/introspect", post(introspect))
        .route("/.well-known/jwks.json", get(jwks_handler))
        .route(
            "/.well-known/oauth-authorization-server",
            get(metadata_handler),
        )
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

async fn jwks_handler(State(s): State<HttpState>) -> Response {
    // Short caching: validators refetch on an unknown `kid` anyway.
    json_response(&s.jwks, "public, max-age=300")
}

async fn metadata_handler(State(s): State<HttpState>) -> Response {
    json_response(&s.metadata, "public, max-age=3600")
}

/// The form of an RFC 7662 request.
#[derive(Debug, serde::Deserialize)]
struct IntrospectForm {
    token: String,
    /// Accepted and ignored: only access tokens exist here.
    #[serde(default)]
    #[allow(dead_code)]
    token_type_hint: Option<String>,
}

use mayfly_core::limits::{MAX_FORM_BYTES, MAX_TOKEN_BYTES};

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

async fn introspect(
    State(s): State<HttpState>,
    Extension(peer): Extension<PeerInfo>,
    form: Result<Form<IntrospectForm>, FormRejection>,
) -> Response {
    // The resource server authenticates with its X.509-SVID (mTLS).
    let caller = match peer.identity.as_ref() {
        Ok(c) if Timestamp::now() < c.not_after => c.clone(),
        Ok(_) => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client certificate has expired",
            );
        }
        Err(e) => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", &e.to_string()),
    };
    let form = match form {
        Ok(Form(form)) => form,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return oauth_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                &format!("request body exceeds {MAX_FORM_BYTES} bytes"),
            );
        }
        Err(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "expected application/x-www-form-urlencoded with a token parameter",
            );
        }
    };
    let inactive = || {
        (
            StatusCode::OK,
            [(header::CACHE_CONTROL, "no-store")],
            axum::Json(json!({"active": false})),
        )
            .into_response()
    };
    if form.token.len() > MAX_TOKEN_BYTES {
        return inactive();
    }
    match s.service.issuance().introspect(&caller, &form.token).await {
        Ok(Some(claims)) => (
            StatusCode::OK,
            [(header::CACHE_CONTROL, "no-store")],
            axum::Json(claims),
        )
            .into_response(),
        Ok(None) => inactive(),
        Err(BrokerError::NotIntrospector(_)) => oauth_error(
            StatusCode::FORBIDDEN,
            "unauthorized_client",
            &format!("{} may not introspect tokens", caller.id),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "introspection failed");
            oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "lease store unavailable",
            )
        }
    }
}

async fn crl_handler(State(s): State<HttpState>) -> Response {
    let Some(crl) = s.crl else {
        return (StatusCode::NOT_FOUND, "no issuing CA is configured\n").into_response();
    };
    match crl.current().await {
        Ok(der) => (
            [
                (header::CONTENT_TYPE, "application/pkix-crl"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            der.to_vec(),
        )
            .into_response(),
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

/// Prometheus metrics (OpenMetrics text). The live-lease gauge is read
/// from the store now; if the store does not answer, it keeps its last
/// value and the rest is served anyway.
async fn metrics_handler(State(s): State<HttpState>) -> Response {
    let metrics = s.service.metrics();
    if let Ok(Ok(n)) = tokio::time::timeout(READY_TIMEOUT, s.service.store().active_count()).await {
        metrics
            .active_leases
            .set(i64::try_from(n).unwrap_or(i64::MAX));
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
