//! The one path every credential takes. A credential kind ([`Kind`])
//! says what differs: the request an approval is bound to, its lifetime,
//! what policy is asked (its `Action`), how the credential is minted, and
//! what its lease and audit record hold. Everything else is written here once, as a small state
//! machine over one attempt ([`Service::attempt`]):
//!
//! ```text
//!   Read (cached | fresh) ─► Check ─► Decide ─► Gate ─► Mint ─► Record ─► issued
//!        ▲                      │        │        │                 │
//!        └──────── fresh ───────┴────────┘        └─► pending       │
//!        └──────── fresh (the task changed, attempts left) ─────────┘
//! ```
//!
//! - **Read**: the task, from the cache while nothing but a plain permit
//!   depends on it (the store checks the task again when it records);
//!   fresh for anything else.
//! - **Check / Decide**: a refusal on a cached task is made again on a
//!   fresh read (its context may have changed to allow it), and so is a
//!   permit that needs an approval (the task may have ended).
//! - **Gate**: an approval given is consumed for exactly this request; one
//!   needed and not given is opened, and the caller told to wait. Once one
//!   is consumed, a decision made again is not gated again; until then it
//!   is (it may newly need an approval).
//! - **Record**: the lease and its audit record, together (one step when
//!   the trail lives in the store, else the lease and then the record,
//!   undoing the lease if the record fails). A task whose context changed
//!   since the decision sends the attempt back to a fresh read, up to
//!   [`ATTEMPTS`] decisions in all.

use std::time::Duration;

use mayfly_core::{
    Action, ApprovalId, ApprovalRequest, Decision, Lease, LeaseDetail, LeaseId, LeaseStatus,
    PolicyRequest, Scopes, SpiffeId, Task, TaskFacts, TaskId, Timestamp,
};

use super::shared::{Gate, asked, expiry};
use super::{Issuance, Issued, Minted, TokenSigner};
use crate::audit::{AuditRecord, Event};
use crate::config::Lifetimes;
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::store::{RecordError, StoreError};

/// How many times a credential is decided, at most, when the task's
/// context keeps changing while it is issued (the first decision and two
/// more).
pub(super) const ATTEMPTS: usize = 3;

/// What a credential kind supplies to the pipeline.
pub(super) trait Kind {
    /// What the caller gets, besides the lease.
    type Credential;
    /// The audit event of an issued credential.
    const ISSUED: Event;
    /// The audit event of a refused one.
    const DENIED: Event;

    /// Whose task the credential is issued under, and whose lease it is:
    /// the caller's own, except for a token exchanged by a service, which
    /// is under the task of the agent whose token it exchanged.
    fn owner<'a>(&'a self, caller: &'a Caller) -> &'a SpiffeId {
        &caller.id
    }
    /// The request an approval is bound to; `None` when this kind is
    /// never issued on an approval (a permit that asks for one is then
    /// refused).
    fn approval_request(&self) -> Option<ApprovalRequest>;
    /// The lifetime asked for, and the broker's default and maximum for
    /// the kind.
    fn lifetime(&self, lifetimes: &Lifetimes) -> Lifetime;
    /// A refusal that needs no policy (the task's envelope), if any.
    fn check(&self, _task: &Task) -> Option<BrokerError> {
        None
    }
    /// What policy is asked to allow (the caller asks it, under the task).
    fn action(&self) -> Action<'_>;
    /// Whether the credential is a token, listed in the Token Status List.
    const STATUS_LISTED: bool = false;
    /// The kind's part of a new lease (a token's audience, binding and
    /// status-list index, a certificate's serial): fresh for every attempt.
    /// `status_idx` is given exactly when the kind is
    /// [`STATUS_LISTED`](Kind::STATUS_LISTED).
    fn detail(&self, caller: &Caller, status_idx: Option<u64>) -> LeaseDetail;
    /// The scopes the lease grants.
    fn scopes(&self) -> Scopes {
        Scopes::default()
    }
    /// The kind's part of its audit records, issued or refused.
    fn describe(&self, record: AuditRecord, lease: Option<&Lease>) -> AuditRecord;
    /// Makes the credential `lease` records, under `task`.
    fn mint(
        &self,
        tokens: &TokenSigner,
        task: &Task,
        lease: &Lease,
    ) -> impl std::future::Future<Output = Result<Self::Credential, BrokerError>> + Send;
    /// What was issued, in a few words for the log (never the credential).
    fn summary(&self, lease: &Lease) -> String;
}

/// A kind's lifetime: as asked, and the broker's default and maximum.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lifetime {
    /// Asked for; `None` for the default.
    pub asked: Option<Duration>,
    /// The broker's default for the kind.
    pub default: Duration,
    /// The broker's maximum for the kind.
    pub max: Duration,
}

impl Lifetime {
    /// The lifetime to decide on: as asked (or the default), within the
    /// maximum.
    fn resolved(&self) -> Duration {
        asked(self.asked, self.default, self.max)
    }
}

/// Where the task is read from on the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// The cache, while it holds the task active.
    Cached,
    /// The store.
    Fresh,
}

/// What carries over from one attempt to the next.
struct Progress {
    read: Read,
    /// The approval consumed for this request, once it is: until then,
    /// every decision passes the gate (one made again may newly need an
    /// approval).
    approval: Option<ApprovalId>,
    /// Decisions acted on so far.
    decisions: usize,
}

/// How an attempt ended, short of an error.
enum Next<T> {
    /// Issued, or waiting for an approval.
    Done(Issued<T>),
    /// Decide again on a fresh read of the task.
    Again,
}

impl Issuance {
    /// Issues one credential of kind `K` under the caller's task `task_id`,
    /// or opens the approval policy requires; `approval_id` collects an
    /// approved request.
    pub(super) async fn issue<K: Kind>(
        &self,
        caller: &Caller,
        kind: &K,
        task_id: &TaskId,
        approval_id: Option<&ApprovalId>,
    ) -> Result<Issued<Minted<K::Credential>>, BrokerError> {
        let run = async {
            self.rate_limit(caller).await?;
            let ttl = kind.lifetime(&self.lifetimes).resolved();
            let mut progress = Progress {
                // An approval is consumed only on a fresh read.
                read: match approval_id {
                    None => Read::Cached,
                    Some(_) => Read::Fresh,
                },
                approval: None,
                decisions: 0,
            };
            loop {
                match self
                    .attempt(caller, kind, task_id, approval_id, ttl, &mut progress)
                    .await?
                {
                    Next::Done(issued) => return Ok(issued),
                    Next::Again => progress.read = Read::Fresh,
                }
            }
        };
        let issued = run.await;
        self.shared.explain_lock(kind.owner(caller), issued).await
    }

    /// One pass from reading the task to recording the credential.
    async fn attempt<K: Kind>(
        &self,
        caller: &Caller,
        kind: &K,
        task_id: &TaskId,
        approval_id: Option<&ApprovalId>,
        ttl: Duration,
        progress: &mut Progress,
    ) -> Result<Next<Minted<K::Credential>>, BrokerError> {
        // Read.
        let now = Timestamp::now();
        let cached = progress.read == Read::Cached;
        let owner = kind.owner(caller);
        let (record, from_cache) = self
            .shared
            .credential_task(owner, task_id, now, cached)
            .await?;
        let task = &record.task;
        let denied = || kind.describe(caller.record(K::DENIED).task(task), None);

        // Check: the envelope never changes, but a cached task may have
        // ended since.
        if let Some(e) = kind.check(task) {
            if from_cache {
                return Ok(Next::Again);
            }
            return Err(self.shared.record_denial(e, denied()).await);
        }

        // Decide.
        let decision = self.shared.policy.decide(&PolicyRequest {
            principal: &caller.id,
            proof: &caller.proof,
            action: kind.action(),
            task: TaskFacts::of(task),
            ttl,
            now,
        });
        if from_cache && needs_fresh_task(&decision) {
            return Ok(Next::Again);
        }
        let permit = self.shared.permit_or_record(decision, denied).await?;

        // Gate.
        if progress.approval.is_none() {
            match kind.approval_request() {
                Some(request) => match self
                    .shared
                    .approval_gate(
                        task,
                        &permit,
                        request,
                        approval_id,
                        caller.record(Event::ApprovalRequested).task(task),
                        now,
                    )
                    .await?
                {
                    Gate::Pending(a) => return Ok(Next::Done(Issued::Pending(a))),
                    Gate::Proceed(a) => progress.approval = a,
                },
                None if permit.approval_required => {
                    return Err(BrokerError::Unsupported(format!(
                        "policy {} requires approval for this credential, which cannot wait \
                         for one: ask an operator to change the policy",
                        permit.policy_id
                    )));
                }
                None => {}
            }
        }

        // Mint.
        let issued_at = now.floor_secs();
        let status_idx = match K::STATUS_LISTED {
            true => Some(self.tokens.status_index().await?),
            false => None,
        };
        let lease = Lease {
            id: LeaseId::generate(),
            detail: kind.detail(caller, status_idx),
            agent: owner.clone(),
            task_id: task.id.clone(),
            scopes: kind.scopes(),
            issued_at,
            expires_at: expiry(now, ttl, permit.max_ttl, task)?,
            status: LeaseStatus::Active,
            task_revision: task.revision,
            approval: progress.approval.clone(),
            authenticated_by: caller.proof.clone(),
        };
        let credential = kind.mint(&self.tokens, task, &lease).await?;

        // Record: the credential leaves only once its lease and its record
        // are durable, under a task still active and unchanged then.
        let mut record = caller
            .record(K::ISSUED)
            .task(task)
            .lease(&lease.id)
            .decided("permit", Some(&permit.policy_id))
            .expires(lease.expires_at);
        record.approval_id = lease.approval.as_ref().map(ToString::to_string);
        let record = kind.describe(record, Some(&lease));
        progress.decisions += 1;
        match self
            .shared
            .recorder
            .record_issued(record, lease.clone(), now)
            .await
        {
            Ok(()) => {
                // One per credential: debug, like expiry; the audit trail
                // has every one.
                tracing::debug!(
                    target: "mayfly::decision",
                    event = K::ISSUED.as_str(),
                    agent = %caller.id,
                    task_id = %lease.task_id,
                    lease_id = %lease.id,
                    credential = %kind.summary(&lease),
                    policy = %permit.policy_id,
                    approval = lease.approval.as_ref().map(|a| a.to_string()).unwrap_or_default(),
                    expires_at = lease.expires_at.as_secs(),
                );
                Ok(Next::Done(Issued::Credential(Minted { credential, lease })))
            }
            Err(e) => match self.decide_again(e, &task.id, progress.decisions) {
                Ok(()) => Ok(Next::Again),
                Err(locked @ BrokerError::AgentLocked(_)) => {
                    Err(self.shared.record_denial(locked, denied()).await)
                }
                Err(e) => Err(e),
            },
        }
    }

    /// Takes one issuance from the caller's bucket.
    async fn rate_limit(&self, caller: &Caller) -> Result<(), BrokerError> {
        self.rate
            .take(self.shared.store.as_ref(), &caller.id)
            .await
            .map_err(|retry_after| BrokerError::RateLimited { retry_after })
    }

    /// After a credential was not recorded: `Ok` to decide again (the
    /// task's context changed and fewer than [`ATTEMPTS`] decisions were
    /// made), else the answer for the caller.
    fn decide_again(
        &self,
        e: RecordError,
        task: &TaskId,
        decisions: usize,
    ) -> Result<(), BrokerError> {
        match e {
            RecordError::Store(e) => {
                self.shared.task_cache.forget(task);
                match e {
                    StoreError::TaskChanged if decisions < ATTEMPTS => Ok(()),
                    e => Err(BrokerError::from_store(e, task)),
                }
            }
            RecordError::Audit(e) => Err(e.into()),
        }
    }
}

/// Whether `decision`, made on a cached task, must be made again on a
/// fresh read before it is acted on: a refusal (the task's context may
/// have changed to allow it) and an approval to open (the task may have
/// ended) are answered on the task as the store has it now.
fn needs_fresh_task(decision: &Decision) -> bool {
    !matches!(
        decision,
        Decision::Permit {
            approval_required: false,
            ..
        }
    )
}
