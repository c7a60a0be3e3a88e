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
//! | `agent_leases`  | agent ID (multimap)  | lease ids of the agent    |
//! | `agent_tasks`   | agent ID (multimap)  | task ids of the agent     |
//! | `task_children` | task id (multimap)   | ids of tasks delegated from it |
//! | `active_expiry` | (expires ms, lease)  | `()`; active leases only  |
//! | `all_expiry`    | (expires ms, lease)  | `()`; every lease, purge  |
//! | `revocations`   | cursor               | [`RevocationEvent`]       |
//! | `meta`          | name                 | u64 (`next_cursor`)       |
//! | `approvals`     | approval id          | [`Approval`]              |
//! | `approval_expiry` | (expires ms, id)   | `()`; purge               |
//! | `agent_locks`   | agent ID             | [`AgentLock`]             |

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mayfly_core::{
    AgentLock, Approval, ApprovalId, ApprovalRequest, ApprovalState, ApprovalStatus, Lease,
    LeaseDetail, LeaseId, LeaseStatus, RevocationReason, SpiffeId, Task, TaskContext, TaskId,
    TaskRecord, TaskState, Timestamp,
};
use redb::{
    Database, MultimapTable, MultimapTableDefinition, ReadTransaction, ReadableDatabase,
    ReadableMultimapTable, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
    WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::{
    ExpiredLease, LeaseFilter, LeaseStore, LeaseThenRecord, LeaseWrite, Page, PageRequest,
    ReapOutcome, RecordBatch, RecordError, RevocationEvent, RevokeRequest, StoreError, TaskFilter,
    check_consumable, check_decidable, lease_then_record,
};
use crate::audit::AuditSink;
use crate::cause::Cause;

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const TASK_LEASES: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("task_leases");
const AGENT_LEASES: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("agent_leases");
const AGENT_TASKS: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("agent_tasks");
const TASK_CHILDREN: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("task_children");
const ACTIVE_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("active_expiry");
const ALL_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("all_expiry");
const REVOCATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("revocations");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const APPROVALS: TableDefinition<&str, &[u8]> = TableDefinition::new("approvals");
const APPROVAL_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("approval_expiry");
const AGENT_LOCKS: TableDefinition<&str, &[u8]> = TableDefinition::new("agent_locks");

/// Key in `meta` of the next revocation cursor (never reused, even after
/// trimming).
const NEXT_CURSOR: &str = "next_cursor";
/// Most records one list call examines, so a selective filter over a large
/// store returns a short page (with a token to continue) instead of
/// scanning everything.
const MAX_SCAN: usize = 10_000;

macro_rules! unavailable_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Unavailable(Cause::of(e))
            }
        }
    )*};
}
unavailable_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(Cause::of(e)))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(Cause::of(e)))
}

/// The embedded, single-node lease store.
#[derive(Clone)]
pub struct EmbeddedStore {
    /// Readers use it directly, on snapshots alongside the writer.
    db: Arc<Database>,
    /// The group-commit writer; joined when the last clone goes.
    writer: Arc<Writer>,
}

/// redb's page cache.
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Most changes one commit holds.
pub const MAX_BATCH: usize = 256;

/// One queued change, type-erased: applied (maybe more than once, if a
/// later change in its batch fails), then answered once.
trait Change: Send {
    fn apply(&mut self, tables: &mut Tables<'_>) -> Result<(), StoreError>;
    fn succeed(self: Box<Self>);
    fn fail(self: Box<Self>, e: StoreError);
}

struct Typed<T, F> {
    f: F,
    out: Option<T>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Change for Typed<T, F>
where
    T: Send,
    F: FnMut(&mut Tables<'_>) -> Result<T, StoreError> + Send,
{
    fn apply(&mut self, tables: &mut Tables<'_>) -> Result<(), StoreError> {
        self.out = Some((self.f)(tables)?);
        Ok(())
    }

    fn succeed(self: Box<Self>) {
        let reply = match self.out {
            Some(v) => Ok(v),
            None => Err(StoreError::Unavailable(Cause::msg(
                "change was never applied",
            ))),
        };
        let _ = self.reply.send(reply);
    }

    fn fail(self: Box<Self>, e: StoreError) {
        let _ = self.reply.send(Err(e));
    }
}

/// The writer thread and the queue to it.
struct Writer {
    queue: Option<std::sync::mpsc::Sender<Box<dyn Change>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue stops the thread after its batch; joining it
        // releases the database before the store is reopened.
        drop(self.queue.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Takes what is queued, batch by batch, until the queue closes.
fn write_batches(db: &Database, queue: &std::sync::mpsc::Receiver<Box<dyn Change>>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        commit_batch(db, batch);
    }
}

/// Applies `batch` in order in one transaction and commits it; a change
/// that fails is answered with its error and the rest applied again
/// without it.
fn commit_batch(db: &Database, mut batch: Vec<Box<dyn Change>>) {
    while !batch.is_empty() {
        let txn = match db.begin_write() {
            Ok(t) => t,
            Err(e) => return fail_all(batch, &e.to_string()),
        };
        let failed = match Tables::open(&txn) {
            Err(e) => return fail_all(batch, &e.to_string()),
            Ok(mut tables) => batch
                .iter_mut()
                .enumerate()
                .find_map(|(i, c)| c.apply(&mut tables).err().map(|e| (i, e))),
        };
        match failed {
            None => {
                match txn.commit() {
                    Ok(()) => batch.into_iter().for_each(Change::succeed),
                    Err(e) => fail_all(batch, &e.to_string()),
                }
                return;
            }
            Some((i, e)) => {
                // Nothing of the batch stays; the failed change is answered
                // and the others go again.
                if let Err(abort) = txn.abort() {
                    return fail_all(batch, &abort.to_string());
                }
                batch.remove(i).fail(e);
            }
        }
    }
}

fn fail_all(batch: Vec<Box<dyn Change>>, why: &str) {
    for c in batch {
        c.fail(StoreError::Unavailable(Cause::msg(why.to_owned())));
    }
}

/// A batch's leases in one transaction, each checked on its own; the
/// undo (if the trail fails) in another.
impl LeaseThenRecord for EmbeddedStore {
    async fn issue_all(&self, writes: &[&LeaseWrite]) -> Vec<Result<(), StoreError>> {
        let writes: Vec<LeaseWrite> = writes.iter().map(|w| (*w).clone()).collect();
        let n = writes.len();
        let answers = self
            .write(move |t| {
                let mut answers = Vec::with_capacity(writes.len());
                for w in &writes {
                    match t.issue(&w.lease, w.now) {
                        // The transaction itself failed: none of it may be
                        // committed.
                        Err(e @ (StoreError::Unavailable(_) | StoreError::Corrupt(_))) => {
                            return Err(e);
                        }
                        answer => answers.push(answer),
                    }
                }
                Ok(answers)
            })
            .await;
        answers.unwrap_or_else(|e| vec![Err(e); n])
    }

    async fn undo_all(&self, ids: &[&LeaseId], req: &RevokeRequest) -> Result<(), StoreError> {
        let (ids, req): (Vec<LeaseId>, _) =
            (ids.iter().map(|id| (*id).clone()).collect(), req.clone());
        self.write(move |t| {
            for id in &ids {
                if let Some(lease) = t.lease(id.as_str())?
                    && lease.is_active_at(req.at)
                {
                    t.revoke(lease, &req, req.reason)?;
                }
            }
            Ok(())
        })
        .await
    }
}

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

/// Every table, open in one write transaction.
struct Tables<'t> {
    tasks: Table<'t, &'static str, &'static [u8]>,
    leases: Table<'t, &'static str, &'static [u8]>,
    task_leases: MultimapTable<'t, &'static str, &'static str>,
    agent_leases: MultimapTable<'t, &'static str, &'static str>,
    agent_tasks: MultimapTable<'t, &'static str, &'static str>,
    task_children: MultimapTable<'t, &'static str, &'static str>,
    active_expiry: Table<'t, (u64, &'static str), ()>,
    all_expiry: Table<'t, (u64, &'static str), ()>,
    revocations: Table<'t, u64, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
    approvals: Table<'t, &'static str, &'static [u8]>,
    approval_expiry: Table<'t, (u64, &'static str), ()>,
    agent_locks: Table<'t, &'static str, &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            tasks: txn.open_table(TASKS)?,
            leases: txn.open_table(LEASES)?,
            task_leases: txn.open_multimap_table(TASK_LEASES)?,
            agent_leases: txn.open_multimap_table(AGENT_LEASES)?,
            agent_tasks: txn.open_multimap_table(AGENT_TASKS)?,
            task_children: txn.open_multimap_table(TASK_CHILDREN)?,
            active_expiry: txn.open_table(ACTIVE_EXPIRY)?,
            all_expiry: txn.open_table(ALL_EXPIRY)?,
            revocations: txn.open_table(REVOCATIONS)?,
            meta: txn.open_table(META)?,
            approvals: txn.open_table(APPROVALS)?,
            approval_expiry: txn.open_table(APPROVAL_EXPIRY)?,
            agent_locks: txn.open_table(AGENT_LOCKS)?,
        })
    }

    /// The lock on `agent` if it holds at `now`.
    fn lock(&self, agent: &str, now: Timestamp) -> Result<Option<AgentLock>, StoreError> {
        let lock: Option<AgentLock> = self
            .agent_locks
            .get(agent)?
            .map(|v| decode(v.value()))
            .transpose()?;
        Ok(lock.filter(|l| l.holds_at(now)))
    }

    /// Refuses a write for `agent` while a lock holds it out.
    fn refuse_locked(&self, agent: &SpiffeId, now: Timestamp) -> Result<(), StoreError> {
        match self.lock(agent.as_str(), now)? {
            Some(_) => Err(StoreError::AgentLocked),
            None => Ok(()),
        }
    }

    /// Ends every active task of `agent` and revokes every active lease of
    /// it, including those under tasks it does not own (delegation).
    fn revoke_agent(
        &mut self,
        agent: &SpiffeId,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError> {
        let mut revoked = Vec::new();
        for task in ids(&self.agent_tasks, agent.as_str())? {
            let id = TaskId::new(&task).map_err(|e| StoreError::Corrupt(Cause::of(e)))?;
            match self.end_task(&id, req) {
                Ok(ids) => revoked.extend(ids),
                Err(StoreError::TaskNotActive(_)) => {}
                Err(e) => return Err(e),
            }
        }
        for id in ids(&self.agent_leases, agent.as_str())? {
            if let Some(lease) = self.lease(&id)?
                && lease.is_active_at(req.at)
            {
                revoked.push(self.revoke(lease, req, req.child_reason)?);
            }
        }
        Ok(revoked)
    }

    /// Records a credential lease if its task is live, of the same agent,
    /// outlives it and is still at the revision decided on, and the agent
    /// is not locked; refuses with why, writing nothing, otherwise.
    fn issue(&mut self, lease: &Lease, now: Timestamp) -> Result<(), StoreError> {
        let record = self
            .task_record(lease.task_id.as_str())?
            .filter(|r| r.task.agent == lease.agent)
            .ok_or(StoreError::TaskNotFound)?;
        self.refuse_locked(&lease.agent, now)?;
        let state = record.state_at(now);
        if state != TaskState::Active {
            return Err(StoreError::TaskNotActive(state));
        }
        if lease.expires_at > record.task.expires_at {
            return Err(StoreError::OutlivesTask);
        }
        if lease.task_revision != record.task.revision {
            return Err(StoreError::TaskChanged);
        }
        self.insert_new_lease(lease)
    }

    fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        self.leases.get(id)?.map(|v| decode(v.value())).transpose()
    }

    fn task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        self.tasks.get(id)?.map(|v| decode(v.value())).transpose()
    }

    fn put_lease(&mut self, lease: &Lease) -> Result<(), StoreError> {
        self.leases
            .insert(lease.id.as_str(), encode(lease)?.as_slice())?;
        Ok(())
    }

    fn insert_new_lease(&mut self, lease: &Lease) -> Result<(), StoreError> {
        if self.leases.get(lease.id.as_str())?.is_some() {
            return Err(StoreError::Duplicate(lease.id.to_string()));
        }
        self.put_lease(lease)?;
        let (id, exp) = (lease.id.as_str(), lease.expires_at.as_millis());
        self.task_leases.insert(lease.task_id.as_str(), id)?;
        self.agent_leases.insert(lease.agent.as_str(), id)?;
        self.active_expiry.insert((exp, id), ())?;
        self.all_expiry.insert((exp, id), ())?;
        Ok(())
    }

    /// Marks an active lease revoked and appends its feed event.
    fn revoke(
        &mut self,
        mut lease: Lease,
        req: &RevokeRequest,
        reason: RevocationReason,
    ) -> Result<LeaseId, StoreError> {
        let revocation = req.revocation(reason);
        lease.status = LeaseStatus::Revoked(revocation.clone());
        self.put_lease(&lease)?;
        self.active_expiry
            .remove((lease.expires_at.as_millis(), lease.id.as_str()))?;
        let cursor = self.meta.get(NEXT_CURSOR)?.map_or(1, |v| v.value());
        self.meta.insert(NEXT_CURSOR, cursor + 1)?;
        let event = RevocationEvent {
            cursor,
            lease_id: lease.id.clone(),
            kind: lease.kind(),
            task_id: lease.task_id.clone(),
            revocation,
            expires_at: lease.expires_at,
            serial: lease.serial().map(str::to_owned),
        };
        self.revocations
            .insert(cursor, encode(&event)?.as_slice())?;
        Ok(lease.id)
    }

    fn task_record(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let Some(task) = self.task(id)? else {
            return Ok(None);
        };
        let lease = self.lease(id)?.ok_or_else(|| {
            StoreError::Corrupt(Cause::msg(format!("task {id} has no task lease")))
        })?;
        Ok(Some(TaskRecord {
            task,
            status: lease.status,
        }))
    }

    fn end_task(&mut self, id: &TaskId, req: &RevokeRequest) -> Result<Vec<LeaseId>, StoreError> {
        let record = self
            .task_record(id.as_str())?
            .ok_or(StoreError::TaskNotFound)?;
        let state = record.state_at(req.at);
        if state != TaskState::Active {
            return Err(StoreError::TaskNotActive(state));
        }
        let task_lease = self.lease(id.as_str())?.ok_or_else(|| {
            StoreError::Corrupt(Cause::msg(format!("task {id} has no task lease")))
        })?;
        let mut revoked = vec![self.revoke(task_lease, req, req.reason)?];
        let leases = ids(&self.task_leases, id.as_str())?;
        for lease in leases.iter().filter(|l| l.as_str() != id.as_str()) {
            if let Some(lease) = self.lease(lease)?
                && lease.is_active_at(req.at)
            {
                revoked.push(self.revoke(lease, req, req.child_reason)?);
            }
        }
        // Tasks delegated from this one, and theirs, end with it.
        let descendants = RevokeRequest {
            reason: RevocationReason::ParentRevoked,
            child_reason: RevocationReason::ParentRevoked,
            ..req.clone()
        };
        for child in ids(&self.task_children, id.as_str())? {
            let child = TaskId::new(&child).map_err(|e| StoreError::Corrupt(Cause::of(e)))?;
            match self.end_task(&child, &descendants) {
                Ok(more) => revoked.extend(more),
                Err(StoreError::TaskNotActive(_) | StoreError::TaskNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(revoked)
    }

    fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        self.approvals
            .get(id)?
            .map(|v| decode(v.value()))
            .transpose()
    }

    fn put_approval(&mut self, a: &Approval) -> Result<(), StoreError> {
        self.approvals
            .insert(a.id.as_str(), encode(a)?.as_slice())?;
        Ok(())
    }

    fn purge(&mut self, lease: &Lease) -> Result<(), StoreError> {
        let (id, exp) = (lease.id.as_str(), lease.expires_at.as_millis());
        self.leases.remove(id)?;
        self.task_leases.remove(lease.task_id.as_str(), id)?;
        self.agent_leases.remove(lease.agent.as_str(), id)?;
        self.active_expiry.remove((exp, id))?;
        self.all_expiry.remove((exp, id))?;
        if lease.detail == LeaseDetail::Task {
            if let Some(parent) = self.task(id)?.and_then(|t| t.parent) {
                self.task_children.remove(parent.as_str(), id)?;
            }
            self.tasks.remove(id)?;
            self.agent_tasks.remove(lease.agent.as_str(), id)?;
            self.task_children.remove_all(id)?;
        }
        Ok(())
    }
}

/// The values under `key` in a multimap, collected so the tables can be
/// changed while walking them.
fn ids(
    table: &MultimapTable<'_, &'static str, &'static str>,
    key: &str,
) -> Result<Vec<String>, StoreError> {
    table
        .get(key)?
        .map(|v| v.map(|g| g.value().to_owned()).map_err(StoreError::from))
        .collect()
}

/// Keys of a range of an expiry index, collected so the table can be
/// changed while walking them.
fn expiry_keys(
    table: &Table<'_, (u64, &'static str), ()>,
    up_to_ms: u64,
    limit: usize,
) -> Result<Vec<(u64, String)>, StoreError> {
    let mut keys = Vec::new();
    for entry in table.range::<(u64, &str)>(..(up_to_ms.saturating_add(1), ""))? {
        if keys.len() >= limit {
            break;
        }
        let (k, _) = entry?;
        let (exp, id) = k.value();
        keys.push((exp, id.to_owned()));
    }
    Ok(keys)
}

/// Walks ids in order after `after`, loads each, keeps those `keep` accepts,
/// and stops at `limit` results or `max_scan` examined (then `next` is the
/// last examined id, so the caller can go on).
fn page_of<T>(
    ids: impl Iterator<Item = Result<String, StoreError>>,
    page: &PageRequest,
    max_scan: usize,
    mut load: impl FnMut(&str) -> Result<Option<T>, StoreError>,
    keep: impl Fn(&T) -> bool,
) -> Result<Page<T>, StoreError> {
    let limit = page.limit.max(1);
    let mut items = Vec::new();
    let mut last = None;
    let mut scanned = 0;
    for id in ids {
        let id = id?;
        if page.after.as_deref().is_some_and(|a| id.as_str() <= a) {
            continue;
        }
        if scanned == max_scan {
            // Stopped by the scan bound: more may follow.
            return Ok(Page { items, next: last });
        }
        scanned += 1;
        if let Some(item) = load(&id)?
            && keep(&item)
        {
            items.push(item);
        }
        last = Some(id);
        if items.len() >= limit {
            return Ok(Page { items, next: last });
        }
    }
    Ok(Page { items, next: None })
}

fn multimap_ids(
    table: &redb::ReadOnlyMultimapTable<&'static str, &'static str>,
    key: &str,
) -> Result<Vec<Result<String, StoreError>>, StoreError> {
    Ok(table
        .get(key)?
        .map(|v| v.map(|g| g.value().to_owned()).map_err(StoreError::from))
        .collect())
}

fn table_ids(
    table: &redb::ReadOnlyTable<&'static str, &'static [u8]>,
    after: Option<&str>,
) -> Result<Vec<Result<String, StoreError>>, StoreError> {
    use std::ops::Bound;
    let range = match after {
        Some(a) => table.range::<&str>((Bound::Excluded(a), Bound::Unbounded))?,
        None => table.range::<&str>(..)?,
    };
    Ok(range
        .take(MAX_SCAN + 1)
        .map(|e| {
            e.map(|(k, _)| k.value().to_owned())
                .map_err(StoreError::from)
        })
        .collect())
}

#[async_trait]
impl LeaseStore for EmbeddedStore {
    async fn start_task(&self, task: &Task) -> Result<(), StoreError> {
        let task = task.clone();
        self.write(move |t| {
            let id = task.id.as_str();
            if t.tasks.get(id)?.is_some() {
                return Err(StoreError::Duplicate(id.to_owned()));
            }
            t.refuse_locked(&task.agent, task.created_at)?;
            if let Some(parent) = &task.parent {
                let record = t
                    .task_record(parent.as_str())?
                    .filter(|r| Some(&r.task.agent) == task.delegated_by.last())
                    .ok_or(StoreError::TaskNotFound)?;
                let state = record.state_at(task.created_at);
                if state != TaskState::Active {
                    return Err(StoreError::TaskNotActive(state));
                }
                if task.expires_at > record.task.expires_at {
                    return Err(StoreError::OutlivesTask);
                }
                t.task_children.insert(parent.as_str(), id)?;
            }
            t.tasks.insert(id, encode(&task)?.as_slice())?;
            t.agent_tasks.insert(task.agent.as_str(), id)?;
            t.insert_new_lease(&task.new_lease())
        })
        .await
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

    async fn issue(&self, lease: &Lease, now: Timestamp) -> Result<(), StoreError> {
        let lease = lease.clone();
        self.write(move |t| t.issue(&lease, now)).await
    }

    async fn record(
        &self,
        batch: &RecordBatch<'_>,
        trail: &dyn AuditSink,
    ) -> Vec<Result<(), RecordError>> {
        lease_then_record(self, batch, trail).await
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

    async fn end_task(&self, id: &TaskId, req: &RevokeRequest) -> Result<Vec<LeaseId>, StoreError> {
        let (id, req) = (id.clone(), req.clone());
        self.write(move |t| t.end_task(&id, &req)).await
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

    async fn check(&self) -> Result<(), StoreError> {
        self.read(|txn| {
            txn.open_table(META)?;
            Ok(())
        })
        .await
    }

    async fn active_count(&self) -> Result<u64, StoreError> {
        self.read(|txn| Ok(txn.open_table(ACTIVE_EXPIRY)?.len()?))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages over 0..n with a scan bound of 3 and a filter that keeps only
    /// multiples of 4, collecting everything.
    fn walk(n: usize, limit: usize) -> (Vec<usize>, usize) {
        let ids: Vec<String> = (0..n).map(|i| format!("{i:04}")).collect();
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            pages += 1;
            // As `table_ids` does: the source starts after `after`.
            let source = ids
                .iter()
                .filter(|id| after.as_deref().is_none_or(|a| id.as_str() > a))
                .take(3 + 1)
                .map(|id| Ok(id.clone()));
            let page = PageRequest {
                after: after.clone(),
                limit,
            };
            let got = page_of(
                source,
                &page,
                3,
                |id| Ok(Some(id.parse::<usize>().unwrap())),
                |v| v % 4 == 0,
            )
            .unwrap();
            out.extend(got.items);
            match got.next {
                Some(n) => after = Some(n),
                None => return (out, pages),
            }
        }
    }

    #[test]
    fn scan_bounded_pages_skip_nothing() {
        let (got, pages) = walk(50, 100);
        assert_eq!(got, (0..50).filter(|v| v % 4 == 0).collect::<Vec<_>>());
        assert!(pages > 10, "the scan bound split the walk into many pages");
        let (got, _) = walk(50, 1);
        assert_eq!(got.len(), 13);
    }
}
