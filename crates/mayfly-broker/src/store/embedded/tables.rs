//! The tables, and each check-then-write on them inside one write
//! transaction: issuing under a live task, revoking with a feed event,
//! ending a task with everything under it, purging, and queueing audit
//! records in the outbox.

use mayfly_core::{
    AgentLock, Approval, Lease, LeaseDetail, LeaseId, LeaseStatus, RevocationReason, SpiffeId,
    Task, TaskId, TaskRecord, TaskState, Timestamp,
};
use redb::{
    MultimapTable, MultimapTableDefinition, ReadableTable, Table, TableDefinition, WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::scan::ids;
use crate::audit::AuditRecord;
use crate::cause::Cause;
use crate::store::{RevocationEvent, RevokeRequest, StoreError};

pub(super) const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
pub(super) const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
pub(super) const TASK_LEASES: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("task_leases");
pub(super) const AGENT_LEASES: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("agent_leases");
pub(super) const AGENT_TASKS: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("agent_tasks");
pub(super) const TASK_CHILDREN: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("task_children");
pub(super) const ACTIVE_EXPIRY: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("active_expiry");
pub(super) const ALL_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("all_expiry");
pub(super) const REVOCATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("revocations");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(super) const APPROVALS: TableDefinition<&str, &[u8]> = TableDefinition::new("approvals");
pub(super) const APPROVAL_EXPIRY: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("approval_expiry");
pub(super) const AGENT_LOCKS: TableDefinition<&str, &[u8]> = TableDefinition::new("agent_locks");
/// Keys used once (`first_use`): key → until (ms), and by until for
/// clean-up.
pub(super) const SEEN: TableDefinition<&str, u64> = TableDefinition::new("seen");
pub(super) const SEEN_EXPIRY: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("seen_expiry");
/// Audit records written with their leases and not yet known to be in the
/// trail: outbox id → the record (JSON, before the trail chains it).
pub(super) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_outbox");
/// Database logins to drop: lease id → the held login (JSON).
pub(super) const LOGINS: TableDefinition<&str, &[u8]> = TableDefinition::new("database_logins");
/// Shared Signals streams: stream id → the stream (JSON).
pub(super) const SSF_STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("ssf_streams");
/// Shared Signals delivery: stream id → its progress (JSON).
pub(super) const SSF_PROGRESS: TableDefinition<&str, &[u8]> = TableDefinition::new("ssf_progress");

/// Key in `meta` of the next revocation cursor (never reused, even after
/// trimming).
pub(super) const NEXT_CURSOR: &str = "next_cursor";
/// Key in `meta` of the next Token Status List index (never reused).
pub(super) const NEXT_STATUS_INDEX: &str = "next_status_index";
/// Key in `meta` of the next outbox id (never reused).
pub(super) const NEXT_OUTBOX: &str = "next_outbox";
/// Key in `meta` of the trail's seq just before the first record in the
/// outbox: how many of the outbox's records a trail already holds is its
/// head's seq minus this.
pub(super) const TRAIL_SEQ: &str = "trail_seq";

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

pub(super) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(Cause::of(e)))
}

pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(Cause::of(e)))
}

/// Every table, open in one write transaction.
pub(super) struct Tables<'t> {
    pub tasks: Table<'t, &'static str, &'static [u8]>,
    pub leases: Table<'t, &'static str, &'static [u8]>,
    pub task_leases: MultimapTable<'t, &'static str, &'static str>,
    pub agent_leases: MultimapTable<'t, &'static str, &'static str>,
    pub agent_tasks: MultimapTable<'t, &'static str, &'static str>,
    pub task_children: MultimapTable<'t, &'static str, &'static str>,
    pub active_expiry: Table<'t, (u64, &'static str), ()>,
    pub all_expiry: Table<'t, (u64, &'static str), ()>,
    pub revocations: Table<'t, u64, &'static [u8]>,
    pub meta: Table<'t, &'static str, u64>,
    pub approvals: Table<'t, &'static str, &'static [u8]>,
    pub approval_expiry: Table<'t, (u64, &'static str), ()>,
    pub agent_locks: Table<'t, &'static str, &'static [u8]>,
    pub seen: Table<'t, &'static str, u64>,
    pub seen_expiry: Table<'t, (u64, &'static str), ()>,
    pub outbox: Table<'t, u64, &'static [u8]>,
    pub logins: Table<'t, &'static str, &'static [u8]>,
    pub ssf_streams: Table<'t, &'static str, &'static [u8]>,
    pub ssf_progress: Table<'t, &'static str, &'static [u8]>,
}

impl<'t> Tables<'t> {
    pub(super) fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
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
            seen: txn.open_table(SEEN)?,
            seen_expiry: txn.open_table(SEEN_EXPIRY)?,
            outbox: txn.open_table(OUTBOX)?,
            logins: txn.open_table(LOGINS)?,
            ssf_streams: txn.open_table(SSF_STREAMS)?,
            ssf_progress: txn.open_table(SSF_PROGRESS)?,
        })
    }

    /// The lock on `agent` if it holds at `now`.
    pub(super) fn lock(
        &self,
        agent: &str,
        now: Timestamp,
    ) -> Result<Option<AgentLock>, StoreError> {
        let lock: Option<AgentLock> = self
            .agent_locks
            .get(agent)?
            .map(|v| decode(v.value()))
            .transpose()?;
        Ok(lock.filter(|l| l.holds_at(now)))
    }

    /// Refuses a write for `agent` while a lock holds it out.
    pub(super) fn refuse_locked(&self, agent: &SpiffeId, now: Timestamp) -> Result<(), StoreError> {
        match self.lock(agent.as_str(), now)? {
            Some(_) => Err(StoreError::AgentLocked),
            None => Ok(()),
        }
    }

    /// Ends every active task of `agent` (those delegated to it included)
    /// and revokes every active lease it owns or holds: the tokens it
    /// exchanged for, under tasks of other agents, too.
    pub(super) fn revoke_agent(
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

    /// Records a new task and its task lease unless its agent is locked;
    /// a delegated one only under a live parent of its delegator that
    /// outlives it. Refuses with why, writing nothing, otherwise.
    pub(super) fn start_task(&mut self, task: &Task) -> Result<(), StoreError> {
        let id = task.id.as_str();
        if self.tasks.get(id)?.is_some() {
            return Err(StoreError::Duplicate(id.to_owned()));
        }
        self.refuse_locked(&task.agent, task.created_at)?;
        if let Some(parent) = &task.parent {
            let record = self
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
            self.task_children.insert(parent.as_str(), id)?;
        }
        self.tasks.insert(id, encode(task)?.as_slice())?;
        self.agent_tasks.insert(task.agent.as_str(), id)?;
        self.insert_new_lease(&task.new_lease())
    }

    /// Records a credential lease if its task is live, of the same agent,
    /// outlives it and is still at the revision decided on, and the agent
    /// is not locked; refuses with why, writing nothing, otherwise.
    pub(super) fn issue(&mut self, lease: &Lease, now: Timestamp) -> Result<(), StoreError> {
        let record = self
            .task_record(lease.task_id.as_str())?
            .filter(|r| r.task.agent == lease.agent)
            .ok_or(StoreError::TaskNotFound)?;
        self.refuse_locked(&lease.agent, now)?;
        // The service an exchanged token is for may be locked too; checked
        // in the same transaction as the lock's revocations, so no hop it
        // exchanged for outlives its lock.
        if lease.holder() != &lease.agent {
            self.refuse_locked(lease.holder(), now)?;
        }
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

    pub(super) fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        self.leases.get(id)?.map(|v| decode(v.value())).transpose()
    }

    pub(super) fn task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        self.tasks.get(id)?.map(|v| decode(v.value())).transpose()
    }

    pub(super) fn put_lease(&mut self, lease: &Lease) -> Result<(), StoreError> {
        self.leases
            .insert(lease.id.as_str(), encode(lease)?.as_slice())?;
        Ok(())
    }

    pub(super) fn insert_new_lease(&mut self, lease: &Lease) -> Result<(), StoreError> {
        if self.leases.get(lease.id.as_str())?.is_some() {
            return Err(StoreError::Duplicate(lease.id.to_string()));
        }
        self.put_lease(lease)?;
        let (id, exp) = (lease.id.as_str(), lease.expires_at.as_millis());
        self.task_leases.insert(lease.task_id.as_str(), id)?;
        self.agent_leases.insert(lease.agent.as_str(), id)?;
        if lease.holder() != &lease.agent {
            // An exchanged token is also the service's: revoking or locking
            // the service finds it here.
            self.agent_leases.insert(lease.holder().as_str(), id)?;
        }
        self.active_expiry.insert((exp, id), ())?;
        self.all_expiry.insert((exp, id), ())?;
        Ok(())
    }

    /// Marks an active lease revoked and appends its feed event.
    pub(super) fn revoke(
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
            status_idx: lease.status_index(),
        };
        self.revocations
            .insert(cursor, encode(&event)?.as_slice())?;
        Ok(lease.id)
    }

    pub(super) fn task_record(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
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

    pub(super) fn end_task(
        &mut self,
        id: &TaskId,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError> {
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

    /// Puts `record` in the outbox, after every record there; returns its
    /// outbox id.
    pub(super) fn queue(&mut self, record: &AuditRecord) -> Result<u64, StoreError> {
        let id = self.meta.get(NEXT_OUTBOX)?.map_or(1, |v| v.value());
        self.meta.insert(NEXT_OUTBOX, id + 1)?;
        self.outbox.insert(id, encode(record)?.as_slice())?;
        Ok(id)
    }

    /// Removes the outbox's records up to `through` (those the trail
    /// holds) and notes `trail_seq`, the trail's seq after them.
    pub(super) fn unqueue(
        &mut self,
        through: Option<u64>,
        trail_seq: u64,
    ) -> Result<(), StoreError> {
        if let Some(through) = through {
            self.outbox.retain_in(..=through, |_, _| false)?;
        }
        self.meta.insert(TRAIL_SEQ, trail_seq)?;
        Ok(())
    }

    pub(super) fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        self.approvals
            .get(id)?
            .map(|v| decode(v.value()))
            .transpose()
    }

    pub(super) fn put_approval(&mut self, a: &Approval) -> Result<(), StoreError> {
        self.approvals
            .insert(a.id.as_str(), encode(a)?.as_slice())?;
        Ok(())
    }

    pub(super) fn purge(&mut self, lease: &Lease) -> Result<(), StoreError> {
        let (id, exp) = (lease.id.as_str(), lease.expires_at.as_millis());
        self.leases.remove(id)?;
        self.task_leases.remove(lease.task_id.as_str(), id)?;
        self.agent_leases.remove(lease.agent.as_str(), id)?;
        self.agent_leases.remove(lease.holder().as_str(), id)?;
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
