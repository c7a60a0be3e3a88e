//! Connections, the same way on both ports: admission at accept, the TLS
//! handshake within a deadline, authentication once per connection, HTTP
//! served by hyper with bounded headers, an idle timeout, and a graceful
//! close (HTTP/2 GOAWAY) on idle or shutdown.
//!
//! Admission ([`Gate`], in `admission.rs`) counts three things per port:
//! every open connection (`max`), the unauthenticated ones
//! (`max_unauthenticated`), and the unauthenticated ones of each source
//! (`max_unauthenticated_per_source`; a source is an IPv4 address, an
//! IPv4-mapped IPv6 address counting as its IPv4 address, or an IPv6
//! prefix of `ipv6_source_prefix` bits). A connection is unauthenticated
//! from accept until its handshake yields a valid client SVID, or until a
//! request on it is the first to prove a caller by a workload token
//! ([`PeerInfo::token_outcome`]); then it leaves the last two counts and
//! can no longer be evicted.
//!
//! A source at its own cap is refused at accept, before any TLS work. A
//! newcomer that finds the unauthenticated pool (or the port) full is not
//! refused: one unauthenticated connection is evicted (closed at once) to
//! make room, chosen from the source that would hold the most of them
//! counting the newcomer; of that source's connections, the longest idle
//! (handshake done, nothing in flight) goes first, then the oldest still
//! in its handshake, then the oldest with a request in flight. Only when
//! every open connection is authenticated (`max` of them) is a newcomer
//! refused. Refusals and evictions are counted on `/metrics`.
//!
//! Why an agent (or a validator fetching JWKS) always gets through: its
//! connection is admitted at once, evicting another. It can itself be
//! evicted, before its handshake or first request completes, only while
//! its source holds at least as many unauthenticated connections as every
//! other source; a flood from fewer than `max_unauthenticated` sources
//! (IPv6 counted by prefix) always leaves a source holding more than one,
//! which pays first. From more sources than that, the flood still has to
//! evict everything older first: the idle connections, then every
//! handshake that began before the agent's, so a handshake lasting `d`
//! survives unless `max_unauthenticated` connections are opened within `d`.
//! Once authenticated it leaves the pool, and `max - max_unauthenticated`
//! places are kept for authenticated callers.
//!
//! A connection on which [`MAX_REFUSED_TOKENS`] workload tokens were
//! refused is closed, as one whose client only guesses.
//!
//! A connection is idle while no request is in flight (a streaming
//! response such as the revocation feed counts as in flight until it
//! ends); after `idle_timeout` (`unauthenticated_idle_timeout` while it
//! is unauthenticated) it is closed gracefully. HTTP/2 keepalive
//! pings find peers that vanished without closing.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use mayfly_core::limits::{MAX_HEADER_BYTES, MAX_STREAMS};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tonic::codegen::http::{Request, Response};

use crate::identity::Authenticator;
use crate::shutdown::Shutdown;

mod admission;

pub use admission::Gate;
use admission::Slot;

/// What the accept loop learned about a connection; each port's service
/// gets it (in every request's extensions, on both ports).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The authenticated caller, or why the peer is not one.
    pub identity: Arc<Result<crate::identity::Caller, crate::identity::AuthError>>,
    /// The connection's own state, shared by all its requests.
    connection: Arc<ConnectionEvents>,
}

impl PeerInfo {
    /// What the handshake learned about the peer of a new connection.
    fn new(identity: Result<crate::identity::Caller, crate::identity::AuthError>) -> Self {
        Self {
            identity: Arc::new(identity),
            connection: Arc::default(),
        }
    }

    /// The same connection, with the caller one request proved.
    pub fn with_identity(
        &self,
        identity: Result<crate::identity::Caller, crate::identity::AuthError>,
    ) -> Self {
        Self {
            identity: Arc::new(identity),
            connection: self.connection.clone(),
        }
    }

    /// What a workload token presented on this connection came to. One
    /// that proved a caller makes the connection count as authenticated
    /// from now on (it leaves the unauthenticated caps and gets the longer
    /// idle timeout). One refused counts: past [`MAX_REFUSED_TOKENS`] the
    /// connection is closed, so a client sending made-up tokens pays a new
    /// handshake (and a place under the anonymous caps) for every few
    /// signature checks. One that could not be checked now counts for
    /// neither.
    pub fn token_outcome<T>(&self, outcome: &Result<T, crate::federation::TokenError>) {
        let events = &self.connection;
        match outcome {
            Ok(_) => {
                if !events.authenticated.swap(true, Ordering::AcqRel) {
                    events.promote.notify_one();
                }
            }
            Err(e) if e.is_unavailable() => {}
            Err(_) => {
                if events.refused.fetch_add(1, Ordering::AcqRel) + 1 == MAX_REFUSED_TOKENS {
                    events.close.notify_one();
                }
            }
        }
    }
}

/// Workload tokens a connection may present that are refused before it is
/// closed.
pub const MAX_REFUSED_TOKENS: usize = 16;

/// What the requests of a connection tell it: a workload token proved a
/// caller (once), or too many were refused.
#[derive(Debug, Default)]
struct ConnectionEvents {
    authenticated: std::sync::atomic::AtomicBool,
    promote: tokio::sync::Notify,
    refused: AtomicUsize,
    close: tokio::sync::Notify,
}

/// How long a connection closing at shutdown may take to finish what it
/// has in flight before it is dropped.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an idle connection (nothing in flight) may take to close
/// after its GOAWAY before it is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// An HTTP/1 client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive: a ping after this much silence...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...must be answered within this, or the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which port, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The mTLS gRPC port: HTTP/2 only.
    Grpc,
    /// The HTTPS side port: HTTP/1.1 and HTTP/2.
    Https,
}

impl Port {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Https => "https",
        }
    }
}

/// When a connection last finished a request, and how many are in flight.
#[derive(Debug)]
struct Activity {
    /// Requests whose response has not been sent to the end.
    in_flight: AtomicUsize,
    /// When the last one ended, in ms after `since`.
    last_ms: AtomicU64,
    since: Instant,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            since: Instant::now(),
        })
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Marks now as the end of the last request (the handshake's end, at
    /// first).
    fn touch(&self) {
        self.last_ms.store(self.elapsed_ms(), Ordering::Release);
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Resolves once nothing has been in flight for `timeout`.
    async fn idle(&self, timeout: Duration) {
        let limit = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            let quiet = self
                .elapsed_ms()
                .saturating_sub(self.last_ms.load(Ordering::Acquire));
            let wait = if self.in_flight.load(Ordering::Acquire) > 0 {
                limit
            } else if quiet >= limit {
                return;
            } else {
                limit - quiet
            };
            tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
        }
    }
}

/// One request in flight; ends when dropped (with its response body).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_ms.store(a.elapsed_ms(), Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it is dropped.
struct TrackedBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts the requests of one connection in and out.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> tower::Service<Request<Incoming>> for Tracked<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.begin();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(|inner| TrackedBody {
                inner,
                _in_flight: in_flight,
            }))
        })
    }
}

/// One port: accepts until `stop`, then drains every connection within
/// [`DRAIN_TIMEOUT`]. `service` makes the request service of a connection
/// from what authentication learned about its peer.
pub async fn serve<F, S, B>(
    listener: TcpListener,
    gate: Arc<Gate>,
    acceptor: TlsAcceptor,
    auth: Authenticator,
    service: F,
    mut stop: Shutdown,
) where
    F: Fn(PeerInfo) -> S + Clone + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if gate.port == Port::Grpc {
        http = http.http2_only();
    }
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let mut conns = JoinSet::new();
    while let Some((tcp, remote)) = next_connection(&listener, &mut stop).await {
        let slot = match gate.admit(remote.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                gate.metrics
                    .connection_refused(gate.port.as_str(), refusal.as_str());
                tracing::debug!(%remote, port = gate.port.as_str(), reason = refusal.as_str(), "connection refused");
                continue;
            }
        };
        let conn = Conn {
            gate: gate.clone(),
            slot,
            remote,
        };
        conns.spawn(conn.run(
            tcp,
            acceptor.clone(),
            auth.clone(),
            service.clone(),
            http.clone(),
            stop.clone(),
        ));
        // Reap finished connection tasks as we go.
        while conns.try_join_next().is_some() {}
    }
    let drained = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(1), drained).await;
    // Whatever did not drain is closed, so nothing holds the store after
    // `serve` returns.
    conns.shutdown().await;
}

/// One accepted connection.
struct Conn {
    gate: Arc<Gate>,
    slot: Slot,
    remote: SocketAddr,
}

impl Conn {
    async fn run<F, S, B>(
        mut self,
        tcp: TcpStream,
        acceptor: TlsAcceptor,
        auth: Authenticator,
        service: F,
        http: hyper_util::server::conn::auto::Builder<TokioExecutor>,
        mut stop: Shutdown,
    ) where
        F: Fn(PeerInfo) -> S,
        S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (port, remote, limits) = (self.gate.port.as_str(), self.remote, &self.gate.limits);
        let evicted = self.slot.evicted.clone();
        let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
        let tls = tokio::select! {
            r = handshake => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.gate
                        .metrics
                        .connection_closed(port, "handshake_failed");
                    tracing::debug!(%remote, port, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    self.gate
                        .metrics
                        .connection_closed(port, "handshake_timeout");
                    tracing::debug!(%remote, port, "TLS handshake timed out");
                    return;
                }
            },
            // Counted by the admission that evicted it.
            () = evicted.notified() => {
                tracing::debug!(%remote, port, "evicted in its TLS handshake");
                return;
            }
        };
        let identity = auth.authenticate(tls.get_ref().1.peer_certificates());
        self.slot.established();
        let mut idle = match &identity {
            Ok(c) => {
                if !self.slot.authenticated() {
                    tracing::debug!(%remote, port, "evicted as its handshake completed");
                    return;
                }
                tracing::debug!(%remote, port, caller = %c.id, "authenticated connection");
                limits.idle_timeout
            }
            Err(e) => {
                tracing::debug!(%remote, port, error = %e, "unauthenticated connection");
                limits.unauthenticated_idle_timeout
            }
        };
        let peer = PeerInfo::new(identity);
        let events = peer.connection.clone();
        let mut promoted = peer.identity.is_ok();
        let activity = self.slot.activity.clone();
        let svc = Tracked {
            inner: service(peer),
            activity: activity.clone(),
        };
        let conn = http.serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc));
        tokio::pin!(conn);
        let mut deadline = None;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%remote, port, error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = events.promote.notified(), if !promoted => {
                    if !self.slot.authenticated() {
                        tracing::debug!(%remote, port, "evicted before a workload token proved a caller");
                        return;
                    }
                    promoted = true;
                    tracing::debug!(%remote, port, "connection authenticated by a workload token");
                    idle = limits.idle_timeout;
                }
                // Counted by the admission that evicted it. Closed at once:
                // its place is already another connection's.
                () = evicted.notified(), if !promoted => {
                    tracing::debug!(%remote, port, "evicted unauthenticated connection");
                    return;
                }
                () = events.close.notified(), if deadline.is_none() => {
                    self.gate.metrics.connection_closed(port, "refused_tokens");
                    tracing::debug!(%remote, port, "closing a connection that presented too many refused workload tokens");
                    conn.as_mut().graceful_shutdown();
                    deadline = Some(Instant::now() + IDLE_CLOSE_GRACE);
                }
                () = activity.idle(idle), if deadline.is_none() => {
                    self.gate.metrics.connection_closed(port, "idle");
                    tracing::debug!(%remote, port, "closing idle connection");
                    conn.as_mut().graceful_shutdown();
                    deadline = Some(Instant::now() + IDLE_CLOSE_GRACE);
                }
                () = stop.wait(), if deadline.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    deadline = Some(Instant::now() + DRAIN_TIMEOUT);
                }
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    tracing::debug!(%remote, port, "connection did not close in time; dropped");
                    return;
                }
            }
        }
    }
}

/// The next TCP connection, or `None` once `stop` is set. Accept errors
/// (such as running out of file descriptors) are logged and retried after a
/// pause rather than ending the server.
async fn next_connection(
    listener: &TcpListener,
    stop: &mut Shutdown,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, remote)) => {
                    let _ = tcp.set_nodelay(true);
                    return Some((tcp, remote));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = stop.wait() => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_is_idle_only_with_nothing_in_flight() {
        let a = Activity::new();
        let t = Duration::from_millis(50);
        let busy = a.begin();
        let idle = tokio::time::timeout(Duration::from_millis(300), a.idle(t));
        assert!(idle.await.is_err(), "a request in flight keeps it busy");
        drop(busy);
        let start = Instant::now();
        a.idle(t).await;
        assert!(
            start.elapsed() >= t,
            "idle only a whole timeout after the last request"
        );
    }
}
