//! The Redis sink, for replicas sharing one Redis: one stream
//! (`<prefix>:audit`, field `r` holding the line) and its head
//! (`<prefix>:audit:head`: `seq`, `hash`). A batch is appended only if the
//! head is still the one it was chained onto; otherwise another replica
//! wrote first, and the batch is chained again onto the new head. So all
//! replicas write one chain.
//!
//! It is the Redis store's own trail, on the store's connection: the store
//! writes leases in the same script as their records, through
//! [`RedisSink::append_via`] (`recorded.rs`); this sink only chains the
//! lines and keeps the head. [`RedisSink::new`] opens one on its own
//! connection, to read a trail or to write beside a store.
//!
//! With a retention ([`RedisSink::with_retention`]), entries older than it
//! are trimmed (`XTRIM … MINID`, the stream's ids being milliseconds), at
//! most once a minute, after a write. The head stays, so the chain goes
//! on; a reader then starts at the oldest entry kept.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use redis::Script;
use redis::streams::StreamRangeReply;
use tokio::sync::Mutex;

use crate::audit::{AuditError, AuditRecord, AuditSink, Head, chain};
use crate::cause::Cause;
use crate::redis_conn::{RedisConn, RedisTarget, Towards, Unreachable};

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

impl From<Unreachable> for AuditError {
    fn from(e: Unreachable) -> Self {
        Self::Failed(e.0)
    }
}

/// Appends to the shared stream.
pub struct RedisSink {
    conn: Arc<RedisConn>,
    stream: String,
    head_key: String,
    script: Script,
    /// The head as last seen; `None` until first use.
    head: Mutex<Option<Head>>,
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

/// A batch chained onto a head, as a script writes it.
#[derive(Debug)]
pub(super) struct Chained<'a> {
    /// The trail's stream key.
    pub stream: &'a str,
    /// The key of the trail's head (`seq`, `hash`).
    pub head_key: &'a str,
    /// The head the lines were chained onto.
    pub expected: &'a Head,
    /// The head after them.
    pub next: &'a Head,
    /// The lines, in order.
    pub lines: &'a [String],
}

/// What one write of a [`Chained`] batch did.
#[derive(Debug)]
pub(super) enum Wrote<T> {
    /// Wrote everything.
    All,
    /// Wrote nothing: the head is this one (another writer moved it, or
    /// an earlier send of this very batch did).
    Stale(Head),
    /// Wrote nothing, for the writer's own reason.
    Nothing(T),
}

/// A script that writes a [`Chained`] batch (its lines, and maybe more).
pub(super) trait WriteChained: Sync {
    /// Why it may write nothing, besides a moved head.
    type Refusal: Send;
    /// How it fails.
    type Error: From<AuditError> + Send;

    /// Runs once (sent twice at most, after a lost connection: the second
    /// value says so).
    fn write(
        &self,
        batch: &Chained<'_>,
    ) -> impl Future<Output = Result<(Wrote<Self::Refusal>, bool), Self::Error>> + Send;
}

/// The sink's own script: the lines, nothing else.
struct AppendLines<'a>(&'a RedisSink);

impl WriteChained for AppendLines<'_> {
    type Refusal = std::convert::Infallible;
    type Error = AuditError;

    async fn write(&self, batch: &Chained<'_>) -> Result<(Wrote<Self::Refusal>, bool), AuditError> {
        let mut inv = self.0.script.prepare_invoke();
        inv.key(batch.stream)
            .key(batch.head_key)
            .arg(batch.expected.seq)
            .arg(&batch.expected.hash)
            .arg(batch.next.seq)
            .arg(&batch.next.hash);
        for line in batch.lines {
            inv.arg(line);
        }
        // Safe to send again: a run after a lost reply finds the head
        // moved, and `append_via` tells whether by this batch.
        let inv = &inv;
        let (reply, twice): (Vec<String>, bool) = self
            .0
            .conn
            .run_repeatable(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        let wrote = match reply.as_slice() {
            [ok] if ok == "OK" => Wrote::All,
            [stale, seq, hash] if stale == "STALE" => Wrote::Stale(stale_head(seq, hash)?),
            other => {
                return Err(AuditError::Failed(Cause::msg(format!(
                    "unexpected audit script reply {other:?}"
                ))));
            }
        };
        Ok((wrote, twice))
    }
}

impl RedisSink {
    /// The trail under `prefix` on `target`, on its own connection;
    /// nothing is dialled yet.
    pub fn new(target: RedisTarget, prefix: &str) -> Result<Self, AuditError> {
        Ok(Self::sharing(Arc::new(RedisConn::new(target)?), prefix))
    }

    /// The trail under `prefix` on an existing connection.
    pub(super) fn sharing(conn: Arc<RedisConn>, prefix: &str) -> Self {
        Self {
            conn,
            stream: format!("{prefix}:audit"),
            head_key: format!("{prefix}:audit:head"),
            script: Script::new(APPEND),
            head: Mutex::new(None),
            retention: None,
            trimmed_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Trims entries older than `retention` (none: keeps everything).
    pub fn with_retention(mut self, retention: Option<std::time::Duration>) -> Self {
        self.retention = retention;
        self
    }

    /// Chains `records` onto the head and hands them to `writer`, until
    /// it writes them, or nothing for its own reason; when another writer
    /// moved the head, they are chained again onto the new one. A stale
    /// answer after a second send may be this very batch, written by the
    /// first send and followed by another writer's:
    /// [`written_before`](Self::written_before) tells. `Ok(None)`: written;
    /// `Ok(Some(why))`: the writer's refusal.
    pub(super) async fn append_via<W: WriteChained>(
        &self,
        records: &[AuditRecord],
        writer: &W,
    ) -> Result<Option<W::Refusal>, W::Error> {
        let mut cached = self.head.lock().await;
        for _ in 0..ATTEMPTS {
            let head = cached.clone().unwrap_or_else(Head::genesis);
            let (lines, next) = chain(records, &head).map_err(AuditError::from)?;
            let batch = Chained {
                stream: &self.stream,
                head_key: &self.head_key,
                expected: &head,
                next: &next,
                lines: &lines,
            };
            match writer.write(&batch).await? {
                (Wrote::All, _) => {}
                // The head is where this batch leaves it: only its lines
                // hash to it, so an earlier send of it wrote everything.
                (Wrote::Stale(now), _) if now == next => {}
                (Wrote::Stale(now), twice) => {
                    let ours = twice && self.written_before(&head, &lines, &now).await?;
                    *cached = Some(now);
                    if ours {
                        return Ok(None);
                    }
                    continue;
                }
                (Wrote::Nothing(why), _) => return Ok(Some(why)),
            }
            *cached = Some(next);
            drop(cached);
            self.trim().await;
            return Ok(None);
        }
        Err(AuditError::Failed(Cause::msg(
            "the audit head kept moving; other replicas are writing too fast",
        ))
        .into())
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
            return Err(AuditError::Failed(Cause::msg(format!(
                "cannot tell whether a batch was written: the head moved {behind} records on"
            ))));
        }
        let reply: StreamRangeReply = self
            .conn
            .stream_range(&self.stream, Towards::Older, ("+", "-"), behind as usize)
            .await?;
        Ok(reply
            .ids
            .iter()
            .any(|e| e.get::<String>("r").as_deref() == Some(first.as_str())))
    }
}

/// The head a `STALE` reply names.
pub(super) fn stale_head(seq: &str, hash: &str) -> Result<Head, AuditError> {
    let seq = seq
        .parse()
        .map_err(|_| AuditError::Failed(Cause::msg(format!("bad audit head seq {seq:?}"))))?;
    Ok(Head {
        seq,
        hash: hash.to_owned(),
    })
}

#[async_trait]
impl AuditSink for RedisSink {
    async fn append(&self, records: &[AuditRecord]) -> Result<(), AuditError> {
        let written = self.append_via(records, &AppendLines(self)).await?;
        match written {
            None => Ok(()),
            Some(never) => match never {},
        }
    }

    async fn read(&self, cursor: &str, limit: usize) -> Result<(Vec<String>, String), AuditError> {
        let start = if cursor.is_empty() {
            "-".to_owned()
        } else if is_stream_id(cursor) {
            format!("({cursor}")
        } else {
            return Err(AuditError::BadCursor(cursor.to_owned()));
        };
        let reply: StreamRangeReply = self
            .conn
            .stream_range(&self.stream, Towards::Newer, (&start, "+"), limit)
            .await?;
        let mut next = cursor.to_owned();
        let mut lines = Vec::with_capacity(reply.ids.len());
        for entry in reply.ids {
            let line: Option<String> = entry.get("r");
            lines.push(line.ok_or_else(|| {
                AuditError::Failed(Cause::msg(format!(
                    "audit stream entry {} has no record",
                    entry.id
                )))
            })?);
            next = entry.id;
        }
        Ok((lines, next))
    }

    async fn cursor_before_last(&self, n: usize) -> Result<String, AuditError> {
        let reply: StreamRangeReply = self
            .conn
            .stream_range(&self.stream, Towards::Older, ("+", "-"), n + 1)
            .await?;
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
