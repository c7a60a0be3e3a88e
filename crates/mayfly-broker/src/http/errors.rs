//! OAuth errors (RFC 6749 §5.2, RFC 7009, RFC 8707, RFC 8628) as the HTTPS
//! endpoints answer them, and the one mapping from [`BrokerError`] to them:
//! an exhaustive match, so a new error variant is mapped on purpose.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mayfly_core::ApprovalState;
use serde_json::{Map, Value, json};

use crate::error::BrokerError;

/// How long a client waits between polls for an approval (RFC 8628
/// `interval`).
pub(super) const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// An OAuth error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Code {
    /// Malformed, missing or repeated parameters.
    InvalidRequest,
    /// The client did not authenticate (no valid client certificate).
    InvalidClient,
    /// The task, approval or subject token is unknown, ended or another's.
    InvalidGrant,
    /// The client may not do this.
    UnauthorizedClient,
    /// The DPoP proof failed a check (RFC 9449 §5).
    InvalidDpopProof,
    /// A `grant_type` this server does not issue.
    UnsupportedGrantType,
    /// A scope outside the task's envelope, or malformed.
    InvalidScope,
    /// A `resource` outside the task's envelope, or malformed (RFC 8707).
    InvalidTarget,
    /// Policy or an operator refused.
    AccessDenied,
    /// An operator has not decided yet: poll again (RFC 8628).
    AuthorizationPending,
    /// The approval waited too long (RFC 8628).
    ExpiredToken,
    /// Too many requests: wait (RFC 8628).
    SlowDown,
    /// The store or the trail is down, or the task changed under the
    /// request: nothing was issued; retry.
    TemporarilyUnavailable,
    /// A bug; the log has the details.
    ServerError,
}

impl Code {
    fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidClient => "invalid_client",
            Self::InvalidGrant => "invalid_grant",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::InvalidDpopProof => "invalid_dpop_proof",
            Self::InvalidScope => "invalid_scope",
            Self::InvalidTarget => "invalid_target",
            Self::AccessDenied => "access_denied",
            Self::AuthorizationPending => "authorization_pending",
            Self::ExpiredToken => "expired_token",
            Self::SlowDown => "slow_down",
            Self::TemporarilyUnavailable => "temporarily_unavailable",
            Self::ServerError => "server_error",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::InvalidClient => StatusCode::UNAUTHORIZED,
            Self::SlowDown => StatusCode::TOO_MANY_REQUESTS,
            Self::TemporarilyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            Self::InvalidRequest
            | Self::InvalidGrant
            | Self::UnauthorizedClient
            | Self::UnsupportedGrantType
            | Self::InvalidDpopProof
            | Self::InvalidScope
            | Self::InvalidTarget
            | Self::AccessDenied
            | Self::AuthorizationPending
            | Self::ExpiredToken => StatusCode::BAD_REQUEST,
        }
    }
}

/// An error response: the code, what was wrong, and any fields a client
/// needs to go on (an approval's id and polling interval).
#[derive(Debug)]
pub(super) struct OAuthError {
    code: Code,
    description: String,
    status: StatusCode,
    extra: Map<String, Value>,
    retry_after: Option<Duration>,
}

impl OAuthError {
    /// `code` saying `description`.
    pub(super) fn new(code: Code, description: impl Into<String>) -> Self {
        Self {
            code,
            description: description.into(),
            status: code.status(),
            extra: Map::new(),
            retry_after: None,
        }
    }

    /// The same, with another HTTP status (413 for a body too large).
    pub(super) fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The same, with a field beside `error`.
    pub(super) fn with(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(name.to_owned(), value.into());
        self
    }

    /// The OAuth error code.
    #[cfg(test)]
    pub(super) fn code(&self) -> Code {
        self.code
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "error": self.code.as_str(),
            "error_description": self.description,
        });
        if let Value::Object(fields) = &mut body {
            fields.extend(self.extra);
        }
        let mut response = (
            self.status,
            [
                (header::CACHE_CONTROL, "no-store"),
                (header::PRAGMA, "no-cache"),
            ],
            axum::Json(body),
        )
            .into_response();
        if let Some(after) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&after.as_secs().max(1).to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

impl From<BrokerError> for OAuthError {
    fn from(e: BrokerError) -> Self {
        let msg = e.to_string();
        let code = match &e {
            BrokerError::Invalid(_)
            | BrokerError::InvalidInput(_)
            | BrokerError::BeyondParent { .. }
            | BrokerError::DelegationTooDeep { .. }
            | BrokerError::Unsupported(_)
            | BrokerError::AgentNotFound(_)
            | BrokerError::AgentNotLocked(_)
            | BrokerError::DatabaseNotFound(_)
            | BrokerError::DatabaseRefused(_) => Code::InvalidRequest,
            BrokerError::Unauthenticated(_) => Code::InvalidClient,
            BrokerError::NotOperator(_)
            | BrokerError::OperatorWithoutCertificate(_)
            | BrokerError::NotIntrospector(_)
            | BrokerError::NotWatcher(_)
            | BrokerError::NotGateway(_)
            | BrokerError::NotUpstream { .. }
            | BrokerError::NotTokenClient(_) => Code::UnauthorizedClient,
            BrokerError::Denied { .. }
            | BrokerError::ApprovalDenied { .. }
            | BrokerError::AgentLocked(_) => Code::AccessDenied,
            BrokerError::OutsideEnvelope(excess) if excess.audience.is_some() => {
                Code::InvalidTarget
            }
            BrokerError::OutsideEnvelope(_) => Code::InvalidScope,
            BrokerError::TaskNotFound(_)
            | BrokerError::LeaseNotFound(_)
            | BrokerError::TaskNotActive { .. }
            | BrokerError::LeaseNotActive { .. }
            | BrokerError::ApprovalNotFound(_)
            | BrokerError::ApprovalMismatch(_)
            | BrokerError::InvalidSubjectToken(_)
            | BrokerError::NotRecipient { .. }
            | BrokerError::NotReporter { .. } => Code::InvalidGrant,
            BrokerError::ApprovalUnusable { state, id } => {
                let code = match state {
                    ApprovalState::Pending => Code::AuthorizationPending,
                    ApprovalState::Expired => Code::ExpiredToken,
                    ApprovalState::Denied => Code::AccessDenied,
                    ApprovalState::Approved | ApprovalState::Consumed => Code::InvalidGrant,
                };
                let out = Self::new(code, msg).with("approval_id", id.to_string());
                return match code {
                    Code::AuthorizationPending => out.with("interval", POLL_INTERVAL.as_secs()),
                    _ => out,
                };
            }
            BrokerError::RateLimited { retry_after } => {
                let mut out = Self::new(Code::SlowDown, msg);
                out.retry_after = Some(*retry_after);
                return out;
            }
            BrokerError::TaskChanged(_)
            | BrokerError::Unavailable(_)
            | BrokerError::DatabaseUnavailable(_)
            | BrokerError::AuditUnavailable(_)
            | BrokerError::AuditBroken(_)
            | BrokerError::FeedUnavailable(_) => {
                tracing::warn!(error = %e, "token endpoint: nothing issued");
                return Self::new(
                    Code::TemporarilyUnavailable,
                    match e {
                        BrokerError::TaskChanged(_) | BrokerError::AuditBroken(_) => msg,
                        _ => "the lease store or audit trail is unavailable; nothing was issued, retry later".into(),
                    },
                );
            }
            BrokerError::Internal(_) => {
                tracing::error!(error = %e, "token endpoint: internal error");
                return Self::new(
                    Code::ServerError,
                    "internal error; the broker log has details",
                );
            }
        };
        Self::new(code, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field that does not parse is answered as any invalid field.
    #[test]
    fn a_field_that_does_not_parse_is_an_invalid_request() {
        let e = OAuthError::from(BrokerError::invalid_field("task_id", mayfly_core::IdError));
        assert_eq!(e.code(), Code::InvalidRequest);
        assert_eq!(e.description, format!("task_id: {}", mayfly_core::IdError));
    }
}
