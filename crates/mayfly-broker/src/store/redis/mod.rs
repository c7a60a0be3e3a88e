//! The Redis store: many stateless broker replicas share one Redis (or a
//! Sentinel-managed primary). Every multi-key state change is one Lua script
//! (loaded once, called by SHA), so it is atomic on the server. The key
//! layout is documented in `docs/redis.md`.
//!
//! Durability: a credential is returned only after Redis acknowledged its
//! lease. Run Redis with `appendonly yes` and `appendfsync always` (or accept
//! losing up to a second of leases on a Redis crash with `everysec`).
//!
//! - `mod.rs`: [`RedisStore`], sending scripts (and waiting for replicas),
//!   and the [`LeaseStore`](super::LeaseStore) roles, each handed to the file of its job:
//! - `leases.rs`: tasks and their leases (start, issue, end, revoke one,
//!   change context, read); `agents.rs`: revoking an agent, locks;
//!   `approvals.rs`; `listing.rs`: pages over the indexes; `feed.rs`: the
//!   revocation stream; `reap.rs`: expiry and purging;
//! - `recorded.rs`: `record`, the store's own trail and
//!   `issue_recorded.lua`;
//! - `keys.rs`: key names, index members, feed cursors; `codec.rs`: records
//!   to and from hash fields and script replies; `scripts.rs`: the scripts
//!   and whether each may be sent twice; one `.lua` per atomic change, with
//!   `common.lua` shared.

mod agents;
mod approvals;
mod codec;
mod feed;
mod keys;
mod leases;
mod listing;
mod reap;
mod recorded;
mod scripts;
mod trail;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mayfly_core::{
    AgentLock, Approval, ApprovalId, ApprovalRequest, ApprovalStatus, Lease, LeaseId, SpiffeId,
    Task, TaskContext, TaskId, TaskRecord, Timestamp,
};
use redis::Script;

use crate::cause::Cause;
use crate::redis_conn::RedisConn;
pub use crate::redis_conn::RedisTarget;
pub use trail::RedisSink;

use super::{
    AgentStore, ApprovalStore, CredentialStore, HeldLogin, LeaseFilter, LoginQueue, Page,
    PageRequest, RateLimits, RateTaken, ReapOutcome, RecordBatch, RecordError, RecordStore,
    ReplayGuard, RevocationEvent, RevocationLog, RevokeRequest, SignalStreams, StatusIndexes,
    StoreError, TaskFilter, TaskStore, Upkeep,
};
use crate::audit::AuditSink;
use codec::{decode, encode, script_status};
use keys::{Keys, member};
use scripts::{Repeat, Scripts};

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
    /// Where records go.
    trail: Trail,
}

/// The trail a Redis store records to.
#[derive(Debug, Clone)]
enum Trail {
    /// Its own stream, on its connection: leases and records in one
    /// script.
    Own(Arc<RedisSink>),
    /// A trail elsewhere (standard output, off): leases first, then
    /// records.
    Outside(Arc<dyn AuditSink>),
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
    /// It records to its own trail, the stream under the same prefix
    /// ([`RedisSink`]), kept whole.
    pub fn new(target: RedisTarget, prefix: &str, retention: Duration) -> Result<Self, StoreError> {
        let conn = Arc::new(RedisConn::new(target)?);
        Ok(Self {
            trail: Trail::Own(Arc::new(RedisSink::sharing(conn.clone(), prefix))),
            conn,
            keys: Keys {
                prefix: prefix.to_owned(),
            },
            scripts: Scripts::new(),
            retention,
            replicas_to_ack: 0,
        })
    }

    /// Trims the store's own trail of entries older than `retention`
    /// (none: keeps everything); see [`RedisSink::with_retention`].
    pub fn with_trail_retention(mut self, retention: Option<Duration>) -> Self {
        let own = RedisSink::sharing(self.conn.clone(), &self.keys.prefix);
        self.trail = Trail::Own(Arc::new(own.with_retention(retention)));
        self
    }

    /// Records to `trail` instead of the store's own stream: the leases
    /// first, then the records, and the leases revoked again if the trail
    /// fails. A crash between the two can leave a lease unrecorded, so the
    /// broker allows it only for a trail that is not read back (standard
    /// output, off).
    pub fn recording_to(mut self, trail: Arc<dyn AuditSink>) -> Self {
        self.trail = Trail::Outside(trail);
        self
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
    /// The keys a credential lease's issue checks and writes besides the
    /// shared indexes: its task, task lease, the task's lease set, the
    /// lease, the owner's lock, the holder's lock, and the holder's index
    /// of tokens it exchanged for (written only when holder and owner
    /// differ).
    fn lease_keys(&self, inv: &mut redis::ScriptInvocation<'_>, lease: &Lease) {
        let (t, l) = (lease.task_id.as_str(), lease.id.as_str());
        inv.key(self.keys.task(t))
            .key(self.keys.lease(t, t))
            .key(self.keys.task_leases(t))
            .key(self.keys.lease(t, l))
            .key(self.keys.lock(lease.agent.as_str()))
            .key(self.keys.lock(lease.holder().as_str()))
            .key(self.keys.actor_leases(lease.holder().as_str()));
    }

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
            .arg(codec::list_entry(lease))
            .arg(lease.task_revision)
            .arg(t)
            .arg(lease.holder().as_str());
        Ok(())
    }

    /// A new task's keys, as `start_task.lua` lists them.
    fn task_keys(&self, inv: &mut redis::ScriptInvocation<'_>, task: &Task) {
        let (t, a) = (task.id.as_str(), task.agent.as_str());
        // Not delegated: the parent keys are the task's own, unused.
        let p = task.parent.as_ref().map_or(t, |p| p.as_str());
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
            .key(self.keys.lock(a));
    }

    /// A new task's arguments, as `start_task.lua` lists them.
    fn task_args(
        &self,
        inv: &mut redis::ScriptInvocation<'_>,
        task: &Task,
    ) -> Result<(), StoreError> {
        let (t, a) = (task.id.as_str(), task.agent.as_str());
        let delegator = task.delegated_by.last().map_or("", |d| d.as_str());
        inv.arg(t)
            .arg(encode(task)?)
            .arg(encode(&task.new_lease())?)
            .arg(a)
            .arg(task.expires_at.as_millis())
            .arg(self.keep_until(task.expires_at))
            .arg(member(t, t, a))
            .arg(task.parent.as_ref().map_or("", |p| p.as_str()))
            .arg(delegator)
            .arg(task.created_at.as_millis())
            .arg((self.retention + TTL_MARGIN).as_millis() as u64);
        Ok(())
    }

    fn keep_until(&self, expires: Timestamp) -> u64 {
        expires.plus(self.retention).plus(TTL_MARGIN).as_millis()
    }
}

#[async_trait]
impl TaskStore for RedisStore {
    async fn start_task(&self, task: &Task) -> Result<(), StoreError> {
        leases::start_task(self, task).await
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        leases::get_task(self, id).await
    }

    async fn end_task(&self, id: &TaskId, req: &RevokeRequest) -> Result<Vec<LeaseId>, StoreError> {
        leases::end_task(self, id, req).await
    }

    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        page: &PageRequest,
        now: Timestamp,
    ) -> Result<Page<TaskRecord>, StoreError> {
        listing::list_tasks(self, filter, page, now).await
    }

    async fn update_task_context(
        &self,
        id: &TaskId,
        agent: &SpiffeId,
        context: &TaskContext,
        now: Timestamp,
    ) -> Result<Task, StoreError> {
        leases::update_task_context(self, id, agent, context, now).await
    }
}

#[async_trait]
impl CredentialStore for RedisStore {
    async fn issue(&self, lease: &Lease, now: Timestamp) -> Result<(), StoreError> {
        leases::issue(self, lease, now).await
    }

    async fn get_lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError> {
        leases::get_lease(self, id).await
    }

    async fn revoke_lease(
        &self,
        id: &LeaseId,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError> {
        leases::revoke_lease(self, id, req).await
    }

    async fn list_leases(
        &self,
        filter: &LeaseFilter,
        page: &PageRequest,
        now: Timestamp,
    ) -> Result<Page<Lease>, StoreError> {
        listing::list_leases(self, filter, page, now).await
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

#[async_trait]
impl AgentStore for RedisStore {
    async fn revoke_agent(
        &self,
        agent: &SpiffeId,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError> {
        agents::revoke_agent(self, agent, req).await
    }

    async fn lock_agent(
        &self,
        lock: &AgentLock,
        req: &RevokeRequest,
    ) -> Result<Vec<LeaseId>, StoreError> {
        agents::lock_agent(self, lock, req).await
    }

    async fn unlock_agent(
        &self,
        agent: &SpiffeId,
        now: Timestamp,
    ) -> Result<Option<AgentLock>, StoreError> {
        agents::unlock_agent(self, agent, now).await
    }

    async fn agent_lock(
        &self,
        agent: &SpiffeId,
        now: Timestamp,
    ) -> Result<Option<AgentLock>, StoreError> {
        agents::agent_lock(self, agent, now).await
    }

    async fn list_locks(&self, now: Timestamp) -> Result<Vec<AgentLock>, StoreError> {
        agents::list_locks(self, now).await
    }
}

#[async_trait]
impl ApprovalStore for RedisStore {
    async fn create_approval(&self, a: &Approval) -> Result<(), StoreError> {
        approvals::create_approval(self, a).await
    }

    async fn get_approval(&self, id: &ApprovalId) -> Result<Option<Approval>, StoreError> {
        approvals::get_approval(self, id).await
    }

    async fn list_approvals(
        &self,
        pending_only: bool,
        page: &PageRequest,
        now: Timestamp,
    ) -> Result<Page<Approval>, StoreError> {
        approvals::list_approvals(self, pending_only, page, now).await
    }

    async fn decide_approval(
        &self,
        id: &ApprovalId,
        decision: ApprovalStatus,
        now: Timestamp,
    ) -> Result<Approval, StoreError> {
        approvals::decide_approval(self, id, decision, now).await
    }

    async fn consume_approval(
        &self,
        id: &ApprovalId,
        agent: &SpiffeId,
        task: &TaskId,
        request: &ApprovalRequest,
        now: Timestamp,
    ) -> Result<Approval, StoreError> {
        approvals::consume_approval(self, id, agent, task, request, now).await
    }
}

#[async_trait]
impl RevocationLog for RedisStore {
    async fn feed_head(&self) -> Result<u64, StoreError> {
        feed::feed_head(self).await
    }

    async fn revocations_since(
        &self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<RevocationEvent>, StoreError> {
        feed::revocations_since(self, cursor, limit).await
    }
}

#[async_trait]
impl RecordStore for RedisStore {
    async fn record(&self, batch: &RecordBatch<'_>) -> Vec<Result<(), RecordError>> {
        self.record_batch(batch).await
    }

    fn trail(&self) -> Arc<dyn AuditSink> {
        match &self.trail {
            Trail::Own(own) => own.clone(),
            Trail::Outside(trail) => trail.clone(),
        }
    }
}

#[async_trait]
impl ReplayGuard for RedisStore {
    async fn first_use(
        &self,
        key: &str,
        until: Timestamp,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        if until <= now {
            // Lapsed already: nothing to hold it against.
            return Ok(true);
        }
        let k = self.keys.seen(key);
        let replicas = self.replicas_to_ack;
        // SET NX with an absolute expiry: set means first use. Sent once:
        // a retry after a lost reply would find its own key and refuse,
        // which fails closed.
        let (set, acked): (Option<String>, u32) = self
            .conn
            .run(|mut c| {
                let k = k.clone();
                async move {
                    let set: Option<String> = redis::cmd("SET")
                        .arg(&k)
                        .arg(1)
                        .arg("NX")
                        .arg("PXAT")
                        .arg(until.as_millis())
                        .query_async(&mut c)
                        .await?;
                    let acked = if replicas > 0 && set.is_some() {
                        redis::cmd("WAIT")
                            .arg(replicas)
                            .arg(REPLICA_WAIT.as_millis() as u64)
                            .query_async(&mut c)
                            .await?
                    } else {
                        replicas
                    };
                    Ok((set, acked))
                }
            })
            .await?;
        if acked < replicas {
            return Err(StoreError::Unavailable(Cause::msg(format!(
                "write reached {acked} of {replicas} required replicas"
            ))));
        }
        Ok(set.is_some())
    }
}

#[async_trait]
impl LoginQueue for RedisStore {
    async fn hold_login(&self, login: &HeldLogin) -> Result<(), StoreError> {
        let (k, field, value) = (
            self.keys.logins(),
            login.lease_id.to_string(),
            encode(login)?,
        );
        let replicas = self.replicas_to_ack;
        let acked: u32 = self
            .conn
            .run(|mut c| {
                let (k, field, value) = (k.clone(), field.clone(), value.clone());
                async move {
                    let () = redis::cmd("HSET")
                        .arg(&k)
                        .arg(&field)
                        .arg(&value)
                        .query_async(&mut c)
                        .await
                        .map(|_: u32| ())?;
                    if replicas == 0 {
                        return Ok(0);
                    }
                    redis::cmd("WAIT")
                        .arg(replicas)
                        .arg(REPLICA_WAIT.as_millis() as u64)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        if acked < replicas {
            return Err(StoreError::Unavailable(Cause::msg(format!(
                "write reached {acked} of {replicas} required replicas"
            ))));
        }
        Ok(())
    }

    async fn held_logins(&self) -> Result<Vec<HeldLogin>, StoreError> {
        let k = self.keys.logins();
        let all: Vec<(String, String)> = self
            .conn
            .run(|mut c| {
                let k = k.clone();
                async move { redis::cmd("HGETALL").arg(&k).query_async(&mut c).await }
            })
            .await?;
        let mut out = all
            .iter()
            .map(|(_, v)| decode::<HeldLogin>(v))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| a.lease_id.as_str().cmp(b.lease_id.as_str()));
        Ok(out)
    }

    async fn is_held(&self, lease_id: &LeaseId) -> Result<bool, StoreError> {
        let (k, field) = (self.keys.logins(), lease_id.to_string());
        let held: bool = self
            .conn
            .run(|mut c| {
                let (k, field) = (k.clone(), field.clone());
                async move {
                    redis::cmd("HEXISTS")
                        .arg(&k)
                        .arg(&field)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(held)
    }

    async fn release_login(&self, lease_id: &LeaseId) -> Result<(), StoreError> {
        let (k, field) = (self.keys.logins(), lease_id.to_string());
        self.conn
            .run(|mut c| {
                let (k, field) = (k.clone(), field.clone());
                async move {
                    redis::cmd("HDEL")
                        .arg(&k)
                        .arg(&field)
                        .query_async(&mut c)
                        .await
                        .map(|_: u32| ())
                }
            })
            .await?;
        Ok(())
    }
}

impl RedisStore {
    /// `HGET key field`.
    async fn hget(&self, key: String, field: &str) -> Result<Option<String>, StoreError> {
        let field = field.to_owned();
        Ok(self
            .conn
            .run(|mut c| {
                let (k, f) = (key.clone(), field.clone());
                async move { redis::cmd("HGET").arg(&k).arg(&f).query_async(&mut c).await }
            })
            .await?)
    }

    /// `HSET key field value`.
    async fn hset(&self, key: String, field: &str, value: &str) -> Result<(), StoreError> {
        let (field, value) = (field.to_owned(), value.to_owned());
        self.conn
            .run(|mut c| {
                let (k, f, v) = (key.clone(), field.clone(), value.clone());
                async move {
                    redis::cmd("HSET")
                        .arg(&k)
                        .arg(&f)
                        .arg(&v)
                        .query_async(&mut c)
                        .await
                        .map(|_: u32| ())
                }
            })
            .await?;
        Ok(())
    }
}

#[async_trait]
impl SignalStreams for RedisStore {
    async fn put_stream(&self, id: &str, body: &str) -> Result<(), StoreError> {
        self.hset(self.keys.ssf_streams(), id, body).await
    }

    async fn get_stream(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.hget(self.keys.ssf_streams(), id).await
    }

    async fn all_streams(&self) -> Result<Vec<String>, StoreError> {
        let k = self.keys.ssf_streams();
        Ok(self
            .conn
            .run(|mut c| {
                let k = k.clone();
                async move { redis::cmd("HVALS").arg(&k).query_async(&mut c).await }
            })
            .await?)
    }

    async fn delete_stream(&self, id: &str) -> Result<(), StoreError> {
        let (streams, progress, id) = (
            self.keys.ssf_streams(),
            self.keys.ssf_progress(),
            id.to_owned(),
        );
        self.conn
            .run(|mut c| {
                let (s, p, id) = (streams.clone(), progress.clone(), id.clone());
                async move {
                    redis::pipe()
                        .atomic()
                        .hdel(&s, &id)
                        .hdel(&p, &id)
                        .query_async(&mut c)
                        .await
                        .map(|_: (u32, u32)| ())
                }
            })
            .await?;
        Ok(())
    }

    async fn stream_progress(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.hget(self.keys.ssf_progress(), id).await
    }

    async fn save_stream_progress(&self, id: &str, body: &str) -> Result<(), StoreError> {
        self.hset(self.keys.ssf_progress(), id, body).await
    }
}

/// GCRA on the Redis server's clock: a key per agent holding the
/// theoretical arrival time of its next issuance (microseconds), which
/// every replica moves, so the limit is the agent's whatever replica it
/// calls. One script call; the key expires once the bucket is full again.
const TAKE_RATE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local emission = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local next_tat = tat + emission
if next_tat - now > tolerance then
  return next_tat - now - tolerance
end
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return 0
";

#[async_trait]
impl RateLimits for RedisStore {
    async fn take_rate(
        &self,
        agent: &SpiffeId,
        per_second: f64,
        burst: f64,
    ) -> Result<RateTaken, StoreError> {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(TAKE_RATE));
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let emission = (1e6 / per_second).ceil().max(1.0) as u64;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let tolerance = (emission as f64 * burst.max(1.0)) as u64;
        let key = self.keys.rate(agent.as_str());
        let wait_us: u64 = self
            .conn
            .run(|mut c| {
                let key = key.clone();
                async move {
                    SCRIPT
                        .key(&key)
                        .arg(emission)
                        .arg(tolerance)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(if wait_us == 0 {
            RateTaken::Allowed
        } else {
            RateTaken::Wait(Duration::from_micros(wait_us))
        })
    }
}

/// Indexes come from one counter (`INCRBY`). A failover that loses the
/// last reservations can hand an index out again; two tokens then share
/// a bit, and revoking either marks both revoked: it fails closed.
#[async_trait]
impl StatusIndexes for RedisStore {
    async fn reserve_status_indexes(&self, count: u64) -> Result<u64, StoreError> {
        let k = self.keys.status_indexes();
        let end: u64 = self
            .conn
            .run(|mut c| {
                let k = k.clone();
                async move {
                    redis::cmd("INCRBY")
                        .arg(&k)
                        .arg(count)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(end.saturating_sub(count))
    }

    async fn status_indexes_reserved(&self) -> Result<u64, StoreError> {
        let k = self.keys.status_indexes();
        let n: Option<u64> = self
            .conn
            .run(|mut c| {
                let k = k.clone();
                async move { redis::cmd("GET").arg(&k).query_async(&mut c).await }
            })
            .await?;
        Ok(n.unwrap_or(0))
    }
}

#[async_trait]
impl Upkeep for RedisStore {
    async fn reap(
        &self,
        now: Timestamp,
        retention: Duration,
        limit: usize,
    ) -> Result<ReapOutcome, StoreError> {
        reap::reap(self, now, retention, limit).await
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
}
