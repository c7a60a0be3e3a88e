//! Mayfly's domain model: who asks ([`SpiffeId`]), for what ([`Task`],
//! [`Envelope`]), what they get ([`Lease`], [`AccessTokenClaims`]) and who
//! decides ([`Policy`]).
//!
//! This crate knows nothing of gRPC, TLS, files or Redis (it reads
//! certificates, in [`svid`], but never fetches or trusts them). Every type that
//! carries outside input has one fallible constructor and is valid once
//! built, so the rest of the broker never handles raw strings.

#![forbid(unsafe_code)]

mod newtype;

mod approval;
mod claims;
pub mod dpop;
mod envelope;
mod id;
mod lease;
pub mod limits;
mod lock;
mod policy;
mod proof;
mod spiffe;
pub mod status_list;
pub mod svid;
mod task;
mod time;
mod tool;

pub use approval::{Approval, ApprovalId, ApprovalRequest, ApprovalState, ApprovalStatus};
pub use claims::{ACCESS_TOKEN_TYPE, AccessTokenClaims, ActorClaim, Confirmation};
pub use envelope::{
    Audience, ContextChange, Envelope, EnvelopeExcess, Intent, MAX_AUDIENCES, MAX_CONTEXT_ENTRIES,
    MAX_INTENT_BYTES, MAX_SCOPES, Scope, Scopes, TaskContext, ValidationError, check_context_key,
    parse_scopes, scope_string,
};
pub use id::{CallId, IdError, LeaseId, TaskId};
pub use lease::{
    DATABASE_LOGIN, EXCHANGED_TOKEN, Lease, LeaseDetail, LeaseKind, LeaseState, LeaseStatus,
    Revocation, RevocationReason,
};
pub use lock::{AgentLock, MAX_LOCK_REASON_BYTES};
pub use policy::{
    Action, Decision, Pattern, PatternError, Policy, PolicyRequest, Route, TaskFacts,
};
pub use proof::{Binding, Proof};
pub use spiffe::{SpiffeId, SpiffeIdError, SpiffeIdPattern, TASK_SEGMENT, TrustDomain};
pub use task::{Task, TaskRecord, TaskState};
pub use time::Timestamp;
pub use tool::{
    ArgumentLimits, Arguments, ArgumentsError, MAX_TOOL_BYTES, MAX_UPSTREAM_BYTES, Tool,
    ToolNameError, canonical_json, check_upstream,
};
