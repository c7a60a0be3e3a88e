//! The embedded store: one redb file, single node, ACID. Every state change
//! is durable (committed with fsync) before the call returns, so a
//! credential is never handed out before its lease is on disk.
//!
//! Writes use group commit. One writer thread takes every change waiting
//! (up to [`MAX_BATCH`]), applies them in order in one write transaction,
//! commits once, and then answers each caller. The changes are serialised
//! exactly as if each had its own transaction. A change that fails, for
//! example a lease under a task that has ended, must leave nothing
//! behind. So the writer aborts the transaction, answers that caller with
//! its error, and applies the rest again in a fresh transaction. Every
//! change is a re-runnable check-then-write on the state it finds.
//!
//! Layout (all values are JSON so records stay readable and can evolve):
//!
//! | table           | key                  | value                     |
//! |-----------------|----------------------|---------------------------|
//! | `tasks`         | task id              | [`Task`]                  |
//! | `leases`        | lease id             | [`Lease`] (tasks too)     |
//! | `task_leases`   | task id (multimap)   | lease ids of the task     |
//! | `agent_leases`  | agent ID (multimap)  | lease ids it owns or holds (exchanged) |
//! | `agent_tasks`   | agent ID (multimap)  | task ids of the agent     |
//! | `task_children` | task id (multimap)   | ids of tasks delegated from it |
//! | `active_expiry` | (expires ms, lease)  | `()`; active leases only  |
//! | `all_expiry`    | (expires ms, lease)  | `()`; every lease, purge  |
//! | `revocations`   | cursor               | [`RevocationEvent`]       |
//! | `meta`          | name                 | u64 (`next_cursor`)       |
//! | `approvals`     | approval id          | [`Approval`]              |
//! | `approval_expiry` | (expires ms, id)   | `()`; purge               |
//! | `agent_locks`   | agent ID             | [`AgentLock`]             |
//! | `seen`          | key used once        | until (ms)                |
//! | `seen_expiry`   | (until ms, key)      | `()`; purge               |
//! | `audit_outbox`  | outbox id            | [`AuditRecord`](crate::audit::AuditRecord) not yet shipped |
//!
//! `meta` also holds `next_outbox` and `trail_seq` (the trail's seq before
//! the first record in the outbox).
//!
//! - `mod.rs`: [`EmbeddedStore`]: opening, reads on snapshots, writes
//!   through the writer, and the [`LeaseStore`](super::LeaseStore) roles;
//! - `outbox.rs`: recording: leases and audit records in one
//!   transaction, the records shipped to the trail after it, each once;
//! - `writer.rs`: the group-commit writer thread;
//! - `tables.rs`: the tables, and every check-then-write on them, each
//!   inside one write transaction;
//! - `scan.rs`: walking indexes and bounded pages.

mod outbox;
mod scan;
mod tables;
mod writer;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mayfly_core::{
    AgentLock, Approval, ApprovalId, ApprovalRequest, ApprovalState, ApprovalStatus, Lease,
    LeaseDetail, LeaseId, LeaseStatus, SpiffeId, Task, TaskContext, TaskId, TaskRecord, TaskState,
    Timestamp,
};
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use tokio::sync::oneshot;

use super::{
    AgentStore, ApprovalStore, CredentialStore, ExpiredLease, HeldLogin, LeaseFilter, LoginQueue,
    Page, PageRequest, RateLimits, ReapOutcome, RecordBatch, RecordError, RecordStore, ReplayGuard,
    RevocationEvent, RevocationLog, RevokeRequest, SignalStreams, StatusIndexes, StoreError,
    TaskFilter, TaskStore, Upkeep, check_consumable, check_decidable,
};
use crate::audit::{AuditSink, NoTrail};
use crate::cause::Cause;
use scan::{MAX_SCAN, expiry_keys, multimap_ids, page_of, table_ids};
use tables::{
    ACTIVE_EXPIRY, AGENT_LEASES, AGENT_LOCKS, AGENT_TASKS, APPROVALS, LEASES, LOGINS, META,
    NEXT_CURSOR, NEXT_STATUS_INDEX, REVOCATIONS, SSF_PROGRESS, SSF_STREAMS, TASK_CHILDREN,
    TASK_LEASES, TASKS, Tables, decode, encode,
};
use writer::{Typed, Writer, write_batches};

/// The embedded, single-node lease store.
#[derive(Clone)]
pub struct EmbeddedStore {
    /// Readers use it directly, on snapshots alongside the writer.
    db: Arc<Database>,
    /// The group-commit writer; joined when the last clone goes.
    writer: Arc<Writer>,
    /// One shipper of the audit outbox at a time, so records reach the
    /// trail in outbox order (`outbox.rs`).
    shipping: Arc<tokio::sync::Mutex<outbox::Shipping>>,
    /// Where the outbox ships records ([`recording_to`](Self::recording_to)).
    trail: Arc<dyn AuditSink>,
}

/// redb's page cache.
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedStore")
    }
}

impl EmbeddedStore {
    /// Opens (or creates, mode 0600) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, CACHE_BYTES)
    }

    /// The store, recording to `trail` (opened, it records to none: every
    /// record fails). The trail it was last shipped to must be the same
    /// one: its outbox is matched against the trail's head at the first
    /// batch.
    pub fn recording_to(mut self, trail: Arc<dyn AuditSink>) -> Self {
        self.trail = trail;
        self
    }

    /// [`open`](Self::open) with a page cache of `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::Unavailable(Cause::context(path.display(), e)))?;
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create_with_backend(redb::backends::FileBackend::new(file)?)?;
        let txn = db.begin_write()?;
        Tables::open(&txn)?;
        txn.commit()?;
        let db = Arc::new(db);
        let (queue, rx) = std::sync::mpsc::channel();
        let thread = {
            let db = db.clone();
            std::thread::Builder::new()
                .name("mayfly-store-writer".into())
                .spawn(move || write_batches(&db, &rx))
                .map_err(|e| StoreError::Unavailable(Cause::context("store writer", e)))?
        };
        Ok(Self {
            db,
            writer: Arc::new(Writer {
                queue: Some(queue),
                thread: Some(thread),
            }),
            shipping: Arc::default(),
            trail: Arc::new(NoTrail),
        })
    }

    /// Runs `f` on the blocking pool: redb does file I/O and fsync.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Unavailable(Cause::context("store worker failed", e)))?
    }

    /// Applies `f` through the group-commit writer: durable if it returns
    /// `Ok`, leaving nothing behind otherwise. `f` may run more than once
    /// (if a change batched with it fails), each time on the state it
    /// finds, so it must not consume what it captures.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&mut Tables<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let change = Box::new(Typed {
            f,
            out: None,
            reply,
        });
        self.writer
            .queue
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable(Cause::msg("the store is closing")))?
            .send(change)
            .map_err(|_| StoreError::Unavailable(Cause::msg("the store writer stopped")))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable(Cause::msg("the store writer stopped")))?
    }

    /// Runs `f` on a read snapshot.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        self.blocking(move |db| f(&db.begin_read()?)).await
    }
}

/// Lapsed `first_use` keys removed per call.
const SEEN_PURGE_BATCH: usize = 64;

#[async_trait]
impl TaskStore for EmbeddedStore {
    async fn start_task(&self, task: &Task) -> Result<(), StoreError> {
        let task = task.clone();
        self.write(move |t| t.start_task(&task)).await
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let id = id.clone();
        self.read(move |txn| {
            let tasks = txn.open_table(TASKS)?;
            let leases = txn.open_table(LEASES)?;
            let Some(task) = tasks.get(id.as_str())? else {
                return Ok(None);
            };
            let task: Task = decode(task.value())?;
            let lease: Lease = match leases.get(id.as_str())? {
                Some(v) => decode(v.value())?,
                None => {
                    return Err(StoreError::Corrupt(Cause::msg(format!(
                        "task {id} has no task lease"
                    ))));
                }
            };
            Ok(Some(TaskRecord {
                task,
                status: lease.status,
            }))
        })
        .await
    }

    async fn end_task(&self, id: &TaskId, req: &RevokeRequest) -> Result<Vec<LeaseId>, StoreError> {
        let (id, req) = (id.clone(), req.clone());
        self.write(move |t| t.end_task(&id, &req)).await
    }

    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        page: &PageRequest,
        now: Timestamp,
    ) -> Result<Page<TaskRecord>, StoreError> {
        let (filter, page) = (filter.clone(), page.clone());
        self.read(move |txn| {
            let tasks = txn.open_table(TASKS)?;
            let leases = txn.open_table(LEASES)?;
            let ids = match (&filter.parent, &filter.agent) {
                (Some(parent), _) => {
                    multimap_ids(&txn.open_multimap_table(TASK_CHILDREN)?, parent.as_str())?
                }
                (None, Some(agent)) => {
                    multimap_ids(&txn.open_multimap_table(AGENT_TASKS)?, agent.as_str())?
                }
                (None, None) => table_ids(&tasks, page.after.as_deref())?,
            };
            let load = |id: &str| -> Result<Option<TaskRecord>, StoreError> {
                let Some(task) = tasks.get(id)? else {
                    return Ok(None);
                };
                let lease: Option<Lease> =
                    leases.get(id)?.map(|v| decode(v.value())).transpose()?;
                let lease = lease.ok_or_else(|| {
                    StoreError::Corrupt(Cause::msg(format!("task {id} has no task lease")))
                })?;
                Ok(Some(TaskRecord {
                    task: decode(task.value())?,
                    status: lease.status,
                }))
            };
            page_of(ids.into_iter(), &page, MAX_SCAN, load, |r| {
                filter.matches(r, now)
            })
        })
        .await
    }

    async fn update_task_context(
        &self,
        id: &TaskId,
        agent: &SpiffeId,
        context: &TaskContext,
        now: Timestamp,
    ) -> Result<Task, StoreError> {
        let (id, agent, context) = (id.clone(), agent.clone(), context.clone());
        self.write(move |t| {
            let record = t
                .task_record(id.as_str())?
                .filter(|r| r.task.agent == agent)
                .ok_or(StoreError::TaskNotFound)?;
            let state = record.state_at(now);
            if state != TaskState::Active {
                return Err(StoreError::TaskNotActive(state));
            }
            let mut task = record.task;
            task.context = context.clone();
            task.revision += 1;
            t.tasks.insert(id.as_str(), encode(&task)?.as_slice())?;
            Ok(task)
        })
        .await
    }
}

#[async_trait]
impl CredentialStore for EmbeddedStore {
    async fn issue(&self, lease: &Lease, now: Timestamp) -> Result<(), StoreError> {
        let lease = lease.clone();
        self.write(move |t| t.issue(&lease, now)).await
    }

    async fn get_lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError> {
        let id = id.clone();
        self.read(move |txn| {
            let leases = txn.open_table(LEASES)?;
            leases
                .get(id.as_str())?
                .map(|v| decode(v.value()))
                .transpose()
        })
        .await
    }

    async fn revoke_lease(
        &self,
        id: &LeaseId,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError> {
        let (id, req) = (id.clone(), req.clone());
        self.write(move |t| {
            let lease = t.lease(id.as_str())?.ok_or(StoreError::LeaseNotFound)?;
            if !lease.is_active_at(req.at) {
                return Ok(Vec::new());
            }
            if lease.detail == LeaseDetail::Task {
                return t.end_task(&lease.task_id, &req);
            }
            Ok(vec![t.revoke(lease, &req, req.reason)?])
        })
        .await
    }

    async fn list_leases(
        &self,
        filter: &LeaseFilter,
        page: &PageRequest,
        now: Timestamp,
    ) -> Result<Page<Lease>, StoreError> {
        let (filter, page) = (filter.clone(), page.clone());
        self.read(move |txn| {
            let leases = txn.open_table(LEASES)?;
            let ids = if let Some(task) = &filter.task {
                multimap_ids(&txn.open_multimap_table(TASK_LEASES)?, task.as_str())?
            } else if let Some(agent) = &filter.agent {
                multimap_ids(&txn.open_multimap_table(AGENT_LEASES)?, agent.as_str())?
            } else {
                table_ids(&leases, page.after.as_deref())?
            };
            page_of(
                ids.into_iter(),
                &page,
                MAX_SCAN,
                |id| leases.get(id)?.map(|v| decode(v.value())).transpose(),
                |l: &Lease| filter.matches(l, now),
            )
        })
        .await
    }

    async fn active_count(&self) -> Result<u64, StoreError> {
        self.read(|txn| Ok(txn.open_table(ACTIVE_EXPIRY)?.len()?))
            .await
    }
}

#[async_trait]
impl AgentStore for EmbeddedStore {
    async fn revoke_agent(
        &self,
        agent: &SpiffeId,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError> {
        let (agent, req) = (agent.clone(), req.clone());
        self.write(move |t| t.revoke_agent(&agent, &req)).await
    }

    async fn lock_agent(
        &self,
        lock: &AgentLock,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError> {
        let (lock, req) = (lock.clone(), req.clone());
        self.write(move |t| {
            // Locks that lifted by themselves go when a new one comes.
            t.agent_locks
                .retain(|_, v| decode::<AgentLock>(v).is_ok_and(|l| l.holds_at(req.at)))?;
            t.agent_locks
                .insert(lock.agent.as_str(), encode(&lock)?.as_slice())?;
            t.revoke_agent(&lock.agent, &req)
        })
        .await
    }

    async fn unlock_agent(
        &self,
        agent: &SpiffeId,
        now: Timestamp,
    ) -> Result<Option<AgentLock>, StoreError> {
        let agent = agent.clone();
        self.write(move |t| {
            let held = t.lock(agent.as_str(), now)?;
            t.agent_locks.remove(agent.as_str())?;
            Ok(held)
        })
        .await
    }

    async fn agent_lock(
        &self,
        agent: &SpiffeId,
        now: Timestamp,
    ) -> Result<Option<AgentLock>, StoreError> {
        let agent = agent.clone();
        self.read(move |txn| {
            let locks = txn.open_table(AGENT_LOCKS)?;
            let lock: Option<AgentLock> = locks
                .get(agent.as_str())?
                .map(|v| decode(v.value()))
                .transpose()?;
            Ok(lock.filter(|l| l.holds_at(now)))
        })
        .await
    }

    async fn list_locks(&self, now: Timestamp) -> Result<Vec<AgentLock>, StoreError> {
        self.read(move |txn| {
            let locks = txn.open_table(AGENT_LOCKS)?;
            let mut out = Vec::new();
            for entry in locks.iter()? {
                let (_, v) = entry?;
                let lock: AgentLock = decode(v.value())?;
                if lock.holds_at(now) {
                    out.push(lock);
                }
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl ApprovalStore for EmbeddedStore {
    async fn create_approval(&self, approval: &Approval) -> Result<(), StoreError> {
        let a = approval.clone();
        self.write(move |t| {
            if t.approvals.get(a.id.as_str())?.is_some() {
                return Err(StoreError::Duplicate(a.id.to_string()));
            }
            t.put_approval(&a)?;
            t.approval_expiry
                .insert((a.expires_at.as_millis(), a.id.as_str()), ())?;
            Ok(())
        })
        .await
    }

    async fn get_approval(&self, id: &ApprovalId) -> Result<Option<Approval>, StoreError> {
        let id = id.clone();
        self.read(move |txn| {
            let table = txn.open_table(APPROVALS)?;
            table
                .get(id.as_str())?
                .map(|v| decode(v.value()))
                .transpose()
        })
        .await
    }

    async fn list_approvals(
        &self,
        pending_only: bool,
        page: &PageRequest,
        now: Timestamp,
    ) -> Result<Page<Approval>, StoreError> {
        let page = page.clone();
        self.read(move |txn| {
            let table = txn.open_table(APPROVALS)?;
            let ids = table_ids(&table, page.after.as_deref())?;
            page_of(
                ids.into_iter(),
                &page,
                MAX_SCAN,
                |id| table.get(id)?.map(|v| decode(v.value())).transpose(),
                |a: &Approval| !pending_only || a.state_at(now) == ApprovalState::Pending,
            )
        })
        .await
    }

    async fn decide_approval(
        &self,
        id: &ApprovalId,
        decision: ApprovalStatus,
        now: Timestamp,
    ) -> Result<Approval, StoreError> {
        let id = id.clone();
        self.write(move |t| {
            let mut a = t
                .approval(id.as_str())?
                .ok_or(StoreError::ApprovalNotFound)?;
            check_decidable(&a, now)?;
            a.status = decision.clone();
            t.put_approval(&a)?;
            Ok(a)
        })
        .await
    }

    async fn consume_approval(
        &self,
        id: &ApprovalId,
        agent: &SpiffeId,
        task: &TaskId,
        request: &ApprovalRequest,
        now: Timestamp,
    ) -> Result<Approval, StoreError> {
        let (id, agent, task, request) = (id.clone(), agent.clone(), task.clone(), request.clone());
        self.write(move |t| {
            let mut a = t
                .approval(id.as_str())?
                .ok_or(StoreError::ApprovalNotFound)?;
            a.status = check_consumable(&a, &agent, &task, &request, now)?;
            t.put_approval(&a)?;
            Ok(a)
        })
        .await
    }
}

#[async_trait]
impl RevocationLog for EmbeddedStore {
    async fn feed_head(&self) -> Result<u64, StoreError> {
        self.read(|txn| {
            let meta = txn.open_table(META)?;
            Ok(meta
                .get(NEXT_CURSOR)?
                .map_or(0, |v| v.value().saturating_sub(1)))
        })
        .await
    }

    async fn revocations_since(
        &self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<RevocationEvent>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(REVOCATIONS)?;
            let mut out = Vec::new();
            for entry in table.range(cursor.saturating_add(1)..)?.take(limit) {
                let (_, v) = entry?;
                out.push(decode(v.value())?);
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl RecordStore for EmbeddedStore {
    async fn record(&self, batch: &RecordBatch<'_>) -> Vec<Result<(), RecordError>> {
        self.record_via_outbox(batch).await
    }

    async fn ship_pending(&self) -> Result<(), RecordError> {
        self.ship_outbox().await
    }

    fn trail(&self) -> Arc<dyn AuditSink> {
        self.trail.clone()
    }
}

#[async_trait]
impl ReplayGuard for EmbeddedStore {
    async fn first_use(
        &self,
        key: &str,
        until: Timestamp,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let key = key.to_owned();
        self.write(move |t| {
            // What has lapsed goes first, a bounded batch per call, so the
            // tables stay as large as the keys still in force.
            let lapsed: Vec<(u64, String)> = t
                .seen_expiry
                .range(..(now.as_millis(), ""))?
                .take(SEEN_PURGE_BATCH)
                .map(|e| e.map(|(k, _)| (k.value().0, k.value().1.to_owned())))
                .collect::<Result<_, _>>()?;
            for (at, k) in &lapsed {
                t.seen_expiry.remove((*at, k.as_str()))?;
                if t.seen.get(k.as_str())?.map(|v| v.value()) == Some(*at) {
                    t.seen.remove(k.as_str())?;
                }
            }
            let held = t.seen.get(key.as_str())?.map(|v| v.value());
            if held.is_some_and(|at| at > now.as_millis()) {
                return Ok(false);
            }
            t.seen.insert(key.as_str(), until.as_millis())?;
            t.seen_expiry
                .insert((until.as_millis(), key.as_str()), ())?;
            Ok(true)
        })
        .await
    }
}

#[async_trait]
impl LoginQueue for EmbeddedStore {
    async fn hold_login(&self, login: &HeldLogin) -> Result<(), StoreError> {
        let (id, bytes) = (login.lease_id.to_string(), encode(login)?);
        self.write(move |t| {
            t.logins.insert(id.as_str(), bytes.as_slice())?;
            Ok(())
        })
        .await
    }

    async fn held_logins(&self) -> Result<Vec<HeldLogin>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(LOGINS)?;
            let mut out = Vec::new();
            for entry in table.iter()? {
                let (_, v) = entry?;
                out.push(decode(v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn is_held(&self, lease_id: &LeaseId) -> Result<bool, StoreError> {
        let id = lease_id.to_string();
        self.read(move |txn| {
            let table = txn.open_table(LOGINS)?;
            Ok(table.get(id.as_str())?.is_some())
        })
        .await
    }

    async fn release_login(&self, lease_id: &LeaseId) -> Result<(), StoreError> {
        let id = lease_id.to_string();
        self.write(move |t| {
            t.logins.remove(id.as_str())?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl SignalStreams for EmbeddedStore {
    async fn put_stream(&self, id: &str, body: &str) -> Result<(), StoreError> {
        let (id, body) = (id.to_owned(), body.to_owned());
        self.write(move |t| {
            t.ssf_streams.insert(id.as_str(), body.as_bytes())?;
            Ok(())
        })
        .await
    }

    async fn get_stream(&self, id: &str) -> Result<Option<String>, StoreError> {
        let id = id.to_owned();
        self.read(move |txn| text_of(&txn.open_table(SSF_STREAMS)?, &id))
            .await
    }

    async fn all_streams(&self) -> Result<Vec<String>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(SSF_STREAMS)?;
            let mut out = Vec::new();
            for entry in table.iter()? {
                let (_, v) = entry?;
                out.push(String::from_utf8_lossy(v.value()).into_owned());
            }
            Ok(out)
        })
        .await
    }

    async fn delete_stream(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write(move |t| {
            t.ssf_streams.remove(id.as_str())?;
            t.ssf_progress.remove(id.as_str())?;
            Ok(())
        })
        .await
    }

    async fn stream_progress(&self, id: &str) -> Result<Option<String>, StoreError> {
        let id = id.to_owned();
        self.read(move |txn| text_of(&txn.open_table(SSF_PROGRESS)?, &id))
            .await
    }

    async fn save_stream_progress(&self, id: &str, body: &str) -> Result<(), StoreError> {
        let (id, body) = (id.to_owned(), body.to_owned());
        self.write(move |t| {
            t.ssf_progress.insert(id.as_str(), body.as_bytes())?;
            Ok(())
        })
        .await
    }
}

/// The text kept under `key`.
fn text_of(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<String>, StoreError> {
    Ok(table
        .get(key)?
        .map(|v| String::from_utf8_lossy(v.value()).into_owned()))
}

/// One node: the broker's own buckets are the whole limit.
impl RateLimits for EmbeddedStore {}

#[async_trait]
impl StatusIndexes for EmbeddedStore {
    async fn reserve_status_indexes(&self, count: u64) -> Result<u64, StoreError> {
        self.write(move |t| {
            let first = t.meta.get(NEXT_STATUS_INDEX)?.map_or(0, |v| v.value());
            t.meta
                .insert(NEXT_STATUS_INDEX, first.saturating_add(count))?;
            Ok(first)
        })
        .await
    }

    async fn status_indexes_reserved(&self) -> Result<u64, StoreError> {
        self.read(|txn| {
            let meta = txn.open_table(META)?;
            Ok(meta.get(NEXT_STATUS_INDEX)?.map_or(0, |v| v.value()))
        })
        .await
    }
}

#[async_trait]
impl Upkeep for EmbeddedStore {
    async fn reap(
        &self,
        now: Timestamp,
        retention: Duration,
        limit: usize,
    ) -> Result<ReapOutcome, StoreError> {
        self.write(move |t| {
            let mut outcome = ReapOutcome::default();
            let due = expiry_keys(&t.active_expiry, now.as_millis(), limit)?;
            outcome.more |= due.len() >= limit;
            for (exp, id) in due {
                t.active_expiry.remove((exp, id.as_str()))?;
                if let Some(mut lease) = t.lease(&id)?
                    && lease.status == LeaseStatus::Active
                {
                    lease.status = LeaseStatus::Expired;
                    t.put_lease(&lease)?;
                    outcome.expired.push(ExpiredLease {
                        id: lease.id,
                        task_id: lease.task_id,
                        agent: lease.agent,
                    });
                }
            }
            let cutoff = now.minus(retention).as_millis();
            let due = expiry_keys(&t.all_expiry, cutoff, limit)?;
            outcome.more |= due.len() >= limit;
            for (exp, id) in due {
                match t.lease(&id)? {
                    Some(lease) => t.purge(&lease)?,
                    None => {
                        t.all_expiry.remove((exp, id.as_str()))?;
                    }
                }
                outcome.purged += 1;
            }
            for (exp, id) in expiry_keys(&t.approval_expiry, cutoff, limit)? {
                t.approval_expiry.remove((exp, id.as_str()))?;
                t.approvals.remove(id.as_str())?;
            }
            // Trim the feed from its oldest end while the credentials have
            // been expired for longer than the retention window.
            loop {
                let Some((cursor, event)) = t
                    .revocations
                    .first()?
                    .map(|(k, v)| {
                        Ok::<_, StoreError>((k.value(), decode::<RevocationEvent>(v.value())?))
                    })
                    .transpose()?
                else {
                    break;
                };
                if event.expires_at.as_millis() > cutoff {
                    break;
                }
                t.revocations.remove(cursor)?;
            }
            Ok(outcome)
        })
        .await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.read(|txn| {
            txn.open_table(META)?;
            Ok(())
        })
        .await
    }
}
