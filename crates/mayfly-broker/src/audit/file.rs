//! The JSON-lines file sink (the default): one record per line, appended
//! and fsynced per batch. The file is created 0600. A line cut short by a
//! crash was never acknowledged, and is cut off when the file is reopened.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{AuditError, AuditRecord, AuditSink, Head, chain, line_hash};

/// How much of the file's end is read to find the last record (records
/// are a few KiB at most).
const TAIL: u64 = 1 << 20;

fn failed(what: &str, e: impl std::fmt::Display) -> AuditError {
    AuditError::Failed(format!("{what}: {e}"))
}

struct State {
    file: File,
    head: Head,
}

/// Appends to one file; one broker per file.
#[derive(Clone)]
pub struct FileSink {
    path: PathBuf,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for FileSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink")
            .field("path", &self.path)
            .finish()
    }
}

impl FileSink {
    /// Opens (or creates, 0600) the trail at `path` and finds its head.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let what = path.display().to_string();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| failed(&what, e))?;
        // Two writers would fork the chain.
        file.try_lock().map_err(|e| {
            failed(
                &what,
                format!("{e}: another broker writes this trail; give each its own [audit] path, or use sink = \"redis\""),
            )
        })?;
        let head = recover(&mut file).map_err(|e| failed(&what, e))?;
        Ok(Self {
            path: path.to_owned(),
            state: Arc::new(Mutex::new(State { file, head })),
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

/// The head of the chain in `file`, cutting off a partial last line.
fn recover(file: &mut File) -> Result<Head, String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len == 0 {
        return Ok(Head::genesis());
    }
    let start = len.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(start))
        .map_err(|e| e.to_string())?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).map_err(|e| e.to_string())?;
    let Some(end) = tail.iter().rposition(|b| *b == b'\n') else {
        if start > 0 {
            return Err("no complete record in the last MiB".into());
        }
        // Only a partial first record: nothing was ever acknowledged.
        file.set_len(0).map_err(|e| e.to_string())?;
        tracing::warn!("cut off a partial audit record left by a crash");
        return Ok(Head::genesis());
    };
    if end + 1 < tail.len() {
        file.set_len(start + end as u64 + 1)
            .map_err(|e| e.to_string())?;
        tracing::warn!("cut off a partial audit record left by a crash");
    }
    let body = &tail[..end];
    let from = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if from == 0 && start > 0 {
        return Err("the last record is longer than a MiB".into());
    }
    let last = std::str::from_utf8(&body[from..]).map_err(|e| e.to_string())?;
    let record: AuditRecord = serde_json::from_str(last)
        .map_err(|e| format!("the last line is not an audit record: {e}"))?;
    Ok(Head {
        seq: record.seq,
        hash: line_hash(last),
    })
}

fn append(state: &mut State, records: &[AuditRecord]) -> Result<(), AuditError> {
    let (lines, head) = chain(records, &state.head)?;
    let mut buf = lines.join("\n");
    buf.push('\n');
    let before = state
        .file
        .metadata()
        .map_err(|e| failed("audit file", e))?
        .len();
    let written = state
        .file
        .write_all(buf.as_bytes())
        .and_then(|()| state.file.sync_data());
    if let Err(e) = written {
        // Leave no partial batch behind the acknowledged records.
        let _ = state.file.set_len(before);
        return Err(failed("writing the audit file", e));
    }
    state.head = head;
    Ok(())
}

fn read(path: &Path, cursor: &str, limit: usize) -> Result<(Vec<String>, String), AuditError> {
    let mut offset: u64 = if cursor.is_empty() {
        0
    } else {
        cursor
            .parse()
            .map_err(|_| AuditError::BadCursor(cursor.to_owned()))?
    };
    let mut file = File::open(path).map_err(|e| failed("audit file", e))?;
    if offset > file.metadata().map_err(|e| failed("audit file", e))?.len() {
        return Err(AuditError::BadCursor(cursor.to_owned()));
    }
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| failed("audit file", e))?;
    let mut reader = BufReader::new(file);
    let mut lines = Vec::new();
    let mut line = Vec::new();
    while lines.len() < limit {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| failed("audit file", e))?;
        if n == 0 || line.last() != Some(&b'\n') {
            break; // the end, or a record still being written
        }
        offset += n as u64;
        line.pop();
        lines.push(String::from_utf8_lossy(&line).into_owned());
    }
    Ok((lines, offset.to_string()))
}

/// The byte offset where the last `n` whole lines begin.
fn cursor_before_last(path: &Path, n: usize) -> Result<String, AuditError> {
    const CHUNK: u64 = 64 * 1024;
    let mut file = File::open(path).map_err(|e| failed("audit file", e))?;
    let mut end = file.metadata().map_err(|e| failed("audit file", e))?.len();
    let mut newlines = 0;
    let mut buf = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        buf.resize((end - start) as usize, 0);
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| failed("audit file", e))?;
        for (i, b) in buf.iter().enumerate().rev() {
            if *b == b'\n' {
                newlines += 1;
                // The (n+1)-th newline from the end closes the line before
                // the last n whole ones (a partial line has none).
                if newlines == n + 1 {
                    return Ok((start + i as u64 + 1).to_string());
                }
            }
        }
        end = start;
    }
    Ok("0".into())
}

#[async_trait]
impl AuditSink for FileSink {
    async fn append(&self, records: &[AuditRecord]) -> Result<(), AuditError> {
        let state = self.state.clone();
        let records = records.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            append(&mut state, &records)
        })
        .await
        .map_err(|e| failed("audit writer", e))?
    }

    async fn read(&self, cursor: &str, limit: usize) -> Result<(Vec<String>, String), AuditError> {
        let (path, cursor) = (self.path.clone(), cursor.to_owned());
        tokio::task::spawn_blocking(move || read(&path, &cursor, limit))
            .await
            .map_err(|e| failed("audit reader", e))?
    }

    async fn cursor_before_last(&self, n: usize) -> Result<String, AuditError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || cursor_before_last(&path, n))
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
            sink.read(&(text.len() + 1).to_string(), 1).await,
            Err(AuditError::BadCursor(_))
        ));
    }
}
