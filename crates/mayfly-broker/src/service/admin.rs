//! What operators do: list and revoke.

use mayfly_core::{Lease, LeaseId, RevocationReason, SpiffeId, TaskId, TaskRecord, Timestamp};

use super::Service;
use crate::audit::{AuditRecord, Event};
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::store::{LeaseFilter, Page, PageRequest, RevokeRequest, StoreError, TaskFilter};

impl Service {
    /// Lists leases.
    pub async fn list_leases(
        &self,
        filter: &LeaseFilter,
        page: &PageRequest,
    ) -> Result<Page<Lease>, BrokerError> {
        Ok(self
            .store
            .list_leases(filter, page, Timestamp::now())
            .await?)
    }

    /// Lists tasks.
    pub async fn list_tasks(
        &self,
        filter: &TaskFilter,
        page: &PageRequest,
    ) -> Result<Page<TaskRecord>, BrokerError> {
        Ok(self
            .store
            .list_tasks(filter, page, Timestamp::now())
            .await?)
    }

    /// One lease.
    pub async fn get_lease(&self, id: &LeaseId) -> Result<Lease, BrokerError> {
        self.store
            .get_lease(id)
            .await?
            .ok_or_else(|| BrokerError::LeaseNotFound(id.clone()))
    }

    /// Any task.
    pub async fn get_task(&self, id: &TaskId) -> Result<TaskRecord, BrokerError> {
        self.store
            .get_task(id)
            .await?
            .ok_or_else(|| BrokerError::TaskNotFound(id.clone()))
    }

    /// Revokes one lease. Revoking a task's lease revokes the task.
    pub async fn revoke_lease(
        &self,
        operator: &Caller,
        id: &LeaseId,
        note: Option<String>,
    ) -> Result<Vec<LeaseId>, BrokerError> {
        let req = operator_request(
            operator,
            RevocationReason::Operator,
            RevocationReason::TaskRevoked,
            note,
        );
        let revoked = match self.store.revoke_lease(id, &req).await {
            Err(StoreError::LeaseNotFound) => return Err(BrokerError::LeaseNotFound(id.clone())),
            other => other?,
        };
        if revoked.is_empty() {
            let lease = self.get_lease(id).await?;
            return Err(BrokerError::LeaseNotActive {
                id: id.clone(),
                state: lease.state_at(req.at),
            });
        }
        let task = self.store.get_lease(id).await?.map(|l| l.task_id);
        let mut record = self
            .revocation_record(Event::LeaseRevoked, operator, task.as_ref(), &req, &revoked)
            .await;
        record.lease_id = Some(id.to_string());
        self.log_revocation(record).await;
        Ok(revoked)
    }

    /// Revokes a task and everything under it.
    pub async fn revoke_task(
        &self,
        operator: &Caller,
        id: &TaskId,
        note: Option<String>,
    ) -> Result<Vec<LeaseId>, BrokerError> {
        let req = operator_request(
            operator,
            RevocationReason::Operator,
            RevocationReason::TaskRevoked,
            note,
        );
        let revoked = self
            .store
            .end_task(id, &req)
            .await
            .map_err(|e| BrokerError::from_store(e, id))?;
        let record = self
            .revocation_record(Event::TaskRevoked, operator, Some(id), &req, &revoked)
            .await
            .lease(&id.lease_id());
        self.log_revocation(record).await;
        Ok(revoked)
    }

    /// Revokes every live task and lease of `agent`.
    pub async fn revoke_agent(
        &self,
        operator: &Caller,
        agent: &SpiffeId,
        note: Option<String>,
    ) -> Result<Vec<LeaseId>, BrokerError> {
        let req = operator_request(
            operator,
            RevocationReason::AgentRevoked,
            RevocationReason::AgentRevoked,
            note,
        );
        let revoked = self.store.revoke_agent(agent, &req).await?;
        let mut record = self
            .revocation_record(Event::AgentRevoked, operator, None, &req, &revoked)
            .await;
        record.agent = Some(agent.to_string());
        self.log_revocation(record).await;
        Ok(revoked)
    }

    /// The record of an operator's revocation, with the task it concerns.
    async fn revocation_record(
        &self,
        event: Event,
        operator: &Caller,
        task: Option<&TaskId>,
        req: &RevokeRequest,
        revoked: &[LeaseId],
    ) -> AuditRecord {
        let mut record = AuditRecord::new(event, &operator.id).revoked(revoked);
        record.reason = Some(match &req.note {
            Some(note) => format!("{}: {note}", req.reason),
            None => req.reason.to_string(),
        });
        match task {
            Some(id) => match self.store.get_task(id).await {
                Ok(Some(t)) => record.task(&t.task),
                _ => record.task_id(id),
            },
            None => record,
        }
    }

    async fn log_revocation(&self, record: AuditRecord) {
        self.revoked.notify_one();
        tracing::info!(
            target: "mayfly::decision",
            event = %record.event,
            operator = record.caller.as_deref().unwrap_or_default(),
            task_id = record.task_id.as_deref().unwrap_or_default(),
            revoked = record.revoked.len(),
        );
        self.audit_anyway(record).await;
    }
}

fn operator_request(
    operator: &Caller,
    reason: RevocationReason,
    child_reason: RevocationReason,
    note: Option<String>,
) -> RevokeRequest {
    RevokeRequest {
        reason,
        child_reason,
        by: operator.id.clone(),
        note,
        at: Timestamp::now(),
    }
}
