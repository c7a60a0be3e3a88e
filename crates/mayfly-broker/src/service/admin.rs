//! What operators do: list, revoke, and lock agents out.

use std::time::Duration;

use mayfly_core::{
    AgentLock, Lease, LeaseId, RevocationReason, SpiffeId, TaskId, TaskRecord, Timestamp,
};

use super::Admin;
use crate::audit::{AuditRecord, Event};
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::store::{LeaseFilter, Page, PageRequest, RevokeRequest, StoreError, TaskFilter};

impl Admin {
    /// Refuses callers outside the operator set, and any caller proven by
    /// a workload token rather than a client certificate: operating the
    /// broker takes the stronger proof.
    pub fn require_operator(&self, caller: &Caller) -> Result<(), BrokerError> {
        if caller.cert_thumbprint().is_none() {
            return Err(BrokerError::OperatorWithoutCertificate(caller.id.clone()));
        }
        if self.operators.iter().any(|p| p.matches(&caller.id)) {
            Ok(())
        } else {
            Err(BrokerError::NotOperator(caller.id.clone()))
        }
    }

    /// Lists leases.
    pub async fn list_leases(
        &self,
        filter: &LeaseFilter,
        page: &PageRequest,
    ) -> Result<Page<Lease>, BrokerError> {
        Ok(self
            .shared
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
            .shared
            .store
            .list_tasks(filter, page, Timestamp::now())
            .await?)
    }

    /// One lease.
    pub async fn get_lease(&self, id: &LeaseId) -> Result<Lease, BrokerError> {
        self.shared
            .store
            .get_lease(id)
            .await?
            .ok_or_else(|| BrokerError::LeaseNotFound(id.clone()))
    }

    /// Any task.
    pub async fn get_task(&self, id: &TaskId) -> Result<TaskRecord, BrokerError> {
        self.shared
            .store
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
        let revoked = match self.shared.store.revoke_lease(id, &req).await {
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
        let task = self.shared.store.get_lease(id).await?.map(|l| l.task_id);
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
            .shared
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
        let revoked = self.shared.store.revoke_agent(agent, &req).await?;
        if revoked.is_empty() && !self.has_records(agent).await? {
            return Err(BrokerError::AgentNotFound(agent.clone()));
        }
        let mut record = self
            .revocation_record(Event::AgentRevoked, operator, None, &req, &revoked)
            .await;
        record.agent = Some(agent.to_string());
        self.log_revocation(record).await;
        Ok(revoked)
    }

    /// Whether the store holds any task or lease of `agent` (live or ended,
    /// within retention).
    async fn has_records(&self, agent: &SpiffeId) -> Result<bool, BrokerError> {
        let page = PageRequest {
            after: None,
            limit: 1,
        };
        let now = Timestamp::now();
        let tasks = TaskFilter {
            agent: Some(agent.clone()),
            ..Default::default()
        };
        if !self
            .shared
            .store
            .list_tasks(&tasks, &page, now)
            .await?
            .items
            .is_empty()
        {
            return Ok(true);
        }
        let leases = LeaseFilter {
            agent: Some(agent.clone()),
            ..Default::default()
        };
        Ok(!self
            .shared
            .store
            .list_leases(&leases, &page, now)
            .await?
            .items
            .is_empty())
    }

    /// Locks `agent` out: every live task and lease of it is revoked
    /// (`agent_revoked`), and until the lock is lifted (or `ttl` passes)
    /// the store refuses it every new task and credential, on every
    /// replica. Locking again replaces the reason and expiry.
    pub async fn lock_agent(
        &self,
        operator: &Caller,
        agent: &SpiffeId,
        reason: String,
        ttl: Option<Duration>,
    ) -> Result<(AgentLock, Vec<LeaseId>), BrokerError> {
        let at = Timestamp::now();
        let lock = AgentLock {
            agent: agent.clone(),
            reason: reason.clone(),
            by: operator.id.clone(),
            at,
            expires_at: ttl.map(|t| at.plus(t)),
        };
        let req = operator_request(
            operator,
            RevocationReason::AgentRevoked,
            RevocationReason::AgentRevoked,
            Some(reason),
        );
        let revoked = self.shared.store.lock_agent(&lock, &req).await?;
        let mut record = self
            .revocation_record(Event::AgentLocked, operator, None, &req, &revoked)
            .await;
        record.agent = Some(agent.to_string());
        if let Some(exp) = lock.expires_at {
            record = record.expires(exp);
        }
        self.log_revocation(record).await;
        Ok((lock, revoked))
    }

    /// Lifts the lock on `agent`; `NOT_FOUND` if none holds.
    pub async fn unlock_agent(
        &self,
        operator: &Caller,
        agent: &SpiffeId,
        note: Option<String>,
    ) -> Result<AgentLock, BrokerError> {
        let lock = self
            .shared
            .store
            .unlock_agent(agent, Timestamp::now())
            .await?
            .ok_or_else(|| BrokerError::AgentNotLocked(agent.clone()))?;
        let mut record = AuditRecord::new(Event::AgentUnlocked, &operator.id);
        record.agent = Some(agent.to_string());
        record.reason = note;
        tracing::info!(
            target: "mayfly::decision",
            event = "agent_unlocked",
            operator = %operator.id,
            agent = %agent,
        );
        self.shared.audit_anyway(record).await;
        Ok(lock)
    }

    /// Every lock in force.
    pub async fn list_locks(&self) -> Result<Vec<AgentLock>, BrokerError> {
        Ok(self.shared.store.list_locks(Timestamp::now()).await?)
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
            Some(id) => match self.shared.store.get_task(id).await {
                Ok(Some(t)) => record.task(&t.task),
                _ => record.task_id(id),
            },
            None => record,
        }
    }

    async fn log_revocation(&self, record: AuditRecord) {
        self.shared.revoked.notify_one();
        tracing::info!(
            target: "mayfly::decision",
            event = %record.event,
            operator = record.caller.as_deref().unwrap_or_default(),
            task_id = record.task_id.as_deref().unwrap_or_default(),
            revoked = record.revoked.len(),
        );
        self.shared.audit_anyway(record).await;
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
