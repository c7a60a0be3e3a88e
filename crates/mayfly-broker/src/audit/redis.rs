//! The Redis sink, for replicas sharing one Redis: one stream
//! (`<prefix>:audit`, field `r` holding the line) and its head
//! (`<prefix>:audit:head`: `seq`, `hash`). A batch is appended only if the
//! head is still the one it was chained onto; otherwise another replica
//! wrote first, and the batch is chained again onto the new head. So all
//! replicas write one chain.
//!
//! Given the store ([`RedisSink::with_store`]), a batch that holds
//! credential leases is written together with them in one script of the
//! store's (`issue_recorded.lua`), which checks the head the same way.
//!
//! With a retention ([`RedisSink::with_retention`]), entries older than it
//! are trimmed (`XTRIM … MINID`, the stream's ids being milliseconds), at
//! most once a minute, after a write. The head stays, so the chain goes
//! on; a reader then starts at the oldest entry kept.

use std::sync::Arc;

use async_trait::async_trait;
use redis::Script;
use redis::streams::StreamRangeReply;
use tokio::sync::Mutex;

use super::{AuditError, AuditRecord, AuditSink, Head, LeaseBatchError, LeaseWrite, chain};
use crate::store::{BatchOutcome, RedisConn, RedisStore, RedisTarget, StoreError, TrailBatch};

/// Appends a chained batch if the head has not moved.
/// KEYS: 1 stream, 2 head hash. ARGV: 1 expected seq, 2 expected hash,
/// 3 new seq, 4 new hash, 5.. the lines.
const APPEND: &str = r"
local h = redis.call('HMGET', KEYS[2], 'seq', 'hash')
local seq = h[1] or '0'
local hash = h[2] or string.rep('0', 64)
if seq ~= ARGV[1] or hash ~= ARGV[2] then return {'STALE', seq, hash} end
for i = 5, #ARGV do redis.call('XADD', KEYS[1], '*', 'r', ARGV[i]) end
redis.call('HSET', KEYS[2], 'seq', ARGV[3], 'hash', ARGV[4])
return {'OK'}
";

/// How often a batch is chained again when other replicas keep writing.
const ATTEMPTS: usize = 16;
/// The stream is trimmed at most this often.
const TRIM_EVERY_MS: u64 = 60_000;

/// Appends to the shared stream.
pub struct RedisSink {
    conn: RedisConn,
    stream: String,
    head_key: String,
    script: Script,
    /// The head as last seen; `None` until first use.
    head: Mutex<Option<Head>>,
    /// The lease store in the same Redis, which records credential leases
    /// in the same step as their records.
    store: Option<Arc<RedisStore>>,
    /// Entries older than this are trimmed; `None` keeps them all.
    retention: Option<std::time::Duration>,
    /// When the stream was last trimmed (ms since the epoch).
    trimmed_ms: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink")
            .field("stream", &self.stream)
            .finish()
    }
}

impl RedisSink {
    /// The trail under `prefix` on `target`; nothing is dialled yet.
    pub fn new(target: RedisTarget, prefix: &str) -> Result<Self, AuditError> {
        Ok(Self {
            conn: RedisConn::new(target).map_err(|e| AuditError::Failed(e.to_string()))?,
            stream: format!("{prefix}:audit"),
            head_key: format!("{prefix}:audit:head"),
            script: Script::new(APPEND),
            head: Mutex::new(None),
            store: None,
            retention: None,
            trimmed_ms: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Trims entries older than `retention` (none: keeps everything).
    pub fn with_retention(mut self, retention: Option<std::time::Duration>) -> Self {
        self.retention = retention;
        self
    }

    /// Trims the stream if a retention is set and a minute has passed
    /// since the last trim. A failure is logged: the records stay.
    async fn trim(&self) {
        use std::sync::atomic::Ordering;
        let Some(keep) = self.retention else {
            return;
        };
        let now = mayfly_core::Timestamp::now().as_millis();
        let last = self.trimmed_ms.load(Ordering::Acquire);
        if now.saturating_sub(last) < TRIM_EVERY_MS
            || self
                .trimmed_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let min_id = now.saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX));
        let key = &self.stream;
        let trimmed = self
            .conn
            .run_idempotent(|mut c| async move {
                redis::cmd("XTRIM")
                    .arg(key)
                    .arg("MINID")
                    .arg(min_id)
                    .query_async::<u64>(&mut c)
                    .await
            })
            .await;
        match trimmed {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, "audit stream entries past retention trimmed"),
            Err(e) => tracing::warn!(error = %e, "audit stream not trimmed"),
        }
    }

    /// Records credential leases through `store` (the same Redis and key
    /// prefix) in the same step as their records.
    pub fn with_store(mut self, store: Arc<RedisStore>) -> Self {
        self.store = Some(store);
        self
    }
}

/// Most records looked back through to find whether a batch sent twice
/// was written by its first send; beyond it the batch counts as unwritten
/// and the request fails (nothing handed out).
const LOOK_BACK: u64 = 10_000;

impl RedisSink {
    /// Whether `lines`, chained onto `expected`, are already in the stream
    /// whose head is now `now`: a send whose reply was lost may have written
    /// them, and other writers may have appended after it. The first line
    /// holds its `seq` and `prev`, so only this batch can have put it there.
    async fn written_before(
        &self,
        expected: &Head,
        lines: &[String],
        now: &Head,
    ) -> Result<bool, AuditError> {
        let Some(first) = lines.first() else {
            return Ok(false);
        };
        let behind = now.seq.saturating_sub(expected.seq);
        if behind == 0 {
            return Ok(false);
        }
        if behind > LOOK_BACK {
            return Err(AuditError::Failed(format!(
                "cannot tell whether a batch was written: the head moved {behind} records on"
            )));
        }
        let key = &self.stream;
        let reply: StreamRangeReply = self
            .conn
            .run_idempotent(|mut c| async move {
                redis::cmd("XREVRANGE")
                    .arg(key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(behind)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(|e| AuditError::Failed(e.to_string()))?;
        Ok(reply
            .ids
            .iter()
            .any(|e| e.get::<String>("r").as_deref() == Some(first.as_str())))
    }
}

/// The head a `STALE` reply names.
fn stale_head(seq: &str, hash: &str) -> Result<Head, AuditError> {
    let seq = seq
        .parse()
        .map_err(|_| AuditError::Failed(format!("bad audit head seq {seq:?}")))?;
    Ok(Head {
        seq,
        hash: hash.to_owned(),
    })
}

fn moving() -> AuditError {
    AuditError::Failed("the audit head kept moving; other replicas are writing too fast".into())
}

#[async_trait]
impl AuditSink for RedisSink {
    async fn append(&self, records: &[AuditRecord]) -> Result<(), AuditError> {
        let mut cached = self.head.lock().await;
        for _ in 0..ATTEMPTS {
            let head = cached.clone().unwrap_or_else(Head::genesis);
            let (lines, next) = chain(records, &head)?;
            let mut inv = self.script.prepare_invoke();
            inv.key(&self.stream)
                .key(&self.head_key)
                .arg(head.seq)
                .arg(&head.hash)
                .arg(next.seq)
                .arg(&next.hash);
            for line in &lines {
                inv.arg(line);
            }
            // Safe to send again: a run after a lost reply finds the head
            // moved, and `written_before` tells whether by this batch.
            let inv = &inv;
            let (reply, twice): (Vec<String>, bool) = self
                .conn
                .run_repeatable(|mut c| async move { inv.invoke_async(&mut c).await })
                .await
                .map_err(|e| AuditError::Failed(e.to_string()))?;
            match reply.as_slice() {
                [ok] if ok == "OK" => {
                    *cached = Some(next);
                    drop(cached);
                    self.trim().await;
                    return Ok(());
                }
                [stale, seq, hash] if stale == "STALE" => {
                    let now = stale_head(seq, hash)?;
                    if twice && self.written_before(&head, &lines, &now).await? {
                        *cached = Some(now);
                        return Ok(());
                    }
                    *cached = Some(now);
                }
                other => {
                    return Err(AuditError::Failed(format!(
                        "unexpected audit script reply {other:?}"
                    )));
                }
            }
        }
        Err(moving())
    }

    fn records_leases(&self) -> bool {
        self.store.is_some()
    }

    async fn append_with_leases(
        &self,
        records: &[AuditRecord],
        leases: &[Option<LeaseWrite>],
    ) -> Result<(), LeaseBatchError> {
        let Some(store) = &self.store else {
            return Err(LeaseBatchError::Audit(super::not_in_store()));
        };
        // Leases by their place in the batch.
        let (places, writes): (Vec<usize>, Vec<_>) = leases
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.as_ref().map(|l| (i, (&l.lease, l.now))))
            .unzip();
        let mut cached = self.head.lock().await;
        for _ in 0..ATTEMPTS {
            let head = cached.clone().unwrap_or_else(Head::genesis);
            let (lines, next) =
                chain(records, &head).map_err(|e| LeaseBatchError::Audit(e.into()))?;
            let batch = TrailBatch {
                stream: &self.stream,
                head_key: &self.head_key,
                expected: (head.seq, &head.hash),
                next: (next.seq, &next.hash),
                lines: &lines,
            };
            match store.issue_recorded(&writes, &batch).await {
                Ok((BatchOutcome::Written, _)) => {
                    *cached = Some(next);
                    drop(cached);
                    self.trim().await;
                    return Ok(());
                }
                Ok((BatchOutcome::Stale { seq, hash }, twice)) => {
                    let now = Head { seq, hash };
                    let ours = twice
                        && self
                            .written_before(&head, &lines, &now)
                            .await
                            .map_err(LeaseBatchError::Audit)?;
                    *cached = Some(now);
                    if ours {
                        return Ok(());
                    }
                }
                Ok((BatchOutcome::Refused(refused), _)) => {
                    return Err(LeaseBatchError::Refused(
                        refused.into_iter().map(|(i, e)| (places[i], e)).collect(),
                    ));
                }
                Ok((BatchOutcome::Broken(key), _)) => {
                    return Err(LeaseBatchError::Audit(AuditError::Failed(format!(
                        "{key} has the wrong type; nothing was written"
                    ))));
                }
                Err(StoreError::Unavailable(m)) => return Err(LeaseBatchError::Unavailable(m)),
                Err(e) => return Err(LeaseBatchError::Audit(AuditError::Failed(e.to_string()))),
            }
        }
        Err(LeaseBatchError::Audit(moving()))
    }

    async fn read(&self, cursor: &str, limit: usize) -> Result<(Vec<String>, String), AuditError> {
        let start = if cursor.is_empty() {
            "-".to_owned()
        } else if is_stream_id(cursor) {
            format!("({cursor}")
        } else {
            return Err(AuditError::BadCursor(cursor.to_owned()));
        };
        let key = self.stream.clone();
        let reply: StreamRangeReply = self
            .conn
            .run(|mut c| async move {
                redis::cmd("XRANGE")
                    .arg(&key)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(|e| AuditError::Failed(e.to_string()))?;
        let mut next = cursor.to_owned();
        let mut lines = Vec::with_capacity(reply.ids.len());
        for entry in reply.ids {
            let line: Option<String> = entry.get("r");
            lines.push(line.ok_or_else(|| {
                AuditError::Failed(format!("audit stream entry {} has no record", entry.id))
            })?);
            next = entry.id;
        }
        Ok((lines, next))
    }

    async fn cursor_before_last(&self, n: usize) -> Result<String, AuditError> {
        let key = self.stream.clone();
        let reply: StreamRangeReply = self
            .conn
            .run(|mut c| async move {
                redis::cmd("XREVRANGE")
                    .arg(&key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(n + 1)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(|e| AuditError::Failed(e.to_string()))?;
        // The entry before the last n, or the start if there are no more.
        Ok(reply.ids.get(n).map(|e| e.id.clone()).unwrap_or_default())
    }
}

/// `<ms>-<seq>`, as Redis numbers stream entries.
fn is_stream_id(s: &str) -> bool {
    s.split_once('-').is_some_and(|(ms, seq)| {
        [ms, seq]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
    })
}
