//! Credential leases recorded together with their audit records, in one
//! script (`issue_recorded.lua`): when the audit trail lives in the same
//! Redis (`[audit] sink = "redis"`, the default with this store), an issue
//! costs one round trip instead of two, and a lease and its record can
//! never exist one without the other. The trail's chaining (heads, lines)
//! stays the audit sink's job; this only writes what it is given.

use mayfly_core::{Lease, Timestamp};

use super::{RedisStore, script_status};
use crate::store::StoreError;

/// The audit side of a batch, chained by the caller onto `expected`.
#[derive(Debug)]
pub struct TrailBatch<'a> {
    /// The trail's stream key.
    pub stream: &'a str,
    /// The key of the trail's head (`seq`, `hash`).
    pub head_key: &'a str,
    /// The head the lines were chained onto: `(seq, hash)`.
    pub expected: (u64, &'a str),
    /// The head after them.
    pub next: (u64, &'a str),
    /// The lines, in order.
    pub lines: &'a [String],
}

/// What became of a batch.
#[derive(Debug)]
pub enum BatchOutcome {
    /// Every lease and line was written.
    Written,
    /// Nothing was written: another writer moved the head to this one.
    Stale {
        /// The head's `seq`.
        seq: u64,
        /// The head's hash.
        hash: String,
    },
    /// Nothing was written: these leases (by index) may not be recorded.
    Refused(Vec<(usize, StoreError)>),
    /// Nothing was written: this key of the trail or an index has the
    /// wrong type (someone wrote to it from outside).
    Broken(String),
}

impl RedisStore {
    /// Writes `leases` (each with the time its decision was made) and the
    /// trail's `batch` in one atomic step, or nothing. The second value says
    /// the script was sent twice (its connection failed under the first
    /// send, which may have run): a `Stale` answer then may be this very
    /// batch, written by the first send and followed by another writer's.
    pub async fn issue_recorded(
        &self,
        leases: &[(&Lease, Timestamp)],
        batch: &TrailBatch<'_>,
    ) -> Result<(BatchOutcome, bool), StoreError> {
        let mut inv = self.scripts.issue_recorded.prepare_invoke();
        inv.key(batch.stream)
            .key(batch.head_key)
            .key(self.keys.lease_tasks())
            .key(self.keys.expiry())
            .arg(batch.expected.0)
            .arg(batch.expected.1)
            .arg(batch.next.0)
            .arg(batch.next.1)
            .arg(batch.lines.len());
        for line in batch.lines {
            inv.arg(line);
        }
        for (lease, now) in leases {
            let (t, l) = (lease.task_id.as_str(), lease.id.as_str());
            inv.key(self.keys.task(t))
                .key(self.keys.lease(t, t))
                .key(self.keys.task_leases(t))
                .key(self.keys.lease(t, l))
                .key(self.keys.lock(lease.agent.as_str()));
            self.lease_args(&mut inv, lease, *now)?;
        }
        // Safe to send again: a run after a lost reply finds the head moved
        // (at the batch's own `next`, which `outcome` reads as written, or
        // beyond it, which the caller checks), never writes twice.
        let (reply, twice): (Vec<String>, bool) =
            self.invoke_repeatable(&inv, super::Repeat::Safe).await?;
        Ok((outcome(&reply, leases, batch)?, twice))
    }
}

/// Reads the script's reply.
fn outcome(
    reply: &[String],
    leases: &[(&Lease, Timestamp)],
    batch: &TrailBatch<'_>,
) -> Result<BatchOutcome, StoreError> {
    let bad = || StoreError::Corrupt(format!("unexpected script reply {reply:?}"));
    match reply {
        [ok] if ok == "OK" => Ok(BatchOutcome::Written),
        // The head is where this batch leaves it: only this batch's lines
        // hash to it, so an earlier run of the same call wrote everything.
        [stale, seq, hash]
            if stale == "STALE" && seq.parse() == Ok(batch.next.0) && hash == batch.next.1 =>
        {
            Ok(BatchOutcome::Written)
        }
        [stale, seq, hash] if stale == "STALE" => Ok(BatchOutcome::Stale {
            seq: seq.parse().map_err(|_| bad())?,
            hash: hash.clone(),
        }),
        [broken, key] if broken == "BROKEN" => Ok(BatchOutcome::Broken(key.clone())),
        [refused, rest @ ..] if refused == "REFUSED" && rest.len() % 2 == 0 => {
            let mut out = Vec::with_capacity(rest.len() / 2);
            for pair in rest.chunks(2) {
                let i: usize = pair[0].parse().map_err(|_| bad())?;
                let lease = i
                    .checked_sub(1)
                    .and_then(|i| leases.get(i))
                    .ok_or_else(bad)?
                    .0;
                let e = match script_status(&pair[1]) {
                    Err(StoreError::Duplicate(_)) => StoreError::Duplicate(lease.id.to_string()),
                    Err(e) => e,
                    Ok(()) => return Err(bad()),
                };
                out.push((i - 1, e));
            }
            Ok(BatchOutcome::Refused(out))
        }
        _ => Err(bad()),
    }
}
