//! A file trail's segments: the active file (`audit.jsonl`) and the ones
//! rotated out of it, named by the seq of their first record
//! (`audit.00000000000000000001.jsonl`), in the same directory. Records
//! chain across them: a segment's first record links to the previous
//! segment's last. Read cursors are `<first seq of a segment>:<byte
//! offset in it>`, so a reader carries on across a rotation.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::audit::AuditError;
use crate::cause::Cause;

/// Digits of the seq in a segment's name (`u64::MAX` has 20).
const DIGITS: usize = 20;

fn failed(what: &Path, e: impl std::error::Error + Send + Sync + 'static) -> AuditError {
    AuditError::Failed(Cause::context(what.display(), e))
}

/// Names the files of the trail whose active file is `active`.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    active: PathBuf,
    dir: PathBuf,
    /// `audit` of `audit.jsonl`.
    stem: String,
    /// `.jsonl`, or empty.
    ext: String,
}

impl Layout {
    pub(super) fn new(active: &Path) -> Self {
        let dir = active
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        let name = active
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (stem, ext) = match name.rsplit_once('.') {
            Some((s, e)) if !s.is_empty() => (s.to_owned(), format!(".{e}")),
            _ => (name, String::new()),
        };
        Self {
            active: active.to_owned(),
            dir,
            stem,
            ext,
        }
    }

    /// The active file.
    pub(super) fn active(&self) -> &Path {
        &self.active
    }

    /// The directory holding every segment.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a segment whose first record is `first_seq` goes.
    pub(super) fn segment(&self, first_seq: u64) -> PathBuf {
        self.dir
            .join(format!("{}.{first_seq:0DIGITS$}{}", self.stem, self.ext))
    }

    /// The first seq of a segment named `name`, if it is one of ours.
    fn parse(&self, name: &str) -> Option<u64> {
        let middle = name
            .strip_prefix(&self.stem)?
            .strip_prefix('.')?
            .strip_suffix(&self.ext)?;
        (middle.len() == DIGITS && middle.bytes().all(|b| b.is_ascii_digit()))
            .then(|| middle.parse().ok())
            .flatten()
    }

    /// The rotated segments, oldest first: `(first seq, path)`.
    pub(super) fn rotated(&self) -> Result<Vec<(u64, PathBuf)>, AuditError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| failed(&self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| failed(&self.dir, e))?;
            if let Some(seq) = self.parse(&entry.file_name().to_string_lossy()) {
                out.push((seq, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The seq of a file's first record, if it has a whole one.
pub(super) fn first_seq(path: &Path) -> Result<Option<u64>, AuditError> {
    let file = File::open(path).map_err(|e| failed(path, e))?;
    let mut line = String::new();
    BufReader::new(file)
        .read_line(&mut line)
        .map_err(|e| failed(path, e))?;
    if !line.ends_with('\n') {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_str::<Seq>(&line)
        .map(|s| Some(s.seq))
        .map_err(|e| {
            let what = format!("{}: first line is not an audit record", path.display());
            AuditError::Failed(Cause::context(what, e))
        })
}

/// A position in the trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cursor {
    /// The segment, by the seq of its first record.
    pub(super) segment: u64,
    /// Bytes into it.
    pub(super) offset: u64,
}

impl Cursor {
    pub(super) fn parse(s: &str) -> Result<Self, AuditError> {
        let bad = || AuditError::BadCursor(s.to_owned());
        let (segment, offset) = s.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            segment: segment.parse().map_err(|_| bad())?,
            offset: offset.parse().map_err(|_| bad())?,
        })
    }

    pub(super) fn render(self) -> String {
        format!("{}:{}", self.segment, self.offset)
    }
}

/// Every segment in order, the active one last (with the first seq it
/// will have, `active_first`): `(first seq, path, rotated)`.
pub(super) fn all(
    layout: &Layout,
    active_first: u64,
) -> Result<Vec<(u64, PathBuf, bool)>, AuditError> {
    let mut out: Vec<(u64, PathBuf, bool)> = layout
        .rotated()?
        .into_iter()
        .filter(|(seq, _)| *seq < active_first)
        .map(|(seq, p)| (seq, p, true))
        .collect();
    out.push((active_first, layout.active().to_owned(), false));
    Ok(out)
}

/// Up to `limit` whole lines from `cursor` on, across segments, and the
/// cursor after them. A line still being written is left for later.
pub(super) fn read(
    segments: &[(u64, PathBuf, bool)],
    cursor: Option<Cursor>,
    limit: usize,
) -> Result<(Vec<String>, Cursor), AuditError> {
    let first = segments.first().map_or(
        Cursor {
            segment: 1,
            offset: 0,
        },
        |(seq, _, _)| Cursor {
            segment: *seq,
            offset: 0,
        },
    );
    let mut at = cursor.unwrap_or(first);
    let mut i = segments
        .iter()
        .position(|(seq, _, _)| *seq == at.segment)
        .ok_or_else(|| AuditError::BadCursor(at.render()))?;
    let mut lines = Vec::new();
    loop {
        let (_, path, rotated) = &segments[i];
        let mut file = File::open(path).map_err(|e| failed(path, e))?;
        let len = file.metadata().map_err(|e| failed(path, e))?.len();
        if at.offset > len {
            return Err(AuditError::BadCursor(at.render()));
        }
        file.seek(SeekFrom::Start(at.offset))
            .map_err(|e| failed(path, e))?;
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        let mut ended = false;
        while lines.len() < limit {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| failed(path, e))?;
            if n == 0 || line.last() != Some(&b'\n') {
                ended = true;
                break; // the end, or a record still being written
            }
            at.offset += n as u64;
            line.pop();
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        // A rotated segment read to its end: go on in the next one.
        match segments.get(i + 1) {
            Some((next, _, _)) if ended && *rotated => {
                i += 1;
                at = Cursor {
                    segment: *next,
                    offset: 0,
                };
            }
            _ => return Ok((lines, at)),
        }
    }
}

/// In `path`, the offset just after the `k`-th newline from the end, or
/// how many newlines the file has if fewer (each whole line ends in one;
/// a line still being written has none).
fn after_newline_from_end(path: &Path, k: usize) -> Result<Result<u64, usize>, AuditError> {
    const CHUNK: u64 = 64 * 1024;
    let mut file = File::open(path).map_err(|e| failed(path, e))?;
    let mut end = file.metadata().map_err(|e| failed(path, e))?.len();
    let mut newlines = 0;
    let mut buf = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        buf.resize((end - start) as usize, 0);
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| failed(path, e))?;
        for (i, b) in buf.iter().enumerate().rev() {
            if *b == b'\n' {
                newlines += 1;
                if newlines == k {
                    return Ok(Ok(start + i as u64 + 1));
                }
            }
        }
        end = start;
    }
    Ok(Err(newlines))
}

/// The cursor from which the last `n` whole lines of the trail begin,
/// going back across segments as far as it takes.
pub(super) fn before_last(
    segments: &[(u64, PathBuf, bool)],
    n: usize,
) -> Result<Cursor, AuditError> {
    let mut wanted = n;
    for (seq, path, _) in segments.iter().rev() {
        // The (wanted+1)-th newline from the end closes the line before
        // the last `wanted` whole ones.
        match after_newline_from_end(path, wanted + 1)? {
            Ok(offset) => {
                return Ok(Cursor {
                    segment: *seq,
                    offset,
                });
            }
            Err(lines) if lines >= wanted => {
                return Ok(Cursor {
                    segment: *seq,
                    offset: 0,
                });
            }
            Err(lines) => wanted -= lines,
        }
    }
    Ok(segments.first().map_or(
        Cursor {
            segment: 1,
            offset: 0,
        },
        |(seq, _, _)| Cursor {
            segment: *seq,
            offset: 0,
        },
    ))
}
