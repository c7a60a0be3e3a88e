//! Where the audit trail goes. The record, its hash chain and checking a
//! trail are the audit line format, in `mayfly-audit` (re-exported here);
//! this module holds the [`AuditSink`] seam and the sinks that stand
//! beside any store: a file ([`FileSink`]), standard output, or nowhere.
//! The Redis store has its own, a stream shared by replicas
//! (`RedisSink`, in the store module). A store is built with the
//! trail it records to; requests do not write to a sink directly: the
//! broker's recorder batches their records and hands each batch, with the
//! leases that come with it, to the lease store.

mod file;

use std::fmt;
use std::sync::Mutex;

use crate::cause::Cause;
use async_trait::async_trait;

pub use mayfly_audit::{
    AuditRecord, Broken, ChainCheck, Event, GENESIS, Head, Verified, chain, line_hash, rfc3339,
    verify,
};

pub use self::file::{FileOptions, FileSink, segment_files};

/// Writing or reading the trail failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The sink could not take the records.
    #[error("audit trail unavailable: {0}")]
    Failed(#[source] Cause),
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
        #[source]
        what: TrailChange,
    },
}

/// What happened to a trail's file under the running broker (said after
/// its name: "audit trail audit.jsonl was removed").
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TrailChange {
    /// No file has the trail's name any more.
    #[error("was removed")]
    Removed,
    /// Another file (another device or inode) has the trail's name.
    #[error("was replaced (another file now has its name)")]
    Replaced,
    /// The file is shorter than what the broker wrote.
    #[error("was truncated from {written} to {found} bytes")]
    Truncated {
        /// The bytes the broker wrote.
        written: u64,
        /// The bytes the file holds.
        found: u64,
    },
    /// The file is longer than what the broker wrote.
    #[error("grew by {0} bytes that this broker did not write")]
    Grew(u64),
    /// The file's metadata could not be read.
    #[error("cannot be checked ({0})")]
    Unchecked(#[source] Cause),
}

impl From<serde_json::Error> for AuditError {
    /// A record that could not be serialised into its line.
    fn from(e: serde_json::Error) -> Self {
        Self::Failed(Cause::context("audit record not serialised", e))
    }
}

/// Where records go.
#[async_trait]
pub trait AuditSink: Send + Sync + fmt::Debug + 'static {
    /// Appends `records` after the current head, durably, in order.
    async fn append(&self, records: &[AuditRecord]) -> Result<(), AuditError>;

    /// The chain's head as the trail holds it, where the trail can tell
    /// (a file): the embedded store compares it with its outbox to ship
    /// each record exactly once across a crash. `None` for a trail that
    /// is not read back (standard output, off).
    fn chain_head(&self) -> Option<Head> {
        None
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
            writeln!(out, "{line}").map_err(|e| AuditError::Failed(Cause::of(e)))?;
        }
        out.flush().map_err(|e| AuditError::Failed(Cause::of(e)))?;
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

/// No trail (`[audit] sink = "off"`): records are dropped; nothing can be
/// read back.
#[derive(Debug, Default)]
pub struct OffSink;

#[async_trait]
impl AuditSink for OffSink {
    async fn append(&self, _: &[AuditRecord]) -> Result<(), AuditError> {
        Ok(())
    }

    async fn read(&self, _: &str, _: usize) -> Result<(Vec<String>, String), AuditError> {
        Err(off())
    }

    async fn cursor_before_last(&self, _: usize) -> Result<String, AuditError> {
        Err(off())
    }
}

fn off() -> AuditError {
    AuditError::Unreadable("the audit trail is off ([audit] sink = \"off\")".into())
}

/// The trail of a store opened without one: every record fails, so
/// nothing is issued (a store records only to the trail it was built
/// with).
#[derive(Debug, Default)]
pub struct NoTrail;

#[async_trait]
impl AuditSink for NoTrail {
    async fn append(&self, _: &[AuditRecord]) -> Result<(), AuditError> {
        Err(AuditError::Failed(Cause::msg(
            "this lease store was opened without an audit trail",
        )))
    }

    async fn read(&self, _: &str, _: usize) -> Result<(Vec<String>, String), AuditError> {
        Err(AuditError::Unreadable(
            "this lease store was opened without an audit trail".into(),
        ))
    }

    async fn cursor_before_last(&self, _: usize) -> Result<String, AuditError> {
        Err(AuditError::Unreadable(
            "this lease store was opened without an audit trail".into(),
        ))
    }
}
