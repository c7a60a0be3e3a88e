//! The authorization seam. Every `StartTask`, `IssueToken`,
//! `SignCertificate`, `DelegateTask` and token exchange is decided at request time by a [`Policy`]; the broker
//! never decides on its own. The Cedar implementation lives in
//! `mayfly-policy`.

use std::fmt;
use std::time::Duration;

use crate::envelope::{Audience, Envelope, Intent, Scopes, TaskContext};
use crate::spiffe::SpiffeId;
use crate::task::Task;
use crate::time::Timestamp;

/// How a principal proved itself with a client certificate, as policy
/// sees it (`principal.authenticated_by`).
pub const CERTIFICATE: &str = "certificate";

/// The name policy sees for a stored proof: `certificate` for `None`, else
/// the workload-token issuer.
pub fn proof_name(stored: Option<&str>) -> &str {
    stored.unwrap_or(CERTIFICATE)
}

/// What a token is bound to, as policy sees it (`context.binding`):
/// `certificate`, `dpop` or `none`.
pub fn binding_name(binding: Option<&crate::TokenBinding>) -> &'static str {
    match binding {
        Some(crate::TokenBinding::Certificate { .. }) => "certificate",
        Some(crate::TokenBinding::Dpop { .. }) => "dpop",
        None => "none",
    }
}

/// A request to open a task, as policy sees it.
#[derive(Debug)]
pub struct StartTaskRequest<'a> {
    /// The caller.
    pub agent: &'a SpiffeId,
    /// How the caller proved itself: `certificate`, or the workload-token
    /// issuer.
    pub authenticated_by: &'a str,
    /// What the task is for.
    pub intent: &'a Intent,
    /// Facts about the task.
    pub context: &'a TaskContext,
    /// Everything the task asks to be allowed.
    pub envelope: &'a Envelope,
    /// The lifetime asked for (or the default), before policy caps it.
    pub ttl: Duration,
    /// The time of the request.
    pub now: Timestamp,
}

/// A request for a token under a task, as policy sees it.
#[derive(Debug)]
pub struct IssueTokenRequest<'a> {
    /// The caller (the task's owner).
    pub agent: &'a SpiffeId,
    /// How the caller proved itself: `certificate`, or the workload-token
    /// issuer.
    pub authenticated_by: &'a str,
    /// The task, with its intent and context.
    pub task: &'a Task,
    /// The token's audience.
    pub audience: &'a Audience,
    /// The token's scopes.
    pub scopes: &'a Scopes,
    /// What it would be bound to: see [`binding_name`].
    pub binding: &'a str,
    /// The lifetime asked for (or the default), before policy caps it.
    pub ttl: Duration,
    /// The time of the request.
    pub now: Timestamp,
}

/// A request to sign a task-bound certificate, as policy sees it.
#[derive(Debug)]
pub struct SignCertificateRequest<'a> {
    /// The caller (the task's owner).
    pub agent: &'a SpiffeId,
    /// How the caller proved itself: `certificate`, or the workload-token
    /// issuer.
    pub authenticated_by: &'a str,
    /// The task, with its intent and context.
    pub task: &'a Task,
    /// The lifetime asked for (or the default), before policy caps it.
    pub ttl: Duration,
    /// The time of the request.
    pub now: Timestamp,
}

/// A request to exchange a token of a task for one to call the next
/// service (RFC 8693), as policy sees it: `actor` received the token
/// (issued for `subject_audience`) and asks for one for `audience`.
#[derive(Debug)]
pub struct ExchangeTokenRequest<'a> {
    /// The caller: the service exchanging the token.
    pub actor: &'a SpiffeId,
    /// How the caller proved itself: `certificate`, or the workload-token
    /// issuer.
    pub authenticated_by: &'a str,
    /// The agent the work is for: the task's owner.
    pub subject: &'a SpiffeId,
    /// The audience of the token being exchanged (what the actor is).
    pub subject_audience: &'a Audience,
    /// The resource server of `subject_audience` the actor is one of (the
    /// broker refuses an exchange by anyone else before asking policy).
    pub resource_server: &'a str,
    /// The task both tokens belong to.
    pub task: &'a Task,
    /// The new token's audience.
    pub audience: &'a Audience,
    /// The new token's scopes.
    pub scopes: &'a Scopes,
    /// What it would be bound to: see [`binding_name`].
    pub binding: &'a str,
    /// The lifetime asked for (or the default), before policy caps it.
    pub ttl: Duration,
    /// The time of the request.
    pub now: Timestamp,
}

/// A request to hand part of a task to another agent, as policy sees it.
#[derive(Debug)]
pub struct DelegateRequest<'a> {
    /// The caller: the parent task's owner.
    pub agent: &'a SpiffeId,
    /// How the caller proved itself: `certificate`, or the workload-token
    /// issuer.
    pub authenticated_by: &'a str,
    /// The agent that would own the new task.
    pub delegate: &'a SpiffeId,
    /// The parent task, with its intent and context.
    pub task: &'a Task,
    /// The new task's envelope (within the parent's).
    pub envelope: &'a Envelope,
    /// The new task's lifetime asked for, before policy caps it.
    pub ttl: Duration,
    /// The time of the request.
    pub now: Timestamp,
}

/// What policy decided.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Allowed, within limits.
    Permit {
        /// The id of the rule or policy that allowed it.
        policy_id: String,
        /// The longest credential this permit allows, if it caps the TTL.
        max_ttl: Option<Duration>,
        /// Whether an operator must approve before the credential is issued.
        approval_required: bool,
    },
    /// Refused.
    Deny {
        /// The id of the deciding rule, or `None` for the default deny.
        policy_id: Option<String>,
        /// What was not allowed (never policy text).
        reason: String,
    },
}

/// Decides what agents may get. Implementations must be pure functions of
/// their input and configuration, and cheap: they run on every request.
pub trait Policy: Send + Sync + fmt::Debug {
    /// May `req.agent` open a task with this envelope?
    fn decide_start_task(&self, req: &StartTaskRequest<'_>) -> Decision;
    /// May `req.agent` receive this token under `req.task`?
    fn decide_issue_token(&self, req: &IssueTokenRequest<'_>) -> Decision;
    /// May `req.agent` receive a certificate for `req.task`?
    fn decide_sign_certificate(&self, req: &SignCertificateRequest<'_>) -> Decision;
    /// May `req.agent` hand part of `req.task` to `req.delegate`?
    fn decide_delegate(&self, req: &DelegateRequest<'_>) -> Decision;
    /// May `req.actor` exchange a token of `req.task` for this one?
    fn decide_exchange_token(&self, req: &ExchangeTokenRequest<'_>) -> Decision;
}

/// A pattern over audiences (or other names): exact text, or `prefix*` matching
/// every value that starts with `prefix` (`*` alone matches everything).
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The text before `*`, or the whole text.
    text: String,
    /// Whether a trailing `*` was given.
    prefix: bool,
}

impl Pattern {
    /// Parses a pattern; `*` may appear only at the end.
    pub fn new(s: &str) -> Result<Self, String> {
        let (text, prefix) = match s.strip_suffix('*') {
            Some(t) => (t, true),
            None => (s, false),
        };
        if text.contains('*') {
            return Err(format!("pattern {s:?}: '*' is allowed only at the end"));
        }
        if !prefix && text.is_empty() {
            return Err("empty pattern".to_owned());
        }
        Ok(Self {
            text: text.to_owned(),
            prefix,
        })
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        if self.prefix {
            value.starts_with(&self.text)
        } else {
            value == self.text
        }
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Pattern({}{})",
            self.text,
            if self.prefix { "*" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(Pattern::new("read:*").unwrap().matches("read:files"));
        assert!(!Pattern::new("read:*").unwrap().matches("write:files"));
        assert!(Pattern::new("*").unwrap().matches("anything"));
        assert!(Pattern::new("api").unwrap().matches("api"));
        assert!(!Pattern::new("api").unwrap().matches("api2"));
        assert!(Pattern::new("a*b").is_err());
        assert!(Pattern::new("").is_err());
    }
}
