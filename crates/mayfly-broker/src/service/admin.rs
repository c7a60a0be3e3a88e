//! What operators do: list and revoke.

use mayfly_core::{Lease, LeaseId, RevocationReason, SpiffeId, TaskId, TaskRecord, Timestamp};

use super::Service;
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
        self.log_revocation("lease_revoked", operator, id.as_str(), &revoked);
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
        self.log_revocation("task_revoked", operator, id.as_str(), &revoked);
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
        self.log_revocation("agent_revoked", operator, agent.as_str(), &revoked);
        Ok(revoked)
    }

    fn log_revocation(&self, event: &str, operator: &Caller, target: &str, revoked: &[LeaseId]) {
        self.revoked.notify_one();
        tracing::info!(
            target: "mayfly::decision",
            event,
            operator = %operator.id,
            target,
            revoked = revoked.len(),
        );
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
