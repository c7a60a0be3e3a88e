//! Recording decisions. Every decision the broker makes is an audit record;
//! a decision that issues a credential also has the credential's lease,
//! and one that opens a task has the task and its task lease.
//! [`Recorder`] writes both with group commit: requests hand their record
//! (and lease) to one writer, which takes everything waiting as one batch
//! and gives it to the lease store ([`LeaseStore::record`]), which writes
//! the leases and the records together, all or nothing, and answers each
//! one. A credential or a task is handed out only once its lease and its
//! record are durable; a record that fails fails only its own request.

use std::fmt;
use std::sync::{Arc, Weak};

use mayfly_core::{Lease, SpiffeId, Task, Timestamp};
use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditError, AuditRecord, AuditSink, Event};
use crate::cause::Cause;
use crate::metrics::Metrics;
use crate::store::{LeaseStore, LeaseWrite, RecordBatch, RecordError};

/// Most records one batch holds.
const MAX_BATCH: usize = 1024;
/// Records waiting for the writer before callers wait for room.
const QUEUE: usize = 8192;

struct Pending {
    record: AuditRecord,
    /// The lease to record with it (a credential's or a new task's).
    lease: Option<LeaseWrite>,
    done: oneshot::Sender<Result<(), RecordError>>,
}

/// The broker's handle on the trail and the seam every credential is
/// recorded through: cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Pending>,
    sink: Arc<dyn AuditSink>,
    metrics: Option<Arc<Metrics>>,
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("sink", &self.sink)
            .finish()
    }
}

impl Recorder {
    /// Starts the writer on the current runtime: batches go to `store`,
    /// which writes their leases and records them to its trail; a lease
    /// the store must undo is revoked as `broker_id`. Decisions and batches are counted in
    /// `metrics`. The writer holds the store weakly, so the store closes
    /// (and its file is free to reopen) as soon as its owners drop it;
    /// anything recorded after that fails.
    pub fn start(
        store: Arc<dyn LeaseStore>,
        broker_id: SpiffeId,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let sink = store.trail();
        tokio::spawn(write_batches(
            Arc::downgrade(&store),
            broker_id,
            rx,
            metrics.clone(),
        ));
        Self { tx, sink, metrics }
    }

    /// Appends `record`; returns once it is durable in the trail.
    pub async fn record(&self, record: AuditRecord) -> Result<(), AuditError> {
        if let Some(m) = &self.metrics {
            let ended = match record.event {
                Event::LeaseExpired => 1,
                _ => record.revoked.len() as u64,
            };
            m.decided(record.event.as_str(), ended);
        }
        match self.send(record, None).await {
            Ok(()) => Ok(()),
            Err(RecordError::Audit(e)) => Err(e),
            // A record without a lease never meets the store's checks.
            Err(RecordError::Store(e)) => Err(AuditError::Failed(Cause::of(e))),
        }
    }

    /// Records a credential: its `lease` (decided at `now`) and its audit
    /// `record`, together or not at all; returns once both are durable.
    pub async fn record_issued(
        &self,
        record: AuditRecord,
        lease: Lease,
        now: Timestamp,
    ) -> Result<(), RecordError> {
        self.record_with(record, LeaseWrite::Credential { lease, now })
            .await
    }

    /// Records a new task: the task with its task lease, and its audit
    /// `record`, together or not at all; returns once both are durable.
    pub async fn record_started(&self, record: AuditRecord, task: Task) -> Result<(), RecordError> {
        self.record_with(record, LeaseWrite::Task(task)).await
    }

    async fn record_with(&self, record: AuditRecord, write: LeaseWrite) -> Result<(), RecordError> {
        let event = record.event;
        self.send(record, Some(write)).await?;
        if let Some(m) = &self.metrics {
            m.decided(event.as_str(), 0);
        }
        Ok(())
    }

    async fn send(
        &self,
        record: AuditRecord,
        lease: Option<LeaseWrite>,
    ) -> Result<(), RecordError> {
        let stopped =
            || RecordError::Audit(AuditError::Failed(Cause::msg("the audit writer stopped")));
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Pending {
                record,
                lease,
                done,
            })
            .await
            .map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
    }

    /// Lines after `cursor`, and the cursor after them.
    pub async fn read(
        &self,
        cursor: &str,
        limit: usize,
    ) -> Result<(Vec<String>, String), AuditError> {
        self.sink.read(cursor, limit).await
    }

    /// The cursor from which [`read`](Self::read) returns the last `n`
    /// records.
    pub async fn cursor_before_last(&self, n: usize) -> Result<String, AuditError> {
        self.sink.cursor_before_last(n).await
    }
}

/// The writer: takes everything waiting, has the store record it as one
/// batch, answers every caller with its own outcome.
async fn write_batches(
    store: Weak<dyn LeaseStore>,
    broker_id: SpiffeId,
    mut rx: mpsc::Receiver<Pending>,
    metrics: Option<Arc<Metrics>>,
) {
    // What the store holds for the trail from before (an outbox left by a
    // crash) goes before anything new.
    if let Some(store) = store.upgrade()
        && let Err(e) = store.ship_pending().await
    {
        tracing::error!(error = %e, "audit records held by the store not shipped; nothing is issued until they are");
    }
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let mut records = Vec::with_capacity(batch.len());
        let mut leases = Vec::with_capacity(batch.len());
        let mut waiting = Vec::with_capacity(batch.len());
        for p in batch {
            records.push(p.record);
            leases.push(p.lease);
            waiting.push(p.done);
        }
        let batch = RecordBatch {
            records: &records,
            leases: &leases,
            undo_by: &broker_id,
        };
        let outcomes = match store.upgrade() {
            Some(store) => store.record(&batch).await,
            None => {
                let closed = AuditError::Failed(Cause::msg("the lease store is closed"));
                vec![Err(RecordError::Audit(closed)); records.len()]
            }
        };
        counted(&metrics, &outcomes);
        for (done, outcome) in waiting.into_iter().zip(outcomes) {
            let _ = done.send(outcome);
        }
    }
}

/// Counts a batch, and logs it if the trail failed it.
fn counted(metrics: &Option<Arc<Metrics>>, outcomes: &[Result<(), RecordError>]) {
    if let Some(m) = metrics {
        m.audit_batch.observe(outcomes.len() as f64);
    }
    let failed = outcomes.iter().filter_map(|o| match o {
        Err(RecordError::Audit(e)) => Some(e),
        _ => None,
    });
    let (n, first) = failed.fold((0, None), |(n, first), e| (n + 1, first.or(Some(e))));
    if let Some(e) = first {
        if let Some(m) = metrics {
            m.audit_failures.inc();
        }
        tracing::error!(error = %e, records = n, "audit records not written");
    }
}
