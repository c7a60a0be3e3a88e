//! The broker's one stop signal: a `watch` flag every long-running task
//! follows.

use tokio::sync::watch;

/// Resolves once the stop flag is set (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
