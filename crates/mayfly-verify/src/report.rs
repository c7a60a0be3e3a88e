//! Reports of the requests tokens came with, sent to the broker
//! (`mayfly.v1.Requests/ReportRequests`, as the service's SVID) in
//! bounded batches off the request path, so that a task's trace shows
//! what each credential was used for at services that validate tokens
//! themselves. A request never waits for its report: one that cannot be
//! queued or sent is dropped and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mayfly_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::config::FeedConfig;
use crate::material::Material;

/// Reports waiting to be sent.
const QUEUE: usize = 8192;
/// Most reports in one batch (the broker's bound).
const BATCH: usize = 256;

/// The reports of one service.
#[derive(Debug, Clone)]
pub struct RequestReports {
    tx: mpsc::Sender<pb::ServedRequest>,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    reported: AtomicU64,
    lost: AtomicU64,
}

impl RequestReports {
    /// Starts sending to the broker the feed follows, as the feed's
    /// identity.
    pub(crate) fn start(feed: FeedConfig, trust: Material) -> Self {
        let counts = Arc::new(Counts::default());
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(feed, trust, rx, counts.clone()));
        Self { tx, counts }
    }

    /// Queues one report; a full queue drops it (counted).
    pub fn report(&self, served: pb::ServedRequest) {
        if self.tx.try_send(served).is_err() {
            self.counts.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reports the broker recorded so far.
    pub fn reported(&self) -> u64 {
        self.counts.reported.load(Ordering::Relaxed)
    }

    /// Reports lost so far (queue full, broker unreachable or refusing).
    pub fn lost(&self) -> u64 {
        self.counts.lost.load(Ordering::Relaxed)
    }
}

async fn connect(
    feed: &FeedConfig,
    trust: &Material,
) -> Result<pb::requests_client::RequestsClient<Channel>, String> {
    let (cert_pem, key_pem) = match trust.identity().map_err(|e| e.to_string())? {
        Some(id) => id,
        None => (feed.cert_pem.clone(), feed.key_pem.clone().into()),
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            trust.ca_pem().map_err(|e| e.to_string())?,
        ))
        .identity(Identity::from_pem(&cert_pem, &*key_pem));
    let channel = Channel::from_shared(feed.broker.clone())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(pb::requests_client::RequestsClient::new(channel))
}

async fn run(
    feed: FeedConfig,
    trust: Material,
    mut rx: mpsc::Receiver<pb::ServedRequest>,
    counts: Arc<Counts>,
) {
    let mut client = None;
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let n = batch.len() as u64;
        let requests = std::mem::take(&mut batch);
        if client.is_none() {
            match connect(&feed, &trust).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    counts.lost.fetch_add(n, Ordering::Relaxed);
                    tracing::warn!(error = %e, reports = n, "request reports not sent");
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else {
            continue;
        };
        let mut req = tonic::Request::new(pb::ReportRequestsRequest { requests });
        req.set_timeout(Duration::from_secs(5));
        match c.report_requests(req).await {
            Ok(_) => {
                counts.reported.fetch_add(n, Ordering::Relaxed);
            }
            Err(status) => {
                counts.lost.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(error = %status.message(), reports = n, "request reports refused");
                if status.code() == tonic::Code::Unavailable {
                    client = None;
                }
            }
        }
    }
}
