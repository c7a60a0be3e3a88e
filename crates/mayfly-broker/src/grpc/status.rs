//! The one mapping from [`BrokerError`] to a gRPC status. The match has no
//! catch-all arm, so a new error variant must be mapped on purpose.
//!
//! Besides its code and message, every status names its error in metadata
//! so that clients need not parse messages (the SDKs raise a typed
//! exception per name): `mayfly-error` (a stable snake_case name, below),
//! `mayfly-policy-id` for a policy's refusal, `mayfly-approval-id` for an
//! approval's, and `retry-after` (seconds) when rate limited.

use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::error::BrokerError;
use crate::federation::TokenError;
use crate::identity::AuthError;

/// Sets an ASCII metadata entry; a value that is not valid metadata (it
/// never is: ids and names are ASCII) is left out rather than failing.
fn with(mut status: Status, key: &'static str, value: &str) -> Status {
    if let Ok(v) = MetadataValue::try_from(value) {
        status.metadata_mut().insert(key, v);
    }
    status
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
        let msg = e.to_string();
        let (status, name) = match &e {
            BrokerError::Invalid(_) | BrokerError::InvalidInput(_) => {
                (Status::invalid_argument(msg), "invalid")
            }
            // The token could not be checked (the issuer's keys or the
            // replay record out of reach): a retry may succeed.
            BrokerError::Unauthenticated(AuthError::Token(e)) if e.is_unavailable() => {
                (Status::unavailable(msg), "unavailable")
            }
            // A client that holds a source of workload tokens (a file the
            // kubelet rotates, an OIDC endpoint) fetches a fresh one for
            // these two and tries again.
            BrokerError::Unauthenticated(AuthError::Token(TokenError::Replayed(_))) => {
                (Status::unauthenticated(msg), "workload_token_used")
            }
            BrokerError::Unauthenticated(AuthError::Token(TokenError::Expired)) => {
                (Status::unauthenticated(msg), "workload_token_expired")
            }
            BrokerError::Unauthenticated(_) => (Status::unauthenticated(msg), "unauthenticated"),
            BrokerError::NotOperator(_) | BrokerError::OperatorWithoutCertificate(_) => {
                (Status::permission_denied(msg), "not_operator")
            }
            BrokerError::NotIntrospector(_) => (Status::permission_denied(msg), "not_introspector"),
            BrokerError::NotWatcher(_) => (Status::permission_denied(msg), "not_watcher"),
            BrokerError::NotGateway(_) => (Status::permission_denied(msg), "not_gateway"),
            BrokerError::NotUpstream { .. } => (Status::permission_denied(msg), "not_upstream"),
            BrokerError::NotTokenClient(_) => (Status::permission_denied(msg), "not_token_client"),
            BrokerError::NotRecipient { .. } | BrokerError::NotReporter { .. } => {
                (Status::permission_denied(msg), "not_recipient")
            }
            BrokerError::InvalidSubjectToken(_) => {
                (Status::permission_denied(msg), "invalid_subject_token")
            }
            BrokerError::Denied { policy_id, .. } => {
                let status = Status::permission_denied(msg);
                let status = match policy_id {
                    Some(p) => with(status, "mayfly-policy-id", p),
                    None => status,
                };
                (status, "denied")
            }
            BrokerError::OutsideEnvelope(_) => (Status::permission_denied(msg), "outside_envelope"),
            BrokerError::BeyondParent { .. } => (Status::permission_denied(msg), "beyond_parent"),
            BrokerError::DelegationTooDeep { .. } => {
                (Status::permission_denied(msg), "delegation_too_deep")
            }
            BrokerError::TaskNotFound(_) => (Status::not_found(msg), "task_not_found"),
            BrokerError::DatabaseNotFound(_) => (Status::not_found(msg), "database_not_found"),
            BrokerError::DatabaseUnavailable(_) => {
                (Status::unavailable(msg), "database_unavailable")
            }
            BrokerError::DatabaseRefused(_) => {
                (Status::failed_precondition(msg), "database_refused")
            }
            BrokerError::LeaseNotFound(_) => (Status::not_found(msg), "lease_not_found"),
            BrokerError::ApprovalNotFound(_) => (Status::not_found(msg), "approval_not_found"),
            BrokerError::ApprovalMismatch(id) => (
                with(
                    Status::permission_denied(msg),
                    "mayfly-approval-id",
                    id.as_str(),
                ),
                "approval_mismatch",
            ),
            BrokerError::ApprovalDenied { id, .. } => (
                with(
                    Status::permission_denied(msg),
                    "mayfly-approval-id",
                    id.as_str(),
                ),
                "approval_denied",
            ),
            BrokerError::AgentLocked(_) => (Status::permission_denied(msg), "agent_locked"),
            BrokerError::AgentNotFound(_) => (Status::not_found(msg), "agent_not_found"),
            BrokerError::AgentNotLocked(_) => (Status::not_found(msg), "agent_not_locked"),
            BrokerError::ApprovalUnusable { id, state } => (
                with(
                    with(
                        Status::failed_precondition(msg),
                        "mayfly-approval-id",
                        id.as_str(),
                    ),
                    "mayfly-approval-state",
                    state.as_str(),
                ),
                "approval_unusable",
            ),
            BrokerError::TaskChanged(_) => (Status::aborted(msg), "task_changed"),
            BrokerError::RateLimited { retry_after } => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                let status = with(
                    Status::resource_exhausted(msg),
                    "retry-after",
                    &secs.to_string(),
                );
                (status, "rate_limited")
            }
            BrokerError::TaskNotActive { .. } => {
                (Status::failed_precondition(msg), "task_not_active")
            }
            BrokerError::LeaseNotActive { .. } => {
                (Status::failed_precondition(msg), "lease_not_active")
            }
            BrokerError::Unsupported(_) => (Status::failed_precondition(msg), "unsupported"),
            BrokerError::Unavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                (
                    Status::unavailable("lease store unavailable; nothing was issued, retry later"),
                    "unavailable",
                )
            }
            BrokerError::AuditUnavailable(detail) => {
                tracing::warn!(%detail, "audit trail unavailable");
                (
                    Status::unavailable("audit trail unavailable; nothing was issued, retry later"),
                    "audit_unavailable",
                )
            }
            BrokerError::AuditBroken(_) => (Status::unavailable(msg), "audit_broken"),
            BrokerError::FeedUnavailable(_) => (Status::unavailable(msg), "feed_unavailable"),
            BrokerError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                (
                    Status::internal("internal error; the broker log has details"),
                    "internal",
                )
            }
        };
        with(status, "mayfly-error", name)
    }
}
