//! Leases: the broker's record of a task or of one issued credential, and how
//! they end.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::envelope::{Audience, Scopes};
use crate::id::{LeaseId, TaskId};
use crate::spiffe::SpiffeId;
use crate::time::Timestamp;

/// What a lease records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseKind {
    /// The task itself (lease id = task id).
    Task,
    /// A JWT access token (lease id = `jti`).
    Jwt,
    /// An X.509 certificate.
    X509,
}

impl LeaseKind {
    /// The lower-case name used in the CLI and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Jwt => "jwt",
            Self::X509 => "x509",
        }
    }
}

/// The state of a lease as seen at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Valid until its expiry.
    Active,
    /// Ended early; never becomes active again.
    Revoked,
    /// Reached its expiry.
    Expired,
}

impl LeaseState {
    /// The lower-case name used in the CLI and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }
}

impl FromStr for LeaseState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(Self::Active),
            "revoked" => Ok(Self::Revoked),
            "expired" => Ok(Self::Expired),
            _ => Err(format!(
                "unknown lease state {s:?}: expected active, revoked or expired"
            )),
        }
    }
}

/// Why a lease was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationReason {
    /// The owning agent completed the task.
    TaskCompleted,
    /// An operator revoked the task the lease belongs to.
    TaskRevoked,
    /// The task's context changed so that policy no longer allows the lease.
    ContextChanged,
    /// An operator revoked the lease itself.
    Operator,
    /// An operator revoked every lease of the agent.
    AgentRevoked,
    /// The parent of a delegated task was revoked or completed.
    ParentRevoked,
}

impl RevocationReason {
    /// The snake-case name used in the CLI, logs and the feed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TaskCompleted => "task_completed",
            Self::TaskRevoked => "task_revoked",
            Self::ContextChanged => "context_changed",
            Self::Operator => "operator",
            Self::AgentRevoked => "agent_revoked",
            Self::ParentRevoked => "parent_revoked",
        }
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who ended a lease, kept for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Why.
    pub reason: RevocationReason,
    /// When the revocation was recorded.
    pub at: Timestamp,
    /// The SPIFFE ID of the caller that caused it.
    pub by: SpiffeId,
    /// The operator's free-text note, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The stored lifecycle of a lease. `Active` leases whose expiry has passed
/// read as expired even before the reaper records it (see [`Lease::state_at`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LeaseStatus {
    /// Issued and not ended.
    Active,
    /// Ended early, with the details.
    Revoked(Revocation),
    /// Recorded as expired by the reaper.
    Expired,
}

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// For a JWT, its `jti`; for a task, the task id.
    pub id: LeaseId,
    /// What it records.
    pub kind: LeaseKind,
    /// The agent that owns it.
    pub agent: SpiffeId,
    /// The task it belongs to (itself, for a task lease).
    pub task_id: TaskId,
    /// The token's audience; `None` for tasks and certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<Audience>,
    /// The scopes granted (for a task: its envelope's scopes).
    pub scopes: Scopes,
    /// When it was issued.
    pub issued_at: Timestamp,
    /// When it stops being valid on its own.
    pub expires_at: Timestamp,
    /// Active, revoked or expired.
    pub status: LeaseStatus,
    /// RFC 8705 `x5t#S256` of the certificate a token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_thumbprint: Option<String>,
    /// Serial number (upper-case hex) of an X.509 lease's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The task's context revision the issuing decision saw.
    #[serde(default)]
    pub task_revision: u64,
    /// The approval it was issued under, if one was needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<crate::ApprovalId>,
}

impl Lease {
    /// The state at `now`: an active lease past its expiry is expired.
    pub fn state_at(&self, now: Timestamp) -> LeaseState {
        match &self.status {
            LeaseStatus::Active if now >= self.expires_at => LeaseState::Expired,
            LeaseStatus::Active => LeaseState::Active,
            LeaseStatus::Revoked(_) => LeaseState::Revoked,
            LeaseStatus::Expired => LeaseState::Expired,
        }
    }

    /// Whether the lease is usable at `now`.
    pub fn is_active_at(&self, now: Timestamp) -> bool {
        self.state_at(now) == LeaseState::Active
    }

    /// The revocation, if revoked.
    pub fn revocation(&self) -> Option<&Revocation> {
        match &self.status {
            LeaseStatus::Revoked(r) => Some(r),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::parse_scopes;

    fn lease(status: LeaseStatus) -> Lease {
        let task = TaskId::generate();
        Lease {
            id: LeaseId::generate(),
            kind: LeaseKind::Jwt,
            agent: SpiffeId::new("spiffe://td/agent/a").unwrap(),
            task_id: task,
            audience: Some(Audience::new("api").unwrap()),
            scopes: parse_scopes(&["read"]).unwrap(),
            issued_at: Timestamp::from_secs(100),
            expires_at: Timestamp::from_secs(200),
            status,
            cert_thumbprint: None,
            serial: None,
            task_revision: 0,
            approval: None,
        }
    }

    #[test]
    fn state_follows_time_and_status() {
        let active = lease(LeaseStatus::Active);
        assert_eq!(
            active.state_at(Timestamp::from_secs(199)),
            LeaseState::Active
        );
        assert_eq!(
            active.state_at(Timestamp::from_secs(200)),
            LeaseState::Expired
        );
        let revoked = lease(LeaseStatus::Revoked(Revocation {
            reason: RevocationReason::Operator,
            at: Timestamp::from_secs(150),
            by: SpiffeId::new("spiffe://td/operator/admin").unwrap(),
            note: None,
        }));
        // Revoked stays revoked, before and after its expiry.
        assert_eq!(
            revoked.state_at(Timestamp::from_secs(150)),
            LeaseState::Revoked
        );
        assert_eq!(
            revoked.state_at(Timestamp::from_secs(500)),
            LeaseState::Revoked
        );
        assert!(revoked.revocation().is_some());
    }

    #[test]
    fn serde_round_trip() {
        let l = lease(LeaseStatus::Active);
        let json = serde_json::to_string(&l).unwrap();
        let back: Lease = serde_json::from_str(&json).unwrap();
        assert_eq!(back, l);
    }
}
