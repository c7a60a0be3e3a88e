//! When a file watcher looks again: every `interval`, at once on SIGHUP,
//! never after the stop signal. The policy, TLS, signing-key and CA
//! watchers share it.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::Duration;

use crate::shutdown::Shutdown;

/// What a watcher waits on between looks.
pub(crate) struct Looks {
    interval: Duration,
    stop: Shutdown,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

/// Why a watcher looks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Look {
    /// The interval passed: reload if the files changed.
    Due,
    /// SIGHUP: reload whether or not they changed.
    Forced,
}

impl Looks {
    /// Looks every `interval`, and on SIGHUP, until `stop`.
    pub(crate) fn new(interval: Duration, stop: Shutdown) -> Self {
        Self {
            interval,
            stop,
            #[cfg(unix)]
            hangup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// The next look, or `None` once the broker stops.
    pub(crate) async fn next(&mut self) -> Option<Look> {
        #[cfg(unix)]
        let hangup = async {
            match self.hangup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        tokio::select! {
            () = hangup => Some(Look::Forced),
            _ = tokio::time::sleep(self.interval) => Some(Look::Due),
            () = self.stop.wait() => None,
        }
    }
}

/// A hash of the file's bytes (following symlinks, so a Kubernetes
/// ConfigMap's or Secret's `..data` swap is a change); `None` if it cannot
/// be read. What a watcher compares between looks.
pub(crate) fn file_hash(path: &Path) -> Option<u64> {
    std::fs::read(path).ok().map(|bytes| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        h.finish()
    })
}
