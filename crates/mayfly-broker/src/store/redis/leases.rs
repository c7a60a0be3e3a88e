//! Tasks and their leases: start, issue, end, revoke one, change context,
//! read.

use crate::store::TaskStore;
use mayfly_core::{
    Lease, LeaseId, RevocationReason, SpiffeId, Task, TaskContext, TaskId, TaskRecord, Timestamp,
};

use super::RedisStore;
use super::codec::{LeaseFields, encode, lease_from, script_status};
use super::keys::split_member;
use super::scripts::Repeat;
use crate::cause::Cause;
use crate::store::{RevokeRequest, StoreError};

pub(super) async fn start_task(store: &RedisStore, task: &Task) -> Result<(), StoreError> {
    let t = task.id.as_str();
    let mut inv = store.scripts.start_task.prepare_invoke();
    store.task_keys(&mut inv, task);
    store.task_args(&mut inv, task)?;
    let body = encode(task)?;
    let (reply, twice): (String, bool) = store.invoke_repeatable(&inv, Repeat::Safe).await?;
    match script_status(&reply) {
        // Sent again after a lost reply: the first run recorded it.
        Err(StoreError::Duplicate(_))
            if twice && store.recorded_as(&store.keys.task(t), &body).await? =>
        {
            Ok(())
        }
        Err(StoreError::Duplicate(_)) => Err(StoreError::Duplicate(t.to_owned())),
        other => other,
    }
}

pub(super) async fn get_task(
    store: &RedisStore,
    id: &TaskId,
) -> Result<Option<TaskRecord>, StoreError> {
    Ok(store.fetch_tasks(&[id.to_string()]).await?.pop().flatten())
}

pub(super) async fn issue(
    store: &RedisStore,
    lease: &Lease,
    now: Timestamp,
) -> Result<(), StoreError> {
    let (t, l) = (lease.task_id.as_str(), lease.id.as_str());
    let mut inv = store.scripts.issue.prepare_invoke();
    inv.key(store.keys.lease_tasks()).key(store.keys.expiry());
    store.lease_keys(&mut inv, lease);
    store.lease_args(&mut inv, lease, now)?;
    let (reply, twice): (String, bool) = store.invoke_repeatable(&inv, Repeat::Safe).await?;
    match script_status(&reply) {
        // Sent again after a lost reply: the first run recorded it.
        Err(StoreError::Duplicate(_))
            if twice
                && store
                    .recorded_as(&store.keys.lease(t, l), &encode(lease)?)
                    .await? =>
        {
            Ok(())
        }
        Err(StoreError::Duplicate(_)) => Err(StoreError::Duplicate(l.to_owned())),
        other => other,
    }
}

pub(super) async fn get_lease(
    store: &RedisStore,
    id: &LeaseId,
) -> Result<Option<Lease>, StoreError> {
    match store.task_of(id).await? {
        Some(t) => store.fetch_lease(&t, id.as_str()).await,
        None => Ok(None),
    }
}

pub(super) async fn end_task(
    store: &RedisStore,
    id: &TaskId,
    req: &RevokeRequest,
) -> Result<Vec<LeaseId>, StoreError> {
    store.run_end_task(id, req).await
}

pub(super) async fn revoke_lease(
    store: &RedisStore,
    id: &LeaseId,
    req: &RevokeRequest,
) -> Result<Vec<LeaseId>, StoreError> {
    let t = store.task_of(id).await?.ok_or(StoreError::LeaseNotFound)?;
    if t == id.as_str() {
        let task = TaskId::new(&t).map_err(|e| StoreError::Corrupt(Cause::of(e)))?;
        return match store.run_end_task(&task, req).await {
            Err(StoreError::TaskNotActive(_)) => Ok(Vec::new()),
            other => other,
        };
    }
    let mut inv = store.scripts.revoke_lease.prepare_invoke();
    inv.key(store.keys.lease(&t, id.as_str()))
        .key(store.keys.expiry())
        .key(store.keys.revocations())
        .arg(id.as_str())
        .arg(&t)
        .arg(req.at.as_millis())
        .arg(encode(&req.revocation(req.reason))?)
        .arg(req.reason.as_str());
    let reply: String = store.invoke(&inv, Repeat::Once).await?;
    match reply.as_str() {
        "OK" => Ok(vec![id.clone()]),
        "INACTIVE" => Ok(Vec::new()),
        "NOTFOUND" => Err(StoreError::LeaseNotFound),
        other => Err(StoreError::Corrupt(Cause::msg(format!(
            "unexpected script reply {other:?}"
        )))),
    }
}

pub(super) async fn update_task_context(
    store: &RedisStore,
    id: &TaskId,
    agent: &SpiffeId,
    context: &TaskContext,
    now: Timestamp,
) -> Result<Task, StoreError> {
    let record = store.get_task(id).await?.ok_or(StoreError::TaskNotFound)?;
    let mut task = record.task;
    let expected = task.revision;
    task.context = context.clone();
    task.revision += 1;
    let t = id.as_str();
    let mut inv = store.scripts.update_context.prepare_invoke();
    inv.key(store.keys.task(t))
        .key(store.keys.lease(t, t))
        .arg(agent.as_str())
        .arg(now.as_millis())
        .arg(encode(&task)?)
        .arg(expected);
    let reply: String = store.invoke(&inv, Repeat::Once).await?;
    script_status(&reply)?;
    Ok(task)
}

impl RedisStore {
    pub(super) async fn fetch_lease(
        &self,
        task: &str,
        lease: &str,
    ) -> Result<Option<Lease>, StoreError> {
        let key = self.keys.lease(task, lease);
        let key = &key;
        let fields: LeaseFields = self
            .conn
            .run_idempotent(|mut c| async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg(&["body", "state", "rev"])
                    .query_async(&mut c)
                    .await
            })
            .await?;
        lease_from(fields)
    }

    /// Finds the task of a lease through the lease index (or the index of
    /// earlier versions, for a lease recorded before).
    pub(super) async fn task_of(&self, lease: &LeaseId) -> Result<Option<String>, StoreError> {
        let (key, legacy) = (self.keys.lease_tasks(), self.keys.legacy_leases());
        let (lo, hi) = (format!("[{lease}:"), format!("[{lease};"));
        let id = lease.to_string();
        let key = &key;
        let legacy = &legacy;
        let lo = &lo;
        let hi = &hi;
        let id = &id;
        let (task, old): (Option<String>, Vec<String>) = self
            .conn
            .run_idempotent(|mut c| async move {
                redis::pipe()
                    .hget(key, id)
                    .cmd("ZRANGEBYLEX")
                    .arg(legacy)
                    .arg(lo)
                    .arg(hi)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(1)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        match (task, old.first()) {
            (Some(t), _) => Ok(Some(t)),
            (None, Some(m)) => Ok(Some(split_member(m)?.1.to_owned())),
            (None, None) => Ok(None),
        }
    }

    pub(super) async fn run_end_task(
        &self,
        id: &TaskId,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError> {
        let t = id.as_str();
        let task_rev = encode(&req.revocation(req.reason))?;
        let child_rev = encode(&req.revocation(req.child_reason))?;
        let descendant_rev = encode(&req.revocation(RevocationReason::ParentRevoked))?;
        let mut inv = self.scripts.end_task.prepare_invoke();
        inv.key(self.keys.task(t))
            .key(self.keys.lease(t, t))
            .key(self.keys.task_leases(t))
            .key(self.keys.expiry())
            .key(self.keys.revocations())
            .key(self.keys.expiry_ended())
            .arg(t)
            .arg(req.at.as_millis())
            .arg(task_rev)
            .arg(req.reason.as_str())
            .arg(child_rev)
            .arg(req.child_reason.as_str())
            .arg(&self.keys.prefix)
            .arg(descendant_rev);
        let reply: Vec<String> = self.invoke(&inv, Repeat::Once).await?;
        let (status, ids) = reply
            .split_first()
            .ok_or_else(|| StoreError::Corrupt(Cause::msg("empty script reply")))?;
        script_status(status)?;
        ids.iter()
            .map(|l| LeaseId::new(l).map_err(|e| StoreError::Corrupt(Cause::of(e))))
            .collect()
    }
}
