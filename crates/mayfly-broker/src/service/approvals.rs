//! Approvals: operators approve or deny; agents wait for the decision and
//! then collect the credential by repeating the request with the approval id.

use std::time::Duration;

use mayfly_core::{Approval, ApprovalId, ApprovalState, ApprovalStatus, Timestamp};

use super::Approvals;
use crate::audit::{AuditRecord, Event};
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::store::{Page, PageRequest};

pub use mayfly_core::limits::MAX_WAIT;
/// How often a waiting call looks again.
const POLL: Duration = Duration::from_millis(100);

impl Approvals {
    /// Approvals for operators, pending ones only unless `all`.
    pub async fn list_approvals(
        &self,
        all: bool,
        page: &PageRequest,
    ) -> Result<Page<Approval>, BrokerError> {
        Ok(self
            .shared
            .store
            .list_approvals(!all, page, Timestamp::now())
            .await?)
    }

    /// An operator approves or denies a pending approval.
    pub async fn decide_approval(
        &self,
        operator: &Caller,
        id: &ApprovalId,
        approve: bool,
        reason: Option<String>,
    ) -> Result<Approval, BrokerError> {
        let now = Timestamp::now();
        let decision = if approve {
            ApprovalStatus::Approved {
                by: operator.id.clone(),
                at: now,
                reason,
            }
        } else {
            ApprovalStatus::Denied {
                by: operator.id.clone(),
                at: now,
                reason,
            }
        };
        let approval = self
            .shared
            .store
            .decide_approval(id, decision, now)
            .await
            .map_err(|e| BrokerError::from_approval(e, id))?;
        let event = if approve {
            Event::ApprovalGranted
        } else {
            Event::ApprovalDenied
        };
        let mut record = match self.shared.store.get_task(&approval.task_id).await {
            Ok(Some(t)) => AuditRecord::new(event, &operator.id).task(&t.task),
            _ => AuditRecord::new(event, &operator.id).task_id(&approval.task_id),
        };
        record.approval_id = Some(id.to_string());
        record.policy = Some(approval.policy_id.clone());
        record.decision = Some(if approve { "permit" } else { "deny" }.to_owned());
        record.reason = reason_of(&approval.status);
        self.shared.audit_anyway(record).await;
        tracing::info!(
            target: "mayfly::decision",
            event = if approve { "approval_granted" } else { "approval_denied" },
            operator = %operator.id,
            approval_id = %id,
            agent = %approval.agent,
            task_id = %approval.task_id,
        );
        Ok(approval)
    }

    /// One of the caller's approvals; another agent's is "not found".
    pub async fn own_approval(
        &self,
        caller: &Caller,
        id: &ApprovalId,
    ) -> Result<Approval, BrokerError> {
        match self.shared.store.get_approval(id).await? {
            Some(a) if a.agent == caller.id => Ok(a),
            _ => Err(BrokerError::ApprovalNotFound(id.clone())),
        }
    }

    /// Waits up to `wait` (at most [`MAX_WAIT`]) while the caller's
    /// approval is pending; returns it as it then stands.
    pub async fn wait_approval(
        &self,
        caller: &Caller,
        id: &ApprovalId,
        wait: Duration,
    ) -> Result<Approval, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        loop {
            let approval = self.own_approval(caller, id).await?;
            if approval.state_at(Timestamp::now()) != ApprovalState::Pending
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(approval);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

fn reason_of(status: &ApprovalStatus) -> Option<String> {
    match status {
        ApprovalStatus::Approved { reason, .. }
        | ApprovalStatus::Denied { reason, .. }
        | ApprovalStatus::Consumed { reason, .. } => reason.clone(),
        ApprovalStatus::Pending => None,
    }
}
