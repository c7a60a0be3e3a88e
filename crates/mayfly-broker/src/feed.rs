//! The revocation feed's live side. One [`FeedHub`] per broker follows the
//! store's revocation log (woken at once by local revocations, and polling
//! for those made through other replicas) and broadcasts new events to every
//! watcher. Watchers replay from the store first, so a lagging or
//! reconnecting watcher misses nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, broadcast};

use crate::shutdown::{Shutdown, Trigger};

use crate::store::{RevocationEvent, RevocationLog};

/// Events read per store call.
pub const BATCH: usize = 1000;
/// Events a slow watcher may fall behind before it re-reads the store.
const CHANNEL: usize = 4096;

/// Follows the store's revocations and fans them out.
#[derive(Debug)]
pub struct FeedHub {
    store: Arc<dyn RevocationLog>,
    /// New events, in cursor order.
    tx: broadcast::Sender<Arc<RevocationEvent>>,
    /// Poked after every local revocation.
    poke: Arc<Notify>,
    /// How often to look for revocations made through other replicas.
    poll: Duration,
    /// Set when the broker stops, so watcher streams end with it.
    closed: Trigger,
}

impl FeedHub {
    /// A hub over `store`; `poke` is notified by the service after each
    /// revocation.
    pub fn new(store: Arc<dyn RevocationLog>, poke: Arc<Notify>, poll: Duration) -> Arc<Self> {
        let (tx, _) = broadcast::channel(CHANNEL);
        Arc::new(Self {
            store,
            tx,
            poke,
            poll,
            closed: crate::shutdown::channel().0,
        })
    }

    /// A receiver of live events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<RevocationEvent>> {
        self.tx.subscribe()
    }

    /// Resolves when the broker stops.
    pub async fn closed(&self) {
        self.closed.subscribe().wait().await;
    }

    /// The log the feed is read from.
    pub fn store(&self) -> &Arc<dyn RevocationLog> {
        &self.store
    }

    /// Follows the store until `stop`, then ends every watcher stream.
    pub async fn run(self: Arc<Self>, stop: Shutdown) {
        self.follow_store(stop).await;
        self.closed.fire();
    }

    async fn follow_store(&self, mut stop: Shutdown) {
        let mut cursor = loop {
            match self.store.feed_head().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "revocation feed: cannot read the store yet");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = stop.wait() => return,
                    }
                }
            }
        };
        loop {
            match self.store.revocations_since(cursor, BATCH).await {
                Ok(events) => {
                    let full = events.len() == BATCH;
                    for e in events {
                        cursor = e.cursor;
                        // No receivers is fine: nobody is watching.
                        let _ = self.tx.send(Arc::new(e));
                    }
                    if full {
                        continue;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "revocation feed: store read failed"),
            }
            tokio::select! {
                () = self.poke.notified() => {}
                _ = tokio::time::sleep(self.poll) => {}
                () = stop.wait() => return,
            }
        }
    }
}
