//! What the gateway tells about itself: the outcome of each forwarded
//! call, reported to the broker in bounded batches off the request path
//! (a call never waits for its report), and its counters on `/metrics`,
//! outcomes lost among them.

use std::sync::Arc;
use std::time::Duration;

use mayfly_proto::v1 as pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// Outcomes waiting to be reported; beyond that they are dropped and
/// counted.
const QUEUE: usize = 8192;

/// Most outcomes in one report (the broker's bound).
const BATCH: usize = 256;

/// How long one report may take.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    upstream: String,
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

/// The gateway's counters.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    upstream_errors: Family<UpstreamLabels, Counter>,
    reported: Counter,
    lost: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("mayfly_gateway");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "calls",
            "Tool calls decided, by upstream and decision (allowed, refused)",
            calls.clone(),
        );
        let upstream_errors = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Forwarded requests the upstream did not answer (unreachable, timed out)",
            upstream_errors.clone(),
        );
        let reported = Counter::default();
        registry.register(
            "outcomes_reported",
            "Call outcomes recorded by the broker",
            reported.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "outcomes_lost",
            "Call outcomes not recorded: the queue was full, or the broker refused or missed the report",
            lost.clone(),
        );
        Self {
            registry,
            calls,
            upstream_errors,
            reported,
            lost,
        }
    }

    /// Counts a decision.
    pub fn call(&self, upstream: &str, allowed: bool) {
        self.calls
            .get_or_create(&CallLabels {
                upstream: upstream.to_owned(),
                decision: if allowed { "allowed" } else { "refused" },
            })
            .inc();
    }

    /// Counts an upstream that did not answer.
    pub fn upstream_error(&self, upstream: &str) {
        self.upstream_errors
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .inc();
    }

    /// Outcomes lost so far.
    pub fn lost(&self) -> u64 {
        self.lost.get()
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Takes outcomes and reports them.
#[derive(Debug, Clone)]
pub struct Reporter {
    tx: mpsc::Sender<pb::CallOutcome>,
    metrics: Arc<Metrics>,
}

impl Reporter {
    /// Starts reporting over `channel` (the broker, as the gateway).
    pub fn start(channel: Channel) -> Self {
        let metrics = Arc::new(Metrics::new());
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(
            pb::gateway_client::GatewayClient::new(channel),
            rx,
            metrics.clone(),
        ));
        Self { tx, metrics }
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Queues `outcome`; a full queue drops it (counted).
    pub fn report(&self, outcome: pb::CallOutcome) {
        if self.tx.try_send(outcome).is_err() {
            self.metrics.lost.inc();
        }
    }
}

async fn run(
    mut client: pb::gateway_client::GatewayClient<Channel>,
    mut rx: mpsc::Receiver<pb::CallOutcome>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let n = batch.len() as u64;
        let mut req = tonic::Request::new(pb::ReportOutcomesRequest {
            outcomes: std::mem::take(&mut batch),
        });
        req.set_timeout(REPORT_TIMEOUT);
        match client.report_outcomes(req).await {
            Ok(_) => {
                metrics.reported.inc_by(n);
            }
            Err(status) => {
                metrics.lost.inc_by(n);
                tracing::warn!(
                    outcomes = n,
                    error = %status.message(),
                    "call outcomes not recorded"
                );
            }
        }
    }
}
