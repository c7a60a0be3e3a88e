//! `mayfly.v1.Revocations`: the feed validators follow.

use std::sync::Arc;
use std::time::Duration;

use mayfly_core::{SpiffeIdPattern, Timestamp};
use mayfly_proto::v1 as pb;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{caller, lease_kind_to_proto, reason_to_proto, timestamp};
use crate::cause::Cause;
use crate::error::BrokerError;
use crate::feed::{BATCH, FeedHub};
use crate::store::{RevocationEvent, StoreError};

/// The Revocations service.
#[derive(Debug, Clone)]
pub struct RevocationsApi {
    hub: Arc<FeedHub>,
    /// Who may watch.
    watchers: Vec<SpiffeIdPattern>,
    /// How often a quiet feed says it is alive.
    heartbeat: Duration,
    /// Open streams, for `/metrics`.
    open: Gauge,
}

impl RevocationsApi {
    /// The service over `hub`; `open` counts the streams.
    pub fn new(
        hub: Arc<FeedHub>,
        watchers: Vec<SpiffeIdPattern>,
        heartbeat: Duration,
        open: Gauge,
    ) -> Self {
        Self {
            hub,
            watchers,
            heartbeat,
            open,
        }
    }
}

/// Counts one open stream while it lives.
struct Watching(Gauge);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn to_proto(e: &RevocationEvent) -> pb::RevocationEvent {
    pb::RevocationEvent {
        cursor: e.cursor,
        heartbeat: false,
        lease_id: e.lease_id.to_string(),
        kind: e
            .kind
            .map_or(pb::LeaseKind::Unspecified, lease_kind_to_proto)
            .into(),
        serial: e.serial.clone().unwrap_or_default(),
        task_id: e.task_id.to_string(),
        reason: reason_to_proto(e.revocation.reason).into(),
        revoked_at: Some(timestamp(e.revocation.at)),
        expires_at: Some(timestamp(e.expires_at)),
        sent_at: None,
    }
}

type Out = mpsc::Sender<Result<pb::RevocationEvent, Status>>;

/// Sends every stored event after `cursor` whose credential has not expired;
/// returns the new cursor, or `None` once the watcher is gone.
async fn replay(hub: &FeedHub, mut cursor: u64, out: &Out) -> Result<Option<u64>, StoreError> {
    loop {
        let events = hub.store().revocations_since(cursor, BATCH).await?;
        let now = Timestamp::now();
        for e in &events {
            cursor = e.cursor;
            if e.expires_at > now && out.send(Ok(to_proto(e))).await.is_err() {
                return Ok(None);
            }
        }
        if events.len() < BATCH {
            return Ok(Some(cursor));
        }
    }
}

async fn follow(hub: Arc<FeedHub>, from: u64, heartbeat: Duration, out: Out) {
    // Subscribe before replaying, so nothing falls between the two.
    let mut live = hub.subscribe();
    let mut cursor = from;
    let mut replaying = true;
    let mut beat = tokio::time::interval(heartbeat);
    loop {
        if replaying {
            match replay(&hub, cursor, &out).await {
                Ok(Some(c)) => {
                    cursor = c;
                    replaying = false;
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = out
                        .send(Err(BrokerError::FeedUnavailable(Cause::of(e)).into()))
                        .await;
                    return;
                }
            }
        }
        tokio::select! {
            r = live.recv() => match r {
                Ok(e) if e.cursor > cursor => {
                    cursor = e.cursor;
                    if out.send(Ok(to_proto(&e))).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                // Fell behind the broadcast: read the gap from the store.
                Err(broadcast::error::RecvError::Lagged(_)) => replaying = true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = beat.tick() => {
                let hb = pb::RevocationEvent {
                    cursor,
                    heartbeat: true,
                    sent_at: Some(timestamp(Timestamp::now())),
                    ..Default::default()
                };
                if out.send(Ok(hb)).await.is_err() {
                    return;
                }
            }
            () = out.closed() => return,
            () = hub.closed() => return,
        }
    }
}

#[tonic::async_trait]
impl pb::revocations_server::Revocations for RevocationsApi {
    type WatchRevocationsStream = ReceiverStream<Result<pb::RevocationEvent, Status>>;

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let who = caller(&request)?;
        if !self.watchers.iter().any(|p| p.matches(&who.id)) {
            return Err(BrokerError::NotWatcher(who.id).into());
        }
        let (tx, rx) = mpsc::channel(256);
        self.open.inc();
        let watching = Watching(self.open.clone());
        let (hub, from, heartbeat) = (
            self.hub.clone(),
            request.get_ref().from_cursor,
            self.heartbeat,
        );
        tokio::spawn(async move {
            follow(hub, from, heartbeat, tx).await;
            drop(watching);
        });
        tracing::debug!(watcher = %who.id, from = request.get_ref().from_cursor, "feed watcher connected");
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
