//! Moves expired leases to `expired` and removes records past retention, on
//! a fixed interval. Reads never wait for it: a lease past its expiry already
//! reads as expired; the reaper makes that durable and keeps the store small.

use std::sync::Arc;
use std::time::Duration;

use mayfly_core::{SpiffeId, Timestamp};

use crate::audit::{AuditRecord, Event};
use crate::recorder::Recorder;
use crate::shutdown::Shutdown;
use crate::store::Upkeep;

/// Most leases one store call handles, so a backlog is worked off in
/// bounded transactions.
const BATCH: usize = 1000;

/// Runs until `shutdown` turns true. Each expiry is recorded in the audit
/// trail as `lease_expired`, by `broker`.
pub async fn run(
    store: Arc<dyn Upkeep>,
    audit: Recorder,
    broker: SpiffeId,
    interval: Duration,
    retention: Duration,
    mut shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            () = shutdown.wait() => return,
        }
        loop {
            match store.reap(Timestamp::now(), retention, BATCH).await {
                Ok(out) => {
                    // Handed to the writer together, so they share batches.
                    let mut records = tokio::task::JoinSet::new();
                    for lease in &out.expired {
                        tracing::debug!(target: "mayfly::decision", event = "lease_expired", lease_id = %lease.id);
                        // The task and owner, so the record stands alone
                        // (`audit tail --task`).
                        let mut r = AuditRecord::new(Event::LeaseExpired, &broker)
                            .lease(&lease.id)
                            .task_id(&lease.task_id);
                        r.agent = Some(lease.agent.to_string());
                        let audit = audit.clone();
                        records.spawn(async move { audit.record(r).await });
                    }
                    while let Some(outcome) = records.join_next().await {
                        if let Ok(Err(e)) = outcome {
                            tracing::error!(error = %e, "expiry not recorded in the audit trail");
                        }
                    }
                    if !out.expired.is_empty() || out.purged > 0 {
                        tracing::info!(
                            expired = out.expired.len(),
                            purged = out.purged,
                            "reaper pass"
                        );
                    }
                    if !out.more {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reaper pass failed; retrying next interval");
                    break;
                }
            }
        }
    }
}
