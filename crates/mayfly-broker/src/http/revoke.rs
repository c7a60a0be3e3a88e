//! `POST /oauth2/revoke` (RFC 7009): an agent ends one of its own tokens
//! early (one token per tool call, say). The lease is revoked with reason
//! `token_revoked`, so the feed, the CRL's readers and introspection see it
//! at once. A token that is not valid, not one of ours, or already ended is
//! answered 200 as the RFC asks; a token issued to another client is
//! refused.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mayfly_core::limits::MAX_TOKEN_BYTES;

use super::HttpState;
use super::client::{authenticate_client, check_client_id};
use super::errors::OAuthError;
use super::form::Params;
use super::token::body;
use crate::connections::PeerInfo;

/// `POST /oauth2/revoke`.
pub(super) async fn revoke(
    State(s): State<HttpState>,
    Extension(peer): Extension<PeerInfo>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let params = Params::parse(&headers, &body(raw)?)?;
        let caller = authenticate_client(&s, &peer, &params).await?;
        check_client_id(&caller, &params)?;
        // `token_type_hint` is only a hint: access tokens are all there is.
        let token = params.require("token")?;
        if token.len() <= MAX_TOKEN_BYTES {
            s.service
                .issuance()
                .revoke_own_token(&caller, token)
                .await?;
        }
        Ok::<_, OAuthError>(())
    };
    match run.await {
        Ok(()) => (StatusCode::OK, [(header::CACHE_CONTROL, "no-store")]).into_response(),
        Err(e) => e.into_response(),
    }
}
