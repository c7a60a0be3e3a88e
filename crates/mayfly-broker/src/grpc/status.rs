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
            | BrokerError::Denied { .. }
            | BrokerError::OutsideEnvelope(_) => Status::permission_denied(msg),
            BrokerError::TaskNotFound(_) | BrokerError::LeaseNotFound(_) => Status::not_found(msg),
            BrokerError::TaskNotActive { .. }
            | BrokerError::LeaseNotActive { .. }
            | BrokerError::Unsupported(_) => Status::failed_precondition(msg),
            BrokerError::Unavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                Status::unavailable("lease store unavailable; nothing was issued, retry later")
            }
            BrokerError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error; the broker log has details")
            }
        }
    }
}
