//! The Redis store: many stateless broker replicas share one Redis (or a
//! Sentinel-managed primary). Every multi-key state change is one Lua script
//! (loaded once, called by SHA), so it is atomic on the server. The key
//! layout is documented in `docs/redis.md`.
//!
//! Durability: a credential is returned only after Redis acknowledged its
//! lease. Run Redis with `appendonly yes` and `appendfsync always` (or accept
//! losing up to a second of leases on a Redis crash with `everysec`).

mod codec;
mod keys;
mod recorded;
mod scripts;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mayfly_core::{
    AgentLock, Approval, ApprovalId, ApprovalRequest, ApprovalState, ApprovalStatus, Lease,
    LeaseId, RevocationReason, SpiffeId, Task, TaskContext, TaskId, TaskRecord, Timestamp,
};
use redis::Script;

use crate::cause::Cause;
use crate::redis_conn::RedisConn;
pub use crate::redis_conn::RedisTarget;

use super::{
    ExpiredLease, LeaseFilter, LeaseStore, Page, PageRequest, ReapOutcome, RecordBatch,
    RecordError, RevocationEvent, RevokeRequest, StoreError, TaskFilter, check_consumable,
};
use crate::audit::AuditSink;
use codec::{
    ApprovalFields, LeaseFields, approval_from, approval_status, corrupt, decode, encode,
    event_from, lease_from, script_status,
};
use keys::{Keys, cursor_of, member, split_member, stream_id_of};
use scripts::{Repeat, Scripts, evalsha};

/// Records stay this much longer in Redis than the reaper keeps them, so the
/// reaper (not Redis expiry) removes them and cleans the indexes; Redis
/// expiry is the safety net if no reaper runs.
const TTL_MARGIN: Duration = Duration::from_secs(3600);
/// Most records one list call examines.
const MAX_SCAN: usize = 10_000;
/// How long a write waits for its replicas (below the connection's reply
/// timeout).
const REPLICA_WAIT: Duration = Duration::from_millis(500);
/// Members fetched per round trip while listing.
const CHUNK: usize = 200;

/// The Redis lease store.
pub struct RedisStore {
    conn: Arc<RedisConn>,
    keys: Keys,
    scripts: Scripts,
    /// Records are kept this long after expiry (Redis TTL adds a margin).
    retention: Duration,
    /// Replicas that must acknowledge each state change (0: none).
    replicas_to_ack: u32,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("target", &self.conn.describe())
            .field("prefix", &self.keys.prefix)
            .finish()
    }
}

impl RedisStore {
    /// A store on `target`, with every key under `prefix`. Connects lazily:
    /// the broker starts (not ready) while Redis is down and recovers by
    /// itself when it returns.
    pub fn new(target: RedisTarget, prefix: &str, retention: Duration) -> Result<Self, StoreError> {
        Ok(Self {
            conn: Arc::new(RedisConn::new(target)?),
            keys: Keys {
                prefix: prefix.to_owned(),
            },
            scripts: Scripts::new(),
            retention,
            replicas_to_ack: 0,
        })
    }

    /// Makes every state change wait until `n` replicas acknowledged it
    /// (Redis `WAIT`), so a primary's crash cannot lose an acknowledged
    /// lease; with fewer replicas reachable, writes fail closed.
    pub fn with_replicas_to_ack(mut self, n: u32) -> Self {
        self.replicas_to_ack = n;
        self
    }

    /// Runs a state-changing script; with `replicas_to_ack`, then waits for
    /// that many replicas to have it, failing closed (`Unavailable`, so no
    /// credential is handed out) if they do not within [`REPLICA_WAIT`].
    /// `repeat` says the script may be sent again after its connection
    /// failed (its second run recognises the first's work).
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        repeat: Repeat,
    ) -> Result<T, StoreError> {
        self.invoke_repeatable(inv, repeat).await.map(|(v, _)| v)
    }

    /// [`invoke`](Self::invoke), also saying whether the script was sent
    /// twice.
    async fn invoke_repeatable<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        repeat: Repeat,
    ) -> Result<(T, bool), StoreError> {
        let replicas = self.replicas_to_ack;
        let call = move |mut c: redis::aio::ConnectionManager| async move {
            let out: T = inv.invoke_async(&mut c).await?;
            if replicas == 0 {
                return Ok(Ok(out));
            }
            let acked: u32 = redis::cmd("WAIT")
                .arg(replicas)
                .arg(REPLICA_WAIT.as_millis() as u64)
                .query_async(&mut c)
                .await?;
            Ok(if acked >= replicas {
                Ok(out)
            } else {
                Err(acked)
            })
        };
        let (reply, twice) = match repeat {
            Repeat::Safe => self.conn.run_repeatable(call).await?,
            Repeat::Once => (self.conn.run(call).await?, false),
        };
        let reply = reply.map_err(|acked| {
            StoreError::Unavailable(Cause::msg(format!(
                "write reached {acked} of {replicas} required replicas"
            )))
        })?;
        Ok((reply, twice))
    }

    /// Whether a task or lease already recorded under `key` (a hash with
    /// `body`) is exactly `body`: a write sent again after its connection
    /// failed finds its own first run.
    async fn recorded_as(&self, key: &str, body: &str) -> Result<bool, StoreError> {
        let stored: Option<String> = self
            .conn
            .run_idempotent(|mut c| async move {
                redis::cmd("HGET")
                    .arg(key)
                    .arg("body")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(stored.as_deref() == Some(body))
    }

    /// The arguments `issue_check` and `issue_write` take for a lease
    /// (see `issue.lua`), appended to `inv`.
    fn lease_args(
        &self,
        inv: &mut redis::ScriptInvocation<'_>,
        lease: &Lease,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let (t, l, a) = (
            lease.task_id.as_str(),
            lease.id.as_str(),
            lease.agent.as_str(),
        );
        inv.arg(l)
            .arg(a)
            .arg(now.as_millis())
            .arg(lease.expires_at.as_millis())
            .arg(self.keep_until(lease.expires_at))
            .arg(encode(lease)?)
            .arg(lease.detail.kind_name())
            .arg(member(l, t, a))
            .arg(lease.serial().unwrap_or(""))
            .arg(lease.task_revision)
            .arg(t);
        Ok(())
    }

    fn keep_until(&self, expires: Timestamp) -> u64 {
        expires.plus(self.retention).plus(TTL_MARGIN).as_millis()
    }

    async fn fetch_lease(&self, task: &str, lease: &str) -> Result<Option<Lease>, StoreError> {
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

    async fn fetch_leases(
        &self,
        refs: &[(String, String)],
    ) -> Result<Vec<Option<Lease>>, StoreError> {
        if refs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (t, l) in refs {
            pipe.cmd("HMGET")
                .arg(self.keys.lease(t, l))
                .arg(&["body", "state", "rev"]);
        }
        let pipe = &pipe;
        let rows: Vec<LeaseFields> = self
            .conn
            .run_idempotent(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        rows.into_iter().map(lease_from).collect()
    }

    async fn fetch_tasks(&self, ids: &[String]) -> Result<Vec<Option<TaskRecord>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for t in ids {
            pipe.cmd("HGET").arg(self.keys.task(t)).arg("body");
            pipe.cmd("HMGET")
                .arg(self.keys.lease(t, t))
                .arg(&["body", "state", "rev"]);
        }
        let pipe = &pipe;
        let values: Vec<redis::Value> = self
            .conn
            .run_idempotent(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for pair in values.chunks(2) {
            let body: Option<String> = redis::from_redis_value(pair[0].clone()).map_err(corrupt)?;
            let lease: LeaseFields = redis::from_redis_value(pair[1].clone()).map_err(corrupt)?;
            out.push(match (body, lease_from(lease)?) {
                (Some(body), Some(lease)) => Some(TaskRecord {
                    task: decode(&body)?,
                    status: lease.status,
                }),
                _ => None,
            });
        }
        Ok(out)
    }

    /// Finds the task of a lease through the lease index (or the index of
    /// earlier versions, for a lease recorded before).
    async fn task_of(&self, lease: &LeaseId) -> Result<Option<String>, StoreError> {
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

    /// Members of a lex-ordered index after `after` (an id), `count` at most.
    async fn members_after(
        &self,
        key: &str,
        after: Option<&str>,
        id_only: bool,
        count: usize,
    ) -> Result<Vec<String>, StoreError> {
        // For `id:...` members, everything with a larger id sorts at or after
        // `id;` (';' follows ':').
        let lo = match after {
            None => "-".to_owned(),
            Some(a) if id_only => format!("({a}"),
            Some(a) => format!("[{a};"),
        };
        let key = &key;
        let lo = &lo;
        let key = key.to_owned();
        self.conn
            .run_idempotent(|mut c| async move {
                redis::cmd("ZRANGEBYLEX")
                    .arg(key)
                    .arg(lo)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(count)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(StoreError::from)
    }

    async fn run_end_task(
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

    /// Pages over the leases of the tasks in `tasks_key` (a lex index of
    /// task ids, or of `T:A` members when `ids_only` is false): the tasks
    /// in id order, each task's leases in id order. `after` (a lease id)
    /// resumes after that lease in its task; a lease purged since then is
    /// `LeaseNotFound`.
    async fn page_task_leases(
        &self,
        tasks_key: &str,
        ids_only: bool,
        page: &PageRequest,
        keep: impl Fn(&Lease) -> bool,
    ) -> Result<Page<Lease>, StoreError> {
        let limit = page.limit.max(1);
        let mut items = Vec::new();
        // Tasks still to read, and where to start in the first of them.
        let mut tasks = Vec::new();
        let mut lease_after = None;
        if let Some(a) = &page.after {
            let id = LeaseId::new(a).map_err(|e| StoreError::Corrupt(Cause::of(e)))?;
            tasks.push(self.task_of(&id).await?.ok_or(StoreError::LeaseNotFound)?);
            lease_after = Some(a.clone());
        }
        let mut tasks_after: Option<String> = tasks.first().cloned();
        let mut last: Option<String> = None;
        let mut scanned = 0;
        loop {
            if tasks.is_empty() {
                tasks = self
                    .members_after(tasks_key, tasks_after.as_deref(), ids_only, CHUNK)
                    .await?
                    .into_iter()
                    .map(|m| match m.split_once(':') {
                        Some((t, _)) if !ids_only => t.to_owned(),
                        _ => m,
                    })
                    .collect();
                tasks.reverse();
            }
            let Some(t) = tasks.pop() else {
                return Ok(Page { items, next: None });
            };
            tasks_after = Some(t.clone());
            let (read, stopped) = self
                .read_task_leases(
                    &t,
                    lease_after.take(),
                    limit,
                    &keep,
                    &mut items,
                    &mut scanned,
                    MAX_SCAN,
                )
                .await?;
            if read.is_some() {
                last = read;
            }
            if stopped {
                return Ok(Page { items, next: last });
            }
        }
    }

    /// Reads task `t`'s leases after `after` (a lease id), in id order,
    /// keeping in `items` those `keep` wants, until `items` holds `limit`,
    /// `scanned` (leases read, counted on) reaches `max_scan`, or the set
    /// ends. Returns the last lease read, and whether it stopped before the
    /// set ended.
    #[allow(clippy::too_many_arguments)]
    async fn read_task_leases(
        &self,
        t: &str,
        mut after: Option<String>,
        limit: usize,
        keep: &impl Fn(&Lease) -> bool,
        items: &mut Vec<Lease>,
        scanned: &mut usize,
        max_scan: usize,
    ) -> Result<(Option<String>, bool), StoreError> {
        let key = self.keys.task_leases(t);
        loop {
            let ids = self
                .members_after(&key, after.as_deref(), true, CHUNK)
                .await?;
            let refs: Vec<(String, String)> =
                ids.iter().map(|l| (t.to_owned(), l.clone())).collect();
            for (l, lease) in ids.iter().zip(self.fetch_leases(&refs).await?) {
                *scanned += 1;
                after = Some(l.clone());
                if let Some(lease) = lease
                    && keep(&lease)
                {
                    items.push(lease);
                    if items.len() >= limit {
                        return Ok((after, true));
                    }
                }
            }
            if *scanned >= max_scan {
                return Ok((after, true));
            }
            if ids.len() < CHUNK {
                return Ok((after, false));
            }
        }
    }
}

#[async_trait]
impl LeaseStore for RedisStore {
    async fn start_task(&self, task: &Task) -> Result<(), StoreError> {
        let (t, a) = (task.id.as_str(), task.agent.as_str());
        let m = member(t, t, a);
        // Not delegated: the parent keys are the task's own, unused.
        let p = task.parent.as_ref().map_or(t, |p| p.as_str());
        let delegator = task.delegated_by.last().map_or("", |d| d.as_str());
        let mut inv = self.scripts.start_task.prepare_invoke();
        inv.key(self.keys.task(t))
            .key(self.keys.lease(t, t))
            .key(self.keys.task_leases(t))
            .key(self.keys.lease_tasks())
            .key(self.keys.tasks())
            .key(self.keys.agent_tasks(a))
            .key(self.keys.expiry())
            .key(self.keys.purge())
            .key(self.keys.task(p))
            .key(self.keys.lease(p, p))
            .key(self.keys.children(p))
            .key(self.keys.lock(a))
            .arg(t)
            .arg(encode(task)?)
            .arg(encode(&task.new_lease())?)
            .arg(a)
            .arg(task.expires_at.as_millis())
            .arg(self.keep_until(task.expires_at))
            .arg(&m)
            .arg(task.parent.as_ref().map_or("", |p| p.as_str()))
            .arg(delegator)
            .arg(task.created_at.as_millis())
            .arg((self.retention + TTL_MARGIN).as_millis() as u64);
        let body = encode(task)?;
        let (reply, twice): (String, bool) = self.invoke_repeatable(&inv, Repeat::Safe).await?;
        match script_status(&reply) {
            // Sent again after a lost reply: the first run recorded it.
            Err(StoreError::Duplicate(_))
                if twice && self.recorded_as(&self.keys.task(t), &body).await? =>
            {
                Ok(())
            }
            Err(StoreError::Duplicate(_)) => Err(StoreError::Duplicate(t.to_owned())),
            other => other,
        }
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        Ok(self.fetch_tasks(&[id.to_string()]).await?.pop().flatten())
    }

    async fn issue(&self, lease: &Lease, now: Timestamp) -> Result<(), StoreError> {
        let (t, l) = (lease.task_id.as_str(), lease.id.as_str());
        let mut inv = self.scripts.issue.prepare_invoke();
        inv.key(self.keys.task(t))
            .key(self.keys.lease(t, t))
            .key(self.keys.task_leases(t))
            .key(self.keys.lease(t, l))
            .key(self.keys.lease_tasks())
            .key(self.keys.expiry())
            .key(self.keys.lock(lease.agent.as_str()));
        self.lease_args(&mut inv, lease, now)?;
        let (reply, twice): (String, bool) = self.invoke_repeatable(&inv, Repeat::Safe).await?;
        match script_status(&reply) {
            // Sent again after a lost reply: the first run recorded it.
            Err(StoreError::Duplicate(_))
                if twice
                    && self
                        .recorded_as(&self.keys.lease(t, l), &encode(lease)?)
                        .await? =>
            {
                Ok(())
            }
            Err(StoreError::Duplicate(_)) => Err(StoreError::Duplicate(l.to_owned())),
            other => other,
        }
    }

    async fn record(
        &self,
        batch: &RecordBatch<'_>,
        trail: &dyn AuditSink,
    ) -> Vec<Result<(), RecordError>> {
        self.record_batch(batch, trail).await
    }

    async fn get_lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError> {
        match self.task_of(id).await? {
            Some(t) => self.fetch_lease(&t, id.as_str()).await,
            None => Ok(None),
        }
    }

    async fn end_task(&self, id: &TaskId, req: &RevokeRequest) -> Result<Vec<LeaseId>, StoreError> {
        self.run_end_task(id, req).await
    }

    async fn revoke_lease(
        &self,
        id: &LeaseId,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError> {
        let t = self.task_of(id).await?.ok_or(StoreError::LeaseNotFound)?;
        if t == id.as_str() {
            let task = TaskId::new(&t).map_err(|e| StoreError::Corrupt(Cause::of(e)))?;
            return match self.run_end_task(&task, req).await {
                Err(StoreError::TaskNotActive(_)) => Ok(Vec::new()),
                other => other,
            };
        }
        let mut inv = self.scripts.revoke_lease.prepare_invoke();
        inv.key(self.keys.lease(&t, id.as_str()))
            .key(self.keys.expiry())
            .key(self.keys.revocations())
            .arg(id.as_str())
            .arg(&t)
            .arg(req.at.as_millis())
            .arg(encode(&req.revocation(req.reason))?)
            .arg(req.reason.as_str());
        let reply: String = self.invoke(&inv, Repeat::Once).await?;
        match reply.as_str() {
            "OK" => Ok(vec![id.clone()]),
            "INACTIVE" => Ok(Vec::new()),
            "NOTFOUND" => Err(StoreError::LeaseNotFound),
            other => Err(StoreError::Corrupt(Cause::msg(format!(
                "unexpected script reply {other:?}"
            )))),
        }
    }

    async fn revoke_agent(
        &self,
        agent: &SpiffeId,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError> {
        // Each task ends atomically with everything under it; the agent's
        // tasks are ended one after another.
        let key = self.keys.agent_tasks(agent.as_str());
        let tasks: Vec<String> = self
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
        // Every lease of the agent is under one of its tasks (`issue` records
        // a lease only under a task of the same agent).
        let mut revoked = Vec::new();
        for t in tasks {
            let id = TaskId::new(&t).map_err(|e| StoreError::Corrupt(Cause::of(e)))?;
            match self.run_end_task(&id, req).await {
                Ok(ids) => revoked.extend(ids),
                Err(StoreError::TaskNotActive(_) | StoreError::TaskNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(revoked)
    }

    async fn lock_agent(
        &self,
        lock: &AgentLock,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError> {
        let (key, all) = (self.keys.lock(lock.agent.as_str()), self.keys.locks());
        let (body, agent) = (encode(lock)?, lock.agent.to_string());
        let exp = lock.expires_at.map_or(0, Timestamp::as_millis);
        let now = req.at.as_millis();
        // One MULTI: the lock and its index entry, with the expired locks
        // dropped from the index. From then on every issue and task start
        // of the agent is refused by its script.
        self.conn
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
        self.revoke_agent(&lock.agent, req).await
    }

    async fn unlock_agent(
        &self,
        agent: &SpiffeId,
        now: Timestamp,
    ) -> Result<Option<AgentLock>, StoreError> {
        let (key, all, id) = (
            self.keys.lock(agent.as_str()),
            self.keys.locks(),
            agent.to_string(),
        );
        let (body,): (Option<String>,) = self
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

    async fn agent_lock(
        &self,
        agent: &SpiffeId,
        now: Timestamp,
    ) -> Result<Option<AgentLock>, StoreError> {
        let key = self.keys.lock(agent.as_str());
        let body: Option<String> = self
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

    async fn list_locks(&self, now: Timestamp) -> Result<Vec<AgentLock>, StoreError> {
        let all = self.keys.locks();
        let since = format!("({}", now.as_millis());
        let agents: Vec<String> = self
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
            pipe.cmd("HGET").arg(self.keys.lock(a)).arg("body");
        }
        let bodies: Vec<Option<String>> = self
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

    async fn list_leases(
        &self,
        filter: &LeaseFilter,
        page: &PageRequest,
        now: Timestamp,
    ) -> Result<Page<Lease>, StoreError> {
        let keep = |l: &Lease| filter.matches(l, now);
        if let Some(task) = &filter.task {
            let mut items = Vec::new();
            let (last, full) = self
                .read_task_leases(
                    task.as_str(),
                    page.after.clone(),
                    page.limit.max(1),
                    &keep,
                    &mut items,
                    &mut 0,
                    usize::MAX,
                )
                .await?;
            return Ok(Page {
                items,
                next: if full { last } else { None },
            });
        }
        match &filter.agent {
            Some(a) => {
                self.page_task_leases(&self.keys.agent_tasks(a.as_str()), true, page, keep)
                    .await
            }
            None => {
                self.page_task_leases(&self.keys.tasks(), false, page, keep)
                    .await
            }
        }
    }

    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        page: &PageRequest,
        now: Timestamp,
    ) -> Result<Page<TaskRecord>, StoreError> {
        let limit = page.limit.max(1);
        let (key, id_only) = match (&filter.parent, &filter.agent) {
            (Some(p), _) => (self.keys.children(p.as_str()), true),
            (None, Some(a)) => (self.keys.agent_tasks(a.as_str()), true),
            (None, None) => (self.keys.tasks(), false),
        };
        let mut items = Vec::new();
        let mut after = page.after.clone();
        let mut scanned = 0;
        while scanned < MAX_SCAN {
            let members = self
                .members_after(&key, after.as_deref(), id_only, CHUNK)
                .await?;
            let ids: Vec<String> = members
                .iter()
                .map(|m| m.split(':').next().unwrap_or_default().to_owned())
                .collect();
            let tasks = self.fetch_tasks(&ids).await?;
            for (t, rec) in ids.iter().zip(tasks) {
                scanned += 1;
                after = Some(t.clone());
                if let Some(rec) = rec
                    && filter.matches(&rec, now)
                {
                    items.push(rec);
                    if items.len() >= limit {
                        return Ok(Page { items, next: after });
                    }
                }
            }
            if members.len() < CHUNK {
                return Ok(Page { items, next: None });
            }
        }
        Ok(Page { items, next: after })
    }

    async fn feed_head(&self) -> Result<u64, StoreError> {
        let key = self.keys.revocations();
        let key = &key;
        let last: Vec<(String, Vec<(String, String)>)> = self
            .conn
            .run_idempotent(|mut c| async move {
                redis::cmd("XREVRANGE")
                    .arg(key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        last.first().map_or(Ok(0), |(id, _)| cursor_of(id))
    }

    async fn revocations_since(
        &self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<RevocationEvent>, StoreError> {
        let key = self.keys.revocations();
        let start = format!("({}", stream_id_of(cursor));
        let key = &key;
        let start = &start;
        let rows: Vec<(String, Vec<(String, String)>)> = self
            .conn
            .run_idempotent(|mut c| async move {
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        rows.into_iter()
            .map(|(id, fields)| event_from(&id, fields))
            .collect()
    }

    async fn reap(
        &self,
        now: Timestamp,
        retention: Duration,
        limit: usize,
    ) -> Result<ReapOutcome, StoreError> {
        let mut outcome = ReapOutcome::default();
        let due = |key: String, up_to: u64| {
            self.conn.run(move |mut c| async move {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(up_to)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async::<Vec<String>>(&mut c)
                    .await
            })
        };
        let expiring = due(self.keys.expiry(), now.as_millis()).await?;
        outcome.more |= expiring.len() >= limit;
        if !expiring.is_empty() {
            let mut pipe = redis::pipe();
            for m in &expiring {
                let (l, t, _) = split_member(m)?;
                evalsha(
                    &mut pipe,
                    &self.scripts.expire,
                    &[
                        self.keys.lease(t, l),
                        self.keys.expiry(),
                        self.keys.expiry_ended(),
                    ],
                    &[m.clone(), now.as_millis().to_string()],
                );
            }
            let results: Vec<i64> = self.run_scripts(pipe, &self.scripts.expire).await?;
            for (m, moved) in expiring.iter().zip(results) {
                if moved == 1 {
                    let (l, t, a) = split_member(m)?;
                    outcome.expired.push(ExpiredLease {
                        id: LeaseId::new(l).map_err(corrupt)?,
                        task_id: TaskId::new(t).map_err(corrupt)?,
                        agent: SpiffeId::new(a).map_err(corrupt)?,
                    });
                }
            }
        }

        let cutoff = now.minus(retention).as_millis();
        let purging = due(self.keys.purge(), cutoff).await?;
        outcome.more |= purging.len() >= limit;
        if !purging.is_empty() {
            let mut pipe = redis::pipe();
            for m in &purging {
                let (l, t, a) = split_member(m)?;
                evalsha(
                    &mut pipe,
                    &self.scripts.purge,
                    &[
                        self.keys.lease(t, l),
                        self.keys.task_leases(t),
                        self.keys.lease_tasks(),
                        self.keys.expiry(),
                        self.keys.purge(),
                        self.keys.task(t),
                        self.keys.tasks(),
                        self.keys.agent_tasks(a),
                        self.keys.legacy_leases(),
                        self.keys.agent_leases(a),
                        self.keys.expiry_ended(),
                    ],
                    &[
                        m.clone(),
                        l.to_owned(),
                        t.to_owned(),
                        a.to_owned(),
                        self.keys.prefix.clone(),
                        limit.to_string(),
                    ],
                );
            }
            let done: Vec<i64> = self.run_scripts(pipe, &self.scripts.purge).await?;
            outcome.purged = done.iter().filter(|d| **d == 1).count();
            // A big task stays due until its last chunk is purged.
            outcome.more |= outcome.purged < purging.len();
        }
        self.trim_feed(cutoff).await?;
        self.purge_approvals(cutoff, limit).await?;
        Ok(outcome)
    }

    async fn create_approval(&self, a: &Approval) -> Result<(), StoreError> {
        let key = self.keys.approval(a.id.as_str());
        let (body, status, request) = (encode(a)?, encode(&a.status)?, encode(&a.request)?);
        let state = match a.status {
            ApprovalStatus::Pending => "pending",
            _ => {
                return Err(StoreError::Corrupt(Cause::msg(
                    "a new approval must be pending",
                )));
            }
        };
        let keep = self.keep_until(a.expires_at);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSETNX")
            .arg(&key)
            .arg("body")
            .arg(&body)
            .cmd("HSET")
            .arg(&key)
            .arg("state")
            .arg(state)
            .arg("status")
            .arg(&status)
            .arg("exp")
            .arg(a.expires_at.as_millis())
            .arg("agent")
            .arg(a.agent.as_str())
            .arg("task")
            .arg(a.task_id.as_str())
            .arg("request")
            .arg(&request)
            .ignore()
            .cmd("PEXPIREAT")
            .arg(&key)
            .arg(keep)
            .ignore()
            .cmd("ZADD")
            .arg(self.keys.approvals())
            .arg(0)
            .arg(a.id.as_str())
            .ignore()
            .cmd("ZADD")
            .arg(self.keys.approval_expiry())
            .arg(a.expires_at.as_millis())
            .arg(a.id.as_str())
            .ignore();
        let (created,): (i64,) = self
            .conn
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        if created == 0 {
            return Err(StoreError::Duplicate(a.id.to_string()));
        }
        Ok(())
    }

    async fn get_approval(&self, id: &ApprovalId) -> Result<Option<Approval>, StoreError> {
        let key = self.keys.approval(id.as_str());
        let fields: ApprovalFields = self
            .conn
            .run(|mut c| async move {
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg(&["body", "status"])
                    .query_async(&mut c)
                    .await
            })
            .await?;
        approval_from(fields)
    }

    async fn list_approvals(
        &self,
        pending_only: bool,
        page: &PageRequest,
        now: Timestamp,
    ) -> Result<Page<Approval>, StoreError> {
        let limit = page.limit.max(1);
        let mut items = Vec::new();
        let mut after = page.after.clone();
        loop {
            let ids = self
                .members_after(&self.keys.approvals(), after.as_deref(), true, CHUNK)
                .await?;
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET")
                    .arg(self.keys.approval(id))
                    .arg(&["body", "status"]);
            }
            let rows: Vec<ApprovalFields> = if ids.is_empty() {
                Vec::new()
            } else {
                self.conn
                    .run(|mut c| async move { pipe.query_async(&mut c).await })
                    .await?
            };
            for (id, row) in ids.iter().zip(rows) {
                after = Some(id.clone());
                if let Some(a) = approval_from(row)?
                    && (!pending_only || a.state_at(now) == ApprovalState::Pending)
                {
                    items.push(a);
                    if items.len() >= limit {
                        return Ok(Page { items, next: after });
                    }
                }
            }
            if ids.len() < CHUNK {
                return Ok(Page { items, next: None });
            }
        }
    }

    async fn decide_approval(
        &self,
        id: &ApprovalId,
        decision: ApprovalStatus,
        now: Timestamp,
    ) -> Result<Approval, StoreError> {
        let state = match &decision {
            ApprovalStatus::Approved { .. } => "approved",
            ApprovalStatus::Denied { .. } => "denied",
            _ => {
                return Err(StoreError::Corrupt(Cause::msg(
                    "a decision approves or denies",
                )));
            }
        };
        let mut inv = self.scripts.approval_decide.prepare_invoke();
        inv.key(self.keys.approval(id.as_str()))
            .arg(now.as_millis())
            .arg(state)
            .arg(encode(&decision)?);
        let reply: String = self.invoke(&inv, Repeat::Once).await?;
        approval_status(&reply)?;
        self.get_approval(id)
            .await?
            .ok_or(StoreError::ApprovalNotFound)
    }

    async fn consume_approval(
        &self,
        id: &ApprovalId,
        agent: &SpiffeId,
        task: &TaskId,
        request: &ApprovalRequest,
        now: Timestamp,
    ) -> Result<Approval, StoreError> {
        // The consumed status names the approver, read first; the script
        // then checks the approval is still approved before using it.
        let current = self
            .get_approval(id)
            .await?
            .ok_or(StoreError::ApprovalNotFound)?;
        let consumed = check_consumable(&current, agent, task, request, now)?;
        let mut inv = self.scripts.approval_consume.prepare_invoke();
        inv.key(self.keys.approval(id.as_str()))
            .arg(now.as_millis())
            .arg(agent.as_str())
            .arg(task.as_str())
            .arg(encode(request)?)
            .arg(encode(&consumed)?);
        let reply: String = self.invoke(&inv, Repeat::Once).await?;
        approval_status(&reply)?;
        Ok(Approval {
            status: consumed,
            ..current
        })
    }

    async fn update_task_context(
        &self,
        id: &TaskId,
        agent: &SpiffeId,
        context: &TaskContext,
        now: Timestamp,
    ) -> Result<Task, StoreError> {
        let record = self.get_task(id).await?.ok_or(StoreError::TaskNotFound)?;
        let mut task = record.task;
        let expected = task.revision;
        task.context = context.clone();
        task.revision += 1;
        let t = id.as_str();
        let mut inv = self.scripts.update_context.prepare_invoke();
        inv.key(self.keys.task(t))
            .key(self.keys.lease(t, t))
            .arg(agent.as_str())
            .arg(now.as_millis())
            .arg(encode(&task)?)
            .arg(expected);
        let reply: String = self.invoke(&inv, Repeat::Once).await?;
        script_status(&reply)?;
        Ok(task)
    }

    async fn check(&self) -> Result<(), StoreError> {
        let pong: String = self
            .conn
            .run(|mut c| async move { redis::cmd("PING").query_async(&mut c).await })
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Unavailable(Cause::msg(format!(
                "PING answered {pong:?}"
            ))))
        }
    }

    async fn active_count(&self) -> Result<u64, StoreError> {
        // The expiry index holds the active leases and those a task end
        // revoked that have not come due yet, which are counted apart.
        let (index, ended) = (self.keys.expiry(), self.keys.expiry_ended());
        let (all, left): (u64, Option<i64>) = self
            .conn
            .run(|mut c| async move {
                redis::pipe()
                    .zcard(&index)
                    .get(&ended)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(all.saturating_sub(u64::try_from(left.unwrap_or(0)).unwrap_or(0)))
    }
}

impl RedisStore {
    /// Runs a pipeline of `EVALSHA`s of `script`, loading it first so a
    /// server that lost its script cache (restart, failover) knows it.
    async fn run_scripts(
        &self,
        pipe: redis::Pipeline,
        script: &Script,
    ) -> Result<Vec<i64>, StoreError> {
        self.conn
            .run(|mut c| async move { script.prepare_invoke().load_async(&mut c).await })
            .await?;
        self.conn
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await
            .map_err(StoreError::from)
    }

    /// Removes approvals that expired before `cutoff`.
    async fn purge_approvals(&self, cutoff: u64, limit: usize) -> Result<(), StoreError> {
        let index = self.keys.approval_expiry();
        let ids: Vec<String> = {
            let index = index.clone();
            self.conn
                .run(|mut c| async move {
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(&index)
                        .arg("-inf")
                        .arg(cutoff)
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit)
                        .query_async(&mut c)
                        .await
                })
                .await?
        };
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("DEL").arg(self.keys.approval(id)).ignore();
        }
        pipe.cmd("ZREM").arg(&index).arg(&ids).ignore();
        pipe.cmd("ZREM")
            .arg(self.keys.approvals())
            .arg(&ids)
            .ignore();
        self.conn
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
            .map_err(StoreError::from)
    }

    /// Drops feed events whose credentials expired before `cutoff`, from the
    /// oldest end.
    async fn trim_feed(&self, cutoff: u64) -> Result<(), StoreError> {
        let key = self.keys.revocations();
        loop {
            let k = key.clone();
            let rows: Vec<(String, Vec<(String, String)>)> = self
                .conn
                .run(|mut c| async move {
                    redis::cmd("XRANGE")
                        .arg(&k)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(CHUNK)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            let mut old = Vec::new();
            let mut done = rows.len() < CHUNK;
            for (id, fields) in &rows {
                let exp = fields
                    .iter()
                    .find(|(f, _)| f == "exp")
                    .and_then(|(_, v)| v.parse::<u64>().ok())
                    .unwrap_or(0);
                if exp > cutoff {
                    done = true;
                    break;
                }
                old.push(id.clone());
            }
            if !old.is_empty() {
                let k = key.clone();
                self.conn
                    .run(|mut c| async move {
                        redis::cmd("XDEL")
                            .arg(&k)
                            .arg(&old)
                            .query_async::<i64>(&mut c)
                            .await
                    })
                    .await?;
            }
            if done {
                return Ok(());
            }
        }
    }
}
