//! `<trail>.head`: the head this broker last wrote, kept beside the trail
//! so that a trail replaced, truncated or rewritten while the broker was
//! down is noticed when it starts. One fixed-size line, rewritten in place
//! after every batch (no fsync of its own: after a power loss it may be a
//! batch behind the trail, never ahead, and a trail ahead of its head is
//! checked to still hold the head's record). The file is also the trail's
//! lock: one broker per trail.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audit::{AuditError, Head};
use crate::cause::Cause;

/// The line is padded to this, so every write covers the last one.
const WIDTH: usize = 128;

#[derive(Serialize, Deserialize)]
struct Stored {
    seq: u64,
    sha256: String,
}

/// Why the head file could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub(super) enum HeadError {
    /// Opening, reading or writing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The head file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// Another process holds the trail's lock.
    #[error(
        "{}: {source}: another broker writes this trail; give each its own [audit] path, or use \
         sink = \"redis\"",
        trail.display()
    )]
    Locked {
        /// The trail (not its head file): what the operator configured.
        trail: PathBuf,
        /// Why the lock was not had.
        source: std::fs::TryLockError,
    },
    /// The file holds something other than a head.
    #[error(
        "{}: not a trail head ({source}); it is rewritten after every batch and never edited",
        path.display()
    )]
    NotAHead {
        /// The head file.
        path: PathBuf,
        /// Why it does not parse.
        source: serde_json::Error,
    },
    /// The head could not be serialised.
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
}

impl From<HeadError> for AuditError {
    fn from(e: HeadError) -> Self {
        Self::Failed(Cause::of(e))
    }
}

/// The open, locked head file.
#[derive(Debug)]
pub(super) struct HeadFile {
    file: File,
    path: PathBuf,
}

impl HeadFile {
    /// The head file of `trail` (`<trail>.head`).
    pub(super) fn path_of(trail: &Path) -> PathBuf {
        let mut name = trail.as_os_str().to_owned();
        name.push(".head");
        PathBuf::from(name)
    }

    /// Opens (or creates, 0600) and locks the head file of `trail`.
    pub(super) fn open(trail: &Path) -> Result<Self, HeadError> {
        let path = Self::path_of(trail);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| HeadError::Io {
                path: path.clone(),
                source,
            })?;
        // Two writers would fork the chain.
        file.try_lock().map_err(|source| HeadError::Locked {
            trail: trail.to_owned(),
            source,
        })?;
        Ok(Self { file, path })
    }

    /// Where it is.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The stored head; `None` for a new (empty) file.
    pub(super) fn read(&mut self) -> Result<Option<Head>, HeadError> {
        let mut text = String::new();
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.read_to_string(&mut text))
            .map_err(|source| self.io(source))?;
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        let stored: Stored = serde_json::from_str(text).map_err(|source| HeadError::NotAHead {
            path: self.path.clone(),
            source,
        })?;
        Ok(Some(Head {
            seq: stored.seq,
            hash: stored.sha256,
        }))
    }

    /// Replaces the stored head with `head`.
    pub(super) fn write(&self, head: &Head) -> Result<(), HeadError> {
        let mut line = serde_json::to_string(&Stored {
            seq: head.seq,
            sha256: head.hash.clone(),
        })
        .map_err(HeadError::Encode)?;
        let pad = WIDTH.saturating_sub(line.len() + 1);
        line.extend(std::iter::repeat_n(' ', pad));
        line.push('\n');
        self.file
            .write_all_at(line.as_bytes(), 0)
            .map_err(|source| self.io(source))
    }

    fn io(&self, source: std::io::Error) -> HeadError {
        HeadError::Io {
            path: self.path.clone(),
            source,
        }
    }
}
