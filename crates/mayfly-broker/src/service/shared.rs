//! What every part of the service shares: the store, policy, the
//! recorder, metrics, the revocation wake-up, recent task reads and the
//! broker's own identity; and the steps every part takes with them (read
//! the caller's task, record a decision, refuse a locked agent).

use std::sync::Arc;
use std::time::Duration;

use mayfly_core::{
    Approval, ApprovalId, ApprovalRequest, ApprovalState, ApprovalStatus, Decision, Policy,
    SpiffeId, Task, TaskId, TaskRecord, TaskState, Timestamp,
};
use tokio::sync::Notify;

use super::TaskCache;
use crate::audit::AuditRecord;
use crate::cause::Cause;
use crate::config::ResourceServer;
use crate::error::BrokerError;
use crate::recorder::Recorder;
use crate::store::{LeaseStore, RecordError, StoreError};

/// What every part of the service shares.
#[derive(Debug)]
pub(super) struct Shared {
    /// Where leases and tasks live.
    pub store: Arc<dyn LeaseStore>,
    /// Decides every request (reloadable).
    pub policy: Arc<dyn Policy>,
    /// Where every decision is recorded.
    pub recorder: Recorder,
    /// Counters and histograms for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Woken after every revocation, so the feed picks it up at once.
    pub revoked: Arc<Notify>,
    /// Tasks as recently read, for issuing credentials.
    pub task_cache: TaskCache,
    /// The identity the broker acts as on its own (re-evaluation after a
    /// policy reload, undoing an unrecorded write).
    pub broker_id: SpiffeId,
    /// Who receives tokens of which audiences: only they may exchange
    /// them, when first asked and when decided again.
    pub resource_servers: Vec<ResourceServer>,
    /// How long an approval waits for an operator.
    pub approval_ttl: Duration,
}

/// What policy allowed.
#[derive(Debug)]
pub(super) struct Permit {
    /// The deciding policies.
    pub policy_id: String,
    /// The shortest cap among them.
    pub max_ttl: Option<Duration>,
    /// Whether an operator must approve.
    pub approval_required: bool,
}

/// The permit, or the deny as an error.
pub(super) fn permit(decision: Decision) -> Result<Permit, BrokerError> {
    match decision {
        Decision::Permit {
            policy_id,
            max_ttl,
            approval_required,
        } => Ok(Permit {
            policy_id,
            max_ttl,
            approval_required,
        }),
        Decision::Deny { policy_id, reason } => Err(BrokerError::Denied { policy_id, reason }),
        other => Err(BrokerError::Internal(Cause::msg(format!(
            "unsupported policy decision {other:?}"
        )))),
    }
}

/// The lifetime asked for: the request's, or the default, within the
/// broker's maximum.
pub(super) fn asked(requested: Option<Duration>, default: Duration, max: Duration) -> Duration {
    requested.unwrap_or(default).min(max)
}

/// A credential's expiry: `ttl` capped by the policy and the task's expiry,
/// on whole seconds from `now`.
pub(super) fn expiry(
    now: Timestamp,
    ttl: Duration,
    policy_max: Option<Duration>,
    task: &Task,
) -> Result<Timestamp, BrokerError> {
    let ttl = policy_max.map_or(ttl, |m| ttl.min(m));
    let expires_at = now
        .floor_secs()
        .plus(Duration::from_secs(ttl.as_secs()))
        .min(task.expires_at);
    if expires_at <= now {
        return Err(BrokerError::TaskNotActive {
            id: task.id.clone(),
            state: TaskState::Expired,
        });
    }
    Ok(expires_at)
}

impl Shared {
    /// One of `owner`'s tasks; another agent's task is "not found".
    pub(super) async fn own_task(
        &self,
        owner: &SpiffeId,
        id: &TaskId,
    ) -> Result<TaskRecord, BrokerError> {
        match self.store.get_task(id).await? {
            Some(r) if &r.task.agent == owner => Ok(r),
            _ => Err(BrokerError::TaskNotFound(id.clone())),
        }
    }

    /// One of `owner`'s tasks, active at `now`.
    pub(super) async fn active_task(
        &self,
        owner: &SpiffeId,
        id: &TaskId,
        now: Timestamp,
    ) -> Result<TaskRecord, BrokerError> {
        let record = self.own_task(owner, id).await?;
        match record.state_at(now) {
            TaskState::Active => Ok(record),
            state => Err(BrokerError::TaskNotActive {
                id: id.clone(),
                state,
            }),
        }
    }

    /// The task a credential is requested under, active at `now`: from the
    /// cache when `cached` allows it (the second value says whether it
    /// came from there), else from the store (and then kept). A cached
    /// task may be behind the store; see [`TaskCache`] for why issuing on
    /// it is safe, and the callers for the answers that need a fresh read.
    pub(super) async fn credential_task(
        &self,
        owner: &SpiffeId,
        id: &TaskId,
        now: Timestamp,
        cached: bool,
    ) -> Result<(Arc<TaskRecord>, bool), BrokerError> {
        if cached
            && let Some(record) = self.task_cache.get(id)
            && &record.task.agent == owner
            && record.state_at(now) == TaskState::Active
        {
            return Ok((record, true));
        }
        let record = Arc::new(self.active_task(owner, id, now).await?);
        self.task_cache.put(record.clone());
        Ok((record, false))
    }

    /// Writes a new task and its record (`record`), together or not at
    /// all. A lock on its agent is refused, and recorded as `denied`.
    pub(super) async fn open_task(
        &self,
        task: &Task,
        record: AuditRecord,
        denied: AuditRecord,
    ) -> Result<(), BrokerError> {
        // A delegated task's refusals (not found, not active) are its parent's.
        let about = task.parent.as_ref().unwrap_or(&task.id);
        let opened = self
            .recorder
            .record_started(record, task.clone())
            .await
            .map_err(|e| match e {
                RecordError::Store(e) => BrokerError::from_store(e, about),
                RecordError::Audit(e) => e.into(),
            });
        match self.explain_lock(&task.agent, opened).await {
            Err(locked @ BrokerError::AgentLocked(_)) => {
                Err(self.record_denial(locked, denied).await)
            }
            other => other,
        }
    }

    /// Records a decision that stands whether or not it is recorded (a
    /// denial, a revocation): a failure is logged, not returned.
    pub(super) async fn audit_anyway(&self, record: AuditRecord) {
        let event = record.event;
        if let Err(e) = self.recorder.record(record).await {
            tracing::error!(%event, error = %e, "decision not recorded in the audit trail");
        }
    }

    /// `decision` as a permit; a denial is recorded (as `denied()` with the
    /// deciding policy and the reason) before it is returned.
    pub(super) async fn permit_or_record(
        &self,
        decision: Decision,
        denied: impl FnOnce() -> AuditRecord,
    ) -> Result<Permit, BrokerError> {
        match permit(decision) {
            Ok(p) => Ok(p),
            Err(e) => Err(self.record_denial(e, denied()).await),
        }
    }

    /// Records `record` as the denial `e`, and returns `e`.
    pub(super) async fn record_denial(&self, e: BrokerError, record: AuditRecord) -> BrokerError {
        let policy = match &e {
            BrokerError::Denied { policy_id, .. } => policy_id.clone(),
            _ => None,
        };
        let reason = match &e {
            BrokerError::Denied { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        self.audit_anyway(record.decided("deny", policy.as_deref()).reason(reason))
            .await;
        e
    }

    /// Fills in the lock behind an `AgentLocked` refusal of `agent`, so the
    /// caller learns who locked it, why, and until when; a task found
    /// revoked because its agent was locked is refused as locked too.
    pub(super) async fn explain_lock<T>(
        &self,
        agent: &SpiffeId,
        result: Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        let lock = || async {
            let lock = self.store.agent_lock(agent, Timestamp::now()).await;
            lock.ok().flatten().map(Box::new)
        };
        match result {
            Err(BrokerError::AgentLocked(None)) => Err(BrokerError::AgentLocked(lock().await)),
            Err(
                e @ BrokerError::TaskNotActive {
                    state: TaskState::Revoked,
                    ..
                },
            ) => match lock().await {
                Some(l) => Err(BrokerError::AgentLocked(Some(l))),
                None => Err(e),
            },
            other => other,
        }
    }

    /// Refuses `agent` at once while a lock holds it (for steps that would
    /// leave state behind before the store's own check, such as opening an
    /// approval).
    pub(super) async fn refuse_locked(
        &self,
        agent: &SpiffeId,
        now: Timestamp,
    ) -> Result<(), BrokerError> {
        match self.store.agent_lock(agent, now).await? {
            Some(lock) => Err(BrokerError::AgentLocked(Some(Box::new(lock)))),
            None => Ok(()),
        }
    }

    /// Consumes `approval_id` for exactly `request` under `task`, or,
    /// when the permit needs an approval and none was given, opens one for
    /// the task's owner (whose approvals they are), recorded as `requested` (a record of
    /// `approval_requested` naming the caller and the task) with the
    /// approval, the deciding policy and what it is for.
    pub(super) async fn approval_gate(
        &self,
        task: &Task,
        permit: &Permit,
        request: ApprovalRequest,
        approval_id: Option<&ApprovalId>,
        requested: AuditRecord,
        now: Timestamp,
    ) -> Result<Gate, BrokerError> {
        let agent = &task.agent;
        match approval_id {
            Some(id) => {
                match self
                    .store
                    .consume_approval(id, agent, &task.id, &request, now)
                    .await
                {
                    Ok(_) => Ok(Gate::Proceed(Some(id.clone()))),
                    Err(StoreError::ApprovalState(ApprovalState::Denied)) => {
                        Err(self.denied_approval(id).await)
                    }
                    Err(e) => Err(BrokerError::from_approval(e, id)),
                }
            }
            None if permit.approval_required => {
                self.refuse_locked(agent, now).await?;
                let approval = Approval {
                    id: ApprovalId::generate(),
                    agent: agent.clone(),
                    task_id: task.id.clone(),
                    request,
                    policy_id: permit.policy_id.clone(),
                    created_at: now,
                    expires_at: now.plus(self.approval_ttl),
                    status: ApprovalStatus::Pending,
                };
                self.store.create_approval(&approval).await?;
                let mut record = requested
                    .decided("pending", Some(&permit.policy_id))
                    .expires(approval.expires_at);
                record.approval_id = Some(approval.id.to_string());
                match &approval.request {
                    ApprovalRequest::Token {
                        audience, scopes, ..
                    }
                    | ApprovalRequest::DatabaseLogin {
                        database: audience,
                        scopes,
                        ..
                    } => record = record.credential(Some(audience.as_str()), scopes),
                    ApprovalRequest::ToolCall {
                        tool,
                        arguments_sha256,
                    } => {
                        record.tool = Some(tool.to_string());
                        record.arguments_sha256 = Some(arguments_sha256.clone());
                    }
                    ApprovalRequest::Certificate { .. } => {}
                }
                self.audit_anyway(record).await;
                tracing::info!(
                    target: "mayfly::decision",
                    event = "approval_requested",
                    agent = %agent,
                    task_id = %task.id,
                    approval_id = %approval.id,
                    policy = %permit.policy_id,
                );
                Ok(Gate::Pending(Box::new(approval)))
            }
            None => Ok(Gate::Proceed(None)),
        }
    }

    /// The error for presenting an approval an operator refused, with who
    /// refused it and why.
    async fn denied_approval(&self, id: &ApprovalId) -> BrokerError {
        match self.store.get_approval(id).await {
            Ok(Some(Approval {
                status: ApprovalStatus::Denied { by, reason, .. },
                ..
            })) => BrokerError::ApprovalDenied {
                id: id.clone(),
                by,
                reason,
            },
            Ok(_) => BrokerError::ApprovalUnusable {
                id: id.clone(),
                state: ApprovalState::Denied,
            },
            Err(e) => BrokerError::from_approval(e, id),
        }
    }
}

/// What the approval step decided.
pub(super) enum Gate {
    /// Go on; what follows records the approval it used, if any.
    Proceed(Option<ApprovalId>),
    /// Stop: an approval is now pending.
    Pending(Box<Approval>),
}
