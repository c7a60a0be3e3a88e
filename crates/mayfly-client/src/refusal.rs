//! The broker's refusals, typed. Every status the broker returns names its
//! error in metadata (`mayfly-error`, with `mayfly-policy-id`,
//! `mayfly-approval-id` and `retry-after` where they apply), so a caller
//! reacts to a policy's denial, an envelope it overstepped, a task that
//! ended or a rate limit without parsing the message. A status without
//! that metadata (a proxy's, a dropped connection) is typed by its code.

use std::time::Duration;

use tonic::{Code, Status};

/// What kind of refusal it was.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefusalKind {
    /// A field was malformed or out of range; nothing was issued.
    Invalid,
    /// The broker did not accept the caller's identity (a workload token
    /// already used or expired included: fetch a fresh one).
    Unauthenticated,
    /// Policy refused; `policy_id` names the deciding policy, or is `None`
    /// when no policy permitted it (the default deny).
    Denied {
        /// The deciding policy.
        policy_id: Option<String>,
    },
    /// An audience or scope outside the task's envelope (or, for a
    /// delegation, the parent's).
    OutsideEnvelope,
    /// The task is no longer active: completed, revoked or expired.
    TaskEnded,
    /// No such task, lease, approval or agent visible to the caller.
    NotFound,
    /// An operator locked the agent out; nothing new is issued to it.
    AgentLocked,
    /// An operator refused the approval, or it expired undecided.
    ApprovalDenied {
        /// The approval.
        approval_id: Option<String>,
    },
    /// Too many requests from this agent: try again after `retry_after`.
    RateLimited {
        /// How long to wait.
        retry_after: Duration,
    },
    /// The broker, its store or its audit trail is out of reach; nothing
    /// was issued, and retrying later is safe.
    Unavailable,
    /// Anything else (its name is in [`Refusal::name`]).
    Other,
}

/// A broker call that was refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} ({})", if name.is_empty() { code_name(*code) } else { name.as_str() })]
pub struct Refusal {
    /// What kind of refusal.
    pub kind: RefusalKind,
    /// The gRPC status code.
    pub code: Code,
    /// The broker's stable name for it (`mayfly-error`), empty when the
    /// status did not come from the broker.
    pub name: String,
    /// The broker's explanation, for people.
    pub message: String,
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::Unauthenticated => "unauthenticated",
        Code::InvalidArgument => "invalid_argument",
        Code::NotFound => "not_found",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        _ => "error",
    }
}

impl Refusal {
    /// Whether the same call may succeed later unchanged (the broker was
    /// out of reach, or the agent was rate limited).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            RefusalKind::Unavailable | RefusalKind::RateLimited { .. }
        )
    }
}

impl From<Status> for Refusal {
    fn from(status: Status) -> Self {
        let meta = status.metadata();
        let text = |key: &str| {
            meta.get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let name = text("mayfly-error").unwrap_or_default();
        let kind = match name.as_str() {
            "invalid" | "invalid_subject_token" | "delegation_too_deep" => RefusalKind::Invalid,
            "unauthenticated" | "workload_token_used" | "workload_token_expired" => {
                RefusalKind::Unauthenticated
            }
            "denied" => RefusalKind::Denied {
                policy_id: text("mayfly-policy-id"),
            },
            "outside_envelope" | "beyond_parent" => RefusalKind::OutsideEnvelope,
            "task_not_active" => RefusalKind::TaskEnded,
            "task_not_found" | "lease_not_found" | "approval_not_found" | "agent_not_found" => {
                RefusalKind::NotFound
            }
            "agent_locked" => RefusalKind::AgentLocked,
            "approval_denied" => RefusalKind::ApprovalDenied {
                approval_id: text("mayfly-approval-id"),
            },
            "rate_limited" => RefusalKind::RateLimited {
                retry_after: text("retry-after")
                    .and_then(|s| s.parse().ok())
                    .map_or(Duration::from_secs(1), Duration::from_secs),
            },
            "unavailable" | "audit_unavailable" | "audit_broken" | "feed_unavailable" => {
                RefusalKind::Unavailable
            }
            "" => match status.code() {
                Code::Unavailable | Code::DeadlineExceeded => RefusalKind::Unavailable,
                Code::Unauthenticated => RefusalKind::Unauthenticated,
                Code::InvalidArgument => RefusalKind::Invalid,
                Code::NotFound => RefusalKind::NotFound,
                _ => RefusalKind::Other,
            },
            _ => RefusalKind::Other,
        };
        Self {
            kind,
            code: status.code(),
            name,
            message: status.message().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;

    use super::*;

    fn status(code: Code, message: &str, meta: &[(&'static str, &'static str)]) -> Status {
        let mut s = Status::new(code, message);
        for (k, v) in meta {
            s.metadata_mut().insert(*k, MetadataValue::from_static(v));
        }
        s
    }

    #[test]
    fn refusals_are_typed_by_their_metadata_not_their_message() {
        let denied = Refusal::from(status(
            Code::PermissionDenied,
            "no policy permits it",
            &[("mayfly-error", "denied"), ("mayfly-policy-id", "reads")],
        ));
        assert_eq!(
            denied.kind,
            RefusalKind::Denied {
                policy_id: Some("reads".into())
            }
        );
        assert_eq!(denied.to_string(), "no policy permits it (denied)");
        let limited = Refusal::from(status(
            Code::ResourceExhausted,
            "slow down",
            &[("mayfly-error", "rate_limited"), ("retry-after", "3")],
        ));
        assert_eq!(
            limited.kind,
            RefusalKind::RateLimited {
                retry_after: Duration::from_secs(3)
            }
        );
        assert!(limited.is_retryable());
        // A message that reads like another refusal changes nothing.
        let ended = Refusal::from(status(
            Code::FailedPrecondition,
            "denied by policy",
            &[("mayfly-error", "task_not_active")],
        ));
        assert_eq!(ended.kind, RefusalKind::TaskEnded);
        assert!(!ended.is_retryable());
    }

    #[test]
    fn a_status_without_metadata_is_typed_by_its_code() {
        let dropped = Refusal::from(Status::unavailable("connection reset"));
        assert_eq!(dropped.kind, RefusalKind::Unavailable);
        assert_eq!(dropped.name, "");
        assert_eq!(dropped.to_string(), "connection reset (unavailable)");
        let odd = Refusal::from(Status::internal("boom"));
        assert_eq!(odd.kind, RefusalKind::Other);
    }
}
