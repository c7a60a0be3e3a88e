//! Agents: revoking everything one holds, and operators' locks.

use crate::store::AgentStore;
use crate::store::CredentialStore;
use mayfly_core::{AgentLock, LeaseId, SpiffeId, TaskId, Timestamp};

use super::RedisStore;
use super::codec::{decode, encode};
use crate::cause::Cause;
use crate::store::{RevokeRequest, StoreError};

pub(super) async fn revoke_agent(
    store: &RedisStore,
    agent: &SpiffeId,
    req: &RevokeRequest,
) -> Result<Vec<LeaseId>, StoreError> {
    // Each task ends atomically with everything under it; the agent's
    // tasks are ended one after another.
    let key = store.keys.agent_tasks(agent.as_str());
    let tasks: Vec<String> = store
        .conn
        .run(|mut c| async move {
            redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await
        })
        .await?;
    // Every lease the agent owns is under one of its tasks (`issue`
    // records a lease only under a task of the same agent)…
    let mut revoked = Vec::new();
    for t in tasks {
        let id = TaskId::new(&t).map_err(|e| StoreError::Corrupt(Cause::of(e)))?;
        match store.run_end_task(&id, req).await {
            Ok(ids) => revoked.extend(ids),
            Err(StoreError::TaskNotActive(_) | StoreError::TaskNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    // …and every token it holds under another's task (exchanged for) is
    // in its actor index, written by the same script as the lease.
    for id in held_tokens(store, agent, req.at).await? {
        revoked.extend(store.revoke_lease(&id, req).await?);
    }
    Ok(revoked)
}

/// The unexpired tokens `agent` exchanged for, dropping the expired
/// entries from its index on the way.
async fn held_tokens(
    store: &RedisStore,
    agent: &SpiffeId,
    now: Timestamp,
) -> Result<Vec<LeaseId>, StoreError> {
    let key = store.keys.actor_leases(agent.as_str());
    let now = now.as_millis();
    let (members,): (Vec<String>,) = store
        .conn
        .run_idempotent(|mut c| {
            let key = key.clone();
            async move {
                redis::pipe()
                    .atomic()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now)
                    .ignore()
                    .cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await
            }
        })
        .await?;
    members
        .iter()
        .map(|m| {
            let lease = m.split(':').next().unwrap_or_default();
            LeaseId::new(lease).map_err(|e| StoreError::Corrupt(Cause::of(e)))
        })
        .collect()
}

pub(super) async fn lock_agent(
    store: &RedisStore,
    lock: &AgentLock,
    req: &RevokeRequest,
) -> Result<Vec<LeaseId>, StoreError> {
    let (key, all) = (store.keys.lock(lock.agent.as_str()), store.keys.locks());
    let (body, agent) = (encode(lock)?, lock.agent.to_string());
    let exp = lock.expires_at.map_or(0, Timestamp::as_millis);
    let now = req.at.as_millis();
    // One MULTI: the lock and its index entry, with the expired locks
    // dropped from the index. From then on every issue and task start
    // of the agent is refused by its script.
    store
        .conn
        .run(|mut c| async move {
            let mut pipe = redis::pipe();
            pipe.atomic()
                .del(&key)
                .ignore()
                .hset_multiple(&key, &[("body", body.as_str()), ("exp", &exp.to_string())])
                .ignore();
            if exp > 0 {
                pipe.cmd("PEXPIREAT").arg(&key).arg(exp).ignore();
            }
            let score = if exp > 0 {
                exp.to_string()
            } else {
                "+inf".into()
            };
            pipe.cmd("ZADD")
                .arg(&all)
                .arg(score)
                .arg(&agent)
                .ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(&all)
                .arg("-inf")
                .arg(format!("({now}"))
                .ignore();
            pipe.query_async::<()>(&mut c).await
        })
        .await?;
    store.revoke_agent(&lock.agent, req).await
}

pub(super) async fn unlock_agent(
    store: &RedisStore,
    agent: &SpiffeId,
    now: Timestamp,
) -> Result<Option<AgentLock>, StoreError> {
    let (key, all, id) = (
        store.keys.lock(agent.as_str()),
        store.keys.locks(),
        agent.to_string(),
    );
    let (body,): (Option<String>,) = store
        .conn
        .run(|mut c| async move {
            redis::pipe()
                .atomic()
                .hget(&key, "body")
                .del(&key)
                .ignore()
                .zrem(&all, &id)
                .ignore()
                .query_async(&mut c)
                .await
        })
        .await?;
    let lock: Option<AgentLock> = body.as_deref().map(decode).transpose()?;
    Ok(lock.filter(|l| l.holds_at(now)))
}

pub(super) async fn agent_lock(
    store: &RedisStore,
    agent: &SpiffeId,
    now: Timestamp,
) -> Result<Option<AgentLock>, StoreError> {
    let key = store.keys.lock(agent.as_str());
    let body: Option<String> = store
        .conn
        .run(|mut c| async move {
            redis::cmd("HGET")
                .arg(&key)
                .arg("body")
                .query_async(&mut c)
                .await
        })
        .await?;
    let lock: Option<AgentLock> = body.as_deref().map(decode).transpose()?;
    Ok(lock.filter(|l| l.holds_at(now)))
}

pub(super) async fn list_locks(
    store: &RedisStore,
    now: Timestamp,
) -> Result<Vec<AgentLock>, StoreError> {
    let all = store.keys.locks();
    let since = format!("({}", now.as_millis());
    let agents: Vec<String> = store
        .conn
        .run(|mut c| async move {
            redis::cmd("ZRANGEBYSCORE")
                .arg(&all)
                .arg(&since)
                .arg("+inf")
                .query_async(&mut c)
                .await
        })
        .await?;
    if agents.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for a in &agents {
        pipe.cmd("HGET").arg(store.keys.lock(a)).arg("body");
    }
    let bodies: Vec<Option<String>> = store
        .conn
        .run(|mut c| async move { pipe.query_async(&mut c).await })
        .await?;
    let mut locks = Vec::new();
    for body in bodies.into_iter().flatten() {
        let lock: AgentLock = decode(&body)?;
        if lock.holds_at(now) {
            locks.push(lock);
        }
    }
    locks.sort_by(|a, b| a.agent.cmp(&b.agent));
    Ok(locks)
}
