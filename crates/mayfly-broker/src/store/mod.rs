//! Where leases live. [`LeaseStore`] is the seam, made of one trait per
//! role ([`TaskStore`], [`CredentialStore`], [`AgentStore`],
//! [`ApprovalStore`], [`RevocationLog`], [`RecordStore`], [`ReplayGuard`],
//! [`Upkeep`]); every backend implements them all and passes the same
//! contract suite (`mayfly_testkit::contract`). All state changes that must
//! be atomic are one call here, so a backend can make each one a
//! transaction (embedded) or a script (Redis):
//!
//! - [`CredentialStore::issue`] records a credential only under a live
//!   task owned by the same agent;
//! - [`TaskStore::end_task`] ends a task and revokes every live lease under
//!   it, so an `issue` racing it either fails or is revoked with the rest;
//! - [`RecordStore::record`] writes a batch of audit records together with
//!   the leases of the credentials they issue and the tasks they open: a
//!   lease and its record exist together or not at all, across a crash at
//!   any point. This is the one way a credential or a task is recorded.
//!
//! A store records to the trail it was built with
//! ([`EmbeddedStore::recording_to`], [`RedisStore::recording_to`]; the
//! Redis store's default is its own stream, [`RedisSink`]), so no caller
//! can hand it another.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mayfly_core::{
    AgentLock, Approval, ApprovalId, ApprovalRequest, ApprovalState, ApprovalStatus, Lease,
    LeaseId, LeaseKind, LeaseState, Revocation, RevocationReason, SpiffeId, Task, TaskContext,
    TaskId, TaskRecord, TaskState, Timestamp,
};
use serde::{Deserialize, Serialize};

use crate::audit::{AuditError, AuditRecord, AuditSink};
use crate::cause::Cause;

mod embedded;
mod redis;

pub use self::redis::{RedisSink, RedisStore, RedisTarget};
pub use embedded::{CACHE_BYTES as EMBEDDED_CACHE_BYTES, EmbeddedStore};

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No such task, or it belongs to another agent.
    #[error("task not found")]
    TaskNotFound,
    /// No such lease.
    #[error("lease not found")]
    LeaseNotFound,
    /// The task exists but is no longer active.
    #[error("task is {0}")]
    TaskNotActive(TaskState),
    /// A record with this id already exists (ids are random; this means a bug
    /// or a replayed write).
    #[error("a record with id {0} already exists")]
    Duplicate(String),
    /// A lease would outlive its task.
    #[error("lease would outlive its task")]
    OutlivesTask,
    /// The task's context changed after the decision was made.
    #[error("the task's context changed during the request")]
    TaskChanged,
    /// No such approval (or another agent's).
    #[error("approval not found")]
    ApprovalNotFound,
    /// The approval is not in the state the call needs.
    #[error("approval is {0}")]
    ApprovalState(ApprovalState),
    /// The approval was granted for another request.
    #[error("approval was granted for a different request")]
    ApprovalMismatch,
    /// An operator has locked the agent out: no new task or credential.
    #[error("the agent is locked")]
    AgentLocked,
    /// The backend cannot be reached or failed to commit; nothing was written.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// A stored record could not be decoded.
    #[error("store holds a corrupt record: {0}")]
    Corrupt(#[source] Cause),
}

impl From<crate::redis_conn::Unreachable> for StoreError {
    fn from(e: crate::redis_conn::Unreachable) -> Self {
        Self::Unavailable(e.0)
    }
}

/// Why a record (and the credential lease that came with it) was not
/// written. Neither was: nothing of it is left behind.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecordError {
    /// The store refused the lease (its task ended or changed, its agent
    /// is locked, …) or could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit trail could not take the record.
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// A lease to record with its audit record.
#[derive(Debug, Clone)]
pub enum LeaseWrite {
    /// A credential's lease, checked as [`LeaseStore::issue`] checks it.
    Credential {
        /// The lease.
        lease: Lease,
        /// When its decision was made (the task must be active then).
        now: Timestamp,
    },
    /// A new task with its task lease, checked as
    /// [`LeaseStore::start_task`] checks it.
    Task(Task),
}

impl LeaseWrite {
    /// The id of the lease it writes (a task's lease has the task's id).
    pub fn lease_id(&self) -> LeaseId {
        match self {
            Self::Credential { lease, .. } => lease.id.clone(),
            Self::Task(task) => task.id.lease_id(),
        }
    }

    /// Whether it opens a task.
    pub fn is_task(&self) -> bool {
        matches!(self, Self::Task(_))
    }

    /// Why its lease is revoked again when its record could not be
    /// written: a task as `task_revoked`, a credential as `operator` (the
    /// broker acting on its own).
    pub(crate) fn unrecorded_reason(&self) -> RevocationReason {
        match self {
            Self::Credential { .. } => RevocationReason::Operator,
            Self::Task(_) => RevocationReason::TaskRevoked,
        }
    }
}

/// The failpoint after a batch's leases and records are committed to the
/// store: `after_lease_commit` for one that issues credentials,
/// `after_task_commit` for one that opens tasks.
pub(crate) fn after_commit<'a>(leases: impl IntoIterator<Item = &'a LeaseWrite>) {
    reach(leases, "after_lease_commit", "after_task_commit");
}

/// The failpoint after a batch's records are appended to a trail outside
/// the store: `after_trail_append`, `after_task_trail_append`.
pub(crate) fn after_append<'a>(leases: impl IntoIterator<Item = &'a LeaseWrite>) {
    reach(leases, "after_trail_append", "after_task_trail_append");
}

fn reach<'a>(leases: impl IntoIterator<Item = &'a LeaseWrite>, credentials: &str, tasks: &str) {
    let (mut credential, mut task) = (false, false);
    for w in leases {
        if w.is_task() {
            task = true;
        } else {
            credential = true;
        }
    }
    if credential {
        crate::failpoint::hit(credentials);
    }
    if task {
        crate::failpoint::hit(tasks);
    }
}

/// A batch for [`LeaseStore::record`]: audit records in trail order, each
/// with the lease it records, if it records one.
#[derive(Debug, Clone, Copy)]
pub struct RecordBatch<'a> {
    /// The records, in the order the trail gets them.
    pub records: &'a [AuditRecord],
    /// `leases[i]` is the lease `records[i]` writes (a credential's, or a
    /// new task's); as long as `records`.
    pub leases: &'a [Option<LeaseWrite>],
    /// Who revokes a lease whose record could not be written, where the
    /// store must undo one (the broker's own identity).
    pub undo_by: &'a SpiffeId,
}

impl RecordBatch<'_> {
    /// One outcome per record, each the same.
    fn all(&self, outcome: &Result<(), RecordError>) -> Vec<Result<(), RecordError>> {
        vec![outcome.clone(); self.records.len()]
    }
}

/// What [`lease_then_record`] needs of a backend.
pub(crate) trait LeaseThenRecord: Sync {
    /// Records each lease as [`LeaseStore::issue`] (a task's as
    /// [`LeaseStore::start_task`]) would; one answer each.
    fn issue_all(
        &self,
        writes: &[&LeaseWrite],
    ) -> impl Future<Output = Vec<Result<(), StoreError>>> + Send;

    /// Revokes each lease still active, as `req` says.
    fn undo_all(
        &self,
        ids: &[LeaseId],
        req: &RevokeRequest,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// [`LeaseStore::record`] for the Redis store with a trail outside it
/// (standard output, off; a file is refused at load): the leases first,
/// then the records of those taken, and if the trail fails, the leases
/// revoked again, so that no lease is left active without its record.
/// A crash between the two can still leave a lease unrecorded, which is
/// why a file trail, the one that is read back, needs the Redis store's
/// own trail. Only the records whose lease was refused fail for that; the
/// rest go on.
pub(crate) async fn lease_then_record<S: LeaseThenRecord>(
    store: &S,
    batch: &RecordBatch<'_>,
    trail: &dyn AuditSink,
) -> Vec<Result<(), RecordError>> {
    debug_assert_eq!(batch.records.len(), batch.leases.len());
    let mut out: Vec<Result<(), RecordError>> = batch.all(&Ok(()));
    let writes: Vec<(usize, &LeaseWrite)> = batch
        .leases
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.as_ref().map(|l| (i, l)))
        .collect();
    let mut issued = Vec::with_capacity(writes.len());
    if !writes.is_empty() {
        let leases: Vec<&LeaseWrite> = writes.iter().map(|(_, w)| *w).collect();
        let answers = store.issue_all(&leases).await;
        for ((i, w), answer) in writes.iter().zip(answers) {
            match answer {
                Ok(()) => issued.push((w.lease_id(), w.unrecorded_reason())),
                Err(e) => out[*i] = Err(RecordError::Store(e)),
            }
        }
    }
    let kept: Vec<usize> = (0..out.len()).filter(|&i| out[i].is_ok()).collect();
    if kept.is_empty() {
        return out;
    }
    let appended = if kept.len() == batch.records.len() {
        trail.append(batch.records).await
    } else {
        let records: Vec<AuditRecord> = kept.iter().map(|&i| batch.records[i].clone()).collect();
        trail.append(&records).await
    };
    if let Err(e) = appended {
        for reason in [RevocationReason::Operator, RevocationReason::TaskRevoked] {
            let ids: Vec<LeaseId> = issued
                .iter()
                .filter(|(_, r)| *r == reason)
                .map(|(id, _)| id.clone())
                .collect();
            if ids.is_empty() {
                continue;
            }
            let req = RevokeRequest::unrecorded(reason, batch.undo_by);
            if let Err(undo) = store.undo_all(&ids, &req).await {
                tracing::error!(leases = ids.len(), error = %undo, "unrecorded leases not revoked");
            }
        }
        for i in kept {
            out[i] = Err(RecordError::Audit(e.clone()));
        }
    }
    out
}

/// Which leases to list. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct LeaseFilter {
    /// Only leases of this task (the task's own lease included).
    pub task: Option<TaskId>,
    /// Only leases of this agent.
    pub agent: Option<SpiffeId>,
    /// Only leases in this state (as of the call).
    pub state: Option<LeaseState>,
    /// Only leases of this kind.
    pub kind: Option<LeaseKind>,
}

impl LeaseFilter {
    /// Whether `lease` passes the filter at `now`.
    pub fn matches(&self, lease: &Lease, now: Timestamp) -> bool {
        self.task.as_ref().is_none_or(|t| &lease.task_id == t)
            && self.agent.as_ref().is_none_or(|a| &lease.agent == a)
            && self.state.is_none_or(|s| lease.state_at(now) == s)
            && self.kind.is_none_or(|k| lease.kind() == Some(k))
    }
}

/// Which tasks to list.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only tasks of this agent.
    pub agent: Option<SpiffeId>,
    /// Only tasks in this state (as of the call).
    pub state: Option<TaskState>,
    /// Only tasks delegated from this one (its children).
    pub parent: Option<TaskId>,
}

impl TaskFilter {
    /// Whether `task` passes the filter at `now`.
    pub fn matches(&self, task: &TaskRecord, now: Timestamp) -> bool {
        self.agent.as_ref().is_none_or(|a| &task.task.agent == a)
            && self.state.is_none_or(|s| task.state_at(now) == s)
            && self
                .parent
                .as_ref()
                .is_none_or(|p| task.task.parent.as_ref() == Some(p))
    }
}

/// A page request: results come in id order, after `after`.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    /// The last id of the previous page.
    pub after: Option<String>,
    /// How many results at most (at least 1).
    pub limit: usize,
}

/// One page of results.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The results, in id order.
    pub items: Vec<T>,
    /// Pass as `after` for the next page; `None` at the end.
    pub next: Option<String>,
}

/// One revocation, as the feed will carry it. Cursors increase strictly
/// and survive restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationEvent {
    /// Position in the feed.
    pub cursor: u64,
    /// The revoked lease (a token's `jti`).
    pub lease_id: LeaseId,
    /// What the lease recorded; `None` for a kind this build does not
    /// know.
    pub kind: Option<LeaseKind>,
    /// The task it belonged to.
    pub task_id: TaskId,
    /// Why and by whom.
    pub revocation: Revocation,
    /// The credential's own expiry: validators may forget it after this.
    pub expires_at: Timestamp,
    /// For a certificate: its serial (lower-case hex), for CRLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// For a token: its index in the Token Status List.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_idx: Option<u64>,
}

/// What one reaper pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapOutcome {
    /// Leases moved from active to expired, each exactly once.
    pub expired: Vec<ExpiredLease>,
    /// Records removed after their retention window.
    pub purged: usize,
    /// Whether the pass stopped at its limit with more due: the caller
    /// should run another at once. (Due entries need not all become
    /// `expired` or `purged`: an index may hold leases already revoked.)
    pub more: bool,
}

/// A lease a reaper pass moved to expired, with what its audit record names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredLease {
    /// The lease.
    pub id: LeaseId,
    /// Its task.
    pub task_id: TaskId,
    /// Its owner.
    pub agent: SpiffeId,
}

/// Who asked for a revocation and why; the store stamps each lease with it.
#[derive(Debug, Clone)]
pub struct RevokeRequest {
    /// The reason for the lease or task named in the call.
    pub reason: RevocationReason,
    /// The reason given to leases under it (e.g. `task_completed` for a
    /// token of a completed task).
    pub child_reason: RevocationReason,
    /// Who asked.
    pub by: SpiffeId,
    /// Operator's note.
    pub note: Option<String>,
    /// When.
    pub at: Timestamp,
}

impl RevokeRequest {
    /// The broker, as `by`, undoing a write whose audit record could not be
    /// written: nothing may stay active unrecorded.
    pub fn unrecorded(reason: RevocationReason, by: &SpiffeId) -> Self {
        Self {
            reason,
            child_reason: reason,
            by: by.clone(),
            note: Some("audit trail unavailable".into()),
            at: Timestamp::now(),
        }
    }

    fn revocation(&self, reason: RevocationReason) -> Revocation {
        Revocation {
            reason,
            at: self.at,
            by: self.by.clone(),
            note: self.note.clone(),
        }
    }
}

/// Checks that an approval may be decided at `now`.
pub(crate) fn check_decidable(a: &Approval, now: Timestamp) -> Result<(), StoreError> {
    match a.state_at(now) {
        ApprovalState::Pending => Ok(()),
        state => Err(StoreError::ApprovalState(state)),
    }
}

/// Checks that `agent` may consume approval `a` for `request` under `task`
/// at `now`; returns its consumed status.
pub(crate) fn check_consumable(
    a: &Approval,
    agent: &SpiffeId,
    task: &TaskId,
    request: &ApprovalRequest,
    now: Timestamp,
) -> Result<ApprovalStatus, StoreError> {
    if &a.agent != agent || &a.task_id != task {
        return Err(StoreError::ApprovalNotFound);
    }
    match (&a.status, a.state_at(now)) {
        (ApprovalStatus::Approved { by, reason, .. }, ApprovalState::Approved) => {
            if &a.request != request {
                return Err(StoreError::ApprovalMismatch);
            }
            Ok(ApprovalStatus::Consumed {
                by: by.clone(),
                at: now,
                reason: reason.clone(),
            })
        }
        (_, state) => Err(StoreError::ApprovalState(state)),
    }
}

/// Tasks: opening, reading, ending, their context, listing.
#[async_trait]
pub trait TaskStore: Send + Sync + fmt::Debug {
    /// Records a new task and its task lease, unless its agent is locked
    /// at `task.created_at` (`AgentLocked`). A delegated task (with a
    /// `parent`) is recorded only if, at its `created_at`, the parent is
    /// active, owned by the last of `delegated_by`, and outlives it
    /// (`TaskNotFound`, `TaskNotActive` or `OutlivesTask` otherwise, about
    /// the parent); it then ends with the parent.
    async fn start_task(&self, task: &Task) -> Result<(), StoreError>;

    /// A task with its current status.
    async fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError>;

    /// Ends an active task: its lease gets `req.reason`, every active lease
    /// under it `req.child_reason`, and every active task delegated from
    /// it, to any depth, ends with its leases as `parent_revoked`, in one
    /// atomic step. Returns the revoked lease ids, the task's own first.
    /// Fails with `TaskNotActive` if the task already ended (nothing
    /// changes).
    async fn end_task(&self, id: &TaskId, req: &RevokeRequest) -> Result<Vec<LeaseId>, StoreError>;

    /// Tasks matching `filter`, in task-id order.
    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        page: &PageRequest,
        now: Timestamp,
    ) -> Result<Page<TaskRecord>, StoreError>;

    /// Replaces the context of an active task of `agent`, bumping its
    /// revision; returns the updated task.
    async fn update_task_context(
        &self,
        id: &TaskId,
        agent: &SpiffeId,
        context: &TaskContext,
        now: Timestamp,
    ) -> Result<Task, StoreError>;
}

/// Credential leases: issuing, reading, revoking one, listing, counting.
#[async_trait]
pub trait CredentialStore: Send + Sync + fmt::Debug {
    /// Records a credential lease, atomically checking that its task exists,
    /// is owned by `lease.agent`, is active at `now`, and outlives the lease,
    /// and that the agent is not locked (`AgentLocked`). Returns
    /// `TaskNotFound` for another agent's task.
    async fn issue(&self, lease: &Lease, now: Timestamp) -> Result<(), StoreError>;

    /// A lease by id.
    async fn get_lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError>;

    /// Revokes one active lease. A task lease ends its task (as
    /// [`end_task`](Self::end_task)). Returns the revoked ids; empty when the
    /// lease was no longer active.
    async fn revoke_lease(
        &self,
        id: &LeaseId,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError>;

    /// Leases matching `filter`, in lease-id order.
    async fn list_leases(
        &self,
        filter: &LeaseFilter,
        page: &PageRequest,
        now: Timestamp,
    ) -> Result<Page<Lease>, StoreError>;

    /// How many leases (tasks and credentials) are recorded active,
    /// including any past their expiry that the reaper has not yet moved.
    /// Cheap: an index's size, for the live-leases gauge.
    async fn active_count(&self) -> Result<u64, StoreError>;
}

/// Whole agents: revoking everything of one, locking it out.
#[async_trait]
pub trait AgentStore: Send + Sync + fmt::Debug {
    /// Ends every active task of `agent` and revokes every active lease of it.
    async fn revoke_agent(
        &self,
        agent: &SpiffeId,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError>;

    /// Locks `lock.agent` out (replacing a lock it already has) and, in the
    /// same step on the embedded store (or right after, on Redis, where
    /// every issue already refuses the agent), ends every active task and
    /// revokes every active lease of it, as [`revoke_agent`](Self::revoke_agent).
    async fn lock_agent(
        &self,
        lock: &AgentLock,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError>;

    /// Lifts the lock on `agent`; returns the lock that held at `now`, or
    /// `None` if there was none.
    async fn unlock_agent(
        &self,
        agent: &SpiffeId,
        now: Timestamp,
    ) -> Result<Option<AgentLock>, StoreError>;

    /// The lock holding `agent` out at `now`, if any.
    async fn agent_lock(
        &self,
        agent: &SpiffeId,
        now: Timestamp,
    ) -> Result<Option<AgentLock>, StoreError>;

    /// Every lock holding at `now`, by agent.
    async fn list_locks(&self, now: Timestamp) -> Result<Vec<AgentLock>, StoreError>;
}

/// Approvals: created pending, decided once, consumed once.
#[async_trait]
pub trait ApprovalStore: Send + Sync + fmt::Debug {
    /// Records a new, pending approval.
    async fn create_approval(&self, approval: &Approval) -> Result<(), StoreError>;

    /// An approval by id.
    async fn get_approval(&self, id: &ApprovalId) -> Result<Option<Approval>, StoreError>;

    /// Approvals, newest first by id order; only those pending at `now`
    /// when `pending_only`.
    async fn list_approvals(
        &self,
        pending_only: bool,
        page: &PageRequest,
        now: Timestamp,
    ) -> Result<Page<Approval>, StoreError>;

    /// Approves or denies a pending, unexpired approval, atomically.
    async fn decide_approval(
        &self,
        id: &ApprovalId,
        decision: ApprovalStatus,
        now: Timestamp,
    ) -> Result<Approval, StoreError>;

    /// Marks an approved, unexpired approval consumed if it belongs to
    /// `agent` and `task` and was granted for exactly `request`; once only.
    async fn consume_approval(
        &self,
        id: &ApprovalId,
        agent: &SpiffeId,
        task: &TaskId,
        request: &ApprovalRequest,
        now: Timestamp,
    ) -> Result<Approval, StoreError>;
}

/// The revocation feed's log: ordered, resumable, surviving restarts.
#[async_trait]
pub trait RevocationLog: Send + Sync + fmt::Debug {
    /// The cursor of the newest revocation (0 if none yet): where a live
    /// follower of the feed starts.
    async fn feed_head(&self) -> Result<u64, StoreError>;

    /// Revocations after `cursor`, oldest first, at most `limit`.
    async fn revocations_since(
        &self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<RevocationEvent>, StoreError>;
}

/// The Token Status List's index counter: it only grows, so no index is
/// handed out twice, whichever replica asks.
#[async_trait]
pub trait StatusIndexes: Send + Sync + fmt::Debug {
    /// Reserves `count` fresh indexes; gives the first (the rest follow
    /// it).
    async fn reserve_status_indexes(&self, count: u64) -> Result<u64, StoreError>;

    /// How many indexes have been reserved so far: every index below it
    /// may be in a token.
    async fn status_indexes_reserved(&self) -> Result<u64, StoreError>;
}

/// What a shared rate limit said of one more issuance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateTaken {
    /// Within the limit; counted.
    Allowed,
    /// Over it: one more is allowed after this long (nothing counted).
    Wait(Duration),
    /// This store keeps no limits shared by replicas: each broker counts
    /// alone (a single node has nothing to share).
    Local,
}

/// Per-agent issuance limits shared by every replica of one store.
#[async_trait]
pub trait RateLimits: Send + Sync + fmt::Debug {
    /// Takes one issuance of `agent` from a bucket of `burst` refilled at
    /// `per_second`, in one round trip to the store.
    async fn take_rate(
        &self,
        _agent: &SpiffeId,
        _per_second: f64,
        _burst: f64,
    ) -> Result<RateTaken, StoreError> {
        Ok(RateTaken::Local)
    }
}

/// Shared Signals streams and their delivery progress, as the
/// `mayfly-ssf` crate encodes them (JSON text): the store keeps them
/// whole, by stream id.
#[async_trait]
pub trait SignalStreams: Send + Sync + fmt::Debug {
    /// Stores stream `id`.
    async fn put_stream(&self, id: &str, body: &str) -> Result<(), StoreError>;
    /// Stream `id`.
    async fn get_stream(&self, id: &str) -> Result<Option<String>, StoreError>;
    /// Every stream.
    async fn all_streams(&self) -> Result<Vec<String>, StoreError>;
    /// Removes stream `id` and its progress.
    async fn delete_stream(&self, id: &str) -> Result<(), StoreError>;
    /// Stream `id`'s progress.
    async fn stream_progress(&self, id: &str) -> Result<Option<String>, StoreError>;
    /// Keeps stream `id`'s progress.
    async fn save_stream_progress(&self, id: &str, body: &str) -> Result<(), StoreError>;
}

/// Recording: leases with their audit records, to the store's trail.
#[async_trait]
pub trait RecordStore: Send + Sync + fmt::Debug {
    /// Writes `batch.records` to the store's trail and, with each record
    /// that issues a credential or opens a task, its lease (checked as
    /// [`issue`](Self::issue) or [`start_task`](Self::start_task) checks
    /// it), so that a lease and its record exist together or not at all,
    /// across a crash at any point: in one script when the trail is this
    /// store's own (Redis); on the embedded store, the leases and the
    /// records in one transaction (the records in its outbox), then the
    /// records shipped to the trail. Returns one outcome per record, in
    /// order: `Ok` once the record is in the trail (and its lease
    /// durable); an error otherwise, with no lease of it left active. A
    /// refused lease fails only its own record.
    async fn record(&self, batch: &RecordBatch<'_>) -> Vec<Result<(), RecordError>>;

    /// Ships to the trail the records this store holds that the trail may
    /// not have yet (the embedded store's outbox, left by a crash or by
    /// a trail that failed), each exactly once where the trail can tell
    /// its head; the recorder calls it before its first batch. A store
    /// that writes leases and records in one place has nothing to ship.
    async fn ship_pending(&self) -> Result<(), RecordError> {
        Ok(())
    }

    /// The trail this store records to, chosen when it was built
    /// ([`NoTrail`](crate::audit::NoTrail) if none was: every record
    /// fails). Read it for `mayfly audit tail`.
    fn trail(&self) -> Arc<dyn AuditSink>;
}

/// Keys used once across every replica (a workload token's `jti`).
#[async_trait]
pub trait ReplayGuard: Send + Sync + fmt::Debug {
    /// Records `key` as used until `until` and says whether this is its
    /// first use: `false` if it was recorded before and `until` of that
    /// record has not passed at `now`. Every replica sees the same answer
    /// (a workload token's `jti` is accepted once per cluster).
    async fn first_use(
        &self,
        key: &str,
        until: Timestamp,
        now: Timestamp,
    ) -> Result<bool, StoreError>;
}

/// Keeping the store: expiry and purging, health.
#[async_trait]
pub trait Upkeep: Send + Sync + fmt::Debug {
    /// Moves at most `limit` leases whose expiry has passed from active to
    /// expired, and removes records whose expiry is older than `retention`.
    async fn reap(
        &self,
        now: Timestamp,
        retention: Duration,
        limit: usize,
    ) -> Result<ReapOutcome, StoreError>;

    /// Whether the store can serve requests now.
    async fn check(&self) -> Result<(), StoreError>;
}

/// A database login the broker may have made and not yet confirmed gone:
/// held before the login is created, released once it is dropped. What is
/// held is the work revocation must finish, across crashes and replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLogin {
    /// Its lease (which may not be recorded yet, or ever).
    pub lease_id: LeaseId,
    /// The database's name (`[[databases]]`).
    pub database: String,
    /// The login's user name.
    pub user: String,
    /// When it was held.
    pub held_at: Timestamp,
}

/// The logins the broker must drop: [`HeldLogin`]s.
#[async_trait]
pub trait LoginQueue: Send + Sync + fmt::Debug {
    /// Holds `login`, durably, before it is created.
    async fn hold_login(&self, login: &HeldLogin) -> Result<(), StoreError>;

    /// Every login held, in lease-id order.
    async fn held_logins(&self) -> Result<Vec<HeldLogin>, StoreError>;

    /// Whether the login of `lease_id` is held (not yet released).
    async fn is_held(&self, lease_id: &LeaseId) -> Result<bool, StoreError>;

    /// Releases a login confirmed gone.
    async fn release_login(&self, lease_id: &LeaseId) -> Result<(), StoreError>;
}

/// The lease store: every role, as one backend implements them. Methods
/// take `now` from the caller so that time is one consistent value per
/// request, and so tests control it. A part of the broker that needs one
/// role takes that role (the feed a [`RevocationLog`], the reaper and
/// health [`Upkeep`], token sign-in a [`ReplayGuard`]); the request
/// service takes the whole store.
pub trait LeaseStore:
    TaskStore
    + CredentialStore
    + AgentStore
    + ApprovalStore
    + RevocationLog
    + RecordStore
    + ReplayGuard
    + LoginQueue
    + StatusIndexes
    + SignalStreams
    + RateLimits
    + Upkeep
    + 'static
{
}

impl<S> LeaseStore for S where
    S: TaskStore
        + CredentialStore
        + AgentStore
        + ApprovalStore
        + RevocationLog
        + RecordStore
        + ReplayGuard
        + LoginQueue
        + StatusIndexes
        + SignalStreams
        + RateLimits
        + Upkeep
        + 'static
{
}
