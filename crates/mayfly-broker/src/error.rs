//! The broker's request errors. `grpc/status.rs` maps each variant to one
//! gRPC status, exhaustively.

use mayfly_core::{
    AgentLock, ApprovalId, ApprovalState, Audience, EnvelopeExcess, LeaseId, LeaseState, Scope,
    SpiffeId, TaskId, TaskState,
};

use crate::audit::AuditError;
use crate::cause::Cause;
use crate::identity::AuthError;
use crate::store::StoreError;

fn beyond_parent(audiences: &[Audience], scopes: &[Scope]) -> String {
    let mut parts = Vec::new();
    if !audiences.is_empty() {
        let names: Vec<&str> = audiences.iter().map(Audience::as_str).collect();
        parts.push(format!("audiences {names:?}"));
    }
    if !scopes.is_empty() {
        let names: Vec<&str> = scopes.iter().map(Scope::as_str).collect();
        parts.push(format!("scopes {names:?}"));
    }
    format!(
        "a delegated task must be narrower than its parent: {} exceed the parent task's envelope",
        parts.join(" and ")
    )
}

fn locked_message(lock: Option<&AgentLock>) -> String {
    let Some(l) = lock else {
        return "the agent is locked by an operator: no new task or credential until it is unlocked"
            .into();
    };
    let until = l.expires_at.map_or_else(
        || "until an operator unlocks it".to_owned(),
        |t| format!("until {}", crate::audit::rfc3339(t)),
    );
    format!(
        "agent {} is locked by {} ({}): no new task or credential {until}",
        l.agent, l.by, l.reason
    )
}

/// Why a request was refused or failed. Messages say what was wrong; none
/// carries a secret or policy text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// A field is malformed or out of range.
    #[error("{0}")]
    Invalid(String),
    /// A field did not parse: the parser's error, as `source()`, says why.
    /// Answered exactly as [`Invalid`](Self::Invalid).
    #[error("{0}")]
    InvalidInput(#[source] Cause),
    /// The peer is not an acceptable caller.
    #[error(transparent)]
    Unauthenticated(#[from] AuthError),
    /// The caller is not an operator.
    #[error("{0} is not an operator; the Admin API needs a SPIFFE ID in the operator set")]
    NotOperator(SpiffeId),
    /// The caller proved itself with a workload token, not a certificate.
    #[error(
        "{0} authenticated with a workload token; the Admin API needs a client certificate \
         (an X.509-SVID) of an operator"
    )]
    OperatorWithoutCertificate(SpiffeId),
    /// Policy refused the request.
    #[error("denied{}: {reason}", policy_id.as_deref().map_or_else(String::new, |p| format!(" by policy {p:?}")))]
    Denied {
        /// The deciding policy, if one decided.
        policy_id: Option<String>,
        /// What was not allowed.
        reason: String,
    },
    /// The request asks for more than the task's envelope.
    #[error("{0}")]
    OutsideEnvelope(EnvelopeExcess),
    /// A delegated task may not be wider than its parent.
    #[error("{}", beyond_parent(audiences, scopes))]
    BeyondParent {
        /// Audiences the parent does not have.
        audiences: Vec<Audience>,
        /// Scopes the parent does not have.
        scopes: Vec<Scope>,
    },
    /// The delegation chain would be too long.
    #[error(
        "delegation depth limit reached: the task is already {depth} delegation(s) from its root and at most {limit} are allowed"
    )]
    DelegationTooDeep {
        /// The parent's depth.
        depth: usize,
        /// `tasks.max_delegation_depth`.
        limit: usize,
    },
    /// No such task visible to the caller.
    #[error("task {0} not found")]
    TaskNotFound(TaskId),
    /// No such lease.
    #[error("lease {0} not found")]
    LeaseNotFound(LeaseId),
    /// The task has ended.
    #[error("task {id} is {state}")]
    TaskNotActive {
        /// The task.
        id: TaskId,
        /// Its state.
        state: TaskState,
    },
    /// The lease has already ended.
    #[error("lease {id} is already {}", state.as_str())]
    LeaseNotActive {
        /// The lease.
        id: LeaseId,
        /// Its state.
        state: LeaseState,
    },
    /// The caller may not introspect tokens.
    #[error(
        "{0} may not introspect tokens (no [[introspection]] or [[resource_servers]] entry names \
         it)"
    )]
    NotIntrospector(SpiffeId),
    /// The caller of a token exchange is not a recipient of the subject
    /// token: no resource server it belongs to receives tokens for the
    /// token's audience.
    #[error(
        "subject_token was issued for {audience}, and {caller} is not a resource server of that \
         audience ([[resource_servers]]): only a token's recipient may exchange it"
    )]
    NotRecipient {
        /// Who presented the token.
        caller: SpiffeId,
        /// The subject token's audience.
        audience: String,
    },
    /// A service reported requests made with a token it does not receive.
    #[error(
        "{caller} is not a resource server of {audience} ([[resource_servers]]): only a token's \
         recipient may report the requests it came with"
    )]
    NotReporter {
        /// Who reported.
        caller: SpiffeId,
        /// The token's audience.
        audience: String,
    },
    /// The token was issued to another client: only its own client may
    /// revoke it.
    #[error("the token was issued to another client; {0} may revoke only its own tokens")]
    NotTokenClient(SpiffeId),
    /// The token offered for exchange is not a live token of this broker.
    #[error("subject_token {0}")]
    InvalidSubjectToken(String),
    /// The caller is not a gateway (`[[gateways]]`).
    #[error(
        "{0} is not a gateway: the Gateway API answers only the [[gateways]] of the broker's configuration"
    )]
    NotGateway(SpiffeId),
    /// The gateway does not front the tool's upstream.
    #[error("gateway {gateway} does not front upstream {upstream} ([[gateways]] upstreams)")]
    NotUpstream {
        /// The gateway.
        gateway: SpiffeId,
        /// The upstream it asked about.
        upstream: String,
    },
    /// The caller may not watch the revocation feed.
    #[error("{0} may not watch the revocation feed (feed.watchers)")]
    NotWatcher(SpiffeId),
    /// The broker is not set up for this request.
    #[error("{0}")]
    Unsupported(String),
    /// No `[[databases]]` entry has this name.
    #[error("database {0:?} is not configured on this broker ([[databases]])")]
    DatabaseNotFound(String),
    /// The database could not be reached: nothing was issued.
    #[error("nothing was issued: {0}")]
    DatabaseUnavailable(String),
    /// The database refused to make the login: nothing was issued.
    #[error("nothing was issued: {0}")]
    DatabaseRefused(String),
    /// No such approval visible to the caller.
    #[error("approval {0} not found")]
    ApprovalNotFound(ApprovalId),
    /// The approval cannot be used or decided in its state.
    #[error("approval {id} is {state}")]
    ApprovalUnusable {
        /// The approval.
        id: ApprovalId,
        /// Its state.
        state: ApprovalState,
    },
    /// An operator refused the approval this request presents.
    #[error("approval {id} is denied by {by}{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    ApprovalDenied {
        /// The approval.
        id: ApprovalId,
        /// The operator who refused.
        by: SpiffeId,
        /// Why, if said.
        reason: Option<String>,
    },
    /// The approval was granted for another request.
    #[error(
        "approval {0} was granted for a different request; repeat the approved request exactly"
    )]
    ApprovalMismatch(ApprovalId),
    /// The task's context kept changing while the credential was decided;
    /// nothing was issued.
    #[error("task {0} changed while the credential was being issued; nothing was issued, retry")]
    TaskChanged(TaskId),
    /// An operator locked the agent out; nothing new is issued to it.
    #[error("{}", locked_message(.0.as_deref()))]
    AgentLocked(Option<Box<AgentLock>>),
    /// An agent the broker has no record of (never seen, or purged).
    #[error(
        "agent {0} has no task or credential on record (never seen, or purged after retention); \
         nothing was revoked. To keep it out before it shows up, lock it: mayfly agent lock"
    )]
    AgentNotFound(SpiffeId),
    /// The agent is not locked.
    #[error("agent {0} is not locked")]
    AgentNotLocked(SpiffeId),
    /// Too many requests from this agent.
    #[error("too many credentials requested; retry in {} ms", retry_after.as_millis())]
    RateLimited {
        /// When a token will be there.
        retry_after: std::time::Duration,
    },
    /// The store cannot be reached; nothing was issued.
    #[error("lease store unavailable, nothing was issued: {0}")]
    Unavailable(#[source] Cause),
    /// The audit trail cannot take or give records; a credential whose
    /// record cannot be written is not issued.
    #[error("audit trail unavailable: {0}")]
    AuditUnavailable(#[source] Cause),
    /// The trail's file was replaced, truncated or removed under the
    /// broker; nothing is issued until an operator restores it.
    #[error("{0}")]
    AuditBroken(#[source] AuditError),
    /// The revocation feed could not be read from the store; the watcher
    /// should reconnect with its cursor.
    #[error("revocation feed unavailable: {0}")]
    FeedUnavailable(#[source] Cause),
    /// A bug or corrupt data; details go to the log, not the caller.
    #[error("internal error: {0}")]
    Internal(#[source] Cause),
}

impl BrokerError {
    /// A request field that did not parse, in the parser's own words.
    pub fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::InvalidInput(Cause::of(e))
    }

    /// Field `name` did not parse: `name: <the parser's words>`.
    pub fn invalid_field(name: &str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::InvalidInput(Cause::context(name, e))
    }

    /// Maps a store error met while working on `task`.
    pub fn from_store(e: StoreError, task: &TaskId) -> Self {
        match e {
            StoreError::TaskNotFound => Self::TaskNotFound(task.clone()),
            StoreError::TaskNotActive(state) => Self::TaskNotActive {
                id: task.clone(),
                state,
            },
            StoreError::TaskChanged => Self::TaskChanged(task.clone()),
            other => other.into(),
        }
    }
}

impl BrokerError {
    /// Maps a store error met while using or deciding approval `id`.
    pub fn from_approval(e: StoreError, id: &ApprovalId) -> Self {
        match e {
            StoreError::ApprovalNotFound => Self::ApprovalNotFound(id.clone()),
            StoreError::ApprovalState(state) => Self::ApprovalUnusable {
                id: id.clone(),
                state,
            },
            StoreError::ApprovalMismatch => Self::ApprovalMismatch(id.clone()),
            other => other.into(),
        }
    }
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => Self::Unavailable(m),
            StoreError::AgentLocked => Self::AgentLocked(None),
            StoreError::TaskNotFound => {
                Self::Internal(Cause::msg("task vanished during the request"))
            }
            StoreError::LeaseNotFound => {
                Self::Internal(Cause::msg("lease vanished during the request"))
            }
            // Without the task or approval at hand (`from_store` and
            // `from_approval` have them), these are the broker's own bugs:
            // a request that can meet them maps them with context.
            e @ (StoreError::TaskNotActive(_)
            | StoreError::Duplicate(_)
            | StoreError::OutlivesTask
            | StoreError::TaskChanged
            | StoreError::ApprovalNotFound
            | StoreError::ApprovalState(_)
            | StoreError::ApprovalMismatch
            | StoreError::Corrupt(_)) => Self::Internal(Cause::of(e)),
        }
    }
}

impl From<AuditError> for BrokerError {
    fn from(e: AuditError) -> Self {
        match e {
            AuditError::Failed(m) => Self::AuditUnavailable(m),
            broken @ AuditError::Broken { .. } => Self::AuditBroken(broken),
            AuditError::Unreadable(m) => Self::Unsupported(m),
            bad @ AuditError::BadCursor(_) => Self::invalid(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    /// What a store or trail failure came from is still there when it
    /// reaches the request's error, for the log and for code that asks.
    #[test]
    fn store_and_trail_failures_keep_their_source() {
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = BrokerError::from(StoreError::Unavailable(Cause::context("redis", refused())));
        assert!(matches!(e, BrokerError::Unavailable(_)));
        assert!(e.to_string().contains("redis: refused"), "{e}");
        let io = e.source().and_then(Error::source);
        let io = io.and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(
            io.map(std::io::Error::kind),
            Some(std::io::ErrorKind::ConnectionRefused)
        );

        let e = BrokerError::from(AuditError::Failed(Cause::context("audit.jsonl", refused())));
        let io = e.source().and_then(Error::source);
        assert!(io.is_some_and(|s| s.is::<std::io::Error>()), "{e:?}");

        // A corrupt record is the broker's own problem: the store error is
        // kept under the internal one.
        let bad = serde_json::from_str::<u64>("x").unwrap_err();
        let e = BrokerError::from(StoreError::Corrupt(Cause::of(bad)));
        let store = e.source().and_then(Error::source);
        let store = store.and_then(|s| s.downcast_ref::<StoreError>());
        assert!(matches!(store, Some(StoreError::Corrupt(_))), "{e:?}");
    }

    /// A field that does not parse says so as `Invalid` did (the same
    /// message, status and name), and keeps the parser's error.
    #[test]
    fn a_field_that_does_not_parse_keeps_the_parsers_error() {
        let e = BrokerError::invalid_field("task_id", TaskId::new("nope").unwrap_err());
        assert!(matches!(e, BrokerError::InvalidInput(_)));
        assert_eq!(e.to_string(), format!("task_id: {}", mayfly_core::IdError));
        let parser = e.source().and_then(Error::source);
        assert!(
            parser.is_some_and(|s| s.is::<mayfly_core::IdError>()),
            "{e:?}"
        );
        let status = tonic::Status::from(e);
        let invalid = tonic::Status::from(BrokerError::Invalid(format!(
            "task_id: {}",
            mayfly_core::IdError
        )));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), invalid.message());
        assert_eq!(
            status.metadata().get("mayfly-error"),
            invalid.metadata().get("mayfly-error")
        );

        let e = BrokerError::from(AuditError::BadCursor("x".into()));
        assert_eq!(e.to_string(), AuditError::BadCursor("x".into()).to_string());
        let cursor = e.source().and_then(Error::source);
        let cursor = cursor.and_then(|s| s.downcast_ref::<AuditError>());
        assert!(matches!(cursor, Some(AuditError::BadCursor(_))), "{e:?}");
    }
}
