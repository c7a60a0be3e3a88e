//! [`LeaseStore::record`](crate::store::LeaseStore::record) on the embedded
//! store: the batch's leases and its audit records in one write transaction
//! (the records in the `audit_outbox` table), then the records appended to
//! the trail. A crash at any point leaves every lease with its record:
//! before the commit, neither exists; after it, the record is in the
//! outbox and is shipped when the store next records (the recorder asks at
//! start, [`EmbeddedStore::ship_pending`]).
//!
//! Each record reaches the trail exactly once. Records are shipped in
//! outbox order, one shipper at a time, and those the trail holds are
//! removed in the next batch's transaction, which also notes the trail's
//! seq before the first record left in the outbox (`trail_seq` in `meta`).
//! At start, a trail whose head is `n` past that seq already holds the
//! outbox's first `n` records (a crash after the append, before the
//! removal): they are checked against the trail's last `n` lines and
//! skipped, and only the rest shipped. A trail that cannot tell its head
//! (standard output) gets the outbox whole: at least once.
//!
//! If the trail fails after the commit, the batch's records stay in the
//! outbox and its credentials are revoked again, with a record of that
//! queued after them: every record of the batch is answered with the
//! trail's error, so the agent gets nothing (UNAVAILABLE, as it would have
//! without an outbox) and nothing it was not given stays active. Until the
//! outbox is shipped, every later batch fails before it writes anything,
//! so nothing new is issued while the trail cannot take records.

use mayfly_core::{LeaseId, RevocationReason};

use super::EmbeddedStore;
use super::tables::{META, OUTBOX, TRAIL_SEQ, decode};
use crate::audit::{AuditError, AuditRecord, AuditSink, Event};
use crate::cause::Cause;
use crate::store::{LeaseWrite, RecordBatch, RecordError, RevokeRequest, StoreError};

/// Most records one append ships when the outbox is drained.
const SHIP_BATCH: usize = 1024;

/// Where shipping stands; behind the store's shipping lock.
#[derive(Debug, Default)]
pub(super) struct Shipping {
    /// Whether the outbox has been compared with the trail since the store
    /// opened (what a crash left is shipped then).
    reconciled: bool,
    /// The last outbox id the trail is known to hold: the next batch's
    /// transaction removes it and those before it.
    shipped: Option<u64>,
    /// Whether the outbox holds records after `shipped` that the trail
    /// does not (it failed): they go before anything new.
    behind: bool,
}

/// One batch's write: an answer per record, and the records queued.
type Written = (Vec<Result<(), StoreError>>, Vec<u64>);

impl EmbeddedStore {
    /// `record` on this store, as the module says.
    pub(super) async fn record_via_outbox(
        &self,
        batch: &RecordBatch<'_>,
    ) -> Vec<Result<(), RecordError>> {
        let trail = &*self.trail;
        debug_assert_eq!(batch.records.len(), batch.leases.len());
        let mut shipping = self.shipping.lock().await;
        if let Err(e) = self.drain(&mut shipping, trail).await {
            return batch.all(&Err(e));
        }
        // Everything in the outbox is in the trail now: this transaction
        // removes it, and the trail's head is the seq before this batch.
        let (through, base) = (shipping.shipped, trail.chain_head().map_or(0, |h| h.seq));
        let (records, leases) = (batch.records.to_vec(), batch.leases.to_vec());
        let written = self
            .write(move |t| {
                t.unqueue(through, base)?;
                let mut answers = Vec::with_capacity(records.len());
                let mut queued = Vec::with_capacity(records.len());
                for (record, lease) in records.iter().zip(&leases) {
                    if let Some(w) = lease {
                        let written = match w {
                            LeaseWrite::Credential { lease, now } => t.issue(lease, *now),
                            LeaseWrite::Task(task) => t.start_task(task),
                        };
                        match written {
                            // The transaction itself failed: none of it may
                            // be committed.
                            Err(e @ (StoreError::Unavailable(_) | StoreError::Corrupt(_))) => {
                                return Err(e);
                            }
                            Err(refused) => {
                                answers.push(Err(refused));
                                continue;
                            }
                            Ok(()) => {}
                        }
                    }
                    queued.push(t.queue(record)?);
                    answers.push(Ok(()));
                }
                Ok((answers, queued))
            })
            .await;
        let (answers, queued): Written = match written {
            Ok(w) => w,
            Err(e) => return batch.all(&Err(RecordError::Store(e))),
        };
        shipping.shipped = None;
        let mut out: Vec<Result<(), RecordError>> = answers
            .into_iter()
            .map(|a| a.map_err(RecordError::Store))
            .collect();
        let Some(&last) = queued.last() else {
            return out;
        };
        crate::store::after_commit(batch.leases.iter().flatten());
        let kept: Vec<usize> = (0..out.len()).filter(|&i| out[i].is_ok()).collect();
        let appended = if kept.len() == batch.records.len() {
            trail.append(batch.records).await
        } else {
            let records: Vec<AuditRecord> =
                kept.iter().map(|&i| batch.records[i].clone()).collect();
            trail.append(&records).await
        };
        match appended {
            Ok(()) => {
                crate::store::after_append(batch.leases.iter().flatten());
                shipping.shipped = Some(last);
            }
            Err(e) => {
                shipping.behind = true;
                let issued: Vec<(LeaseId, RevocationReason)> = kept
                    .iter()
                    .filter_map(|&i| batch.leases[i].as_ref())
                    .map(|w| (w.lease_id(), w.unrecorded_reason()))
                    .collect();
                self.undo(&issued, batch.undo_by).await;
                for i in kept {
                    out[i] = Err(RecordError::Audit(e.clone()));
                }
            }
        }
        out
    }

    /// Ships what the outbox holds that the trail does not, before the
    /// first batch.
    pub(super) async fn ship_outbox(&self) -> Result<(), RecordError> {
        let mut shipping = self.shipping.lock().await;
        self.drain(&mut shipping, &*self.trail).await
    }

    /// Revokes the credentials and tasks of a batch the trail did not
    /// take (each for its reason), and queues the record of that after
    /// theirs. If this fails too, the leases stay active with their records
    /// in the outbox: together, though never handed out.
    async fn undo(&self, issued: &[(LeaseId, RevocationReason)], by: &mayfly_core::SpiffeId) {
        if issued.is_empty() {
            return;
        }
        let req = RevokeRequest::unrecorded(RevocationReason::Operator, by);
        let ids: Vec<LeaseId> = issued.iter().map(|(id, _)| id.clone()).collect();
        let record = AuditRecord::new(Event::LeaseRevoked, by)
            .revoked(&ids)
            .reason("audit trail unavailable: these leases were not handed out");
        let issued = issued.to_vec();
        let undone = self
            .write(move |t| {
                let mut revoked = Vec::new();
                for (id, reason) in &issued {
                    if let Some(lease) = t.lease(id.as_str())?
                        && lease.is_active_at(req.at)
                    {
                        revoked.push(t.revoke(lease, &req, *reason)?);
                    }
                }
                if !revoked.is_empty() {
                    t.queue(&record.clone().revoked(&revoked))?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = undone {
            tracing::error!(leases = ids.len(), error = %e, "credentials of an unshipped batch not revoked");
        }
    }

    /// Brings the trail level with the outbox: at the first call, skips
    /// what the trail already holds (checked line by line); then ships
    /// the rest in order.
    async fn drain(
        &self,
        shipping: &mut Shipping,
        trail: &dyn AuditSink,
    ) -> Result<(), RecordError> {
        if shipping.reconciled && !shipping.behind {
            return Ok(());
        }
        let after = shipping.shipped;
        let (base, entries) = self
            .read(move |txn| {
                let meta = txn.open_table(META)?;
                let base = meta.get(TRAIL_SEQ)?.map_or(0, |v| v.value());
                let outbox = txn.open_table(OUTBOX)?;
                let from = after.map_or(0, |a| a + 1);
                let mut entries = Vec::new();
                for entry in outbox.range(from..)? {
                    let (k, v) = entry?;
                    entries.push((k.value(), decode::<AuditRecord>(v.value())?));
                }
                Ok((base, entries))
            })
            .await?;
        let skip = if shipping.reconciled {
            0
        } else {
            held_already(trail, base, &entries).await?
        };
        if skip > 0 {
            shipping.shipped = Some(entries[skip - 1].0);
            tracing::info!(
                records = skip,
                "the audit trail already held records left in the outbox by a crash"
            );
        }
        let rest = &entries[skip..];
        for chunk in rest.chunks(SHIP_BATCH) {
            let records: Vec<AuditRecord> = chunk.iter().map(|(_, r)| r.clone()).collect();
            trail.append(&records).await?;
            shipping.shipped = chunk.last().map(|(id, _)| *id);
        }
        if !rest.is_empty() {
            tracing::info!(
                records = rest.len(),
                "audit records shipped from the outbox"
            );
        }
        shipping.reconciled = true;
        shipping.behind = false;
        Ok(())
    }
}

/// How many of the outbox's first records `trail` already holds: its head
/// past `base`, the seq before them, each checked against the trail's
/// line. Refuses a trail that cannot be matched with the outbox.
async fn held_already(
    trail: &dyn AuditSink,
    base: u64,
    entries: &[(u64, AuditRecord)],
) -> Result<usize, RecordError> {
    let Some(head) = trail.chain_head() else {
        return Ok(0);
    };
    let mismatch = |what: String| {
        RecordError::Audit(AuditError::Failed(Cause::msg(format!(
            "the audit trail does not match the lease store's outbox: {what}. Nothing is \
             issued until this is settled: restore the trail and the store file that were \
             written together (mayfly audit verify checks the trail)"
        ))))
    };
    if head.seq < base {
        if head.seq == 0 {
            // A new chain, begun deliberately (the file sink refuses a
            // trail cut short): none of the outbox is in it.
            tracing::warn!(
                outbox_base = base,
                "the audit trail is a new chain; the outbox is shipped to it whole"
            );
            return Ok(0);
        }
        return Err(mismatch(format!(
            "the trail ends at seq {}, before seq {base}, where the outbox begins",
            head.seq
        )));
    }
    let held = usize::try_from(head.seq - base).unwrap_or(usize::MAX);
    if held == 0 {
        return Ok(0);
    }
    if held > entries.len() {
        return Err(mismatch(format!(
            "the trail holds {held} records after seq {base}, the outbox only {}",
            entries.len()
        )));
    }
    let from = trail.cursor_before_last(held).await?;
    let (lines, _) = trail.read(&from, held).await?;
    if lines.len() != held {
        return Err(mismatch(format!(
            "{} of the trail's last {held} records could be read",
            lines.len()
        )));
    }
    for (line, (_, queued)) in lines.iter().zip(entries) {
        let found: AuditRecord = serde_json::from_str(line)
            .map_err(|e| mismatch(format!("a line of the trail is not a record ({e})")))?;
        let mut expected = queued.clone();
        expected.seq = found.seq;
        expected.prev.clone_from(&found.prev);
        if expected != found {
            return Err(mismatch(format!(
                "record seq {} is not the one the outbox holds next",
                found.seq
            )));
        }
    }
    Ok(held)
}
