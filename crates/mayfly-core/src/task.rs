//! Tasks: a unit of work an agent opens, which owns every credential issued
//! under it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::claims::ActorClaim;
use crate::envelope::{Envelope, Intent, TaskContext};
use crate::id::TaskId;
use crate::lease::{Lease, LeaseDetail, LeaseStatus, Revocation, RevocationReason};
use crate::proof::Proof;
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
    /// The task this one was delegated from; `None` for a task an agent
    /// opened itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<TaskId>,
    /// The owners of the tasks above this one, the root task's owner
    /// first and the parent's owner last; empty when not delegated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegated_by: Vec<SpiffeId>,
    /// How whoever opened it (the owner, or for a delegated task the
    /// delegator) proved its SPIFFE ID. Decisions made again see it.
    #[serde(default, skip_serializing_if = "Proof::is_certificate")]
    pub authenticated_by: Proof,
}

impl Task {
    /// How many delegations lie between the root task and this one.
    pub fn depth(&self) -> usize {
        self.delegated_by.len()
    }

    /// The agent the work is ultimately for: the root task's owner. Tokens
    /// under the task name it as `sub`.
    pub fn subject(&self) -> &SpiffeId {
        self.delegated_by.first().unwrap_or(&self.agent)
    }

    /// The RFC 8693 `act` claim of credentials under this task: the task's
    /// owner (the current actor) outermost, then each earlier delegate,
    /// innermost the first one; the root owner is the subject, not an
    /// actor. `None` for a task that was not delegated.
    pub fn actors(&self) -> Option<ActorClaim> {
        if self.delegated_by.is_empty() {
            return None;
        }
        // Earlier actors, outermost first: the parent's owner back to the
        // first delegate (the root owner is skipped).
        let earlier = self.delegated_by.iter().skip(1).rev();
        let mut chain: Vec<&SpiffeId> = std::iter::once(&self.agent).chain(earlier).collect();
        let mut claim: Option<ActorClaim> = None;
        while let Some(actor) = chain.pop() {
            claim = Some(ActorClaim {
                sub: actor.to_string(),
                act: claim.map(Box::new),
            });
        }
        claim
    }

    /// The lease that tracks the task's own lifecycle.
    pub fn new_lease(&self) -> Lease {
        Lease {
            id: self.id.lease_id(),
            detail: LeaseDetail::Task,
            agent: self.agent.clone(),
            task_id: self.id.clone(),
            scopes: self.envelope.scopes().clone(),
            issued_at: self.created_at,
            expires_at: self.expires_at,
            status: LeaseStatus::Active,
            task_revision: self.revision,
            approval: None,
            authenticated_by: self.authenticated_by.clone(),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    fn task(agent: &str, delegated_by: &[&str]) -> Task {
        let id = |s: &str| SpiffeId::new(&format!("spiffe://example.org/{s}")).unwrap();
        Task {
            id: TaskId::generate(),
            agent: id(agent),
            intent: Intent::new("x").unwrap(),
            context: TaskContext::default(),
            envelope: Envelope::new(&["https://api.example.com"], &["read"]).unwrap(),
            created_at: Timestamp::now(),
            expires_at: Timestamp::now().plus(Duration::from_secs(60)),
            revision: 0,
            parent: None,
            delegated_by: delegated_by.iter().map(|s| id(s)).collect(),
            authenticated_by: Proof::Certificate,
        }
    }

    fn chain(mut claim: Option<ActorClaim>) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(c) = claim {
            out.push(c.sub.trim_start_matches("spiffe://example.org/").to_owned());
            claim = c.act.map(|b| *b);
        }
        out
    }

    #[test]
    fn the_root_owner_is_the_subject_and_actors_nest_newest_outermost() {
        let own = task("a", &[]);
        assert_eq!(own.subject().as_str(), "spiffe://example.org/a");
        assert!(own.actors().is_none());

        let once = task("b", &["a"]);
        assert_eq!(once.subject().as_str(), "spiffe://example.org/a");
        assert_eq!(chain(once.actors()), ["b"]);

        let thrice = task("d", &["a", "b", "c"]);
        assert_eq!(thrice.subject().as_str(), "spiffe://example.org/a");
        assert_eq!(thrice.depth(), 3);
        assert_eq!(chain(thrice.actors()), ["d", "c", "b"]);
    }
}
