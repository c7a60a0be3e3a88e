//! Prometheus metrics, served as OpenMetrics text on `GET /metrics` (HTTPS
//! side port). Every label value comes from a fixed set (audit events,
//! gRPC methods of the API, status codes), so no caller can grow the
//! series; agent and task ids never become labels.
//!
//! - `mayfly_decisions_total{event}`: every audited decision
//!   (`token_issued`, `token_denied`, `task_started`, …), counted even when
//!   the trail is off.
//! - `mayfly_leases_ended_total{event}`: leases revoked or expired, by the
//!   decision that ended them.
//! - `mayfly_rpc_duration_seconds{method,code}`: gRPC handling time until
//!   the response headers (for streams: until the stream opens).
//! - `mayfly_active_leases`: leases recorded active in the store, read at
//!   scrape time.
//! - `mayfly_feed_watchers`: open revocation feed streams.
//! - `mayfly_audit_batch_records`, `mayfly_audit_write_failures_total`: the
//!   audit writer's group commit.
//! - `mayfly_connections{port,state}`: open connections per port
//!   (`grpc`, `https`), `authenticated` or `unauthenticated` (in the
//!   handshake, or without a valid client certificate).
//! - `mayfly_connections_refused_total{port,reason}`: connections closed
//!   at accept because a cap was reached (`connection_limit`: every open
//!   connection is authenticated; `source_limit`).
//! - `mayfly_connections_evicted_total{port,reason}`: unauthenticated
//!   connections closed to make room for a newcomer, by what they were
//!   doing (`idle`, `opening`, `in_flight`).
//! - `mayfly_connections_closed_total{port,reason}`: connections the broker
//!   closed (`idle`, `handshake_timeout`, `handshake_failed`,
//!   `refused_tokens`: too many refused workload tokens on one connection).
//! - `mayfly_build_info{version}`: always 1.
//! - `process_*`: the process's CPU, memory, file descriptors and start
//!   ([`process`]).
//!
//! A scraper that asks for `text/plain` (and not OpenMetrics) gets the
//! Prometheus text format instead ([`classic`]).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::codegen::http;

pub mod classic;
mod process;

/// Labels by audit event.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    event: &'static str,
}

/// Labels of one gRPC call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

/// Labels of the open-connections gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnStateLabels {
    /// `grpc` or `https`.
    port: &'static str,
    /// `authenticated` or `unauthenticated`.
    state: &'static str,
}

/// Labels of the refused and closed connection counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnReasonLabels {
    /// `grpc` or `https`.
    port: &'static str,
    /// Why, from a fixed set.
    reason: &'static str,
}

fn rpc_histogram() -> Histogram {
    // 100 µs to ~3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The broker's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The `process_*` metrics, which carry no prefix.
    process: Registry,
    decisions: Family<EventLabel, Counter>,
    leases_ended: Family<EventLabel, Counter>,
    rpc: Family<RpcLabels, Histogram, fn() -> Histogram>,
    /// Leases recorded active; set at scrape time.
    pub active_leases: Gauge,
    /// Open revocation feed streams.
    pub feed_watchers: Gauge,
    /// Records per audit batch.
    pub audit_batch: Histogram,
    /// Audit batches that could not be written.
    pub audit_failures: Counter,
    /// Open connections, by port and state.
    connections: Family<ConnStateLabels, Gauge>,
    /// Connections refused at accept, by port and reason.
    connections_refused: Family<ConnReasonLabels, Counter>,
    /// Connections the broker closed, by port and reason.
    connections_closed: Family<ConnReasonLabels, Counter>,
    /// Unauthenticated connections evicted for a newcomer, by port and
    /// what they were doing.
    connections_evicted: Family<ConnReasonLabels, Counter>,
    /// Database logins held and not yet confirmed dropped; set each pass.
    pub logins_held: Gauge,
    /// Attempts to drop a database login that failed (retried).
    pub login_drop_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mayfly");
        let decisions = Family::<EventLabel, Counter>::default();
        registry.register(
            "decisions",
            "Audited decisions, by event",
            decisions.clone(),
        );
        let leases_ended = Family::<EventLabel, Counter>::default();
        registry.register(
            "leases_ended",
            "Leases revoked or expired, by the decision that ended them",
            leases_ended.clone(),
        );
        let rpc = Family::<RpcLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            rpc_histogram as fn() -> Histogram,
        );
        registry.register(
            "rpc_duration_seconds",
            "gRPC handling time until the response headers, by method and status code",
            rpc.clone(),
        );
        let active_leases = Gauge::default();
        registry.register(
            "active_leases",
            "Leases recorded active in the store (tasks and credentials)",
            active_leases.clone(),
        );
        let feed_watchers = Gauge::default();
        registry.register(
            "feed_watchers",
            "Open revocation feed streams",
            feed_watchers.clone(),
        );
        let audit_batch = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "audit_batch_records",
            "Records per audit trail write (group commit)",
            audit_batch.clone(),
        );
        let audit_failures = Counter::default();
        registry.register(
            "audit_write_failures",
            "Audit trail writes that failed (their requests failed too)",
            audit_failures.clone(),
        );
        let connections = Family::<ConnStateLabels, Gauge>::default();
        registry.register(
            "connections",
            "Open connections, by port and state (authenticated, unauthenticated)",
            connections.clone(),
        );
        let connections_refused = Family::<ConnReasonLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed at accept because a cap was reached, by port and reason",
            connections_refused.clone(),
        );
        let connections_closed = Family::<ConnReasonLabels, Counter>::default();
        registry.register(
            "connections_closed",
            "Connections the broker closed, by port and reason (idle, handshake_timeout, handshake_failed, refused_tokens)",
            connections_closed.clone(),
        );
        let connections_evicted = Family::<ConnReasonLabels, Counter>::default();
        registry.register(
            "connections_evicted",
            "Unauthenticated connections closed to make room for a newcomer, by port and what they were doing (idle, opening, in_flight)",
            connections_evicted.clone(),
        );
        let logins_held = Gauge::default();
        registry.register(
            "database_logins_held",
            "Database logins that may exist and are not yet confirmed dropped",
            logins_held.clone(),
        );
        let login_drop_failures = Counter::default();
        registry.register(
            "database_login_drop_failures",
            "Attempts to drop a database login that failed (each is retried with backoff)",
            login_drop_failures.clone(),
        );
        registry.register(
            "build",
            "The broker's build",
            prometheus_client::metrics::info::Info::new(vec![(
                "version",
                env!("CARGO_PKG_VERSION"),
            )]),
        );
        let mut process = Registry::default();
        process.register_collector(Box::new(process::ProcessCollector::new()));
        Self {
            registry,
            process,
            logins_held,
            login_drop_failures,
            decisions,
            leases_ended,
            rpc,
            active_leases,
            feed_watchers,
            audit_batch,
            audit_failures,
            connections,
            connections_refused,
            connections_closed,
            connections_evicted,
        }
    }

    /// The open-connections gauge of `port` in `state`.
    pub fn connections(&self, port: &'static str, state: &'static str) -> Gauge {
        self.connections
            .get_or_create(&ConnStateLabels { port, state })
            .clone()
    }

    /// Counts a connection refused at accept.
    pub fn connection_refused(&self, port: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ConnReasonLabels { port, reason })
            .inc();
    }

    /// Counts an unauthenticated connection evicted for a newcomer.
    pub fn connection_evicted(&self, port: &'static str, reason: &'static str) {
        self.connections_evicted
            .get_or_create(&ConnReasonLabels { port, reason })
            .inc();
    }

    /// Counts a connection the broker closed.
    pub fn connection_closed(&self, port: &'static str, reason: &'static str) {
        self.connections_closed
            .get_or_create(&ConnReasonLabels { port, reason })
            .inc();
    }

    /// Counts a decision (named as its audit event) that ended `ended`
    /// leases.
    pub fn decided(&self, event: &'static str, ended: u64) {
        let label = EventLabel { event };
        self.decisions.get_or_create(&label).inc();
        if ended > 0 {
            self.leases_ended.get_or_create(&label).inc_by(ended);
        }
    }

    /// The registries as OpenMetrics text.
    pub fn encode(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &self.process);
        let _ = encode_eof(&mut out);
        out
    }

    fn observe_rpc(&self, method: &'static str, code: &'static str, secs: f64) {
        self.rpc
            .get_or_create(&RpcLabels { method, code })
            .observe(secs);
    }
}

/// The gRPC methods this broker serves (`/package.Service/Method`), from
/// the compiled-in descriptor sets; anything else is labelled `other`.
fn known_methods() -> &'static HashSet<String> {
    static METHODS: OnceLock<HashSet<String>> = OnceLock::new();
    METHODS.get_or_init(|| {
        let mut out = HashSet::new();
        for set in [
            mayfly_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(fds) = <prost_types::FileDescriptorSet as prost::Message>::decode(set) else {
                continue;
            };
            for file in fds.file {
                for svc in &file.service {
                    for m in &svc.method {
                        out.insert(format!("/{}.{}/{}", file.package(), svc.name(), m.name()));
                    }
                }
            }
        }
        out
    })
}

fn method_label(path: &str) -> &'static str {
    match known_methods().get(path) {
        Some(m) => m.as_str(),
        None if path.starts_with("/grpc.reflection.") => "reflection",
        None => "other",
    }
}

/// `grpc-status` of a response as a code name; a response without one in
/// its headers carries it in the trailers, which tonic sends only on
/// success.
fn code_label(headers: &http::HeaderMap) -> &'static str {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from);
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Times every gRPC call (a tower layer for the tonic server).
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// See [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let start = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => code_label(r.headers()),
                Err(_) => "INTERNAL",
            };
            metrics.observe_rpc(method, code, start.elapsed().as_secs_f64());
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_methods_become_labels() {
        assert_eq!(
            method_label("/mayfly.v1.Broker/IssueToken"),
            "/mayfly.v1.Broker/IssueToken"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(method_label("/mayfly.v1.Broker/Made-Up-123"), "other");
        assert_eq!(
            method_label("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            "reflection"
        );
        let mut h = http::HeaderMap::new();
        assert_eq!(code_label(&h), "OK");
        h.insert("grpc-status", http::HeaderValue::from_static("7"));
        assert_eq!(code_label(&h), "PERMISSION_DENIED");
    }
}
