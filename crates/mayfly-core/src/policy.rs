//! The authorization seam. Every decision (opening a task, issuing a
//! token or a certificate, delegating, exchanging a token, calling a
//! tool) is one
//! [`PolicyRequest`] to a [`Policy`], at request time; the broker never
//! decides on its own. The Cedar implementation lives in `mayfly-policy`.

use std::fmt;
use std::time::Duration;

use crate::envelope::{Audience, Envelope, Intent, Scopes, TaskContext};
use crate::id::TaskId;
use crate::proof::{Binding, Proof};
use crate::spiffe::SpiffeId;
use crate::task::Task;
use crate::time::Timestamp;
use crate::tool::{Arguments, Tool};

/// One request to policy: who asks and how it proved itself, what it asks
/// to do, under which task, for how long, and when.
#[derive(Debug, Clone, Copy)]
pub struct PolicyRequest<'a> {
    /// The caller: the task's owner, or for an exchange the service that
    /// received the token.
    pub principal: &'a SpiffeId,
    /// How the caller proved itself.
    pub proof: &'a Proof,
    /// What it asks to do, with what only that action has.
    pub action: Action<'a>,
    /// The task it asks under (for `StartTask`, the one it would open).
    pub task: TaskFacts<'a>,
    /// The lifetime asked for (or the default), before policy caps it.
    pub ttl: Duration,
    /// The time of the request.
    pub now: Timestamp,
}

/// What a [`PolicyRequest`] asks to do. Every policy implementation
/// handles each (a new action is one more variant here and one more arm
/// there).
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Open a task with this envelope (decided for each of its audiences).
    StartTask {
        /// Everything the task asks to be allowed.
        envelope: &'a Envelope,
    },
    /// Receive a token for `audience`.
    IssueToken {
        /// The token's audience.
        audience: &'a Audience,
        /// Its scopes.
        scopes: &'a Scopes,
        /// What it would be bound to.
        binding: &'a Binding,
    },
    /// Receive a certificate for the task.
    SignCertificate,
    /// Receive a login in a configured database (`[[databases]]`).
    IssueDatabaseLogin {
        /// The database's name, which is its logins' audience.
        database: &'a Audience,
        /// The scopes the login would be granted.
        scopes: &'a Scopes,
    },
    /// Hand part of the task to `delegate`.
    Delegate {
        /// The agent that would own the new task.
        delegate: &'a SpiffeId,
        /// The new task's envelope (within the parent's).
        envelope: &'a Envelope,
    },
    /// Exchange a token of the task for one for `audience` (RFC 8693): the
    /// principal received the token (issued for `subject_audience`).
    ExchangeToken {
        /// The agent the work is for: the task's owner.
        subject: &'a SpiffeId,
        /// The audience of the token being exchanged (what the principal is).
        subject_audience: &'a Audience,
        /// The resource server of `subject_audience` the principal is one
        /// of (the broker refuses an exchange by anyone else first).
        resource_server: &'a str,
        /// The new token's audience.
        audience: &'a Audience,
        /// Its scopes.
        scopes: &'a Scopes,
        /// What it would be bound to.
        binding: &'a Binding,
    },
    /// Call a tool through a gateway: an MCP `tools/call`, or an HTTP
    /// route mapped to a tool. Decided on its arguments.
    CallTool {
        /// The tool.
        tool: &'a Tool,
        /// Its arguments.
        arguments: &'a Arguments,
        /// For an HTTP route: which one.
        route: Option<Route<'a>>,
        /// The scopes of the token the call is made with.
        scopes: &'a Scopes,
        /// What that token is bound to.
        binding: &'a Binding,
    },
    /// Whether some arguments could let `tool` be called at all: what a
    /// gateway's list of tools (MCP `tools/list`) shows. Permitted when no
    /// policy rules every call out; a tool shown may still be refused on
    /// its arguments.
    MayCallTool {
        /// The tool.
        tool: &'a Tool,
        /// The scopes of the token the list is asked with.
        scopes: &'a Scopes,
        /// What that token is bound to.
        binding: &'a Binding,
    },
}

impl Action<'_> {
    /// Its name in policy (`action == Mayfly::Action::"<name>"`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::StartTask { .. } => "start_task",
            Self::IssueToken { .. } => "issue_token",
            Self::SignCertificate => "sign_certificate",
            Self::IssueDatabaseLogin { .. } => "issue_database_login",
            Self::Delegate { .. } => "delegate",
            Self::ExchangeToken { .. } => "exchange_token",
            Self::CallTool { .. } | Self::MayCallTool { .. } => "call_tool",
        }
    }
}

/// An HTTP call a gateway maps to a tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    /// Its method (`POST`).
    pub method: &'a str,
    /// The route template it matched (`/v1/payments/{id}`).
    pub template: &'a str,
}

/// What policy sees of a task: its id (none yet for one being opened),
/// intent and context.
#[derive(Debug, Clone, Copy)]
pub struct TaskFacts<'a> {
    /// Its id; `None` for a task not opened yet.
    pub id: Option<&'a TaskId>,
    /// What it is for.
    pub intent: &'a Intent,
    /// Facts about it.
    pub context: &'a TaskContext,
}

impl<'a> TaskFacts<'a> {
    /// A task that exists.
    pub fn of(task: &'a Task) -> Self {
        Self {
            id: Some(&task.id),
            intent: &task.intent,
            context: &task.context,
        }
    }

    /// A task about to be opened.
    pub fn new(intent: &'a Intent, context: &'a TaskContext) -> Self {
        Self {
            id: None,
            intent,
            context,
        }
    }
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
    /// May `req.principal` do `req.action`?
    fn decide(&self, req: &PolicyRequest<'_>) -> Decision;
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

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// A `*` elsewhere than at the end.
    #[error("pattern {0:?}: '*' is allowed only at the end")]
    InnerWildcard(String),
    /// Nothing at all.
    #[error("empty pattern")]
    Empty,
}

impl Pattern {
    /// Parses a pattern; `*` may appear only at the end.
    pub fn new(s: &str) -> Result<Self, PatternError> {
        let (text, prefix) = match s.strip_suffix('*') {
            Some(t) => (t, true),
            None => (s, false),
        };
        if text.contains('*') {
            return Err(PatternError::InnerWildcard(s.to_owned()));
        }
        if !prefix && text.is_empty() {
            return Err(PatternError::Empty);
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
