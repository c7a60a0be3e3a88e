//! Tasks: opening, completing, changing context, and re-deciding what a
//! task holds when its context or the policies change.

use std::time::Duration;

use mayfly_core::{
    Action, ContextChange, Decision, Lease, LeaseDetail, LeaseId, LeaseState, LeaseStatus,
    PolicyRequest, Revocation, RevocationReason, SpiffeId, Task, TaskFacts, TaskId, TaskRecord,
    TaskState, Timestamp,
};

use super::shared::asked;
use super::{NewDelegation, NewTask, Tasks};
use crate::audit::{AuditRecord, Event};
use crate::config::ResourceServer;
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::store::{LeaseFilter, PageRequest, RevokeRequest, StoreError, TaskFilter};

/// Leases or tasks read per page while re-evaluating.
const PAGE: usize = 500;

impl Tasks {
    /// One of the caller's tasks; another agent's is "not found".
    pub async fn own_task(&self, caller: &Caller, id: &TaskId) -> Result<TaskRecord, BrokerError> {
        self.shared.own_task(&caller.id, id).await
    }

    /// Opens a task for `caller`.
    pub async fn start_task(
        &self,
        caller: &Caller,
        req: NewTask,
    ) -> Result<TaskRecord, BrokerError> {
        let now = Timestamp::now().floor_secs();
        let ttl = asked(
            req.ttl,
            self.lifetimes.task_default_ttl,
            self.lifetimes.task_max_ttl,
        );
        let decision = self.shared.policy.decide(&PolicyRequest {
            principal: &caller.id,
            proof: &caller.proof,
            action: Action::StartTask {
                envelope: &req.envelope,
            },
            task: TaskFacts::new(&req.intent, &req.context),
            ttl,
            now,
        });
        let denied = || {
            let mut r = caller.record(Event::TaskDenied).envelope(&req.envelope);
            r.agent = Some(caller.id.to_string());
            r.intent = Some(req.intent.as_str().to_owned());
            r
        };
        let permit = self.shared.permit_or_record(decision, denied).await?;
        // A policy's max_ttl on start_task caps the task's lifetime.
        let ttl = permit.max_ttl.map_or(ttl, |m| ttl.min(m));
        let denied = denied();
        let task = Task {
            id: TaskId::generate(),
            agent: caller.id.clone(),
            intent: req.intent,
            context: req.context,
            envelope: req.envelope,
            created_at: now,
            expires_at: now.plus(Duration::from_secs(ttl.as_secs())),
            revision: 0,
            parent: None,
            delegated_by: Vec::new(),
            authenticated_by: caller.proof.clone(),
        };
        let record = caller
            .record(Event::TaskStarted)
            .task(&task)
            .envelope(&task.envelope)
            .decided("permit", Some(&permit.policy_id))
            .expires(task.expires_at);
        self.shared.open_task(&task, record, denied).await?;
        tracing::info!(
            target: "mayfly::decision",
            event = "task_started",
            agent = %caller.id,
            task_id = %task.id,
            policy = %permit.policy_id,
            expires_at = task.expires_at.as_secs(),
        );
        Ok(TaskRecord {
            task,
            status: LeaseStatus::Active,
        })
    }

    /// Hands part of one of the caller's tasks to another agent: a child
    /// task owned by `req.delegate`, no wider than the parent, ending no
    /// later, within the depth limit, and allowed by policy (`delegate`).
    /// Its context is the parent's as it stands now.
    pub async fn delegate_task(
        &self,
        caller: &Caller,
        req: NewDelegation,
    ) -> Result<TaskRecord, BrokerError> {
        let now = Timestamp::now().floor_secs();
        let parent = self
            .shared
            .active_task(&caller.id, &req.parent, now)
            .await?
            .task;
        let denied = || {
            let mut r = caller
                .record(Event::DelegationDenied)
                .task(&parent)
                .envelope(&req.envelope);
            r.delegate = Some(req.delegate.to_string());
            r
        };
        if req.delegate.trust_domain_name() != caller.id.trust_domain_name() {
            return Err(BrokerError::Invalid(format!(
                "delegate {} is not in trust domain {}",
                req.delegate,
                caller.id.trust_domain_name()
            )));
        }
        let audiences: Vec<_> = req
            .envelope
            .audiences()
            .difference(parent.envelope.audiences())
            .cloned()
            .collect();
        let scopes: Vec<_> = req
            .envelope
            .scopes()
            .difference(parent.envelope.scopes())
            .cloned()
            .collect();
        if !audiences.is_empty() || !scopes.is_empty() {
            let e = BrokerError::BeyondParent { audiences, scopes };
            return Err(self.shared.record_denial(e, denied()).await);
        }
        if parent.depth() >= self.lifetimes.max_delegation_depth {
            let e = BrokerError::DelegationTooDeep {
                depth: parent.depth(),
                limit: self.lifetimes.max_delegation_depth,
            };
            return Err(self.shared.record_denial(e, denied()).await);
        }
        let ttl = asked(
            req.ttl,
            self.lifetimes.task_default_ttl,
            self.lifetimes.task_max_ttl,
        );
        let decision = self.shared.policy.decide(&PolicyRequest {
            principal: &caller.id,
            proof: &caller.proof,
            action: Action::Delegate {
                delegate: &req.delegate,
                envelope: &req.envelope,
            },
            task: TaskFacts::of(&parent),
            ttl,
            now,
        });
        let permit = self.shared.permit_or_record(decision, denied).await?;
        if permit.approval_required {
            return Err(BrokerError::Unsupported(format!(
                "policy {} requires approval for delegation, which Mayfly does not offer; \
                 delegation is allowed or denied outright",
                permit.policy_id
            )));
        }
        let ttl = permit.max_ttl.map_or(ttl, |m| ttl.min(m));
        let expires_at = now
            .plus(Duration::from_secs(ttl.as_secs()))
            .min(parent.expires_at);
        let mut delegated_by = parent.delegated_by.clone();
        delegated_by.push(parent.agent.clone());
        let denied = denied();
        let task = Task {
            id: TaskId::generate(),
            agent: req.delegate,
            intent: req.intent,
            context: parent.context.clone(),
            envelope: req.envelope,
            created_at: now,
            expires_at,
            revision: 0,
            parent: Some(parent.id.clone()),
            delegated_by,
            authenticated_by: caller.proof.clone(),
        };
        let mut record = caller
            .record(Event::TaskDelegated)
            .task(&task)
            .envelope(&task.envelope)
            .decided("permit", Some(&permit.policy_id))
            .expires(task.expires_at);
        record.delegate = Some(task.agent.to_string());
        self.shared.open_task(&task, record, denied).await?;
        tracing::info!(
            target: "mayfly::decision",
            event = "task_delegated",
            agent = %caller.id,
            delegate = %task.agent,
            task_id = %task.id,
            parent_task_id = %parent.id,
            depth = task.depth(),
            policy = %permit.policy_id,
        );
        Ok(TaskRecord {
            task,
            status: LeaseStatus::Active,
        })
    }

    /// Completes one of the caller's tasks, revoking everything under it.
    pub async fn complete_task(
        &self,
        caller: &Caller,
        id: &TaskId,
    ) -> Result<(Vec<LeaseId>, TaskRecord), BrokerError> {
        let mut record = self.shared.own_task(&caller.id, id).await?;
        let req = RevokeRequest {
            reason: RevocationReason::TaskCompleted,
            child_reason: RevocationReason::TaskCompleted,
            by: caller.id.clone(),
            note: None,
            at: Timestamp::now(),
        };
        let revoked = self
            .shared
            .store
            .end_task(id, &req)
            .await
            .map_err(|e| BrokerError::from_store(e, id))?;
        self.shared.task_cache.forget(id);
        self.shared.revoked.notify_one();
        self.shared
            .audit_anyway(
                caller
                    .record(Event::TaskCompleted)
                    .task(&record.task)
                    .revoked(&revoked),
            )
            .await;
        tracing::info!(
            target: "mayfly::decision",
            event = "task_completed",
            agent = %caller.id,
            task_id = %id,
            revoked = revoked.len(),
        );
        record.status = LeaseStatus::Revoked(Revocation {
            reason: req.reason,
            at: req.at,
            by: req.by,
            note: None,
        });
        Ok((revoked, record))
    }

    /// Changes one of the caller's tasks' context (`set` entries replace,
    /// `remove` keys go), then revokes whatever policy no longer allows under
    /// the new context. Returns the task and the revoked lease ids.
    pub async fn update_task_context(
        &self,
        caller: &Caller,
        id: &TaskId,
        change: ContextChange,
    ) -> Result<(TaskRecord, Vec<LeaseId>), BrokerError> {
        let now = Timestamp::now();
        let record = self.shared.active_task(&caller.id, id, now).await?;
        let context = change
            .apply(&record.task.context)
            .map_err(BrokerError::invalid)?;
        let task = self
            .shared
            .store
            .update_task_context(id, &caller.id, &context, now)
            .await
            .map_err(|e| BrokerError::from_store(e, id))?;
        self.shared.task_cache.forget(id);
        tracing::info!(
            target: "mayfly::decision",
            event = "task_context_changed",
            agent = %caller.id,
            task_id = %id,
            revision = task.revision,
        );
        let mut revoked = self.reevaluate(&task, &caller.id, now).await?;
        // Tasks delegated from this one were allowed on its old context.
        revoked.extend(self.reevaluate_children(&task.id, &caller.id, now).await?);
        let mut record = caller
            .record(Event::TaskContextChanged)
            .task(&task)
            .revoked(&revoked);
        let changed: Vec<&str> = change.keys().collect();
        record.reason = Some(format!("changed keys: {}", changed.join(", ")));
        self.shared.audit_anyway(record).await;
        let record = self.shared.own_task(&caller.id, id).await?;
        Ok((record, revoked))
    }

    /// Decides `task` and each of its active credentials again under the
    /// current policies and context, revoking (reason `context_changed`)
    /// whatever is no longer allowed. A credential that now needs an
    /// approval it was not issued with is revoked too.
    pub async fn reevaluate(
        &self,
        task: &Task,
        by: &SpiffeId,
        now: Timestamp,
    ) -> Result<Vec<LeaseId>, BrokerError> {
        let req = RevokeRequest {
            reason: RevocationReason::ContextChanged,
            child_reason: RevocationReason::ContextChanged,
            by: by.clone(),
            note: None,
            at: now,
        };
        let task_allowed = self.task_still_allowed(task, now).await?;
        if let Decision::Deny { policy_id, .. } = &task_allowed {
            tracing::info!(
                target: "mayfly::decision",
                event = "task_no_longer_allowed",
                task_id = %task.id,
                policy = policy_id.as_deref().unwrap_or("default deny"),
            );
            let revoked = match self.shared.store.end_task(&task.id, &req).await {
                Err(StoreError::TaskNotActive(_) | StoreError::TaskNotFound) => Vec::new(),
                other => other?,
            };
            self.shared.revoked.notify_one();
            self.shared
                .audit_anyway(
                    AuditRecord::new(Event::RevokedByPolicy, by)
                        .task(task)
                        .lease(&task.id.lease_id())
                        .decided("deny", policy_id.as_deref())
                        .reason(RevocationReason::ContextChanged.as_str())
                        .revoked(&revoked),
                )
                .await;
            return Ok(revoked);
        }
        let mut revoked = Vec::new();
        let filter = LeaseFilter {
            task: Some(task.id.clone()),
            state: Some(LeaseState::Active),
            ..Default::default()
        };
        let mut page = PageRequest {
            after: None,
            limit: PAGE,
        };
        loop {
            let leases = self.shared.store.list_leases(&filter, &page, now).await?;
            for lease in &leases.items {
                if lease.detail != LeaseDetail::Task && !self.still_allowed(task, lease, now) {
                    let ids = self.shared.store.revoke_lease(&lease.id, &req).await?;
                    self.shared
                        .audit_anyway(
                            AuditRecord::new(Event::RevokedByPolicy, by)
                                .task(task)
                                .lease(&lease.id)
                                .credential(lease.audience().map(|a| a.as_str()), &lease.scopes)
                                .decided("deny", None)
                                .reason(RevocationReason::ContextChanged.as_str())
                                .revoked(&ids),
                        )
                        .await;
                    revoked.extend(ids);
                    tracing::info!(
                        target: "mayfly::decision",
                        event = "lease_no_longer_allowed",
                        task_id = %task.id,
                        lease_id = %lease.id,
                    );
                }
            }
            match leases.next {
                Some(n) => page.after = Some(n),
                None => break,
            }
        }
        if !revoked.is_empty() {
            self.shared.revoked.notify_one();
        }
        Ok(revoked)
    }

    /// The task itself decided again: a task an agent opened as
    /// `start_task`, a delegated one as `delegate` from its parent's owner
    /// on the parent as it stands (a parent that ended took the task with
    /// it, so there is nothing to decide).
    async fn task_still_allowed(
        &self,
        task: &Task,
        now: Timestamp,
    ) -> Result<Decision, BrokerError> {
        let ttl = now.until(task.expires_at);
        let Some(parent_id) = &task.parent else {
            return Ok(self.shared.policy.decide(&PolicyRequest {
                principal: &task.agent,
                proof: &task.authenticated_by,
                action: Action::StartTask {
                    envelope: &task.envelope,
                },
                task: TaskFacts::new(&task.intent, &task.context),
                ttl,
                now,
            }));
        };
        let Some(parent) = self.shared.store.get_task(parent_id).await? else {
            return Ok(Decision::Permit {
                policy_id: String::new(),
                max_ttl: None,
                approval_required: false,
            });
        };
        Ok(self.shared.policy.decide(&PolicyRequest {
            principal: &parent.task.agent,
            proof: &task.authenticated_by,
            action: Action::Delegate {
                delegate: &task.agent,
                envelope: &task.envelope,
            },
            task: TaskFacts::of(&parent.task),
            ttl,
            now,
        }))
    }

    /// Whether `lease` would still be issued under `task` as it is now.
    fn still_allowed(&self, task: &Task, lease: &Lease, now: Timestamp) -> bool {
        let ttl = now.until(lease.expires_at);
        // Exhaustive: a kind added later must say how it is decided again,
        // and a lease this build cannot read is revoked.
        let (principal, action) = match &lease.detail {
            LeaseDetail::Token {
                audience, binding, ..
            } => (
                &lease.agent,
                Action::IssueToken {
                    audience,
                    scopes: &lease.scopes,
                    binding,
                },
            ),
            LeaseDetail::ExchangedToken {
                audience,
                binding,
                actor,
                subject_audience,
                ..
            } => {
                // Still one of the token's recipients (the configuration
                // may have changed since), or no longer allowed.
                let Some(server) = ResourceServer::find(
                    &self.shared.resource_servers,
                    actor,
                    subject_audience.as_str(),
                ) else {
                    return false;
                };
                (
                    actor,
                    Action::ExchangeToken {
                        subject: &lease.agent,
                        subject_audience,
                        resource_server: &server.name,
                        audience,
                        scopes: &lease.scopes,
                        binding,
                    },
                )
            }
            LeaseDetail::Certificate { .. } => (&lease.agent, Action::SignCertificate),
            LeaseDetail::DatabaseLogin { database, .. } => (
                &lease.agent,
                Action::IssueDatabaseLogin {
                    database,
                    scopes: &lease.scopes,
                },
            ),
            LeaseDetail::Unrecognised { .. } => return false,
            // A task is decided again by `reevaluate` itself, not as one
            // of its own credentials.
            LeaseDetail::Task => return true,
        };
        let decision = self.shared.policy.decide(&PolicyRequest {
            principal,
            proof: &lease.authenticated_by,
            action,
            task: TaskFacts::of(task),
            ttl,
            now,
        });
        match decision {
            Decision::Permit {
                approval_required, ..
            } => !approval_required || lease.approval.is_some(),
            _ => false,
        }
    }

    /// Re-evaluates the active tasks delegated directly from `parent`.
    async fn reevaluate_children(
        &self,
        parent: &TaskId,
        by: &SpiffeId,
        now: Timestamp,
    ) -> Result<Vec<LeaseId>, BrokerError> {
        let filter = TaskFilter {
            parent: Some(parent.clone()),
            state: Some(TaskState::Active),
            agent: None,
        };
        let mut page = PageRequest {
            after: None,
            limit: PAGE,
        };
        let mut revoked = Vec::new();
        loop {
            let children = self.shared.store.list_tasks(&filter, &page, now).await?;
            for child in &children.items {
                revoked.extend(self.reevaluate(&child.task, by, now).await?);
            }
            match children.next {
                Some(n) => page.after = Some(n),
                None => return Ok(revoked),
            }
        }
    }

    /// Re-evaluates every active task (after a policy reload).
    pub async fn reevaluate_all(&self) -> Result<Vec<LeaseId>, BrokerError> {
        let now = Timestamp::now();
        let filter = TaskFilter {
            agent: None,
            state: Some(TaskState::Active),
            parent: None,
        };
        let mut page = PageRequest {
            after: None,
            limit: PAGE,
        };
        let mut revoked = Vec::new();
        loop {
            let tasks = self.shared.store.list_tasks(&filter, &page, now).await?;
            for record in &tasks.items {
                revoked.extend(
                    self.reevaluate(&record.task, &self.shared.broker_id, now)
                        .await?,
                );
            }
            match tasks.next {
                Some(n) => page.after = Some(n),
                None => return Ok(revoked),
            }
        }
    }
}
