//! `POST /oauth2/token` (RFC 6749 §3.2): tokens for stock OAuth clients,
//! through the same pipeline, policy, envelope, approvals, lease and audit
//! as `IssueToken`. Nothing is issued outside one of the caller's tasks.
//!
//! `grant_type=client_credentials`, with:
//! - `task_id`: one of the caller's open tasks;
//! - `resource` (RFC 8707): the token's audience, an absolute URI in the
//!   task's envelope (else `invalid_target`);
//! - `scope`: space-separated, within the envelope (else `invalid_scope`);
//! - `approval_id`: collects a request an operator approved. A request
//!   policy makes wait answers `authorization_pending` with the approval's
//!   id and an `interval`; the client repeats it with `approval_id` until
//!   it gets the token, `access_denied` (with the operator's reason) or
//!   `expired_token` (RFC 8628 polling).
//!
//! `grant_type=urn:ietf:params:oauth:grant-type:token-exchange` (RFC
//! 8693): a service that received an agent's token (`subject_token`, of
//! type `urn:ietf:params:oauth:token-type:access_token`) asks for one for
//! the next service (`resource`, optional `scope`, else the subject
//! token's). The new token is a lease of the same task, inside its
//! envelope, decided by policy (`exchange_token`); it names the service in
//! `act`, one more hop each time, and dies with the task.
//!
//! Tokens are bound to the client certificate the request came with (RFC
//! 8705 `cnf.x5t#S256`), or, when the request carries a DPoP proof (RFC
//! 9449), to the proof's key instead (`cnf.jkt`, `token_type` `DPoP`), so a
//! client can use them where it presents no certificate. A client that
//! must hand the token to something that can check neither (a stock MCP
//! client, say) asks for a bearer token with `token_binding=none`; it is
//! still a short-lived lease of the task, seen revoked at once by
//! validators that follow the feed or introspect.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use mayfly_core::dpop::{DpopError, Request as ProofRequest, verify_proof};
use mayfly_core::limits::{MAX_FORM_BYTES, MAX_TOKEN_BYTES};
use mayfly_core::{
    ApprovalId, Audience, Binding, Scopes, TaskId, Timestamp, parse_scopes, scope_string,
};
use serde_json::json;

use super::HttpState;
use super::client::{authenticate_client, check_client_id};
use super::errors::{Code, OAuthError, POLL_INTERVAL};
use super::form::Params;
use crate::connections::PeerInfo;
use crate::identity::Caller;
use crate::service::{ExchangeRequest, Issued, IssuedToken, TokenRequest, bind_to_certificate};

/// The grants this endpoint issues.
pub(super) const CLIENT_CREDENTIALS: &str = "client_credentials";
/// RFC 8693.
pub(super) const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The token type exchanged, and issued.
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// `POST /oauth2/token`.
pub(super) async fn token(
    State(s): State<HttpState>,
    Extension(peer): Extension<PeerInfo>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match grant(&s, &peer, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Reads the request body, answering a body over the limit as RFC 6749
/// asks (`invalid_request`), with 413.
pub(super) fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, OAuthError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            OAuthError::new(
                Code::InvalidRequest,
                format!("request body exceeds {MAX_FORM_BYTES} bytes"),
            )
            .with_status(StatusCode::PAYLOAD_TOO_LARGE)
        } else {
            OAuthError::new(
                Code::InvalidRequest,
                format!("unreadable request body: {r}"),
            )
        }
    })
}

async fn grant(
    s: &HttpState,
    peer: &PeerInfo,
    headers: &HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, OAuthError> {
    // The client first (after reading the form, which may carry its
    // assertion): an unauthenticated caller learns nothing else.
    let params = Params::parse(headers, &body(raw)?)?;
    let caller = authenticate_client(s, peer, &params).await?;
    check_client_id(&caller, &params)?;
    match params.require("grant_type")? {
        CLIENT_CREDENTIALS => client_credentials(s, &caller, headers, &params).await,
        TOKEN_EXCHANGE => token_exchange(s, &caller, headers, &params).await,
        other => Err(OAuthError::new(
            Code::UnsupportedGrantType,
            format!(
                "grant_type {other:?} is not supported: this server issues {CLIENT_CREDENTIALS} \
                 and {TOKEN_EXCHANGE}"
            ),
        )),
    }
}

/// What the token is bound to: the DPoP proof's key when the request
/// carries one (checked, and used once), else the client certificate.
fn binding(
    s: &HttpState,
    caller: &Caller,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Binding, OAuthError> {
    let unbound = match params.get("token_binding") {
        None | Some("certificate") => false,
        Some("none") => true,
        Some(other) => {
            return Err(OAuthError::new(
                Code::InvalidRequest,
                format!("token_binding {other:?}: expected certificate (the default) or none"),
            ));
        }
    };
    let mut proofs = headers.get_all("dpop").iter();
    let (Some(proof), None) = (proofs.next(), proofs.next()) else {
        return match (headers.contains_key("dpop"), unbound) {
            (true, _) => Err(OAuthError::new(
                Code::InvalidDpopProof,
                "one DPoP header, not several",
            )),
            (false, true) => Ok(Binding::Bearer),
            (false, false) => Ok(bind_to_certificate(caller)?),
        };
    };
    if unbound {
        return Err(OAuthError::new(
            Code::InvalidRequest,
            "token_binding=none with a DPoP proof: the proof asks for a DPoP-bound token",
        ));
    }
    let bad = |e: DpopError| OAuthError::new(Code::InvalidDpopProof, e.to_string());
    let proof = proof
        .to_str()
        .map_err(|_| OAuthError::new(Code::InvalidDpopProof, "the DPoP header is not ASCII"))?;
    let now = Timestamp::now();
    let checked = verify_proof(
        proof,
        &ProofRequest {
            method: "POST",
            url: &s.token_url,
            access_token: None,
            now,
        },
    )
    .map_err(bad)?;
    s.dpop_seen.check(&checked, now).map_err(bad)?;
    Ok(Binding::Dpop { jkt: checked.jkt })
}

async fn client_credentials(
    s: &HttpState,
    caller: &Caller,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Response, OAuthError> {
    let req = TokenRequest {
        task_id: TaskId::new(params.require("task_id")?)
            .map_err(|e| OAuthError::new(Code::InvalidRequest, format!("task_id: {e}")))?,
        audience: resource(params)?,
        scopes: scope(params)?,
        ttl: None,
        binding: binding(s, caller, headers, params)?,
        approval_id: params
            .get("approval_id")
            .map(ApprovalId::new)
            .transpose()
            .map_err(|e| OAuthError::new(Code::InvalidRequest, format!("approval_id: {e}")))?,
    };
    match s.service.issuance().issue_token(caller, req).await? {
        Issued::Credential(t) => Ok(token_response(&t, false)),
        Issued::Pending(a) => Err(OAuthError::new(
            Code::AuthorizationPending,
            format!(
                "approval required by policy {}: repeat this request with approval_id={} \
                 once an operator has approved it",
                a.policy_id, a.id
            ),
        )
        .with("approval_id", a.id.to_string())
        .with("interval", POLL_INTERVAL.as_secs())
        .with("expires_in", Timestamp::now().until(a.expires_at).as_secs())),
    }
}

async fn token_exchange(
    s: &HttpState,
    caller: &Caller,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Response, OAuthError> {
    let invalid = |m: String| OAuthError::new(Code::InvalidRequest, m);
    let subject_token = params.require("subject_token")?;
    match params.require("subject_token_type")? {
        ACCESS_TOKEN_TYPE => {}
        other => {
            return Err(invalid(format!(
                "subject_token_type {other:?} is not supported: exchange an access token \
                 ({ACCESS_TOKEN_TYPE})"
            )));
        }
    }
    if let Some(t) = params.get("requested_token_type")
        && t != ACCESS_TOKEN_TYPE
    {
        return Err(invalid(format!(
            "requested_token_type {t:?} is not supported: this server issues access tokens"
        )));
    }
    if params.get("actor_token").is_some() {
        return Err(invalid(
            "actor_token is not accepted: the client certificate says who the actor is".into(),
        ));
    }
    if subject_token.len() > MAX_TOKEN_BYTES {
        return Err(OAuthError::new(
            Code::InvalidGrant,
            "subject_token is too long",
        ));
    }
    let req = ExchangeRequest {
        subject_token: subject_token.to_owned(),
        audience: resource(params)?,
        scopes: params.get("scope").map(|_| scope(params)).transpose()?,
        binding: binding(s, caller, headers, params)?,
    };
    match s.service.issuance().exchange_token(caller, req).await? {
        Issued::Credential(t) => Ok(token_response(&t, true)),
        Issued::Pending(_) => Err(OAuthError::new(
            Code::ServerError,
            "an exchange does not wait for approvals",
        )),
    }
}

/// The one `resource` (RFC 8707): an absolute URI without a fragment,
/// which becomes the token's audience.
fn resource(params: &Params) -> Result<Audience, OAuthError> {
    let invalid = |m: String| OAuthError::new(Code::InvalidTarget, m);
    let r = params.get("resource").ok_or_else(|| {
        invalid("parameter resource is required: the API the token is for".into())
    })?;
    if !is_absolute_uri(r) {
        return Err(invalid(format!(
            "resource {r:?} is not an absolute URI without a fragment (RFC 8707)"
        )));
    }
    Audience::new(r).map_err(|e| invalid(format!("resource: {e}")))
}

/// RFC 3986 `scheme ":" …` with no `#fragment`.
fn is_absolute_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        && !rest.is_empty()
        && !s.contains('#')
}

/// `scope`: space-separated scope-tokens; none asks for a token without
/// scopes.
fn scope(params: &Params) -> Result<Scopes, OAuthError> {
    let Some(raw) = params.get("scope") else {
        return Ok(Scopes::default());
    };
    let words: Vec<&str> = raw.split(' ').collect();
    if words.iter().any(|w| w.is_empty()) {
        return Err(OAuthError::new(
            Code::InvalidScope,
            "scope must be scope-tokens separated by single spaces",
        ));
    }
    parse_scopes(&words).map_err(|e| OAuthError::new(Code::InvalidScope, e.to_string()))
}

/// RFC 6749 §5.1; with `issued_token_type` for an exchange (RFC 8693
/// §2.2.1).
fn token_response(t: &IssuedToken, exchanged: bool) -> Response {
    let lease = &t.lease;
    let mut body = json!({
        "access_token": t.credential.expose(),
        "token_type": lease.binding().map_or("Bearer", Binding::token_type),
        "expires_in": Timestamp::now().until(lease.expires_at).as_secs(),
    });
    if !lease.scopes.is_empty() {
        body["scope"] = scope_string(&lease.scopes).into();
    }
    if exchanged {
        body["issued_token_type"] = ACCESS_TOKEN_TYPE.into();
    }
    (
        StatusCode::OK,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        Json(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_absolute_uris_without_fragments() {
        for ok in [
            "https://api.example.com",
            "https://api.example.com/v1?x=1",
            "urn:example:api",
        ] {
            assert!(is_absolute_uri(ok), "{ok}");
        }
        for bad in [
            "api.example.com",
            "/v1",
            "https://api.example.com/#top",
            "1https://x",
            ":x",
            "https:",
        ] {
            assert!(!is_absolute_uri(bad), "{bad}");
        }
    }
}
