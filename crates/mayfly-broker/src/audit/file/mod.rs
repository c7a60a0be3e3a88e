//! The JSON-lines file sink (the default): one record per line, appended
//! and fsynced per batch, in files created 0600. A line cut short by a
//! crash was never acknowledged, and is cut off when the file is reopened.
//!
//! The trail is kept honest against what happens to files under a broker:
//! - at start, the trail must continue the head the broker last wrote
//!   (kept in `<trail>.head`, see `head.rs`); a trail that was replaced,
//!   truncated or rewritten stops the broker with an error naming the file,
//!   and so does an active file whose own chain is broken (a record edited
//!   in place: its last line, which the head names, may be untouched);
//! - before every batch, the file at the trail's path must still be the one
//!   the broker writes (same device and inode) with exactly the bytes it
//!   wrote; otherwise every later batch fails, so nothing is issued, until
//!   the trail is restored and the broker restarted. Sequence numbers are
//!   therefore never reused: nothing is written after a loss goes unseen.
//!
//! Rotation (`segments.rs`): after a batch, an active file past
//! `rotate_bytes` or older than `rotate_age` is renamed after the seq of
//! its first record and a new one begun; the chain runs on across them.
//! With a `retention`, rotated segments last written longer ago than that
//! are deleted.

mod head;
mod segments;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use self::head::HeadFile;
use self::segments::{Cursor, Layout};
use super::{AuditError, AuditRecord, AuditSink, Head, TrailChange, chain, line_hash};
use crate::cause::Cause;

/// How much of the file's end is read to find the last record (records
/// are a few KiB at most).
const TAIL: u64 = 1 << 20;

fn failed(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> AuditError {
    AuditError::Failed(Cause::context(what, e))
}

/// Why the head of a file's chain could not be found.
#[derive(Debug, thiserror::Error)]
enum RecoverError {
    /// Reading or cutting the file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No line ends in the last MiB.
    #[error("no complete record in the last MiB")]
    NoCompleteRecord,
    /// The last line starts before the last MiB.
    #[error("the last record is longer than a MiB")]
    RecordTooLong,
    /// The last line is not UTF-8.
    #[error("{0}")]
    NotUtf8(#[from] std::str::Utf8Error),
    /// The last line is not a record.
    #[error("the last line is not an audit record: {0}")]
    NotARecord(#[source] serde_json::Error),
}

/// When the file trail rotates and what it keeps.
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// Rotate once the active file holds this many bytes.
    pub rotate_bytes: u64,
    /// Rotate once the active file's first record is this old.
    pub rotate_age: Duration,
    /// Delete rotated segments last written longer ago than this; `None`
    /// keeps them all (archive them elsewhere before deleting by hand).
    pub retention: Option<Duration>,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            rotate_bytes: 64 * 1024 * 1024,
            rotate_age: Duration::from_secs(24 * 3600),
            retention: None,
        }
    }
}

struct State {
    /// The active file, open for appending.
    file: File,
    /// Its device and inode, to notice a file put in its place.
    ident: (u64, u64),
    /// The bytes the broker knows are in it.
    len: u64,
    /// The seq of its first record (the next seq while it is empty).
    first_seq: u64,
    /// When its first record was written (`None` while empty).
    started: Option<SystemTime>,
    head: Head,
    /// The last head written, kept beside the trail; also its lock.
    head_file: HeadFile,
    /// Set once the trail was found replaced or truncated: every later
    /// batch fails with it.
    broken: Option<AuditError>,
}

/// Appends to one file trail; one broker per trail.
#[derive(Clone)]
pub struct FileSink {
    layout: Layout,
    options: FileOptions,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for FileSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink")
            .field("path", &self.layout.active())
            .finish()
    }
}

/// Every file of the trail whose active file is `path`, in chain order:
/// rotated segments oldest first, then the active file if it exists.
pub fn segment_files(path: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let layout = Layout::new(path);
    let mut out: Vec<PathBuf> = layout.rotated()?.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        out.push(path.to_owned());
    }
    Ok(out)
}

fn ident(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

fn open_active(path: &Path, create_new: bool) -> Result<File, AuditError> {
    let what = path.display().to_string();
    let mut o = OpenOptions::new();
    o.read(true).append(true).mode(0o600);
    if create_new {
        o.create_new(true);
    } else {
        o.create(true);
    }
    o.open(path).map_err(|e| failed(&what, e))
}

/// The last record of a file as (head), if it has one.
fn last_head(path: &Path) -> Result<Option<Head>, AuditError> {
    let mut file = File::open(path).map_err(|e| failed(&path.display().to_string(), e))?;
    let head = recover(&mut file, false).map_err(|e| failed(&path.display().to_string(), e))?;
    Ok((head.seq > 0).then_some(head))
}

/// Finds the line of record `seq` in the trail, for checking a head.
fn line_of(segments: &[(u64, PathBuf, bool)], seq: u64) -> Result<Option<String>, AuditError> {
    let Some((_, path, _)) = segments.iter().rev().find(|(first, _, _)| *first <= seq) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| failed(&path.display().to_string(), e))?;
    for line in text.lines() {
        #[derive(serde::Deserialize)]
        struct Seq {
            seq: u64,
        }
        if serde_json::from_str::<Seq>(line).is_ok_and(|r| r.seq == seq) {
            return Ok(Some(line.to_owned()));
        }
    }
    Ok(None)
}

impl FileSink {
    /// Opens (or creates, 0600) the trail at `path` with the default
    /// rotation, and finds its head.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_with(path, FileOptions::default())
    }

    /// Opens the trail at `path`: checks that it continues the head last
    /// written (refusing a trail replaced, truncated or rewritten), cuts
    /// off a partial last line, and locks it.
    pub fn open_with(path: &Path, options: FileOptions) -> Result<Self, AuditError> {
        let what = path.display().to_string();
        let layout = Layout::new(path);
        let mut head_file = HeadFile::open(path)?;
        let stored = head_file.read()?;
        let existed = path.exists();
        let rotated = layout.rotated()?;
        if stored.as_ref().is_some_and(|h| h.seq > 0) && !existed && rotated.is_empty() {
            return Err(AuditError::Failed(Cause::msg(format!(
                "audit trail {what} is missing, but {} says the broker wrote {} records to it: \
                 restore the trail; to start a new chain deliberately, move {} aside too",
                head_file.path().display(),
                stored.as_ref().map_or(0, |h| h.seq),
                head_file.path().display()
            ))));
        }
        let mut file = open_active(path, false)?;
        let active_head = recover(&mut file, true).map_err(|e| failed(&what, e))?;
        let active_first = segments::first_seq(path)?;
        let head = match (active_head.seq, rotated.last()) {
            (0, Some((_, last))) => last_head(last)?.unwrap_or_else(Head::genesis),
            _ => active_head,
        };
        let first_seq = active_first.unwrap_or(head.seq + 1);
        if let Some(stored) = &stored {
            let all = segments::all(&layout, first_seq)?;
            check_continues(&what, head_file.path(), stored, &head, &all)?;
        }
        check_chain(path, rotated.last().map(|(_, p)| p.as_path()))?;
        head_file.write(&head)?;
        let meta = file.metadata().map_err(|e| failed(&what, e))?;
        let started = active_first.and_then(|_| meta.modified().ok());
        Ok(Self {
            layout,
            options,
            state: Arc::new(Mutex::new(State {
                ident: ident(&meta),
                len: meta.len(),
                file,
                first_seq,
                started,
                head,
                head_file,
                broken: None,
            })),
        })
    }

    /// Where the chain stands.
    pub fn head(&self) -> Head {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .head
            .clone()
    }
}

/// Refuses an active file whose chain is broken: every record must link to
/// the one before it, the first to the previous segment's last record (or
/// to genesis when it is seq 1; a trail whose earlier segments were
/// retired starts where it starts). Bounded by
/// the rotation size: only the active file is read.
fn check_chain(path: &Path, previous: Option<&Path>) -> Result<(), AuditError> {
    use std::io::BufRead;
    let what = path.display().to_string();
    let mut check = match previous {
        Some(p) => match last_head(p)? {
            Some(h) => super::ChainCheck::from_head(h),
            None => super::ChainCheck::from_first_record(),
        },
        None => super::ChainCheck::from_first_record(),
    };
    let file = File::open(path).map_err(|e| failed(&what, e))?;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| failed(&what, e))?;
        if let Err(e) = check.line(&line, i as u64 + 1) {
            return Err(AuditError::Failed(Cause::msg(format!(
                "audit trail {what} is broken at {e}. Nothing is issued until this is settled: \
                 restore the trail (mayfly audit verify checks it), or, to start a new chain \
                 deliberately, move the trail, its segments and its .head file aside"
            ))));
        }
    }
    Ok(())
}

/// Refuses a trail that does not continue `stored`, the head the broker
/// last wrote. A trail ahead of it (the head file is not fsynced) must
/// still hold the stored head's record.
fn check_continues(
    what: &str,
    head_path: &Path,
    stored: &Head,
    found: &Head,
    segments: &[(u64, PathBuf, bool)],
) -> Result<(), AuditError> {
    if found == stored {
        return Ok(());
    }
    let holds = found.seq > stored.seq
        && line_of(segments, stored.seq)?.is_some_and(|l| line_hash(&l) == stored.hash);
    if holds || stored.seq == 0 {
        return Ok(());
    }
    Err(AuditError::Failed(Cause::msg(format!(
        "audit trail {what} does not continue the head this broker last wrote (seq {}, sha256 {}; \
         kept in {}): the trail ends at seq {}{}: records were removed, or the file was replaced or \
         rewritten. Nothing is issued until this is settled: restore the trail (mayfly audit verify \
         checks it), or, to start a new chain deliberately, move the trail, its segments and {} aside",
        stored.seq,
        stored.hash,
        head_path.display(),
        found.seq,
        if found.seq == stored.seq {
            format!(" with another record (sha256 {})", found.hash)
        } else {
            String::new()
        },
        head_path.display()
    ))))
}

/// The head of the chain in `file`; with `repair`, a partial last line (a
/// record a crash cut short, never acknowledged) is cut off.
fn recover(file: &mut File, repair: bool) -> Result<Head, RecoverError> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Head::genesis());
    }
    let start = len.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let Some(end) = tail.iter().rposition(|b| *b == b'\n') else {
        if start > 0 {
            return Err(RecoverError::NoCompleteRecord);
        }
        if repair {
            // Only a partial first record: nothing was ever acknowledged.
            file.set_len(0)?;
            tracing::warn!("cut off a partial audit record left by a crash");
        }
        return Ok(Head::genesis());
    };
    if end + 1 < tail.len() && repair {
        file.set_len(start + end as u64 + 1)?;
        tracing::warn!("cut off a partial audit record left by a crash");
    }
    let body = &tail[..end];
    let from = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if from == 0 && start > 0 {
        return Err(RecoverError::RecordTooLong);
    }
    let last = std::str::from_utf8(&body[from..])?;
    let record: AuditRecord = serde_json::from_str(last).map_err(RecoverError::NotARecord)?;
    Ok(Head {
        seq: record.seq,
        hash: line_hash(last),
    })
}

/// Whether the file at the trail's path is still the one being written,
/// with exactly the bytes written; else what happened to it.
fn still_ours(path: &Path, state: &State) -> Result<(), TrailChange> {
    let on_disk = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TrailChange::Removed);
        }
        Err(e) => return Err(TrailChange::Unchecked(Cause::of(e))),
    };
    if ident(&on_disk) != state.ident {
        return Err(TrailChange::Replaced);
    }
    let len = on_disk.len();
    if len < state.len {
        return Err(TrailChange::Truncated {
            written: state.len,
            found: len,
        });
    }
    if len > state.len {
        return Err(TrailChange::Grew(len - state.len));
    }
    Ok(())
}

impl FileSink {
    fn append_locked(&self, state: &mut State, records: &[AuditRecord]) -> Result<(), AuditError> {
        let path = self.layout.active();
        if state.broken.is_none()
            && let Err(what) = still_ours(path, state)
        {
            let e = AuditError::Broken {
                file: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                what,
            };
            tracing::error!(path = %path.display(), error = %e, "audit trail broken");
            state.broken = Some(e);
        }
        if let Some(e) = &state.broken {
            return Err(e.clone());
        }
        let (lines, head) = chain(records, &state.head)?;
        let mut buf = lines.join("\n");
        buf.push('\n');
        let written = state
            .file
            .write_all(buf.as_bytes())
            .and_then(|()| state.file.sync_data());
        if let Err(e) = written {
            // Leave no partial batch behind the acknowledged records.
            let _ = state.file.set_len(state.len);
            return Err(failed("writing the audit file", e));
        }
        state.len += buf.len() as u64;
        state.head = head;
        state.started.get_or_insert_with(SystemTime::now);
        if let Err(e) = state.head_file.write(&state.head) {
            tracing::warn!(error = %e, "audit head not kept; the trail itself is written");
        }
        self.maybe_rotate(state);
        Ok(())
    }

    /// Starts a new active file if this one is big or old enough; a
    /// failure leaves the trail as it is (it is only logged).
    fn maybe_rotate(&self, state: &mut State) {
        let old = state
            .started
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= self.options.rotate_age);
        if state.len == 0 || (state.len < self.options.rotate_bytes && !old) {
            return;
        }
        if let Err(e) = self.rotate(state) {
            tracing::warn!(error = %e, "audit trail not rotated; it grows on");
            return;
        }
        if let Some(keep) = self.options.retention {
            self.drop_older_than(keep, state.first_seq);
        }
    }

    fn rotate(&self, state: &mut State) -> Result<(), AuditError> {
        let path = self.layout.active();
        let segment = self.layout.segment(state.first_seq);
        if segment.exists() {
            return Err(AuditError::Failed(Cause::msg(format!(
                "{}: a segment of that name exists already",
                segment.display()
            ))));
        }
        std::fs::rename(path, &segment).map_err(|e| failed(&path.display().to_string(), e))?;
        let file = open_active(path, true)?;
        File::open(self.layout.dir())
            .and_then(|d| d.sync_all())
            .map_err(|e| failed(&self.layout.dir().display().to_string(), e))?;
        let meta = file
            .metadata()
            .map_err(|e| failed(&path.display().to_string(), e))?;
        tracing::info!(segment = %segment.display(), first_seq = state.first_seq, "audit trail rotated");
        state.ident = ident(&meta);
        state.file = file;
        state.len = 0;
        state.first_seq = state.head.seq + 1;
        state.started = None;
        Ok(())
    }

    /// Deletes rotated segments last written more than `keep` ago.
    fn drop_older_than(&self, keep: Duration, active_first: u64) {
        let Ok(rotated) = self.layout.rotated() else {
            return;
        };
        for (seq, path) in rotated {
            let age = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if seq < active_first && age.is_some_and(|a| a > keep) {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(segment = %path.display(), "audit segment past retention deleted")
                    }
                    Err(e) => {
                        tracing::warn!(segment = %path.display(), error = %e, "audit segment not deleted")
                    }
                }
            }
        }
    }

    /// The segments as they stand, the active one last.
    fn segments(&self) -> Result<Vec<(u64, PathBuf, bool)>, AuditError> {
        let active_first = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first_seq;
        segments::all(&self.layout, active_first)
    }
}

#[async_trait]
impl AuditSink for FileSink {
    async fn append(&self, records: &[AuditRecord]) -> Result<(), AuditError> {
        let this = self.clone();
        let records = records.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut state = this.state.lock().unwrap_or_else(|p| p.into_inner());
            this.append_locked(&mut state, &records)
        })
        .await
        .map_err(|e| failed("audit writer", e))?
    }

    fn chain_head(&self) -> Option<Head> {
        Some(self.head())
    }

    async fn read(&self, cursor: &str, limit: usize) -> Result<(Vec<String>, String), AuditError> {
        let this = self.clone();
        let cursor = (!cursor.is_empty())
            .then(|| Cursor::parse(cursor))
            .transpose()?;
        tokio::task::spawn_blocking(move || {
            // A rotation between listing and reading moves the active file
            // to its segment name: list again once.
            let first = segments::read(&this.segments()?, cursor, limit);
            match first {
                Err(AuditError::BadCursor(_)) => segments::read(&this.segments()?, cursor, limit),
                other => other,
            }
            .map(|(lines, at)| (lines, at.render()))
        })
        .await
        .map_err(|e| failed("audit reader", e))?
    }

    async fn cursor_before_last(&self, n: usize) -> Result<String, AuditError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            segments::before_last(&this.segments()?, n).map(Cursor::render)
        })
        .await
        .map_err(|e| failed("audit reader", e))?
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use mayfly_core::SpiffeId;

    use super::super::{Event, verify};
    use super::*;

    fn rec(i: usize) -> AuditRecord {
        let op = SpiffeId::new("spiffe://example.org/operator/admin").unwrap();
        AuditRecord::new(Event::LeaseRevoked, &op).reason(format!("r{i}"))
    }

    #[tokio::test]
    async fn appends_survive_reopening_and_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = FileSink::open(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        sink.append(&[rec(1), rec(2)]).await.unwrap();
        sink.append(&[rec(3)]).await.unwrap();
        let head = sink.head();
        assert_eq!(head.seq, 3);
        drop(sink);

        // A crash mid-write leaves half a line: it is cut off on reopening
        // and the chain goes on from the last whole record.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":4,\"prev\":\"ab").unwrap();
        drop(f);
        let sink = FileSink::open(&path).unwrap();
        assert_eq!(sink.head(), head);
        sink.append(&[rec(4)]).await.unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        let v = verify(text.lines().map(|l| Ok::<_, String>(l.to_owned()))).unwrap();
        assert_eq!(v.records, 4);
        assert_eq!(v.head, sink.head());

        // Reading back in pages, by cursor.
        let (first, cursor) = sink.read("", 3).await.unwrap();
        assert_eq!(first.len(), 3);
        let (rest, end) = sink.read(&cursor, 10).await.unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0], text.lines().nth(3).unwrap());
        assert_eq!(sink.read(&end, 10).await.unwrap().0.len(), 0);

        // The last n records, whatever n.
        for n in 0..6 {
            let from = sink.cursor_before_last(n).await.unwrap();
            let (last, _) = sink.read(&from, 10).await.unwrap();
            let want: Vec<&str> = text.lines().skip(4usize.saturating_sub(n)).collect();
            assert_eq!(last, want, "last {n}");
        }
        assert!(matches!(
            sink.read("x", 1).await,
            Err(AuditError::BadCursor(_))
        ));
        assert!(matches!(
            sink.read(&format!("1:{}", text.len() + 1), 1).await,
            Err(AuditError::BadCursor(_))
        ));
        assert!(matches!(
            sink.read("7:0", 1).await,
            Err(AuditError::BadCursor(_))
        ));
    }

    fn small() -> FileOptions {
        FileOptions {
            rotate_bytes: 4096,
            ..FileOptions::default()
        }
    }

    /// Every line of the trail, segment by segment, checked as one chain.
    fn whole_trail(path: &Path) -> (Vec<String>, super::super::Verified) {
        let mut check = super::super::ChainCheck::from_genesis();
        let mut all = Vec::new();
        for file in segment_files(path).unwrap() {
            for line in std::fs::read_to_string(&file).unwrap().lines() {
                all.push(line.to_owned());
                check.line(line, all.len() as u64).unwrap();
            }
        }
        (all, check.finish())
    }

    #[tokio::test]
    async fn rotation_keeps_one_chain_across_segments_and_readers_follow_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = FileSink::open_with(&path, small()).unwrap();
        for i in 0..60 {
            sink.append(&[rec(i)]).await.unwrap();
        }
        let files = segment_files(&path).unwrap();
        assert!(files.len() >= 3, "{files:?}");
        assert_eq!(files.last().unwrap(), &path);
        let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name, "audit.00000000000000000001.jsonl");
        for f in &files {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f:?}");
        }
        let (lines, v) = whole_trail(&path);
        assert_eq!((v.records, v.head.clone()), (60, sink.head()));

        // A reader pages through every segment in order, from the start
        // or from the last n records.
        let mut got = Vec::new();
        let mut cursor = String::new();
        loop {
            let (page, next) = sink.read(&cursor, 7).await.unwrap();
            if page.is_empty() {
                break;
            }
            got.extend(page);
            cursor = next;
        }
        assert_eq!(got, lines);
        for n in [0, 1, 5, 59, 60, 61] {
            let from = sink.cursor_before_last(n).await.unwrap();
            let mut tail = Vec::new();
            let mut at = from;
            loop {
                let (page, next) = sink.read(&at, 100).await.unwrap();
                if page.is_empty() {
                    break;
                }
                tail.extend(page);
                at = next;
            }
            assert_eq!(tail, lines[60 - n.min(60)..], "last {n}");
        }

        // Reopened, the chain goes on from the newest record.
        drop(sink);
        let sink = FileSink::open_with(&path, small()).unwrap();
        sink.append(&[rec(60)]).await.unwrap();
        assert_eq!(whole_trail(&path).1.records, 61);

        // The active file must link on from the segment before it: a
        // broker does not start on a segment whose last record was edited.
        let mut i = 61;
        while std::fs::metadata(&path).unwrap().len() == 0 {
            sink.append(&[rec(i)]).await.unwrap();
            i += 1;
        }
        drop(sink);
        let files = segment_files(&path).unwrap();
        let previous = &files[files.len() - 2];
        let kept = std::fs::read_to_string(previous).unwrap();
        std::fs::write(previous, kept.replace("\"reason\":\"r", "\"reason\":\"R")).unwrap();
        let e = FileSink::open_with(&path, small()).unwrap_err().to_string();
        assert!(e.contains("audit.jsonl is broken at line 1"), "{e}");
        std::fs::write(previous, kept).unwrap();
        assert!(FileSink::open_with(&path, small()).is_ok());
    }

    #[tokio::test]
    async fn a_trail_replaced_truncated_or_removed_under_the_broker_stops_it() {
        type Harm = fn(&Path);
        let cases: [(&str, Harm); 4] = [
            ("was replaced", |p| {
                // As `sed -i` does: a new file with the old name.
                let text = std::fs::read_to_string(p).unwrap().replace("r1", "r7");
                let tmp = p.with_extension("tmp");
                std::fs::write(&tmp, text).unwrap();
                std::fs::rename(&tmp, p).unwrap();
            }),
            ("was truncated", |p| {
                let f = OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(10).unwrap();
            }),
            ("was removed", |p| std::fs::remove_file(p).unwrap()),
            ("grew by", |p| {
                let mut f = OpenOptions::new().append(true).open(p).unwrap();
                f.write_all(b"{}\n").unwrap();
            }),
        ];
        for (what, harm) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.jsonl");
            let sink = FileSink::open(&path).unwrap();
            sink.append(&[rec(0), rec(1)]).await.unwrap();
            harm(&path);
            for _ in 0..2 {
                let e = sink.append(&[rec(2)]).await.unwrap_err();
                assert!(matches!(e, AuditError::Broken { .. }), "{what}: {e}");
                let change = std::error::Error::source(&e);
                assert!(change.is_some_and(|c| c.is::<TrailChange>()), "{e:?}");
                let msg = e.to_string();
                assert!(msg.contains("audit.jsonl") && msg.contains(what), "{msg}");
            }
        }
    }

    /// A trail whose last line is not a record is refused, naming the
    /// file, with the JSON error at the end of the chain.
    #[test]
    fn a_last_line_that_is_no_record_is_refused_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "not a record\n").unwrap();
        let e = FileSink::open(&path).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("audit.jsonl: the last line is not an audit record: "),
            "{msg}"
        );
        let mut chain = std::error::Error::source(&e);
        let mut json = false;
        while let Some(c) = chain {
            json |= c.is::<serde_json::Error>();
            chain = c.source();
        }
        assert!(json, "{e:?}");
    }

    #[tokio::test]
    async fn at_start_a_trail_must_continue_the_head_last_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = FileSink::open(&path).unwrap();
        sink.append(&[rec(0), rec(1), rec(2)]).await.unwrap();
        drop(sink);
        let full = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<&str> = full.lines().collect();

        // Cut short by a record: refused, naming the file and both heads.
        lines.pop();
        std::fs::write(&path, format!("{}\n", lines.join("\n"))).unwrap();
        let e = FileSink::open(&path).unwrap_err().to_string();
        assert!(
            e.contains("audit.jsonl")
                && e.contains("does not continue")
                && e.contains("ends at seq 2"),
            "{e}"
        );
        // Emptied: the same.
        std::fs::write(&path, "").unwrap();
        let e = FileSink::open(&path).unwrap_err().to_string();
        assert!(e.contains("ends at seq 0"), "{e}");
        // Rewritten with another last record: the same.
        let forged = full.replace("r2", "r9");
        std::fs::write(&path, &forged).unwrap();
        let e = FileSink::open(&path).unwrap_err().to_string();
        assert!(e.contains("with another record"), "{e}");
        // A record before the last edited in place (the head still
        // matches the last line): refused, naming the file and the line.
        let edited = full.replacen("r1", "r7", 1);
        assert_ne!(edited, full);
        std::fs::write(&path, &edited).unwrap();
        let e = FileSink::open(&path).unwrap_err().to_string();
        assert!(
            e.contains("audit.jsonl is broken at line 3 (seq 3): prev does not match"),
            "{e}"
        );
        // Gone: refused as missing.
        std::fs::remove_file(&path).unwrap();
        let e = FileSink::open(&path).unwrap_err().to_string();
        assert!(e.contains("is missing"), "{e}");

        // Restored: it opens and goes on.
        std::fs::write(&path, &full).unwrap();
        let sink = FileSink::open(&path).unwrap();
        assert_eq!(sink.head().seq, 3);
        // A head file a batch behind (its write lost in a power cut) is
        // fine while the trail still holds the record it names.
        sink.append(&[rec(3)]).await.unwrap();
        drop(sink);
        let head_path = HeadFile::path_of(&path);
        let stale = format!(
            "{{\"seq\":3,\"sha256\":\"{}\"}}\n",
            line_hash(full.lines().nth(2).unwrap())
        );
        std::fs::write(&head_path, format!("{stale:<127}\n")).unwrap();
        assert_eq!(FileSink::open(&path).unwrap().head().seq, 4);
        // Moved aside with its head file: a new chain begins.
        std::fs::rename(&path, dir.path().join("old.jsonl")).unwrap();
        std::fs::rename(&head_path, dir.path().join("old.jsonl.head")).unwrap();
        assert_eq!(FileSink::open(&path).unwrap().head(), Head::genesis());
    }

    #[tokio::test]
    async fn segments_past_the_retention_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let options = FileOptions {
            retention: Some(Duration::from_secs(3600)),
            ..small()
        };
        let sink = FileSink::open_with(&path, options).unwrap();
        let mut i = 0;
        while segment_files(&path).unwrap().len() < 3 {
            sink.append(&[rec(i)]).await.unwrap();
            i += 1;
        }
        // The oldest segment was last written two hours ago.
        let files = segment_files(&path).unwrap();
        let two_hours = SystemTime::now() - Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(&files[0])
            .unwrap()
            .set_modified(two_hours)
            .unwrap();
        // The next rotation applies the retention.
        while files[0].exists() {
            sink.append(&[rec(i)]).await.unwrap();
            i += 1;
            assert!(i < 10_000, "no rotation");
        }
        let now = segment_files(&path).unwrap();
        assert!(!now.contains(&files[0]), "{now:?}");
        assert!(now.contains(&files[1]));
        // What is left still chains, from the first record kept.
        let mut check = super::super::ChainCheck::from_first_record();
        let mut n = 0;
        for f in now {
            for line in std::fs::read_to_string(&f).unwrap().lines() {
                n += 1;
                check.line(line, n).unwrap();
            }
        }
        assert!(check.finish().first_seq > 1);
    }
}
