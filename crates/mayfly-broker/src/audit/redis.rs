//! The Redis sink, for replicas sharing one Redis: one stream
//! (`<prefix>:audit`, field `r` holding the line) and its head
//! (`<prefix>:audit:head`: `seq`, `hash`). A batch is appended only if the
//! head is still the one it was chained onto; otherwise another replica
//! wrote first, and the batch is chained again onto the new head. So all
//! replicas write one chain.

use async_trait::async_trait;
use redis::Script;
use redis::streams::StreamRangeReply;
use tokio::sync::Mutex;

use super::{AuditError, AuditRecord, AuditSink, Head, chain};
use crate::store::{RedisConn, RedisTarget};

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

/// Appends to the shared stream.
pub struct RedisSink {
    conn: RedisConn,
    stream: String,
    head_key: String,
    script: Script,
    /// The head as last seen; `None` until first use.
    head: Mutex<Option<Head>>,
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
        })
    }
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
            let reply: Vec<String> = self
                .conn
                .run(|mut c| async move { inv.invoke_async(&mut c).await })
                .await
                .map_err(|e| AuditError::Failed(e.to_string()))?;
            match reply.as_slice() {
                [ok] if ok == "OK" => {
                    *cached = Some(next);
                    return Ok(());
                }
                [stale, seq, hash] if stale == "STALE" => {
                    let seq = seq
                        .parse()
                        .map_err(|_| AuditError::Failed(format!("bad audit head seq {seq:?}")))?;
                    *cached = Some(Head {
                        seq,
                        hash: hash.clone(),
                    });
                }
                other => {
                    return Err(AuditError::Failed(format!(
                        "unexpected audit script reply {other:?}"
                    )));
                }
            }
        }
        Err(AuditError::Failed(
            "the audit head kept moving; other replicas are writing too fast".into(),
        ))
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
