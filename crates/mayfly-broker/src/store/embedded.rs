//! The embedded store: one redb file, single node, ACID. Each state change is
//! one write transaction, committed with `Durability::Immediate` (fsync)
//! before the call returns, so a credential is never handed out before its
//! lease is on disk.
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

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mayfly_core::{
    Approval, ApprovalId, ApprovalRequest, ApprovalState, ApprovalStatus, Lease, LeaseId,
    LeaseKind, LeaseStatus, RevocationReason, SpiffeId, Task, TaskContext, TaskId, TaskRecord,
    TaskState, Timestamp,
};
use redb::{
    Database, MultimapTable, MultimapTableDefinition, ReadTransaction, ReadableDatabase,
    ReadableMultimapTable, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
    WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    LeaseFilter, LeaseStore, Page, PageRequest, ReapOutcome, RevocationEvent, RevokeRequest,
    StoreError, TaskFilter, check_consumable, check_decidable,
};

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
                StoreError::Unavailable(e.to_string())
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
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The embedded, single-node lease store.
#[derive(Clone)]
pub struct EmbeddedStore {
    /// Shared by every call; redb serialises writers and lets readers run
    /// alongside them on a snapshot.
    db: Arc<Database>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedStore")
    }
}

impl EmbeddedStore {
    /// Opens (or creates, mode 0600) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        let db = redb::Builder::new()
            .set_cache_size(64 * 1024 * 1024)
            .create_with_backend(redb::backends::FileBackend::new(file)?)?;
        let txn = db.begin_write()?;
        Tables::open(&txn)?;
        txn.commit()?;
        Ok(Self { db: Arc::new(db) })
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
            .map_err(|e| StoreError::Unavailable(format!("store worker failed: {e}")))?
    }

    /// Runs `f` in one write transaction: committed if it returns `Ok`,
    /// rolled back otherwise, so a failed call leaves nothing behind.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tables<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let out = {
                let mut tables = Tables::open(&txn)?;
                f(&mut tables)
            };
            match out {
                Ok(v) => {
                    txn.commit()?;
                    Ok(v)
                }
                Err(e) => {
                    txn.abort()?;
                    Err(e)
                }
            }
        })
        .await
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
        })
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
            kind: lease.kind,
            task_id: lease.task_id.clone(),
            revocation,
            expires_at: lease.expires_at,
            serial: lease.serial.clone(),
        };
        self.revocations
            .insert(cursor, encode(&event)?.as_slice())?;
        Ok(lease.id)
    }

    fn task_record(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let Some(task) = self.task(id)? else {
            return Ok(None);
        };
        let lease = self
            .lease(id)?
            .ok_or_else(|| StoreError::Corrupt(format!("task {id} has no task lease")))?;
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
        let task_lease = self
            .lease(id.as_str())?
            .ok_or_else(|| StoreError::Corrupt(format!("task {id} has no task lease")))?;
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
            let child = TaskId::new(&child).map_err(|e| StoreError::Corrupt(e.to_string()))?;
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
        if lease.kind == LeaseKind::Task {
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
                None => return Err(StoreError::Corrupt(format!("task {id} has no task lease"))),
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
        self.write(move |t| {
            let record = t
                .task_record(lease.task_id.as_str())?
                .filter(|r| r.task.agent == lease.agent)
                .ok_or(StoreError::TaskNotFound)?;
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
            t.insert_new_lease(&lease)
        })
        .await
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
            if lease.kind == LeaseKind::Task {
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
        self.write(move |t| {
            let mut revoked = Vec::new();
            let tasks: Vec<String> = t
                .agent_tasks
                .get(agent.as_str())?
                .map(|v| v.map(|g| g.value().to_owned()))
                .collect::<Result<_, _>>()?;
            for task in tasks {
                let id = TaskId::new(&task).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                match t.end_task(&id, &req) {
                    Ok(ids) => revoked.extend(ids),
                    Err(StoreError::TaskNotActive(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            // Leases of the agent under tasks it does not own (delegation).
            let leases: Vec<String> = t
                .agent_leases
                .get(agent.as_str())?
                .map(|v| v.map(|g| g.value().to_owned()))
                .collect::<Result<_, _>>()?;
            for id in leases {
                if let Some(lease) = t.lease(&id)?
                    && lease.is_active_at(req.at)
                {
                    revoked.push(t.revoke(lease, &req, req.child_reason)?);
                }
            }
            Ok(revoked)
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
                let lease = lease
                    .ok_or_else(|| StoreError::Corrupt(format!("task {id} has no task lease")))?;
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
            for (exp, id) in expiry_keys(&t.active_expiry, now.as_millis(), limit)? {
                t.active_expiry.remove((exp, id.as_str()))?;
                if let Some(mut lease) = t.lease(&id)?
                    && lease.status == LeaseStatus::Active
                {
                    lease.status = LeaseStatus::Expired;
                    t.put_lease(&lease)?;
                    outcome.expired.push(lease.id);
                }
            }
            let cutoff = now.minus(retention).as_millis();
            for (exp, id) in expiry_keys(&t.all_expiry, cutoff, limit)? {
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
            a.status = decision;
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
            task.context = context;
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
