//! Tasks: a unit of work an agent opens, which owns every credential issued
//! under it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, Intent, TaskContext};
use crate::id::TaskId;
use crate::lease::{Lease, LeaseKind, LeaseStatus, Revocation, RevocationReason};
use crate::spiffe::SpiffeId;
use crate::time::Timestamp;

/// What a task is: fixed when it starts. Its lifecycle is that of its task
/// lease (see [`TaskRecord`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// The task's id (and its lease's id).
    pub id: TaskId,
    /// The agent that owns the task.
    pub agent: SpiffeId,
    /// What the agent said the task is for.
    pub intent: Intent,
    /// Facts for policy.
    pub context: TaskContext,
    /// The most the task may receive.
    pub envelope: Envelope,
    /// When it started.
    pub created_at: Timestamp,
    /// When it ends on its own; every credential expires by then.
    pub expires_at: Timestamp,
    /// Bumped on every context change: a credential decided on an older
    /// revision is not recorded (the decision is made again).
    #[serde(default)]
    pub revision: u64,
}

impl Task {
    /// The lease that tracks the task's own lifecycle.
    pub fn new_lease(&self) -> Lease {
        Lease {
            id: self.id.lease_id(),
            kind: LeaseKind::Task,
            agent: self.agent.clone(),
            task_id: self.id.clone(),
            audience: None,
            scopes: self.envelope.scopes().clone(),
            issued_at: self.created_at,
            expires_at: self.expires_at,
            status: LeaseStatus::Active,
            cert_thumbprint: None,
            serial: None,
            task_revision: self.revision,
            approval: None,
        }
    }
}

/// The lifecycle state of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Credentials may be issued under it.
    Active,
    /// Its agent completed it.
    Completed,
    /// Revoked by an operator or with its agent or parent.
    Revoked,
    /// Reached its expiry.
    Expired,
}

impl TaskState {
    /// The lower-case name used in the CLI and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(Self::Active),
            "completed" => Ok(Self::Completed),
            "revoked" => Ok(Self::Revoked),
            "expired" => Ok(Self::Expired),
            _ => Err(format!(
                "unknown task state {s:?}: expected active, completed, revoked or expired"
            )),
        }
    }
}

/// A task with its lifecycle, as a store returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    /// The fixed part.
    pub task: Task,
    /// The task lease's status.
    pub status: LeaseStatus,
}

impl TaskRecord {
    /// The state at `now`.
    pub fn state_at(&self, now: Timestamp) -> TaskState {
        match &self.status {
            LeaseStatus::Active if now >= self.task.expires_at => TaskState::Expired,
            LeaseStatus::Active => TaskState::Active,
            LeaseStatus::Expired => TaskState::Expired,
            LeaseStatus::Revoked(r) if r.reason == RevocationReason::TaskCompleted => {
                TaskState::Completed
            }
            LeaseStatus::Revoked(_) => TaskState::Revoked,
        }
    }

    /// The revocation that ended the task, if any.
    pub fn revocation(&self) -> Option<&Revocation> {
        match &self.status {
            LeaseStatus::Revoked(r) => Some(r),
            _ => None,
        }
    }
}
