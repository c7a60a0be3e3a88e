//! Approvals: when the deciding policy requires it, a credential is issued
//! only after an operator approves the exact request. An approval is
//! single-use and expires.

use serde::{Deserialize, Serialize};

use crate::envelope::{Audience, Scopes};
use crate::id::{IdError, TaskId, check_id, random_id};
use crate::newtype::validated_string;
use crate::spiffe::SpiffeId;
use crate::time::Timestamp;

validated_string!(
    /// Identifies an approval (128 random bits, base64url).
    ApprovalId,
    check_id,
    IdError
);

impl ApprovalId {
    /// A fresh random id.
    pub fn generate() -> Self {
        Self(random_id())
    }
}

/// What was asked for, exactly; an approval is good for this and nothing
/// else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ApprovalRequest {
    /// An access token.
    Token {
        /// Its audience.
        audience: Audience,
        /// Its scopes.
        scopes: Scopes,
        /// The TTL asked for, as sent (0 = default).
        ttl_seconds: u64,
        /// Bound to the caller's certificate.
        bind: bool,
        /// Bound to this DPoP key (its RFC 7638 thumbprint).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dpop_jkt: Option<String>,
    },
    /// A task certificate.
    Certificate {
        /// SHA-256 (base64url) of the CSR's public key.
        key_sha256: String,
        /// The TTL asked for, as sent (0 = default).
        ttl_seconds: u64,
    },
    /// A login in a configured database.
    DatabaseLogin {
        /// The database's name.
        database: Audience,
        /// Its scopes.
        scopes: Scopes,
        /// The TTL asked for, as sent (0 = default).
        ttl_seconds: u64,
    },
    /// A tool call through a gateway: this tool, with exactly these
    /// arguments.
    ToolCall {
        /// `<upstream>/<tool>`.
        tool: crate::Tool,
        /// SHA-256 (hex) of the arguments' canonical form.
        arguments_sha256: String,
    },
}

impl ApprovalRequest {
    /// A token request as an approval is bound to it: the binding by kind
    /// (the caller's certificate, whichever it then presents, or this DPoP
    /// key), the lifetime as asked (0 for the default).
    pub fn token(
        audience: Audience,
        scopes: Scopes,
        ttl: Option<std::time::Duration>,
        binding: &crate::Binding,
    ) -> Self {
        Self::Token {
            audience,
            scopes,
            ttl_seconds: ttl.map_or(0, |d| d.as_secs()),
            bind: matches!(binding, crate::Binding::Certificate { .. }),
            dpop_jkt: binding.jkt().map(str::to_owned),
        }
    }
}

/// Where an approval stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ApprovalStatus {
    /// Waiting for an operator.
    Pending,
    /// Approved; the agent may collect once.
    Approved {
        /// The operator.
        by: SpiffeId,
        /// When.
        at: Timestamp,
        /// Why, if said (a change ticket, say).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Refused.
    Denied {
        /// The operator.
        by: SpiffeId,
        /// When.
        at: Timestamp,
        /// Why, if said.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Used to issue the credential; cannot be used again.
    Consumed {
        /// The operator who approved.
        by: SpiffeId,
        /// When it was used.
        at: Timestamp,
        /// Why it was approved, if said.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

/// The state of an approval at an instant, expiry included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApprovalState {
    /// Waiting for an operator.
    Pending,
    /// Approved, not yet used.
    Approved,
    /// Refused.
    Denied,
    /// Used.
    Consumed,
    /// Not decided or not used in time.
    Expired,
}

impl ApprovalState {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Consumed => "consumed",
            Self::Expired => "expired",
        }
    }
}

impl std::fmt::Display for ApprovalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Its id.
    pub id: ApprovalId,
    /// The agent that asked.
    pub agent: SpiffeId,
    /// Under which task.
    pub task_id: TaskId,
    /// Exactly what was asked.
    pub request: ApprovalRequest,
    /// The policy that required approval.
    pub policy_id: String,
    /// When it was asked.
    pub created_at: Timestamp,
    /// Undecided or unused past this, it is void.
    pub expires_at: Timestamp,
    /// Where it stands.
    pub status: ApprovalStatus,
}

impl Approval {
    /// The state at `now`.
    pub fn state_at(&self, now: Timestamp) -> ApprovalState {
        match &self.status {
            ApprovalStatus::Consumed { .. } => ApprovalState::Consumed,
            ApprovalStatus::Denied { .. } => ApprovalState::Denied,
            _ if now >= self.expires_at => ApprovalState::Expired,
            ApprovalStatus::Pending => ApprovalState::Pending,
            ApprovalStatus::Approved { .. } => ApprovalState::Approved,
        }
    }
}
