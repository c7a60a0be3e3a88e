//! `POST /introspect` (RFC 7662) for resource servers, over mTLS: the
//! token's claims if it is one of ours, unexpired, its lease active, and
//! its audience one the caller may see (`[[introspection]]`); else
//! `{"active": false}`.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use mayfly_core::limits::MAX_TOKEN_BYTES;
use serde_json::json;

use super::HttpState;
use super::client::authenticate_client;
use super::errors::{Code, OAuthError};
use super::form::Params;
use super::token::body;
use crate::connections::PeerInfo;
use crate::error::BrokerError;

/// `POST /introspect`.
pub(super) async fn introspect(
    State(s): State<HttpState>,
    Extension(peer): Extension<PeerInfo>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        // The resource server authenticates with its X.509-SVID (mTLS) or
        // a workload token as a client assertion.
        let params = Params::parse(&headers, &body(raw)?)?;
        let caller = authenticate_client(&s, &peer, &params).await?;
        // `token_type_hint` is accepted and ignored: only access tokens
        // exist here.
        let token = params.require("token")?;
        if token.len() > MAX_TOKEN_BYTES {
            return Ok(None);
        }
        match s.service.issuance().introspect(&caller, token).await {
            Ok(claims) => Ok(claims),
            Err(BrokerError::NotIntrospector(_)) => Err(OAuthError::new(
                Code::UnauthorizedClient,
                format!("{} may not introspect tokens", caller.id),
            )
            .with_status(StatusCode::FORBIDDEN)),
            Err(e) => Err(e.into()),
        }
    };
    let answer = match run.await {
        Ok(Some(claims)) => claims,
        Ok(None) => json!({"active": false}),
        Err(e) => return e.into_response(),
    };
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        Json(answer),
    )
        .into_response()
}
