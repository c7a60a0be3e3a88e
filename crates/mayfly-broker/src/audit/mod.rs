//! Writing the audit trail. The record, its hash chain and checking a
//! trail are the audit line format, in `mayfly-audit` (re-exported here);
//! this module writes it.
//!
//! [`AuditLog`] writes with group commit: requests hand records to one
//! writer, which appends everything waiting as one batch (one write and one
//! fsync for the file sink, one script call for Redis) and then answers
//! them all. A credential is returned only after its record is durable.
//! A sink that lives in the lease store (Redis) also records each
//! credential's lease in the same atomic step as its record
//! ([`AuditLog::record_with_lease`]), so an issue is one round trip.

mod file;
mod redis;

use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use mayfly_core::{Lease, Timestamp};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::store::StoreError;

pub use mayfly_audit::{
    AuditRecord, Broken, ChainCheck, Event, GENESIS, Head, Verified, chain, line_hash, rfc3339,
    verify,
};

pub use self::file::{FileOptions, FileSink, segment_files};
pub use self::redis::RedisSink;

/// Most records one batch holds.
const MAX_BATCH: usize = 1024;
/// Records waiting for the writer before callers wait for room.
const QUEUE: usize = 8192;

/// Writing or reading the trail failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The sink could not take the records.
    #[error("audit trail unavailable: {0}")]
    Failed(String),
    /// This sink cannot be read back through the broker.
    #[error("{0}")]
    Unreadable(String),
    /// A read cursor that this sink never handed out.
    #[error("bad audit cursor {0:?}: use a cursor from an earlier read, or none for the start")]
    BadCursor(String),
    /// The trail's file was replaced, truncated or removed under the
    /// broker: nothing more is written (or issued) until it is restored.
    #[error(
        "audit trail {file} {what} under the running broker; nothing is issued until the trail \
         is restored and the broker restarted (mayfly audit verify checks it)"
    )]
    Broken {
        /// The trail's file name (the log has the whole path).
        file: String,
        /// What happened to it.
        what: String,
    },
}

impl From<serde_json::Error> for AuditError {
    /// A record that could not be serialised into its line.
    fn from(e: serde_json::Error) -> Self {
        Self::Failed(format!("audit record not serialised: {e}"))
    }
}

/// A credential lease to record in the same step as its audit record.
#[derive(Debug, Clone)]
pub struct LeaseWrite {
    /// The lease, as `LeaseStore::issue` takes it.
    pub lease: Lease,
    /// When its decision was made (the task must be active then).
    pub now: Timestamp,
}

/// Why a record, and the lease that came with it, were not written.
#[derive(Debug)]
pub enum RecordError {
    /// The trail could not take the record.
    Audit(AuditError),
    /// The store refused the lease, or could not be reached.
    Lease(StoreError),
}

/// Why [`AuditSink::append_with_leases`] wrote nothing.
#[derive(Debug)]
pub enum LeaseBatchError {
    /// The trail could not take the records.
    Audit(AuditError),
    /// These leases (by index in the batch) may not be recorded, and why.
    Refused(Vec<(usize, StoreError)>),
    /// The store could not be reached.
    Unavailable(String),
}

/// Where records go.
#[async_trait]
pub trait AuditSink: Send + Sync + fmt::Debug + 'static {
    /// Appends `records` after the current head, durably, in order.
    async fn append(&self, records: &[AuditRecord]) -> Result<(), AuditError>;

    /// Whether [`append_with_leases`](Self::append_with_leases) works, that
    /// is, whether the trail lives in the lease store.
    fn records_leases(&self) -> bool {
        false
    }

    /// Appends `records` as [`append`](Self::append) does and, in the same
    /// atomic step, records `leases[i]`, the credential lease of
    /// `records[i]` where there is one, as `LeaseStore::issue` would. If
    /// any lease may not be recorded, nothing is written.
    async fn append_with_leases(
        &self,
        records: &[AuditRecord],
        leases: &[Option<LeaseWrite>],
    ) -> Result<(), LeaseBatchError> {
        let _ = (records, leases);
        Err(LeaseBatchError::Audit(not_in_store()))
    }

    /// Up to `limit` lines after `cursor` ("" for the start), and the
    /// cursor after them.
    async fn read(&self, cursor: &str, limit: usize) -> Result<(Vec<String>, String), AuditError>;

    /// The cursor from which a read returns the last `n` records.
    async fn cursor_before_last(&self, n: usize) -> Result<String, AuditError>;
}

/// Records as JSON lines on standard output, for log pipelines. The chain
/// starts afresh with each process; nothing can be read back.
#[derive(Debug)]
pub struct StdoutSink {
    head: Mutex<Head>,
}

impl StdoutSink {
    /// A chain from genesis.
    pub fn new() -> Self {
        Self {
            head: Mutex::new(Head::genesis()),
        }
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl AuditSink for StdoutSink {
    async fn append(&self, records: &[AuditRecord]) -> Result<(), AuditError> {
        use std::io::Write;
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        let (lines, next) = chain(records, &head)?;
        let mut out = std::io::stdout().lock();
        for line in &lines {
            writeln!(out, "{line}").map_err(|e| AuditError::Failed(e.to_string()))?;
        }
        out.flush().map_err(|e| AuditError::Failed(e.to_string()))?;
        *head = next;
        Ok(())
    }

    async fn read(&self, _: &str, _: usize) -> Result<(Vec<String>, String), AuditError> {
        Err(stdout_unreadable())
    }

    async fn cursor_before_last(&self, _: usize) -> Result<String, AuditError> {
        Err(stdout_unreadable())
    }
}

fn stdout_unreadable() -> AuditError {
    AuditError::Unreadable(
        "the audit trail goes to the broker's standard output ([audit] sink = \"stdout\"); read it from your log pipeline"
            .into(),
    )
}

/// For a lease handed to a trail that does not live in the lease store.
fn not_in_store() -> AuditError {
    AuditError::Failed("this trail does not live in the lease store".into())
}

fn off() -> AuditError {
    AuditError::Unreadable("the audit trail is off ([audit] sink = \"off\")".into())
}

struct Pending {
    record: AuditRecord,
    /// The credential lease to record with it, on a sink that can.
    lease: Option<LeaseWrite>,
    done: oneshot::Sender<Result<(), RecordError>>,
}

/// The broker's handle on the trail: cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: Option<mpsc::Sender<Pending>>,
    sink: Option<Arc<dyn AuditSink>>,
    metrics: Option<Arc<Metrics>>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("sink", &self.sink)
            .finish()
    }
}

impl AuditLog {
    /// Starts the writer for `sink` on the current runtime.
    pub fn start(sink: Arc<dyn AuditSink>) -> Self {
        Self::start_counted(sink, None)
    }

    /// Starts the writer, counting decisions and batches in `metrics`.
    pub fn start_counted(sink: Arc<dyn AuditSink>, metrics: Option<Arc<Metrics>>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(sink.clone(), rx, metrics.clone()));
        Self {
            tx: Some(tx),
            sink: Some(sink),
            metrics,
        }
    }

    /// No trail (`sink = "off"`): records are dropped (but counted).
    pub fn off(metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            tx: None,
            sink: None,
            metrics,
        }
    }

    /// Appends `record`; returns once it is durable in the sink.
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
            Err(RecordError::Lease(e)) => Err(AuditError::Failed(e.to_string())),
        }
    }

    /// Whether [`record_with_lease`](Self::record_with_lease) may be used:
    /// the trail lives in the lease store.
    pub fn records_leases(&self) -> bool {
        self.tx.is_some() && self.sink.as_ref().is_some_and(|s| s.records_leases())
    }

    /// Records `lease` (decided at `now`) and `record` in one atomic step,
    /// as `LeaseStore::issue` and [`record`](Self::record) would one after
    /// the other; returns once both are durable. Only where
    /// [`records_leases`](Self::records_leases).
    pub async fn record_with_lease(
        &self,
        record: AuditRecord,
        lease: Lease,
        now: Timestamp,
    ) -> Result<(), RecordError> {
        let event = record.event;
        self.send(record, Some(LeaseWrite { lease, now })).await?;
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
        let stopped = || RecordError::Audit(AuditError::Failed("the audit writer stopped".into()));
        let Some(tx) = &self.tx else {
            return match lease {
                None => Ok(()),
                Some(_) => Err(RecordError::Audit(off())),
            };
        };
        let (done, wait) = oneshot::channel();
        tx.send(Pending {
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
        match &self.sink {
            Some(sink) => sink.read(cursor, limit).await,
            None => Err(off()),
        }
    }

    /// The cursor from which [`read`](Self::read) returns the last `n`
    /// records.
    pub async fn cursor_before_last(&self, n: usize) -> Result<String, AuditError> {
        match &self.sink {
            Some(sink) => sink.cursor_before_last(n).await,
            None => Err(off()),
        }
    }
}

/// The writer: takes everything waiting, appends it as one batch, answers
/// every caller with the batch's outcome.
async fn write_batches(
    sink: Arc<dyn AuditSink>,
    mut rx: mpsc::Receiver<Pending>,
    metrics: Option<Arc<Metrics>>,
) {
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
        if leases.iter().all(Option::is_none) {
            let outcome = sink.append(&records).await;
            written(&metrics, records.len(), outcome.as_ref().err());
            for done in waiting {
                let _ = done.send(outcome.clone().map_err(RecordError::Audit));
            }
        } else {
            write_with_leases(&*sink, records, leases, waiting, &metrics).await;
        }
    }
}

/// Writes a batch holding credential leases. A lease the store refuses is
/// answered with why and left out, and the rest is written again; nothing
/// was written in the meantime, so the chain goes on unbroken.
async fn write_with_leases(
    sink: &dyn AuditSink,
    mut records: Vec<AuditRecord>,
    mut leases: Vec<Option<LeaseWrite>>,
    mut waiting: Vec<oneshot::Sender<Result<(), RecordError>>>,
    metrics: &Option<Arc<Metrics>>,
) {
    while !records.is_empty() {
        match sink.append_with_leases(&records, &leases).await {
            Ok(()) => {
                written(metrics, records.len(), None);
                for done in waiting.drain(..) {
                    let _ = done.send(Ok(()));
                }
            }
            Err(LeaseBatchError::Refused(mut refused)) => {
                // From the back, so the indices stay right.
                refused.sort_by_key(|r| std::cmp::Reverse(r.0));
                refused.dedup_by(|a, b| a.0 == b.0);
                for (i, e) in refused {
                    if i < records.len() {
                        records.remove(i);
                        leases.remove(i);
                        let _ = waiting.remove(i).send(Err(RecordError::Lease(e)));
                    }
                }
            }
            Err(LeaseBatchError::Unavailable(m)) => {
                let e = AuditError::Failed(m.clone());
                written(metrics, records.len(), Some(&e));
                for (lease, done) in leases.iter().zip(waiting.drain(..)) {
                    let _ = done.send(Err(match lease {
                        Some(_) => RecordError::Lease(StoreError::Unavailable(m.clone())),
                        None => RecordError::Audit(e.clone()),
                    }));
                }
            }
            Err(LeaseBatchError::Audit(e)) => {
                written(metrics, records.len(), Some(&e));
                for done in waiting.drain(..) {
                    let _ = done.send(Err(RecordError::Audit(e.clone())));
                }
            }
        }
        if waiting.is_empty() {
            return;
        }
    }
}

/// Counts a batch, and logs it if it failed.
fn written(metrics: &Option<Arc<Metrics>>, records: usize, failed: Option<&AuditError>) {
    if let Some(m) = metrics {
        m.audit_batch.observe(records as f64);
    }
    if let Some(e) = failed {
        if let Some(m) = metrics {
            m.audit_failures.inc();
        }
        tracing::error!(error = %e, records, "audit records not written");
    }
}
