//! [`LeaseStore::record`](crate::store::LeaseStore::record) on Redis. On
//! the store's own trail ([`RedisSink`], the default with this store) the
//! leases (credentials' and new tasks') and the records are one
//! script (`issue_recorded.lua`):
//! an issue costs one round trip, and a lease and its record can never
//! exist one without the other. The trail's chaining (heads, lines) stays
//! the sink's job ([`RedisSink::append_via`]); this only writes what it is
//! given. On any other trail (standard output, off; a file trail is
//! refused with this store at load), leases first, then records.

use crate::store::CredentialStore;
use crate::store::TaskStore;
use std::borrow::Cow;

use futures_util::future::join_all;
use mayfly_core::LeaseId;

use super::trail::{Chained, RedisSink, WriteChained, Wrote, stale_head};
use super::{RedisStore, Repeat, Trail, script_status};
use crate::audit::{AuditError, AuditRecord};
use crate::cause::Cause;
use crate::store::{
    LeaseThenRecord, LeaseWrite, RecordBatch, RecordError, RevokeRequest, StoreError,
    lease_then_record,
};

/// On a trail elsewhere: each lease its own script, all at once.
impl LeaseThenRecord for RedisStore {
    async fn issue_all(&self, writes: &[&LeaseWrite]) -> Vec<Result<(), StoreError>> {
        join_all(writes.iter().map(|w| async move {
            match w {
                LeaseWrite::Credential { lease, now } => self.issue(lease, *now).await,
                LeaseWrite::Task(task) => self.start_task(task).await,
            }
        }))
        .await
    }

    async fn undo_all(&self, ids: &[LeaseId], req: &RevokeRequest) -> Result<(), StoreError> {
        let done = join_all(ids.iter().map(|id| self.revoke_lease(id, req))).await;
        done.into_iter().find_map(Result::err).map_or(Ok(()), Err)
    }
}

/// Why a script wrote nothing, besides a moved head.
#[derive(Debug)]
enum Refusal {
    /// These leases (by their place among the batch's leases) may not be
    /// recorded.
    Leases(Vec<(usize, StoreError)>),
    /// The store could not be reached; nothing is known to be written.
    Unavailable(StoreError),
}

impl RedisStore {
    /// `record`, on the trail the store was built with.
    pub(super) async fn record_batch(
        &self,
        batch: &RecordBatch<'_>,
    ) -> Vec<Result<(), RecordError>> {
        match &self.trail {
            Trail::Own(own) => Box::pin(self.record_in_script(batch, own)).await,
            Trail::Outside(trail) => Box::pin(lease_then_record(self, batch, &**trail)).await,
        }
    }

    /// Leases and records in one script; a refused lease is answered and
    /// left out with its record, and the rest chained and sent again
    /// (nothing was written in between, so the chain goes on unbroken).
    async fn record_in_script(
        &self,
        batch: &RecordBatch<'_>,
        trail: &RedisSink,
    ) -> Vec<Result<(), RecordError>> {
        let mut out: Vec<Option<Result<(), RecordError>>> = vec![None; batch.records.len()];
        // The records still to write, by their place in the batch.
        let mut left: Vec<usize> = (0..batch.records.len()).collect();
        while !left.is_empty() {
            // The whole batch as it came, the first time round (the usual
            // case); a copy of what is left after a refusal.
            let records: Cow<'_, [AuditRecord]> = if left.len() == batch.records.len() {
                Cow::Borrowed(batch.records)
            } else {
                Cow::Owned(left.iter().map(|&i| batch.records[i].clone()).collect())
            };
            let leases: Vec<(usize, &LeaseWrite)> = left
                .iter()
                .filter_map(|&i| batch.leases[i].as_ref().map(|l| (i, l)))
                .collect();
            let script = IssueRecorded {
                store: self,
                leases: &leases,
            };
            let written = trail.append_via(&records, &script).await;
            match written {
                Ok(None) => {
                    // Leases and records are in Redis together: a crash
                    // here loses only the answer.
                    crate::store::after_commit(leases.iter().map(|(_, w)| *w));
                    for i in left.drain(..) {
                        out[i] = Some(Ok(()));
                    }
                }
                Ok(Some(Refusal::Leases(refused))) if !refused.is_empty() => {
                    for (j, e) in refused {
                        if let Some(&(i, _)) = leases.get(j) {
                            out[i] = Some(Err(RecordError::Store(e)));
                        }
                    }
                    left.retain(|&i| out[i].is_none());
                }
                Ok(Some(Refusal::Unavailable(e))) => {
                    // A record without a lease failed for its trail.
                    let audit = AuditError::Failed(Cause::of(e.clone()));
                    for i in left.drain(..) {
                        out[i] = Some(Err(match batch.leases[i] {
                            Some(_) => RecordError::Store(e.clone()),
                            None => RecordError::Audit(audit.clone()),
                        }));
                    }
                }
                Ok(Some(Refusal::Leases(_))) => {
                    let e = AuditError::Failed(Cause::msg(
                        "the store refused a batch without naming why",
                    ));
                    for i in left.drain(..) {
                        out[i] = Some(Err(RecordError::Audit(e.clone())));
                    }
                }
                Err(e) => {
                    for i in left.drain(..) {
                        out[i] = Some(Err(RecordError::Audit(e.clone())));
                    }
                }
            }
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Err(AuditError::Failed(Cause::msg("not recorded")).into()))
            })
            .collect()
    }
}

/// `issue_recorded.lua` for a batch's leases (each with its place in the
/// batch).
struct IssueRecorded<'a> {
    store: &'a RedisStore,
    leases: &'a [(usize, &'a LeaseWrite)],
}

impl WriteChained for IssueRecorded<'_> {
    type Refusal = Refusal;
    type Error = AuditError;

    /// One run: writes the leases and the chained lines, or nothing.
    async fn write(&self, batch: &Chained<'_>) -> Result<(Wrote<Refusal>, bool), AuditError> {
        let (store, leases) = (self.store, self.leases);
        let mut inv = store.scripts.issue_recorded.prepare_invoke();
        inv.key(batch.stream)
            .key(batch.head_key)
            .key(store.keys.lease_tasks())
            .key(store.keys.expiry())
            .arg(batch.expected.seq)
            .arg(&batch.expected.hash)
            .arg(batch.next.seq)
            .arg(&batch.next.hash)
            .arg(batch.lines.len());
        for line in batch.lines {
            inv.arg(line);
        }
        for (_, w) in leases {
            let args = match w {
                LeaseWrite::Credential { lease, now } => {
                    store.lease_keys(&mut inv, lease);
                    store.lease_args(inv.arg("L"), lease, *now)
                }
                LeaseWrite::Task(task) => {
                    store.task_keys(&mut inv, task);
                    store.task_args(inv.arg("T"), task)
                }
            };
            if let Err(e) = args {
                return Ok((Wrote::Nothing(Refusal::Unavailable(e)), false));
            }
        }
        // Safe to send again: a run after a lost reply finds the head moved
        // (at the batch's own `next`, which counts as written, or beyond
        // it, which `append_via` checks), never writes twice.
        let sent: Result<(Vec<String>, bool), StoreError> =
            store.invoke_repeatable(&inv, Repeat::Safe).await;
        let (reply, twice) = match sent {
            Ok(r) => r,
            Err(e) => return Ok((Wrote::Nothing(Refusal::Unavailable(e)), false)),
        };
        let ids: Vec<LeaseId> = leases.iter().map(|(_, w)| w.lease_id()).collect();
        Ok((outcome(&reply, &ids)?, twice))
    }
}

/// Reads the script's reply.
fn outcome(reply: &[String], leases: &[LeaseId]) -> Result<Wrote<Refusal>, AuditError> {
    let bad = || {
        AuditError::Failed(Cause::msg(format!(
            "unexpected audit script reply {reply:?}"
        )))
    };
    match reply {
        [ok] if ok == "OK" => Ok(Wrote::All),
        [stale, seq, hash] if stale == "STALE" => Ok(Wrote::Stale(stale_head(seq, hash)?)),
        [broken, key] if broken == "BROKEN" => Err(AuditError::Failed(Cause::msg(format!(
            "{key} has the wrong type; nothing was written"
        )))),
        [refused, rest @ ..] if refused == "REFUSED" && rest.len() % 2 == 0 => {
            let mut out = Vec::with_capacity(rest.len() / 2);
            for pair in rest.chunks(2) {
                let i: usize = pair[0].parse().map_err(|_| bad())?;
                let lease = i
                    .checked_sub(1)
                    .and_then(|i| leases.get(i))
                    .ok_or_else(bad)?;
                let e = match script_status(&pair[1]) {
                    Err(StoreError::Duplicate(_)) => StoreError::Duplicate(lease.to_string()),
                    Err(e) => e,
                    Ok(()) => return Err(bad()),
                };
                out.push((i - 1, e));
            }
            Ok(Wrote::Nothing(Refusal::Leases(out)))
        }
        _ => Err(bad()),
    }
}
