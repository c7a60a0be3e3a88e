//! The one mapping from [`BrokerError`] to a gRPC status. The match has no
//! catch-all arm, so a new error variant must be mapped on purpose.

use tonic::Status;

use crate::error::BrokerError;

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
        let msg = e.to_string();
        match e {
            BrokerError::Invalid(_) => Status::invalid_argument(msg),
            BrokerError::Unauthenticated(_) => Status::unauthenticated(msg),
            BrokerError::NotOperator(_)
            | BrokerError::NotIntrospector(_)
            | BrokerError::NotWatcher(_)
            | BrokerError::NotTokenClient(_)
            | BrokerError::InvalidSubjectToken(_)
            | BrokerError::Denied { .. }
            | BrokerError::OutsideEnvelope(_)
            | BrokerError::BeyondParent { .. }
            | BrokerError::DelegationTooDeep { .. } => Status::permission_denied(msg),
            BrokerError::TaskNotFound(_)
            | BrokerError::LeaseNotFound(_)
            | BrokerError::ApprovalNotFound(_) => Status::not_found(msg),
            BrokerError::ApprovalMismatch(_)
            | BrokerError::ApprovalDenied { .. }
            | BrokerError::AgentLocked(_) => Status::permission_denied(msg),
            BrokerError::AgentNotFound(_) | BrokerError::AgentNotLocked(_) => {
                Status::not_found(msg)
            }
            BrokerError::ApprovalUnusable { .. } => Status::failed_precondition(msg),
            BrokerError::TaskChanged(_) => Status::aborted(msg),
            BrokerError::RateLimited { retry_after } => {
                let mut status = Status::resource_exhausted(msg);
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                if let Ok(v) = secs.to_string().parse() {
                    status.metadata_mut().insert("retry-after", v);
                }
                status
            }
            BrokerError::TaskNotActive { .. }
            | BrokerError::LeaseNotActive { .. }
            | BrokerError::Unsupported(_) => Status::failed_precondition(msg),
            BrokerError::Unavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                Status::unavailable("lease store unavailable; nothing was issued, retry later")
            }
            BrokerError::AuditUnavailable(detail) => {
                tracing::warn!(%detail, "audit trail unavailable");
                Status::unavailable("audit trail unavailable; nothing was issued, retry later")
            }
            BrokerError::AuditBroken(_) | BrokerError::FeedUnavailable(_) => {
                Status::unavailable(msg)
            }
            BrokerError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error; the broker log has details")
            }
        }
    }
}
